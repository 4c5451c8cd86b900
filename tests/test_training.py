"""Frozen-base training: optax freezing, and adapter-only train steps on real data.

The base is a randomly initialised transformer, taken as is and frozen; adapters after each
block's MLP learn scikit-learn's bundled 8x8 digits (8 tokens of 8 pixels, 10 classes).
"""

import gc
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _data import digits
from _frontends import assert_trees_equal
from flax import nnx

import jadapters
from jadapters import AdapterParam, LinearAdapterConfig, ResidualAddStrategy
from jadapters.demo.models import LinenTransformer, NNXConvNet, NNXTransformer

N, STEPS, LR = 512, 50, 2e-2
# one transformation object for every NNX step: it is static in nnx.Optimizer's graph, so a
# new optax.adam(...) per test would mean a new compilation of the same step
NNX_TX = optax.adam(LR)
MODEL = dict(num_classes=10, d_model=16, num_layers=1, num_heads=2, mlp_dim=32, max_len=8)
# dropout and stochastic depth need the PRNG keys threaded through; l2 adds an aux loss
CFG = LinearAdapterConfig(
    dim=8, dropout=0.1, adapter_strategy=ResidualAddStrategy(stochastic_depth=0.1, l2_lambda=1e-3)
)


@pytest.fixture(scope="module")
def data():
    x, y = digits(N)
    return jnp.asarray(x), jnp.asarray(y)


def _ce(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _copy(tree):
    return jax.tree.map(lambda a: np.array(a, copy=True), tree)


def _fresh(model):
    """A copy of an NNX model with its own buffers (the train step donates them)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a.copy(), state))


def _noise_like(tree, seed=1, scale=0.5):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), a.dtype), tree)


def _shapes(tree):
    return sorted(tuple(np.shape(x)) for x in jax.tree.leaves(tree))


# --- optax: freezing the base ---------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    """A tiny Linen model with enabled 'a' and disabled 'b' (noisy weights), and the full
    gradient of a loss with respect to *all* its variables, base included."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 5)), jnp.float32)
    model = nn.Sequential([nn.Dense(6), nn.gelu, nn.Dense(3)])
    adapted = (
        jadapters.adapter_transform(model, "layers_0")
        .add_adapter("a", LinearAdapterConfig(dim=2))
        .add_adapter("b", LinearAdapterConfig(dim=2))
        .set_enabled_adapters("b", enabled=False)
    )
    variables = jax.jit(adapted.init)(jax.random.key(0), x)  # one compile, not many eager ones
    variables = {**variables, "adapters": _noise_like(variables["adapters"])}
    grads = jax.jit(jax.grad(lambda v: jnp.mean(adapted.apply(v, x) ** 2)))(variables)
    return adapted, variables, grads


def _owner(path):
    keys = [str(k.key) for k in path]
    return keys[2] if keys[0] == "adapters" else None  # adapters/layers_0/<name>/...


def test_trainable_mask_is_true_exactly_on_enabled_adapters(small):
    adapted, variables, _ = small
    mask = jadapters.trainable_mask(adapted, variables)
    assert jax.tree.structure(mask) == jax.tree.structure(variables)
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    assert sum(bool(m) for _, m in flat) == 4  # a: norm scale, bias, down, up
    for path, trainable in flat:
        assert trainable == (_owner(path) == "a"), path


def test_freeze_base_gives_base_and_disabled_leaves_exactly_zero_updates(small):
    adapted, variables, grads = small
    tx = jadapters.freeze_base(optax.adam(1e-2), jadapters.param_labels(adapted, variables))
    state = tx.init(variables)
    # optimizer state (adam's mu and nu) exists for the trainable leaves only, plus its count
    a_leaves = jax.tree.leaves(variables["adapters"]["layers_0"]["a"])
    assert _shapes(state) == sorted([()] + 2 * [x.shape for x in a_leaves])
    updates, _ = tx.update(grads, state, variables)
    for path, update in jax.tree_util.tree_flatten_with_path(updates)[0]:
        if _owner(path) == "a":
            assert np.abs(np.asarray(update)).max() > 0, path
        else:
            np.testing.assert_array_equal(update, np.zeros_like(update))
    new = optax.apply_updates(variables, updates)
    assert_trees_equal(new["params"], variables["params"])
    assert_trees_equal(new["adapters"]["layers_0"]["b"], variables["adapters"]["layers_0"]["b"])


def test_optax_masked_alone_moves_the_frozen_base(small):
    """optax.masked passes the raw gradient through outside its mask: the base moves by
    -grad. freeze_base does not move it."""
    adapted, variables, grads = small
    mask = jadapters.trainable_mask(adapted, variables)
    masked = optax.masked(optax.sgd(0.1), mask)
    updates, _ = masked.update(grads, masked.init(variables), variables)
    moved = optax.apply_updates(variables, updates)
    kernel, grad = variables["params"]["layers_0"]["kernel"], grads["params"]["layers_0"]["kernel"]
    assert np.abs(np.asarray(grad)).max() > 0
    np.testing.assert_allclose(moved["params"]["layers_0"]["kernel"], kernel + grad, rtol=1e-6)
    assert not np.array_equal(moved["params"]["layers_0"]["kernel"], kernel)

    frozen = jadapters.freeze_base(optax.sgd(0.1), jadapters.param_labels(adapted, variables))
    updates, _ = frozen.update(grads, frozen.init(variables), variables)
    kept = optax.apply_updates(variables, updates)
    assert_trees_equal(kept["params"], variables["params"])
    a = ("adapters", "layers_0", "a", "up", "kernel")
    np.testing.assert_allclose(
        _get(kept, a), _get(variables, a) - 0.1 * _get(grads, a), rtol=1e-6, atol=1e-7
    )


def test_linen_step_trains_only_enabled_adapters(small):
    adapted, variables, _ = small
    base, adapters = jadapters.split_variables(variables)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 5)), jnp.float32)
    batch = (x, jnp.asarray([0, 1, 2, 0]))
    step = jadapters.linen_train_step(adapted, _linen_loss, optax.adam(0.1), donate=False)
    opt_state = step.init(adapters)
    assert _shapes(opt_state) == sorted([()] + 2 * _shapes(adapters["layers_0"]["a"]))
    new, _, _ = step(adapters, opt_state, base, batch, jax.random.key(0))
    assert_trees_equal(new["layers_0"]["b"], adapters["layers_0"]["b"])
    for p, q in zip(
        jax.tree.leaves(new["layers_0"]["a"]),
        jax.tree.leaves(adapters["layers_0"]["a"]),
        strict=True,
    ):
        assert not np.array_equal(p, q)  # adam moves every leaf with a non-zero gradient


