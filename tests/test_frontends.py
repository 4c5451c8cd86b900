"""What both front-ends share, tested once and run on each: ``fe`` is Linen or NNX.

The per-front-end handles in ``_frontends.py`` only say where weights live; every expected
value comes from an explicit float64 NumPy formula of the host layers and the adapters (or the
unwrapped model run on parameters changed *by the test*), never from the library itself.

Front-end-specific behaviour stays in its own files: ``test_transform_linen.py`` (the
functional API, method interception, ``init_adapters``, ``adapter_train``, lifted transforms)
and ``test_transform_nnx.py`` (in-place class surgery, shared modules, ``train()``/``eval()``,
``AdapterParam`` filters); likewise the Linen- or NNX-only parts of ``test_lora.py``,
``test_ia3_parallel.py`` and ``test_merge.py``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _data import digits
from _frontends import (
    FRONTENDS,
    assert_trees_equal,
    f64,
    flat,
    get_at,
    host_copy,
    merge_noise,
    np_adapter,
    np_dense,
    set_at,
)
from flax import nnx

import jadapters
from jadapters import (
    IA3Config,
    LinearAdapterConfig,
    LoRAConfig,
    ParallelAdapterConfig,
    ResidualAddStrategy,
    ReturnResultStrategy,
    ScaledAddStrategy,
    Target,
)
from jadapters.view import view_of

D_MODEL, HEADS, LAYERS, DIM = 16, 2, 2, 4
HEAD_DIM = D_MODEL // HEADS
TARGETS = {"attn": r"blocks#\d+/attn/(query|value)", "mlp": r"blocks#\d+/mlp"}
ATTN_HOSTS = [f"blocks#{i}/attn/{p}" for i in range(LAYERS) for p in ("query", "value")]
MLP_HOSTS = [f"blocks#{i}/mlp" for i in range(LAYERS)]


# --- helpers --------------------------------------------------------------------------------


def _normal(shape, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(FRONTENDS))
def fe(request):
    return FRONTENDS[request.param]


@pytest.fixture(scope="module")
def x():
    return _normal((2, 8, 8))


@pytest.fixture(scope="module")
def base(fe, x):
    """The unadapted demo transformer (the reference)."""
    return fe.base(fe.transformer(), x)


@pytest.fixture(scope="module")
def adapted(fe, base, x):
    """'attn:a' goes to the attention projections, 'mlp:m' to the MLPs.

    The attention projections output ``(heads, head_dim)``, so 'a' acts per head on their
    last axis, ``head_dim`` features. Tests that change it take a ``copy()``.
    """
    cfg = LinearAdapterConfig(dim=DIM)
    return fe.adapt(base, fe.path(TARGETS), [("attn:a", cfg), ("mlp:m", cfg)], x)


@pytest.fixture(scope="module")
def noisy(adapted):
    """The adapted transformer with non-zero adapter weights."""
    return adapted.copy().randomize(seed=1)


@pytest.fixture(scope="module")
def two_dense(fe):
    """Two 4 -> 4 dense layers (paths ``layers#0``, ``layers#1``) and an input."""
    x = _normal((3, 4), seed=2)
    return fe.base(fe.sequential(fe.dense(4, 4), fe.dense(4, 4)), x), x


# --- wrapping -------------------------------------------------------------------------------


def test_base_params_keep_exactly_the_unwrapped_structure_and_values(adapted, base):
    assert_trees_equal(adapted.base_params(), base.params())


def test_base_checkpoint_loads_as_is_and_adapters_are_identity_at_init(fe, adapted, base, x):
    other = fe.base(fe.transformer(seed=5), x, seed=5)
    assert np.abs(np.asarray(other(x) - base(x))).max() > 1e-3  # really another checkpoint
    h = adapted.copy()
    h.set_base(other.params())
    np.testing.assert_array_equal(h(x), other(x))


def test_identity_at_init(adapted, base, x):
    np.testing.assert_array_equal(adapted(x), base(x))


def test_identity_at_init_under_jit(adapted, base, x):
    np.testing.assert_array_equal(adapted.jit(x), base.jit(x))


def test_conv_net_keeps_params_and_batch_stats(fe):
    images = _normal((2, 8, 8, 1))
    base = fe.base(fe.conv_net(), images)
    h = fe.adapt(base, r"conv_\d", [("c", LinearAdapterConfig(dim=2))], images)
    for collection in ("params", "batch_stats"):
        assert_trees_equal(h.collection(collection), base.collection(collection))
    assert h.sites() == {("conv_0", "c"), ("conv_1", "c")}
    np.testing.assert_array_equal(h(images), base(images))


def test_transforming_twice_raises(fe, adapted):
    with pytest.raises(ValueError, match="already adapted"):
        jadapters.adapter_transform(adapted.copy().model, "x")


# --- groups and routing ---------------------------------------------------------------------


def test_group_names_and_routing(fe, adapted):
    assert adapted.model.adapter_module_names == ["attn", "mlp"]  # no default group
    attn, mlp = set(fe.path(ATTN_HOSTS)), set(fe.path(MLP_HOSTS))
    assert adapted.sites() == {(h, "a") for h in attn} | {(h, "m") for h in mlp}
    assert adapted.enabled() == ["a", "m"]
    assert {s.name: s.group for s in adapted.specs()} == {"a": "attn", "m": "mlp"}


def test_unknown_group_raises_listing_valid_ones(adapted):
    with pytest.raises(ValueError, match=r"unknown adapter module 'enc'.*\['attn', 'mlp'\]"):
        adapted.copy().add("enc:z", LinearAdapterConfig(dim=DIM))


def test_same_name_in_two_groups_raises(adapted):
    with pytest.raises(ValueError, match="adapter name 'm' already exists in module 'mlp'"):
        adapted.copy().add("attn:m", LinearAdapterConfig(dim=DIM))


def test_pattern_matching_nothing_raises_listing_closest_paths_first(fe, base, x):
    """Linen raises at ``init`` (the first time paths are known), NNX at the transform."""
    targets = fe.path({"attn": r"blocks#\d+/attn/query", "x": r"blocks#\d+/mlpx"})
    with pytest.raises(ValueError, match=r"matches no module") as err:
        fe.adapt(base, targets, [("attn:z", LinearAdapterConfig(dim=DIM))], x)
    listed = str(err.value).split("closest first: [")[1].split("]")[0]
    assert listed.startswith(fe.path("'blocks#0/mlp', 'blocks#1/mlp'"))


# --- insertion forms and the chain, on two dense layers -------------------------------------


INSERTIONS = {  # (insertion, strategy, expected(second layer, adapter, layer 0's output))
    "output": ("output", None, lambda d, a, h: np_dense(d, h) + np_adapter(a, np_dense(d, h))),
    "parallel": ("parallel", None, lambda d, a, h: np_dense(d, h) + np_adapter(a, h)),
    "parallel-return-result": (
        "parallel",
        ReturnResultStrategy(),
        lambda d, a, h: np_adapter(a, h),
    ),
    "input": ("input", None, lambda d, a, h: np_dense(d, h + np_adapter(a, h))),
}


@pytest.mark.parametrize("form", list(INSERTIONS))
def test_insertion_forms(fe, two_dense, form):
    base, x = two_dense
    insertion, strategy, formula = INSERTIONS[form]
    cfg = LinearAdapterConfig(dim=2, **({"adapter_strategy": strategy} if strategy else {}))
    host = fe.path("layers#1")
    h = fe.adapt(base, host, [("p", cfg, insertion)], x).randomize(seed=3)
    assert h.specs().get("p").insertion == insertion
    params = h.base_params()
    h0 = np_dense(get_at(params, fe.path("layers#0")), x)
    expected = formula(get_at(params, host), h.params_at(host, "p"), h0)
    np.testing.assert_allclose(h(x), expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def chain(fe, two_dense):
    """Output adapters 'first' (dim 2) then 'second' (dim 3) on ``layers#0``."""
    base, x = two_dense
    cfgs = [("first", LinearAdapterConfig(dim=2)), ("second", LinearAdapterConfig(dim=3))]
    return fe.adapt(base, fe.path("layers#0"), cfgs, x).randomize(seed=4)


def _np_chain(fe, h, x, names):
    """The two dense layers with the adapters ``names`` applied in turn after the first."""
    params, host = h.base_params(), fe.path("layers#0")
    z = np_dense(get_at(params, host), x)
    for name in names:
        z = z + np_adapter(h.params_at(host, name), z)
    return np_dense(get_at(params, fe.path("layers#1")), z)


@pytest.mark.parametrize(
    "enabled", [("first", "second"), ("first",), ("second",), ()], ids=["both", "1", "2", "none"]
)
def test_chain_runs_exactly_the_enabled_adapters_in_order(fe, chain, two_dense, enabled):
    base, x = two_dense
    h = chain.copy()
    for name in ("first", "second"):
        h.set_enabled(name, name in enabled)
    assert h.enabled() == list(enabled)
    assert h.model.is_adapter_available()
    np.testing.assert_allclose(h(x), _np_chain(fe, h, x, enabled), rtol=1e-5, atol=1e-5)
    if not enabled:
        np.testing.assert_array_equal(h(x), base(x))


def test_chain_order_is_the_order_of_adding(fe, chain, two_dense):
    base, x = two_dense
    host = fe.path("layers#0")
    cfgs = [("second", LinearAdapterConfig(dim=3)), ("first", LinearAdapterConfig(dim=2))]
    h = fe.adapt(base, host, cfgs, x)
    for name in ("first", "second"):
        h.set_params_at(host, name, chain.params_at(host, name))
    assert h.enabled() == ["second", "first"]
    reversed_out = h(x)
    np.testing.assert_allclose(
        reversed_out, _np_chain(fe, h, x, ["second", "first"]), rtol=1e-5, atol=1e-5
    )
    assert np.abs(np.asarray(reversed_out - chain(x))).max() > 1e-4  # order matters


# --- repeated calls and other methods --------------------------------------------------------


def test_module_called_several_times_shares_one_adapter_applied_each_call(fe):
    x = _normal((2, 4), seed=5)
    base = fe.base(fe.called_thrice(), x)
    h = fe.adapt(base, "dense", [("s", LinearAdapterConfig(dim=2))], x)
    assert h.sites() == {("dense", "s")}  # one set of weights
    assert_trees_equal(h.base_params(), base.params())
    h.randomize(seed=6)
    params, ap = h.base_params(), h.params_at("dense", "s")
    z = np.asarray(x, np.float64)
    for _ in range(3):
        z = np_dense(params["dense"], z)
        z = z + np_adapter(ap, z)
    np.testing.assert_allclose(h(x), np_dense(params["out"], z), rtol=1e-5, atol=1e-5)


def test_target_methods_wrap_only_the_named_method(fe):
    x = _normal((2, 4), seed=7)
    base = fe.base(fe.outer(), x)
    target = Target(pattern="host", methods=("encode",))
    h = fe.adapt(base, target, [("e", LinearAdapterConfig(dim=2))], x, method="encode")
    assert h.sites() == {("host", "e")}
    h.randomize(seed=8)
    z = np_dense(get_at(h.base_params(), "host/dense"), x)
    ap = h.params_at("host", "e")
    np.testing.assert_allclose(
        h(x, method="encode"), 2.0 * z + np_adapter(ap, 2.0 * z), rtol=1e-5, atol=1e-5
    )
    # __call__ is not a targeted method: it runs the host without the adapter
    np.testing.assert_allclose(h(x), z, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pattern", ["layers/mlp", r".*mlp"])
def test_hosts_inside_a_scanned_layer_stack_raise_a_clear_error(fe, pattern):
    """A Linen ``nn.scan`` that does not carry the adapter collection is refused, naming scan
    and the fix; NNX ``nnx.vmap`` + ``nnx.scan`` stacks adapt (``tests/test_scan.py``)."""
    x = _normal((2, 4))
    base = fe.base(fe.scan_stack(), x)
    if fe.name == "nnx":
        h = fe.adapt(base, pattern, [("s", LinearAdapterConfig(dim=2))], x)
        assert h(x).shape == x.shape
        return
    with pytest.raises(ValueError, match=r"(?is)adapter.*scan|scan.*adapter"):
        h = fe.adapt(base, pattern, [("s", LinearAdapterConfig(dim=2))], x)
        h(x)


# --- jit, enabling, compiled computation ----------------------------------------------------


def test_jit_equals_no_jit(noisy, x):
    np.testing.assert_allclose(noisy.jit(x), noisy(x), rtol=1e-5, atol=1e-5)


def test_enable_disable(fe, noisy, base, x):
    h = noisy.copy()
    base_out = base(x)
    assert np.abs(np.asarray(h(x) - base_out)).max() > 1e-3
    h.set_enabled(enabled=False)
    assert h.enabled() == [] and h.model.is_adapter_available()
    np.testing.assert_array_equal(h(x), base_out)
    h.set_enabled("m", enabled=True)
    assert h.enabled() == ["m"]
    only_m = h(x)
    h.set_enabled(enabled=True)
    h.set_enabled("a", enabled=False)
    assert h.enabled() == ["m"]
    np.testing.assert_array_equal(h(x), only_m)
    # disabling 'a' equals zeroing its up-projection (its raw output is then exactly zero)
    zeroed = noisy.copy()
    for host in fe.path(ATTN_HOSTS):
        ap = zeroed.params_at(host, "a")
        zeroed.set_params_at(
            host, "a", {**ap, "up": {"kernel": jnp.zeros_like(ap["up"]["kernel"])}}
        )
    np.testing.assert_array_equal(only_m, zeroed(x))


def test_disabled_adapters_leave_no_trace_in_the_computation(adapted, base, x):
    base_counts = base.counts(x)
    dots = base_counts["dot_general"]
    assert dots == 2 + 8 * LAYERS  # embed, head; per block q, k, v, out, 2 einsums, fc1, fc2
    hosts_a, hosts_m = 2 * LAYERS, LAYERS
    h = adapted.copy()
    assert h.counts(x)["dot_general"] == dots + 2 * (hosts_a + hosts_m)
    h.set_enabled("a", enabled=False)
    assert h.counts(x)["dot_general"] == dots + 2 * hosts_m
    h.set_enabled(enabled=False)
    assert h.counts(x) == base_counts  # not a single extra operation


# --- the compiled forwards (linen_forward, nnx_forward) -----------------------------------


def test_compiled_forward_is_the_call_and_follows_enabling(noisy, x):
    """The same compiled program as the model's own jitted call (so bitwise its output)."""
    h = noisy.copy()
    np.testing.assert_array_equal(h.compiled(x), h.jit(x))
    h.set_enabled("a", enabled=False)  # NNX: a re-split; Linen: a new model, a new forward
    np.testing.assert_array_equal(h.compiled(x), h.jit(x))
    np.testing.assert_allclose(h.compiled(x), h(x), rtol=1e-5, atol=1e-6)
    h.set_enabled("a")
    np.testing.assert_array_equal(h.compiled(x), noisy.jit(x))


def test_compiled_forward_takes_no_disabled_adapter_weights(fe, noisy, x):
    """Adapters added and left disabled are no inputs of the compiled forward: it takes as
    many arrays as the model without them and computes the same output, while the model's own
    jitted call takes them all."""
    many = noisy.copy()
    for i in range(3):
        many.add(f"attn:off{i}", LinearAdapterConfig(dim=DIM))
        many.set_enabled(f"off{i}", enabled=False)
    assert many.compiled_inputs(x) == noisy.compiled_inputs(x)
    np.testing.assert_array_equal(many.compiled(x), noisy.jit(x))
    weights_per_adapter = len(jax.tree.leaves(noisy.params_at(fe.path(ATTN_HOSTS[0]), "a")))
    added = 3 * len(ATTN_HOSTS) * weights_per_adapter
    assert len(jax.tree.leaves(many.adapters())) == len(jax.tree.leaves(noisy.adapters())) + added


# --- the view, summaries, masks -------------------------------------------------------------


def test_view_lists_what_the_model_holds(fe, noisy):
    """``view_of`` (the one protocol partition, merge, masks and checkpoints use) agrees with
    the front-end's own structures."""
    view = noisy.view()
    assert view.framework == fe.name
    groups = view.groups()
    assert groups[:2] == ["attn", "mlp"]
    # NNX: each host's path also names a group, that of adapters added on the host itself
    hosts = fe.pick(linen=[], nnx=sorted(fe.path(ATTN_HOSTS + MLP_HOSTS)))
    assert sorted(groups[2:]) == hosts
    specs = list(view.specs())
    assert [(s.name, s.group, s.insertion, s.enabled) for s in specs] == [
        ("a", "attn", "output", True),
        ("m", "mlp", "output", True),
    ]
    items = view.weights(specs)
    assert {(host, item.spec.name) for item in items for host in item.hosts} == noisy.sites()
    for item in items:
        for host, params in item.hosts.items():
            assert_trees_equal(
                jax.tree.map(np.asarray, params), noisy.params_at(host, item.spec.name)
            )
    for host in fe.path(MLP_HOSTS):
        assert_trees_equal(view.host_base(host), get_at(noisy.base_params(), host))
    wrong = fe.pick(linen=None, nnx={})  # Linen needs its variables; NNX holds its own
    with pytest.raises(
        ValueError, match=fe.pick(linen="variables is required", nnx="variables must be None")
    ):
        view_of(noisy.model, wrong)


def test_summarize(fe, adapted):
    summary = adapted.summary()
    rows = {r.name: r for r in summary.rows}
    assert list(rows) == ["a", "m"]
    assert (rows["a"].group, rows["m"].group) == ("attn", "mlp")
    assert {(r.type, r.insertion, r.enabled) for r in rows.values()} == {
        ("LinearAdapter", "output", True)
    }
    assert set(rows["a"].hosts) == set(fe.path(ATTN_HOSTS))
    assert set(rows["m"].hosts) == set(fe.path(MLP_HOSTS))

    def per_host(d):  # pre norm scale+bias, down, up
        return 2 * d + d * DIM + DIM * d

    assert rows["a"].params == 2 * LAYERS * per_host(HEAD_DIM)  # query/value act per head
    assert rows["m"].params == LAYERS * per_host(D_MODEL)
    assert rows["m"].bytes == 4 * rows["m"].params
    assert summary.adapter_params == rows["a"].params + rows["m"].params
    assert summary.base_params == sum(v.size for v in jax.tree.leaves(adapted.base_params()))
    text = str(summary)
    assert f"total: {summary.adapter_params:,} adapter parameters" in text
    assert fe.path("blocks#0/mlp/m/down/kernel: (16, 4)") in text
    for name in ("a", "m"):
        assert f"  {name}: hosts " in text


def test_trainable_mask_and_labels_mark_exactly_the_enabled_adapters(adapted):
    h = adapted.copy()
    h.set_enabled("a", enabled=False)
    mask, labels, owners = flat(h.mask()), flat(h.labels()), h.owners()
    assert set(mask) == set(labels) == set(owners)  # every base and adapter weight
    assert set(owners.values()) == {None, "a", "m"}
    for path, owner in owners.items():
        assert mask[path] == (owner == "m"), path
        assert labels[path] == ("adapters" if owner == "m" else "frozen"), path


# --- training and auxiliary losses ------------------------------------------------------------


def test_auxiliary_loss_in_training_only_summed_over_calls(fe):
    lam = 0.3
    x = _normal((2, 4), seed=5)
    base = fe.base(fe.called_thrice(), x)
    cfg = LinearAdapterConfig(dim=2, adapter_strategy=ResidualAddStrategy(l2_lambda=lam))
    h = fe.adapt(base, "dense", [("s", cfg)], x).randomize(seed=6)
    params, ap = h.base_params(), h.params_at("dense", "s")
    z, expected = np.asarray(x, np.float64), 0.0
    for _ in range(3):  # the host is called three times: three contributions
        z = np_dense(params["dense"], z)
        contribution = np_adapter(ap, z)
        expected += lam * np.mean(np.sum(contribution**2, axis=-1))
        z = z + contribution
    out, losses = h.forward_with_losses(x, train=True, key=jax.random.key(0))
    assert list(losses) == ["dense/s"]
    np.testing.assert_allclose(losses["dense/s"], expected, rtol=1e-5)
    np.testing.assert_allclose(jadapters.total_auxiliary_loss(losses), expected, rtol=1e-5)
    np.testing.assert_allclose(out, np_dense(params["out"], z), rtol=1e-5, atol=1e-5)
    out, losses = h.forward_with_losses(x, train=False)
    assert losses == {}
    np.testing.assert_allclose(out, np_dense(params["out"], z), rtol=1e-5, atol=1e-5)


def test_train_step_trains_only_the_enabled_adapters_and_adds_the_aux_loss(fe, two_dense):
    base, x = two_dense
    lam, host = 0.1, fe.path("layers#0")
    cfg = LinearAdapterConfig(dim=2, adapter_strategy=ResidualAddStrategy(l2_lambda=lam))
    h = fe.adapt(base, host, [("a", cfg), ("b", LinearAdapterConfig(dim=2))], x).randomize(7)
    h.set_enabled("b", enabled=False)
    target = _normal((3, 4), seed=8)
    frozen = host_copy(h.base_params())
    before = {name: host_copy(h.params_at(host, name)) for name in ("a", "b")}
    # The first step's loss, from the weights before it.
    z = np_dense(get_at(frozen, host), x)
    contribution = np_adapter(before["a"], z)
    aux = lam * np.mean(np.sum(contribution**2, axis=-1))
    out = np_dense(get_at(frozen, fe.path("layers#1")), z + contribution)
    task = np.mean((out - np.asarray(target, np.float64)) ** 2)

    def loss_fn(out, batch):
        return jnp.mean((out - batch[1]) ** 2)

    metrics = h.train(loss_fn, optax.adam(1e-2), [(x, target)] * 5)
    np.testing.assert_allclose(metrics[0]["task_loss"], task, rtol=1e-5)
    np.testing.assert_allclose(metrics[0]["aux_loss"], aux, rtol=1e-5)
    np.testing.assert_allclose(metrics[0]["loss"], task + aux, rtol=1e-5)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert_trees_equal(h.base_params(), frozen)  # bitwise
    assert_trees_equal(h.params_at(host, "b"), before["b"])  # disabled: untouched
    for name, moved in flat(
        jax.tree.map(np.not_equal, h.params_at(host, "a"), before["a"])
    ).items():
        assert moved.any(), name


# --- LoRA -----------------------------------------------------------------------------------

B, T, D, OUT = 2, 3, 5, 6
H, K = 2, 3  # multi-dimensional features of DenseGeneral/Einsum hosts
RANK, ALPHA = 2, 3.0
SCALE = ALPHA / RANK

# Host kinds: (constructor(rngs), input shape, flat (in, out) update -> kernel, written out).
LORA_HOSTS = {
    "linen": {
        "Dense": (lambda r: nn.Dense(OUT), (B, T, D), lambda m: m),
        "DenseGeneral-axis-1": (
            lambda r: nn.DenseGeneral((H, K), axis=-1),
            (B, T, D),
            lambda m: m.reshape(D, H, K),
        ),
        "DenseGeneral-axis(-2,-1)": (
            lambda r: nn.DenseGeneral(D, axis=(-2, -1)),
            (B, T, H, K),
            lambda m: m.reshape(H, K, D),
        ),
        "DenseGeneral-axis1": (lambda r: nn.DenseGeneral(OUT, axis=1), (B, D, T), lambda m: m),
        "Einsum": (
            lambda r: nn.Einsum((D, H, K), "btd,dhk->bthk"),
            (B, T, D),
            lambda m: m.reshape(D, H, K),
        ),
        "Einsum-contracted-middle": (
            lambda r: nn.Einsum((H, D, K), "btd,hdk->bthk"),
            (B, T, D),
            lambda m: m.reshape(D, H, K).transpose(1, 0, 2),
        ),
    },
    "nnx": {
        "Linear": (lambda r: nnx.Linear(D, OUT, rngs=r), (B, T, D), lambda m: m),
        "LinearGeneral-axis-1": (
            lambda r: nnx.LinearGeneral(D, (H, K), axis=-1, rngs=r),
            (B, T, D),
            lambda m: m.reshape(D, H, K),
        ),
        "LinearGeneral-axis(-2,-1)": (
            lambda r: nnx.LinearGeneral((H, K), D, axis=(-2, -1), rngs=r),
            (B, T, H, K),
            lambda m: m.reshape(H, K, D),
        ),
        "Einsum": (
            lambda r: nnx.Einsum("btd,dhk->bthk", (D, H, K), (H, K), rngs=r),
            (B, T, D),
            lambda m: m.reshape(D, H, K),
        ),
        "Einsum-contracted-middle": (
            lambda r: nnx.Einsum("btd,hdk->bthk", (H, D, K), (H, K), rngs=r),
            (B, T, D),
            lambda m: m.reshape(D, H, K).transpose(1, 0, 2),
        ),
    },
}
LORA_CASES = [(f, host) for f, hosts in LORA_HOSTS.items() for host in hosts]

# The kernel as a matrix: (contracted features, output features) = shapes of A's rows, B's columns.
FLAT_SHAPE = {
    "Dense": (D, OUT),
    "DenseGeneral-axis-1": (D, H * K),
    "DenseGeneral-axis(-2,-1)": (H * K, D),
    "DenseGeneral-axis1": (D, OUT),
    "Einsum": (D, H * K),
    "Einsum-contracted-middle": (D, H * K),
    "Linear": (D, OUT),
    "LinearGeneral-axis-1": (D, H * K),
    "LinearGeneral-axis(-2,-1)": (H * K, D),
}


def _one_host(fe, make_host, x, adapters):
    """``(reference, adapted)`` of a Sequential of one host (path ``layers#0``)."""
    base = fe.base(fe.sequential(make_host), x)
    return base, fe.adapt(base, fe.path("layers#0"), adapters, x)


@pytest.mark.parametrize("fe_name, host_id", LORA_CASES, ids=[f"{f}-{h}" for f, h in LORA_CASES])
def test_lora_is_the_host_with_an_updated_kernel(fe_name, host_id):
    fe = FRONTENDS[fe_name]
    make_host, x_shape, to_kernel = LORA_HOSTS[fe_name][host_id]
    x = _normal(x_shape)
    base, h = _one_host(fe, make_host, x, [("lora", LoRAConfig(rank=RANK, alpha=ALPHA))])
    host = fe.path("layers#0")
    h.randomize(seed=1)
    lora = f64(h.params_at(host, "lora"))
    a, b = lora["a"], lora["b"]
    n_in, n_out = FLAT_SHAPE[host_id]
    assert a.shape == (n_in, RANK) and b.shape == (RANK, n_out)

    got, base_out = h(x), base(x)
    params = h.base_params()
    kernel = np.asarray(get_at(params, host)["kernel"], np.float64) + SCALE * to_kernel(a @ b)
    expected = base.run_with(set_at(params, f"{host}/kernel", jnp.asarray(kernel, jnp.float32)), x)
    assert got.shape == base_out.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(got, np.float64) - np.asarray(base_out, np.float64)).max() > 0.1


@pytest.mark.parametrize("fe_name, host_id", LORA_CASES, ids=[f"{f}-{h}" for f, h in LORA_CASES])
def test_lora_is_identity_at_init(fe_name, host_id):
    fe = FRONTENDS[fe_name]
    make_host, x_shape, _ = LORA_HOSTS[fe_name][host_id]
    x = _normal(x_shape)
    base, h = _one_host(fe, make_host, x, [("lora", LoRAConfig(rank=RANK, alpha=ALPHA))])
    lora = h.params_at(fe.path("layers#0"), "lora")
    np.testing.assert_array_equal(lora["b"], np.zeros(lora["b"].shape))
    assert np.abs(np.asarray(lora["a"])).min() > 0.0
    np.testing.assert_array_equal(h(x), base(x))


@pytest.mark.parametrize("use_jit", [False, True])
def test_lora_on_a_dense_host_matches_the_explicit_formula(fe, use_jit):
    x = _normal((B, T, D))
    _, h = _one_host(fe, fe.dense(D, OUT), x, [("lora", LoRAConfig(rank=RANK, alpha=ALPHA))])
    h.randomize(seed=1)
    got = h.jit(x) if use_jit else h(x)
    host = fe.path("layers#0")
    w, bias = (f64(get_at(h.base_params(), host)[k]) for k in ("kernel", "bias"))
    a, b = (f64(h.params_at(host, "lora")[k]) for k in ("a", "b"))
    xn = f64(x)
    np.testing.assert_allclose(got, xn @ w + bias + SCALE * xn @ a @ b, rtol=1e-5, atol=1e-5)
    assert np.abs(SCALE * xn @ a @ b).max() > 0.1  # the update is not negligible


def test_lora_keeps_bfloat16_inputs(fe):
    x = _normal((B, T, D), dtype=jnp.bfloat16)
    make_host = fe.dense(D, OUT, dtype=jnp.bfloat16)
    base, h = _one_host(fe, make_host, x, [("lora", LoRAConfig(rank=RANK, alpha=ALPHA))])
    h.randomize(seed=1)
    got, base_out = h(x), base(x)
    assert got.dtype == base_out.dtype == jnp.bfloat16
    host = fe.path("layers#0")
    w, bias = (f64(get_at(h.base_params(), host)[k]) for k in ("kernel", "bias"))
    a, b = (f64(h.params_at(host, "lora")[k]) for k in ("a", "b"))
    expected = f64(x) @ w + bias + SCALE * f64(x) @ a @ b
    np.testing.assert_allclose(f64(got), expected, rtol=5e-2, atol=5e-2)


NON_DENSE = {
    "linen": {"LayerNorm": lambda r: nn.LayerNorm(), "Conv": lambda r: nn.Conv(4, (3,))},
    "nnx": {
        "LayerNorm": lambda r: nnx.LayerNorm(D, rngs=r),
        "Conv": lambda r: nnx.Conv(D, 4, (3,), rngs=r),
    },
}


@pytest.mark.parametrize("kind", ["LayerNorm", "Conv"])
def test_lora_on_a_non_dense_host_raises_and_adds_nothing(fe, kind):
    """Linen raises when the weights are created (``init``), NNX at ``add_adapter``."""
    x = _normal((B, T, D))
    base = fe.base(fe.sequential(NON_DENSE[fe.name][kind]), x)
    host = fe.path("layers#0")
    with pytest.raises(ValueError, match="Dense-like"):
        fe.adapt(base, host, [("lora", LoRAConfig(rank=RANK))], x)
    h = fe.adapt(base, host, [], x)
    with pytest.raises(ValueError, match="Dense-like"):
        h.add("lora", LoRAConfig(rank=RANK))
    assert not h.model.is_adapter_available()
    assert h.sites() == set()


def test_transformer_attention_lora_trains_with_the_base_bitwise_frozen(fe):
    tokens, labels = (jnp.asarray(a) for a in digits(64))
    base = fe.base(fe.transformer(num_layers=1), tokens[:2])
    targets = fe.path(r"blocks#\d+/attn/(query|value)")
    h = fe.adapt(base, targets, [("lora", LoRAConfig(rank=4, alpha=8.0))], tokens[:2])
    hosts = fe.path(["blocks#0/attn/query", "blocks#0/attn/value"])
    assert h.sites() == {(host, "lora") for host in hosts}
    for host in hosts:
        lora = h.params_at(host, "lora")
        assert lora["a"].shape == (16, 4) and lora["b"].shape == (4, 16)
    np.testing.assert_array_equal(h(tokens[:2]), base(tokens[:2]))
    frozen = host_copy(h.base_params())

    def loss_fn(logits, batch):
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    losses = [m["loss"] for m in h.train(loss_fn, optax.adam(1e-2), [(tokens, labels)] * 12)]
    assert losses[-1] < 0.9 * losses[0], losses
    assert_trees_equal(h.base_params(), frozen)
    assert np.abs(np.asarray(h.params_at(hosts[0], "lora")["b"])).max() > 0.0


# --- IA3 and the parallel adapter -------------------------------------------------------------


def _ia3_scale(shape, seed=1):
    return jnp.asarray(1.0 + 0.5 * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


IA3_HOSTS = {  # (constructor(rngs), shape of the learned scale)
    "linen": {
        "Dense": (lambda r: nn.Dense(OUT), (OUT,)),
        "DenseGeneral": (lambda r: nn.DenseGeneral((H, K), axis=-1), (K,)),
    },
    "nnx": {
        "Linear": (lambda r: nnx.Linear(D, OUT, rngs=r), (OUT,)),
        "LinearGeneral": (lambda r: nnx.LinearGeneral(D, (H, K), rngs=r), (K,)),
    },
}
IA3_CASES = [(f, host) for f, hosts in IA3_HOSTS.items() for host in hosts]


@pytest.mark.parametrize("fe_name, host_id", IA3_CASES, ids=[f"{f}-{h}" for f, h in IA3_CASES])
def test_ia3_scales_the_host_output(fe_name, host_id):
    fe = FRONTENDS[fe_name]
    make_host, l_shape = IA3_HOSTS[fe_name][host_id]
    x = _normal((B, T, D))
    base, h = _one_host(fe, make_host, x, [("ia3", IA3Config())])
    host = fe.path("layers#0")
    np.testing.assert_array_equal(h.params_at(host, "ia3")["scale"], np.ones(l_shape, np.float32))
    base_out = base(x)
    np.testing.assert_array_equal(h(x), base_out)  # identity at init
    scale = _ia3_scale(l_shape)
    h.set_params_at(host, "ia3", {"scale": scale})
    np.testing.assert_allclose(h(x), f64(base_out) * f64(scale), rtol=1e-6, atol=1e-6)


def test_ia3_keeps_bfloat16_output(fe):
    x = _normal((B, D), dtype=jnp.bfloat16)
    base, h = _one_host(fe, fe.dense(D, OUT, dtype=jnp.bfloat16), x, [("ia3", IA3Config())])
    scale = _ia3_scale((OUT,))
    h.set_params_at(fe.path("layers#0"), "ia3", {"scale": scale})
    got, base_out = h(x), base(x)
    assert got.dtype == base_out.dtype == jnp.bfloat16
    np.testing.assert_allclose(f64(got), f64(base_out) * f64(scale), rtol=2e-2, atol=2e-2)


def _np_parallel(params, x, scale):
    p = f64(params)
    h = np.maximum(f64(x) @ p["down"]["kernel"] + p["down"]["bias"], 0.0)  # relu
    return scale * (h @ p["up"]["kernel"] + p["up"]["bias"])


@pytest.mark.parametrize("learn_scale", [False, True])
def test_parallel_adapter_matches_the_explicit_formula(fe, learn_scale):
    dim = 3
    cfg = ParallelAdapterConfig(dim=dim, activation="relu", scale=4.0, learn_scale=learn_scale)
    x = _normal((B, T, D))
    base, h = _one_host(fe, fe.dense(D, OUT), x, [("par", cfg)])
    host = fe.path("layers#0")
    params = h.params_at(host, "par")
    assert params["down"]["kernel"].shape == (D, dim)
    assert params["up"]["kernel"].shape == (dim, OUT)
    np.testing.assert_array_equal(params["up"]["kernel"], np.zeros((dim, OUT)))
    assert ("scale" in params) == learn_scale
    if learn_scale:
        assert params["scale"].shape == () and float(params["scale"]) == 4.0
    base_out = base(x)
    np.testing.assert_array_equal(h(x), base_out)

    h.randomize(seed=1)
    params = h.params_at(host, "par")
    scale = float(params["scale"]) if learn_scale else 4.0
    expected = f64(base_out) + _np_parallel(params, x, scale)
    np.testing.assert_allclose(h(x), expected, rtol=1e-5, atol=1e-5)
    assert np.abs(expected - f64(base_out)).max() > 0.1


# --- merging ------------------------------------------------------------------------------------

MERGE_GROUPS = {
    "lora": [r"blocks#\d+/attn/(query|value|out)", r"blocks#\d+/mlp/fc1"],
    "ia3": r"blocks#\d+/attn/(key|value)",
}


@pytest.fixture(scope="module")
def merge_setup(fe, base, x):
    """The transformer with LoRA on q/v/out and mlp/fc1, IA3 on k/v."""
    h = fe.adapt(
        base,
        fe.path(MERGE_GROUPS),
        [("lora:lora", LoRAConfig(rank=2, alpha=4.0)), ("ia3:ia3", IA3Config())],
        x,
    )
    h.set_adapters(merge_noise(h.adapters()))
    return h


def test_merged_base_equals_adapted_at_the_base_cost(fe, merge_setup, base, x):
    h = merge_setup.copy()
    original = host_copy(h.base_params())
    adapted_out = h(x)
    assert np.abs(f64(adapted_out) - f64(base(x))).max() > 1e-2
    base_counts = base.counts(x)
    assert h.counts(x)["dot_general"] > base_counts["dot_general"]

    merged = h.merge()
    # The unwrapped model on the merged parameters gives the adapted output.
    np.testing.assert_allclose(base.run_with(merged, x), adapted_out, rtol=1e-5, atol=1e-5)
    # Same structure, shapes and dtypes as the base: a drop-in replacement.
    assert jax.tree.structure(merged) == jax.tree.structure(original)
    for m, p in zip(jax.tree.leaves(merged), jax.tree.leaves(original), strict=True):
        assert m.shape == p.shape and m.dtype == p.dtype
    # Folded hosts changed, everything else is the very same value.
    for name in ("query", "key", "value", "out"):
        path = fe.path(f"blocks#0/attn/{name}/kernel")
        assert np.abs(f64(get_at(merged, path)) - f64(get_at(original, path))).max() > 1e-3
    for path in fe.path(["blocks#0/mlp/fc2", "embed", "head", "blocks#1/ln1"]):
        assert_trees_equal(get_at(merged, path), get_at(original, path))
    # Merging changed nothing: the adapted model still has its base and output.
    assert_trees_equal(h.base_params(), original)
    np.testing.assert_array_equal(h(x), adapted_out)

    # Merged into the adapted model with its adapters off: no adapter op is left.
    h.set_base(merged)
    h.set_enabled(enabled=False)
    np.testing.assert_allclose(h(x), adapted_out, rtol=1e-5, atol=1e-5)
    assert h.counts(x) == base_counts
    # Unmerged: the original base and the adapters back on.
    h.set_base(original)
    h.set_enabled(enabled=True)
    np.testing.assert_array_equal(h(x), adapted_out)
    assert_trees_equal(h.base_params(), original)


def test_merge_of_disabled_adapters_by_name(merge_setup, base, x):
    only_lora = merge_setup.copy()
    only_lora.set_enabled("ia3", enabled=False)
    merged = merge_setup.merge(names=["lora"])
    np.testing.assert_allclose(base.run_with(merged, x), only_lora(x), rtol=1e-5, atol=1e-5)
    # names=None merges the enabled adapters only.
    assert_trees_equal(only_lora.merge(), merged)


def test_merge_of_unknown_names_raises(merge_setup):
    with pytest.raises(ValueError, match=r"unknown adapter name 'nope'"):
        merge_setup.merge(names=["lora", "nope"])
    with pytest.raises(ValueError, match=r"weights names adapters not being merged: \['ia3x'\]"):
        merge_setup.merge(weights={"ia3x": 0.5})


@pytest.mark.parametrize(
    "cfg, kind",
    [
        (LinearAdapterConfig(dim=4), "LinearAdapter"),
        (ParallelAdapterConfig(dim=4), "ParallelAdapter"),
        (LoRAConfig(rank=2, adapter_strategy=ReturnResultStrategy()), "ReturnResultStrategy"),
    ],
    ids=["LinearAdapter", "ParallelAdapter", "ReturnResult-LoRA"],
)
def test_unmergeable_adapter_raises_naming_it(fe, cfg, kind):
    x = jnp.ones((2, D))
    _, h = _one_host(fe, fe.dense(D, D), x, [("lora", LoRAConfig(rank=2)), ("bad", cfg)])
    with pytest.raises(ValueError, match=rf"adapter 'bad' .*{kind}"):
        h.merge()
    merged = h.merge(names="lora")  # the others still merge
    assert get_at(merged, fe.path("layers#0"))["kernel"].shape == (D, D)


def _ab(params):
    return f64(params["a"]) @ f64(params["b"])


def test_weighted_combination_of_two_loras(fe):
    x = _normal((2, D), seed=3)
    l1 = LoRAConfig(rank=2, alpha=3.0)  # scale 1.5
    l2 = LoRAConfig(rank=4, alpha=2.0, rslora=True)  # scale 1.0
    base, h = _one_host(fe, fe.dense(D, OUT), x, [("l1", l1), ("l2", l2)])
    h.set_adapters(merge_noise(h.adapters()))
    host = fe.path("layers#0")
    params = get_at(h.base_params(), host)
    lora = {name: h.params_at(host, name) for name in ("l1", "l2")}
    merged_all = h.merge(weights={"l1": 0.3, "l2": 0.7})
    merged = get_at(merged_all, host)
    expected = f64(params["kernel"]) + 0.3 * 1.5 * _ab(lora["l1"]) + 0.7 * 1.0 * _ab(lora["l2"])
    np.testing.assert_allclose(merged["kernel"], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(merged["bias"], params["bias"])
    np.testing.assert_allclose(
        base.run_with(merged_all, x),
        f64(x) @ expected + f64(params["bias"]),
        rtol=1e-5,
        atol=1e-5,
    )


def test_scaled_add_strategy_factor_is_folded(fe):
    x = _normal((2, D), seed=3)
    lora_cfg = LoRAConfig(rank=2, alpha=4.0, adapter_strategy=ScaledAddStrategy(scale=0.25))
    ia3_cfg = IA3Config(adapter_strategy=ScaledAddStrategy(scale=0.5))
    base, h = _one_host(fe, fe.dense(D, OUT), x, [("lora", lora_cfg), ("ia3", ia3_cfg)])
    h.set_adapters(merge_noise(h.adapters()))
    host = fe.path("layers#0")
    w, bias = (f64(get_at(h.base_params(), host)[k]) for k in ("kernel", "bias"))
    ia3 = 1.0 + 0.5 * (f64(h.params_at(host, "ia3")["scale"]) - 1.0)
    merged_all = h.merge()
    merged = get_at(merged_all, host)
    expected_kernel = (w + 0.25 * 2.0 * _ab(h.params_at(host, "lora"))) * ia3
    np.testing.assert_allclose(merged["kernel"], expected_kernel, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(merged["bias"], bias * ia3, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(base.run_with(merged_all, x), h(x), rtol=1e-5, atol=1e-5)


def test_bfloat16_base_kernel_stays_bfloat16(fe):
    x = _normal((2, D), seed=3, dtype=jnp.bfloat16)
    make_host = fe.dense(D, OUT, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    _, h = _one_host(fe, make_host, x, [("lora", LoRAConfig(rank=2, alpha=4.0))])
    h.set_adapters(merge_noise(h.adapters()))
    host = fe.path("layers#0")
    kernel = get_at(h.base_params(), host)["kernel"]
    merged = get_at(h.merge(), host)["kernel"]
    assert kernel.dtype == merged.dtype == jnp.bfloat16
    expected = (f64(kernel) + 2.0 * _ab(h.params_at(host, "lora"))).astype(np.float32)
    np.testing.assert_allclose(f64(merged), expected, rtol=1e-2, atol=1e-2)
    assert np.abs(f64(merged) - f64(kernel)).max() > 0.1