def test_linen_step_passes_no_disabled_adapter_weights(small):
    """A disabled adapter's weights skip the compiled step: they come back as the very
    arrays given, the compiled step has the inputs of the model without them, and the
    enabled adapter's step is the same as in that model."""
    adapted, variables, _ = small
    base, adapters = jadapters.split_variables(variables)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 5)), jnp.float32)
    batch, key = (x, jnp.asarray([0, 1, 2, 0])), jax.random.key(0)
    step = jadapters.linen_train_step(adapted, _linen_loss, optax.adam(0.1), donate=False)
    new, _, metrics = step(adapters, step.init(adapters), base, batch, key)
    disabled = jax.tree.leaves(adapters["layers_0"]["b"])
    assert all(a is b for a, b in zip(jax.tree.leaves(new["layers_0"]["b"]), disabled, strict=True))
    only_a = {"layers_0": {"a": adapters["layers_0"]["a"]}}
    alone = jadapters.linen_train_step(adapted, _linen_loss, optax.adam(0.1), donate=False)
    new_alone, _, metrics_alone = alone(only_a, alone.init(only_a), base, batch, key)
    assert_trees_equal(new["layers_0"]["a"], new_alone["layers_0"]["a"])
    assert float(metrics["loss"]) == float(metrics_alone["loss"])
    n_args = [
        len(jax.tree.leaves(s.compiled.lower(t, s.init(t), base, batch, key).args_info))
        for s, t in ((step, step._park(adapters)[0]), (alone, only_a))
    ]
    assert n_args[0] == n_args[1]


def _get(tree, keys):
    for k in keys:
        tree = tree[k]
    return tree


# --- Linen: adapter-only training on the digits ---------------------------------------------


def _linen_loss(apply, batch):
    x, y = batch
    return _ce(apply(x), y)


@pytest.fixture(scope="module")
def linen(data):
    """The adapted Linen model, its frozen base, initial adapters and a compiled step."""
    x, _ = data
    adapted = jadapters.adapter_transform(LinenTransformer(**MODEL), r"blocks_\d+/mlp")
    adapted = adapted.add_adapter("task", CFG)
    base, adapters = jadapters.split_variables(adapted.init(jax.random.key(0), x[:2]))
    step = jadapters.linen_train_step(adapted, _linen_loss, optax.adam(LR))
    return adapted, base, adapters, step


@pytest.fixture(scope="module")
def linen_run(linen, data):
    """STEPS steps from the initial adapters; returns (trained adapters, metrics per step)."""
    _, base, adapters, step = linen
    adapters = _copy(adapters)  # the step donates them
    opt_state = step.init(adapters)
    history = []
    for i in range(STEPS):
        adapters, opt_state, metrics = step(adapters, opt_state, base, data, jax.random.key(i))
        history.append(jax.tree.map(float, metrics))
    return adapters, opt_state, history


def _falls(history):
    first = history[0]["task_loss"]
    last = np.mean([m["task_loss"] for m in history[-5:]])
    return first, last


def test_linen_loss_falls_with_the_base_bitwise_frozen(linen, linen_run, data):
    adapted, base, adapters0, _ = linen
    before = _copy(base)
    trained, _, history = linen_run
    first, last = _falls(history)
    assert last < 0.8 * first, (first, last)
    assert_trees_equal(base, before)  # the step neither donated nor changed the base
    x = data[0][:2]  # the shapes init ran on: eager ops already compiled
    model = LinenTransformer(**MODEL)
    base_out = model.apply(base, x)
    np.testing.assert_array_equal(adapted.apply({**base, "adapters": adapters0}, x), base_out)
    assert np.abs(np.asarray(adapted.apply({**base, "adapters": trained}, x) - base_out)).max() > 0


class _LinenBatchNormNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(8, name="hidden")(x)
        return nn.BatchNorm(use_running_average=not train, name="bn")(x)


def test_linen_step_refuses_a_base_that_updates_its_batch_statistics():
    """The base is frozen, batch statistics included: a base run in training mode gets a
    clear error naming the fix, and in evaluation mode the adapter trains."""
    model, x = _LinenBatchNormNet(), jnp.ones((4, 3))
    base = model.init(jax.random.key(0), x)
    adapted = jadapters.adapter_transform(model, "hidden").add_adapter("t", jadapters.IA3Config())
    _, adapters = jadapters.split_variables(adapted.init_adapters(jax.random.key(1), base, x))

    def loss_fn(train):
        return lambda apply, batch: jnp.mean(apply(batch, train=train) ** 2)

    step = jadapters.linen_train_step(adapted, loss_fn(True), optax.sgd(0.1), donate=False)
    message = (
        r"(?s)linen_train_step keeps the base frozen.*collection \"batch_stats\" is immutable"
        r".*apply\(x, train=False\).*adapters still train"
    )
    with pytest.raises(ValueError, match=message):
        step(adapters, step.init(adapters), base, x, jax.random.key(0))
    step = jadapters.linen_train_step(adapted, loss_fn(False), optax.sgd(0.1), donate=False)
    new, _, _ = step(adapters, step.init(adapters), base, x, jax.random.key(0))
    assert not np.array_equal(new["hidden"]["t"]["scale"], adapters["hidden"]["t"]["scale"])


def test_linen_optimizer_state_covers_adapter_leaves_only(linen, linen_run):
    _, base, adapters, _ = linen
    _, opt_state, _ = linen_run
    assert _shapes(opt_state) == sorted([()] + 2 * _shapes(adapters))
    base_sizes = {x.size for x in jax.tree.leaves(base)}
    assert sum(x.size for x in jax.tree.leaves(opt_state)) == 1 + 2 * sum(
        x.size for x in jax.tree.leaves(adapters)
    )
    assert base_sizes  # the base has leaves, none of which has optimizer state


def test_linen_aux_loss_is_added(linen_run):
    _, _, history = linen_run
    assert history[0]["aux_loss"] == 0.0  # identity at init: no contribution to penalize
    assert history[-1]["aux_loss"] > 0.0
    for m in history:
        assert np.float32(m["loss"]) == np.float32(m["task_loss"]) + np.float32(m["aux_loss"])


def test_linen_step_equals_an_eager_reference(linen, data):
    """One jit step equals loss, gradient and Adam update computed eagerly by hand, with the
    step's key as the 'dropout' stream and the adapters' aux loss added."""
    adapted, base, adapters, step = linen
    key = jax.random.key(7)
    tx = optax.adam(LR)
    x, y = data

    def objective(ad):
        logits, state = adapted.apply(
            {**base, "adapters": ad},
            x,
            adapter_train=True,
            rngs={"dropout": key},
            mutable=[jadapters.AUX_LOSS_COLLECTION],
        )
        aux = sum(jnp.sum(a) for a in jax.tree.leaves(state))
        return _ce(logits, y) + aux

    noisy = _noise_like(adapters, seed=3, scale=0.3)  # non-zero aux loss and gradients
    loss, grads = jax.value_and_grad(objective)(noisy)
    updates, _ = tx.update(grads, tx.init(noisy), noisy)
    expected = optax.apply_updates(noisy, updates)

    opt_state = step.init(noisy)
    new, _, metrics = step(_copy(noisy), opt_state, base, data, key)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(new), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_linen_keys_are_threaded(linen, data):
    _, base, adapters, step = linen
    noisy = _noise_like(adapters, seed=4, scale=0.3)
    opt_state = step.init(noisy)

    def run(key):
        return step(_copy(noisy), _copy(opt_state), base, data, key)

    same_a, _, ma = run(jax.random.key(1))
    same_b, _, mb = run(jax.random.key(1))
    other, _, mc = run(jax.random.key(2))
    assert_trees_equal(same_a, same_b)
    np.testing.assert_array_equal(ma["loss"], mb["loss"])
    assert float(mc["loss"]) != float(ma["loss"])
    assert any(
        not np.array_equal(p, q)
        for p, q in zip(jax.tree.leaves(other), jax.tree.leaves(same_a), strict=True)
    )


# --- NNX: adapter-only training on the digits -----------------------------------------------


def _nnx_loss(model, batch):
    x, y = batch
    return _ce(model(x), y)


@pytest.fixture(scope="module")
def nnx_step():
    return jadapters.nnx_train_step(_nnx_loss)


@pytest.fixture(scope="module")
def nnx_model():
    model = NNXTransformer(8, rngs=nnx.Rngs(0), **MODEL)
    jadapters.adapter_transform(model, r"blocks/\d+/mlp")
    model.add_adapter("task", CFG, rngs=nnx.Rngs(params=1, dropout=2))
    model.train()
    return model


def test_nnx_loss_falls_with_the_base_bitwise_frozen(nnx_model, nnx_step, data):
    model = _fresh(nnx_model)
    base = _copy(nnx.state(model, nnx.Param))
    adapters0 = _copy(nnx.state(model, AdapterParam))
    optimizer = jadapters.adapter_optimizer(model, NNX_TX)
    # optimizer state: adam's mu and nu for the adapter leaves only, plus step and count
    opt_state = nnx.state(optimizer, nnx.OptState)
    assert _shapes(opt_state) == sorted([(), ()] + 2 * _shapes(adapters0))
    history = [jax.tree.map(float, nnx_step(model, optimizer, data)) for _ in range(STEPS)]
    first, last = _falls(history)
    assert last < 0.8 * first, (first, last)
    assert_trees_equal(nnx.state(model, nnx.Param), base)
    assert history[0]["aux_loss"] == 0.0 and history[-1]["aux_loss"] > 0.0
    for m in history:
        assert np.float32(m["loss"]) == np.float32(m["task_loss"]) + np.float32(m["aux_loss"])
    changed = [
        not np.array_equal(p, q)
        for p, q in zip(
            jax.tree.leaves(nnx.state(model, AdapterParam)), jax.tree.leaves(adapters0), strict=True
        )
    ]
    assert any(changed)


def test_nnx_step_equals_an_eager_reference(nnx_model, nnx_step, data):
    """One nnx.jit step equals loss, gradient and Adam update computed eagerly by hand from
    an identical copy (same weights, same dropout stream state)."""
    model = _fresh(nnx_model)
    _randomize(model)
    reference = _fresh(model)
    optimizer = jadapters.adapter_optimizer(model, NNX_TX)
    metrics = nnx_step(model, optimizer, data)

    x, y = data

    def objective(m):
        logits = m(x)
        aux = sum(jnp.sum(v) for v in jax.tree.leaves(nnx.state(m, jadapters.AdapterLoss)))
        return _ce(logits, y) + aux

    adapters = nnx.state(reference, AdapterParam)
    grad_fn = nnx.value_and_grad(objective, argnums=nnx.DiffState(0, AdapterParam))
    loss, grads = grad_fn(reference)  # eager: no jit anywhere
    pure, grads = nnx.to_pure_dict(adapters), nnx.to_pure_dict(grads)
    tx = optax.adam(LR)
    updates, _ = tx.update(grads, tx.init(pure), pure)
    expected = optax.apply_updates(pure, updates)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    got = nnx.to_pure_dict(nnx.state(model, AdapterParam))
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def _randomize(model, seed=5, scale=0.3):
    rng = np.random.default_rng(seed)
    state = nnx.state(model, AdapterParam)
    nnx.update(
        model,
        jax.tree.map(lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), a.dtype), state),
    )


def test_nnx_keys_are_threaded(nnx_model, nnx_step, data):
    """Same dropout stream state -> same step; a reseeded stream -> a different one."""
    results = []
    for seed in (None, None, 123):
        model = _fresh(nnx_model)
        _randomize(model)
        if seed is not None:
            nnx.reseed(model, dropout=seed)
        optimizer = jadapters.adapter_optimizer(model, NNX_TX)
        metrics = nnx_step(model, optimizer, data)
        results.append((float(metrics["loss"]), jax.tree.leaves(nnx.state(model, AdapterParam))))
    (la, pa), (lb, pb), (lc, pc) = results
    assert la == lb
    for p, q in zip(pa, pb, strict=True):
        np.testing.assert_array_equal(p, q)
    assert lc != la


def test_nnx_conv_net_batch_norm_stays_frozen(data):
    images = data[0][:128, :, :, None]
    labels = data[1][:128]
    model = NNXConvNet(1, num_classes=10, features=8, rngs=nnx.Rngs(0))
    jadapters.adapter_transform(model, r"conv_\d")
    model.add_adapter("c", LinearAdapterConfig(dim=4), rngs=nnx.Rngs(1))
    params, stats = _copy(nnx.state(model, nnx.Param)), _copy(nnx.state(model, nnx.BatchStat))
    model.train()
    assert model.bn_0.use_running_average is False  # train() turned batch statistics on
    optimizer = jadapters.adapter_optimizer(model, optax.adam(3e-2))
    assert model.bn_0.use_running_average and model.bn_1.use_running_average
    step = jadapters.nnx_train_step(_nnx_loss)
    history = [jax.tree.map(float, step(model, optimizer, (images, labels))) for _ in range(20)]
    assert_trees_equal(nnx.state(model, nnx.BatchStat), stats)
    assert_trees_equal(nnx.state(model, nnx.Param), params)
    first, last = _falls(history)
    assert last < first, (first, last)


# ---- the NNX step's economy: split once, no retrace for equal optimizers ------------------


def _counting_loss():
    traces = []

    def loss(model, batch):
        traces.append(1)  # runs at trace time only
        return _nnx_loss(model, batch)

    return loss, traces


def test_nnx_step_is_not_retraced_for_an_equal_optax_transformation(nnx_model, data):
    model = _fresh(nnx_model)
    loss, traces = _counting_loss()
    step = jadapters.nnx_train_step(loss)
    batch = (data[0][:16], data[1][:16])
    step(model, jadapters.adapter_optimizer(model, optax.adam(1e-3)), batch)
    step(model, jadapters.adapter_optimizer(model, optax.adam(1e-3)), batch)
    chained = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    step(model, jadapters.adapter_optimizer(model, chained), batch)
    step(model, jadapters.adapter_optimizer(model, chained), batch)
    assert len(traces) == 2  # adam, then the chain: equal transformations share one trace
    # Another hyperparameter is another computation: it must be traced anew. (A learning rate
    # no other test uses: equal steps share their compiled code across tests.)
    step(model, jadapters.adapter_optimizer(model, optax.adam(2.345e-3)), batch)
    assert len(traces) == 3


def test_nnx_step_neither_outputs_nor_copies_the_base(nnx_model, data):
    """The base is an input of the compiled step, never an output: after a step every base
    variable holds the very array it held before, and the compiled program's outputs are the
    adapters', the optimizer's and the small state beside them (RNG counters, metrics)."""
    model = _fresh(nnx_model)
    optimizer = jadapters.adapter_optimizer(model, NNX_TX)
    step = jadapters.nnx_train_step(_nnx_loss)
    batch = (data[0][:16], data[1][:16])
    base_vars = [v for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)]
    before = [v.get_raw_value() for v in base_vars]
    adapters = _copy(nnx.state(model, AdapterParam))
    step(model, optimizer, batch)
    assert all(v.get_raw_value() is a for v, a in zip(base_vars, before, strict=True))
    moved = jax.tree.leaves(
        jax.tree.map(
            lambda a, b: not np.array_equal(a, b), adapters, nnx.state(model, AdapterParam)
        )
    )
    assert any(moved)

    def nbytes(tree):
        return sum(np.asarray(a).nbytes for a in jax.tree.leaves(tree))

    out = step.lower(model, optimizer, batch).compile().memory_analysis().output_size_in_bytes
    base_bytes = nbytes(nnx.state(model, nnx.Param))
    small = nbytes(nnx.state(model, AdapterParam)) + nbytes(nnx.state(optimizer)) + 4096
    assert out <= small < base_bytes, (out, small, base_bytes)


def test_nnx_step_takes_no_disabled_adapter_weights(nnx_model, data):
    """Adapters added and left disabled are no arguments of the compiled step: it has as many
    inputs as the model with the enabled adapter alone, computes the same step, and leaves
    the disabled weights as the very arrays they were."""
    batch = (data[0][:16], data[1][:16])
    alone, many = _fresh(nnx_model), _fresh(nnx_model)
    for i in range(5):
        many.add_adapter(f"off{i}", CFG, rngs=nnx.Rngs(params=10 + i, dropout=20 + i))
        many.set_enabled_adapters(f"off{i}", enabled=False)
    off_vars = [
        v for p, v in nnx.iter_graph(many) if isinstance(v, AdapterParam) and "off0" in map(str, p)
    ]
    off_before = [v.get_raw_value() for v in off_vars]
    args, metrics = [], []
    for model in (alone, many):
        optimizer = jadapters.adapter_optimizer(model, NNX_TX)
        step = jadapters.nnx_train_step(_nnx_loss)
        args.append(len(jax.tree.leaves(step.lower(model, optimizer, batch).args_info)))
        metrics.append(jax.tree.map(float, step(model, optimizer, batch)))
    assert args[0] == args[1], args
    assert metrics[0] == metrics[1]
    assert_trees_equal(
        nnx.state(alone, AdapterParam), nnx.state(many, many.unfreeze_enabled_adapters(False))
    )
    assert off_vars and all(
        v.get_raw_value() is a for v, a in zip(off_vars, off_before, strict=True)
    )


def test_nnx_step_follows_a_new_optimizer_that_reuses_an_old_ones_id(nnx_model, data):
    """Each new optimizer is the one that steps, also when CPython gives it the id of one
    that is gone (the step's cached split must not be taken for it)."""
    model = _fresh(nnx_model)
    step = jadapters.nnx_train_step(_nnx_loss)
    batch = (data[0][:16], data[1][:16])
    for _ in range(4):  # CPython often hands a new object the id of one just freed
        optimizer = jadapters.adapter_optimizer(model, NNX_TX)
        step(model, optimizer, batch)
        assert int(optimizer.step[...]) == 1  # its own state moved, no one else's
        del optimizer
        gc.collect(1)  # the young generations hold it; a full collection costs seconds here


def test_nnx_step_reuses_its_split_and_follows_adapter_and_mode_changes(nnx_model, data):
    model = _fresh(nnx_model)
    model.add_adapter("other", LinearAdapterConfig(dim=4), rngs=nnx.Rngs(params=3, dropout=4))
    step = jadapters.nnx_train_step(_nnx_loss)
    batch = (data[0][:16], data[1][:16])
    optimizer = jadapters.adapter_optimizer(model, NNX_TX)
    step(model, optimizer, batch)
    bound = step._split._bound
    step(model, optimizer, batch)
    assert step._split._bound is bound  # the graph was split once
    before = _copy(nnx.state(model, AdapterParam))
    model.eval()  # a mode flag changes the graph: the step must see it, not a stale split
    step(model, optimizer, batch)
    assert step._split._bound is not bound
    # In eval mode neither dropout nor stochastic depth draws keys: the RNG counts stay.
    counts = nnx.state(model, nnx.RngCount)
    step(model, optimizer, batch)
    assert_trees_equal(nnx.state(model, nnx.RngCount), counts)
    # Disabling an adapter re-splits too, and then only the enabled one trains.
    model.train()
    model.set_enabled_adapters("other", enabled=False)
    optimizer = jadapters.adapter_optimizer(model, NNX_TX)
    frozen = _copy(nnx.state(model, jadapters.AdapterParam))
    step(model, optimizer, batch)
    after = nnx.to_pure_dict(nnx.state(model, AdapterParam))
    flat_after = dict(jax.tree_util.tree_flatten_with_path(after)[0])
    flat_frozen = dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(frozen))[0])
    moved = {
        "/".join(str(getattr(k, "key", k)) for k in p)
        for p in flat_after
        if not np.array_equal(flat_after[p], flat_frozen[p])
    }
    assert moved and all("/other/" not in m for m in moved), moved
    assert any("/task/" in m for m in moved)
    del before


# ---- the NNX step and its optimizer: the state belongs to the adapters it was built for -----


SMALL_CFG = LinearAdapterConfig(dim=4)


@pytest.fixture(scope="module")
def t_and_u():
    """A one-layer transformer with adapter 't' enabled and 'u' disabled, and a step."""
    model = NNXTransformer(8, rngs=nnx.Rngs(0), **MODEL)
    jadapters.adapter_transform(model, {"mlp": r"blocks/\d+/mlp"})
    model.add_adapter("mlp:t", SMALL_CFG, rngs=nnx.Rngs(1))
    model.add_adapter("mlp:u", SMALL_CFG, rngs=nnx.Rngs(2))
    model.set_enabled_adapters("u", enabled=False)
    nnx.update(model, _noise_like(nnx.state(model, AdapterParam)))
    return model, jadapters.nnx_train_step(_nnx_loss)


def _adapter_arrays(model, name):
    """``{path: array}`` of adapter ``name``'s weights at every host."""
    flat = nnx.to_flat_state(nnx.state(model, AdapterParam))
    return {tuple(path): np.array(v.get_value(), copy=True) for path, v in flat if name in path}


def _moved(before, after):
    return [p for p in before if not np.array_equal(before[p], after[p])]


TRANSITIONS = {
    "disable": (lambda m: m.set_enabled_adapters("t", enabled=False), "now []"),
    "enable another": (lambda m: m.set_enabled_adapters("u"), "now ['t', 'u']"),
    "swap": (
        lambda m: (m.set_enabled_adapters("t", enabled=False), m.set_enabled_adapters("u")),
        "now ['u']",
    ),
    "add": (lambda m: m.add_adapter("mlp:v", SMALL_CFG, rngs=nnx.Rngs(3)), "now ['t', 'v']"),
    "remove": (lambda m: m.remove_adapter("t"), "now []"),
    "add again, other shape": (
        lambda m: (
            m.remove_adapter("t"),
            m.add_adapter("mlp:t", LinearAdapterConfig(dim=8), rngs=nnx.Rngs(3)),
        ),
        "which are enabled, but their weights changed shape or dtype",
    ),
}


@pytest.mark.parametrize("transition", list(TRANSITIONS))
def test_nnx_step_refuses_an_optimizer_built_for_other_adapters(t_and_u, data, transition):
    change, now = TRANSITIONS[transition]
    model, step = _fresh(t_and_u[0]), t_and_u[1]
    batch = (data[0][:16], data[1][:16])
    optimizer = jadapters.adapter_optimizer(model, NNX_TX)
    step(model, optimizer, batch)
    change(model)
    arrays = nnx.Not(nnx.RngKey)  # every array but the PRNG keys (not NumPy-comparable)
    model_state, opt_state = _copy(nnx.state(model, arrays)), _copy(nnx.state(optimizer))
    built = "the optimizer was built for adapters ['t']"
    rebuild = "rebuild it with jadapters.adapter_optimizer(model, tx) for the adapters enabled now"
    with pytest.raises(ValueError, match=re.escape(built) + ".*" + re.escape(now)) as error:
        step(model, optimizer, batch)
    assert rebuild in str(error.value)
    assert_trees_equal(nnx.state(model, arrays), model_state)  # nothing ran, nothing changed
    assert_trees_equal(nnx.state(optimizer), opt_state)


def test_nnx_step_with_a_rebuilt_optimizer_trains_exactly_the_enabled_adapters(t_and_u, data):
    model, step = _fresh(t_and_u[0]), t_and_u[1]
    batch = (data[0][:16], data[1][:16])
    step(model, jadapters.adapter_optimizer(model, NNX_TX), batch)
    model.set_enabled_adapters("t", enabled=False)
    model.set_enabled_adapters("u")
    base = _copy(nnx.state(model, nnx.Param))
    t, u = _adapter_arrays(model, "t"), _adapter_arrays(model, "u")
    step(model, jadapters.adapter_optimizer(model, NNX_TX), batch)
    assert _moved(t, _adapter_arrays(model, "t")) == []
    assert len(_moved(u, _adapter_arrays(model, "u"))) == len(u) == 4
    assert_trees_equal(nnx.state(model, nnx.Param), base)


def test_nnx_step_keeps_an_optimizer_whose_adapters_are_enabled_again(t_and_u, data):
    """Disable and enable again, add and disable, remove a disabled adapter: 't' alone is
    enabled each time, so its optimizer still fits and the step trains 't' alone."""
    model, step = _fresh(t_and_u[0]), t_and_u[1]
    batch = (data[0][:16], data[1][:16])
    optimizer = jadapters.adapter_optimizer(model, NNX_TX)
    base = _copy(nnx.state(model, nnx.Param))
    step(model, optimizer, batch)
    changes = [
        lambda: (model.set_enabled_adapters("t", enabled=False), model.set_enabled_adapters("t")),
        lambda: (
            model.add_adapter("mlp:v", SMALL_CFG, rngs=nnx.Rngs(3)),
            model.set_enabled_adapters("v", enabled=False),
        ),
        lambda: model.remove_adapter("u"),
    ]
    for change in changes:
        change()
        t, v = _adapter_arrays(model, "t"), _adapter_arrays(model, "v")
        step(model, optimizer, batch)
        assert len(_moved(t, _adapter_arrays(model, "t"))) == len(t) == 4
        assert _moved(v, _adapter_arrays(model, "v")) == []
    assert model.get_enabled_adapters() == ["t"]
    assert int(optimizer.step[...]) == 4
    assert_trees_equal(nnx.state(model, nnx.Param), base)


def test_nnx_step_trains_an_adapter_removed_and_added_again(t_and_u, data):
    """The same name, config and shapes, but new weights: the step must train the weights
    the model holds now, not those of its cached split."""
    model, step = _fresh(t_and_u[0]), t_and_u[1]
    batch = (data[0][:16], data[1][:16])
    optimizer = jadapters.adapter_optimizer(model, NNX_TX)
    step(model, optimizer, batch)
    model.remove_adapter("t")
    model.add_adapter("mlp:t", SMALL_CFG, rngs=nnx.Rngs(1))
    added = _adapter_arrays(model, "t")
    step(model, optimizer, batch)
    assert len(_moved(added, _adapter_arrays(model, "t"))) == len(added) == 4


def test_nnx_step_checks_an_optimizer_over_a_filter_of_the_users_own(t_and_u, data):
    model, step = _fresh(t_and_u[0]), t_and_u[1]
    batch = (data[0][:16], data[1][:16])
    optimizer = nnx.Optimizer(model, NNX_TX, wrt=AdapterParam)  # 'u' too, which is disabled
    expected = "selects 8 arrays, which are not the 4 weights of the enabled adapters ['t']"
    with pytest.raises(ValueError, match=re.escape(expected)):
        step(model, optimizer, batch)
    model.set_enabled_adapters("u")  # now the filter selects exactly the enabled adapters
    before = _adapter_arrays(model, "u")
    step(model, optimizer, batch)
    assert len(_moved(before, _adapter_arrays(model, "u"))) == 4
