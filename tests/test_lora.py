"""LoRA: a low-rank update of a Dense-like host's kernel, on Linen and NNX.

Every check is against an explicit formula computed here in float64 NumPy, or against the
unwrapped host run on the kernel ``W + scale * A @ B`` reshaped *by the test* (not by the
library's own layout code).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _data import digits
from flax import nnx

import jadapters
from jadapters import LoRA, LoRAConfig
from jadapters.demo.models import LinenTransformer, NNXTransformer

B, T, D, OUT = 2, 3, 5, 6
H, K = 2, 3  # multi-dimensional features of DenseGeneral/Einsum hosts
RANK, ALPHA = 2, 3.0
SCALE = ALPHA / RANK


def _x(shape, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _f64(x):
    return np.asarray(x, np.float64)


# Host kinds: (constructor, input shape, flat (in, out) update -> kernel shape, written out).
LINEN_HOSTS = {
    "Dense": (lambda: nn.Dense(OUT), (B, T, D), lambda m: m),
    "DenseGeneral-axis-1": (
        lambda: nn.DenseGeneral((H, K), axis=-1),
        (B, T, D),
        lambda m: m.reshape(D, H, K),
    ),
    "DenseGeneral-axis(-2,-1)": (
        lambda: nn.DenseGeneral(D, axis=(-2, -1)),
        (B, T, H, K),
        lambda m: m.reshape(H, K, D),
    ),
    "DenseGeneral-axis1": (lambda: nn.DenseGeneral(OUT, axis=1), (B, D, T), lambda m: m),
    "Einsum": (
        lambda: nn.Einsum((D, H, K), "btd,dhk->bthk"),
        (B, T, D),
        lambda m: m.reshape(D, H, K),
    ),
    "Einsum-contracted-middle": (
        lambda: nn.Einsum((H, D, K), "btd,hdk->bthk"),
        (B, T, D),
        lambda m: m.reshape(D, H, K).transpose(1, 0, 2),
    ),
}

NNX_HOSTS = {
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
}

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


def _linen_adapted(host, cfg):
    model = nn.Sequential([host])
    adapted = jadapters.adapter_transform(model, "layers_0").add_adapter("lora", cfg)
    return model, adapted


class _Holder(nnx.Module):
    def __init__(self, host):
        self.host = host

    def __call__(self, x):
        return self.host(x)


def _nnx_adapted(make_host, cfg, *, seed=0, rngs=None):
    """(adapted model, an unwrapped copy of its host)."""
    host = make_host(nnx.Rngs(seed))
    reference = nnx.clone(host)
    model = jadapters.adapter_transform(_Holder(host), "host")
    model.add_adapter("lora", cfg, rngs=rngs or nnx.Rngs(params=1, dropout=2))
    return model, reference


def _randomize_nnx_adapters(model, randomize, seed=1):
    nnx.update(model, randomize(nnx.state(model, jadapters.AdapterParam), seed=seed))


# --- the explicit formula ---------------------------------------------------------------------


@pytest.mark.parametrize("use_jit", [False, True])
def test_linen_dense_matches_explicit_formula(use_jit, key, randomize):
    model, adapted = _linen_adapted(nn.Dense(OUT), LoRAConfig(rank=RANK, alpha=ALPHA))
    x = _x((B, T, D))
    variables = adapted.init(key, x)
    adapters = randomize(variables["adapters"], seed=1)
    apply = jax.jit(adapted.apply) if use_jit else adapted.apply
    got = apply({"params": variables["params"], "adapters": adapters}, x)

    w, bias = (_f64(variables["params"]["layers_0"][k]) for k in ("kernel", "bias"))
    a, b = (_f64(adapters["layers_0"]["lora"][k]) for k in ("a", "b"))
    xn = _f64(x)
    expected = xn @ w + bias + SCALE * xn @ a @ b
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(SCALE * xn @ a @ b).max() > 0.1  # the update is not negligible


@pytest.mark.parametrize("host_id", list(LINEN_HOSTS))
def test_linen_lora_is_host_with_updated_kernel(host_id, key, randomize):
    make_host, x_shape, to_kernel = LINEN_HOSTS[host_id]
    host = make_host()
    _, adapted = _linen_adapted(host, LoRAConfig(rank=RANK, alpha=ALPHA))
    x = _x(x_shape)
    variables = adapted.init(key, x)
    host_params = variables["params"]["layers_0"]
    kernel = host_params["kernel"]
    lora = randomize(variables["adapters"], seed=1)
    a, b = (_f64(lora["layers_0"]["lora"][k]) for k in ("a", "b"))
    n_in, n_out = FLAT_SHAPE[host_id]
    assert a.shape == (n_in, RANK) and b.shape == (RANK, n_out)

    got = adapted.apply({"params": variables["params"], "adapters": lora}, x)
    new_kernel = _f64(kernel) + SCALE * to_kernel(a @ b)
    expected = host.apply({"params": {**host_params, "kernel": jnp.asarray(new_kernel)}}, x)
    base = host.apply({"params": host_params}, x)
    assert got.shape == base.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(_f64(got) - _f64(base)).max() > 0.1


@pytest.mark.parametrize("host_id", list(NNX_HOSTS))
def test_nnx_lora_is_host_with_updated_kernel(host_id, randomize):
    make_host, x_shape, to_kernel = NNX_HOSTS[host_id]
    model, reference = _nnx_adapted(make_host, LoRAConfig(rank=RANK, alpha=ALPHA))
    _randomize_nnx_adapters(model, randomize)
    x = _x(x_shape)
    lora = model.host.adapter_layer["lora"].param_values()
    a, b = _f64(lora["a"]), _f64(lora["b"])
    kernel = _f64(model.host.kernel[...])
    n_in, n_out = FLAT_SHAPE[host_id]
    assert a.shape == (n_in, RANK) and b.shape == (RANK, n_out)

    got = model(x)
    base = reference(x)
    reference.kernel[...] = jnp.asarray(kernel + SCALE * to_kernel(a @ b), jnp.float32)
    np.testing.assert_allclose(got, reference(x), rtol=1e-5, atol=1e-5)
    assert np.abs(_f64(got) - _f64(base)).max() > 0.1


@pytest.mark.parametrize("host_id", list(LINEN_HOSTS))
def test_linen_identity_at_init(host_id, key):
    make_host, x_shape, _ = LINEN_HOSTS[host_id]
    model, adapted = _linen_adapted(make_host(), LoRAConfig(rank=RANK, alpha=ALPHA))
    x = _x(x_shape)
    variables = adapted.init(key, x)
    lora = variables["adapters"]["layers_0"]["lora"]
    np.testing.assert_array_equal(lora["b"], np.zeros(lora["b"].shape))
    assert np.abs(_f64(lora["a"])).min() > 0.0
    np.testing.assert_array_equal(
        adapted.apply(variables, x), model.apply({"params": variables["params"]}, x)
    )


@pytest.mark.parametrize("host_id", list(NNX_HOSTS))
def test_nnx_identity_at_init(host_id):
    make_host, x_shape, _ = NNX_HOSTS[host_id]
    model, reference = _nnx_adapted(make_host, LoRAConfig(rank=RANK, alpha=ALPHA))
    b = model.host.adapter_layer["lora"].param_values()["b"]
    np.testing.assert_array_equal(b, np.zeros(b.shape))
    x = _x(x_shape)
    np.testing.assert_array_equal(model(x), reference(x))


# --- scale and initialization ------------------------------------------------------------------


@pytest.mark.parametrize(
    "rank, alpha, rslora, expected",
    [
        (4, 8.0, False, 2.0),  # alpha / rank
        (4, 8.0, True, 4.0),  # alpha / sqrt(rank)
        (4, None, False, 1.0),  # alpha defaults to rank
        (4, None, True, 2.0),  # rank / sqrt(rank)
        (3, 1, False, 1.0 / 3.0),
    ],
)
def test_scale(rank, alpha, rslora, expected, key, randomize):
    cfg = LoRAConfig(rank=rank, alpha=alpha, rslora=rslora)
    assert cfg.build().scale == pytest.approx(expected, rel=1e-12)
    model, adapted = _linen_adapted(nn.Dense(OUT), cfg)
    x = _x((B, D))
    variables = adapted.init(key, x)
    adapters = randomize(variables["adapters"], seed=1)
    a, b = (_f64(adapters["layers_0"]["lora"][k]) for k in ("a", "b"))
    delta = adapted.apply({**variables, "adapters": adapters}, x) - model.apply(variables, x)
    np.testing.assert_allclose(delta, expected * _f64(x) @ a @ b, rtol=1e-4, atol=1e-5)


def test_he_uniform_init_bounds(key):
    fan_in, rank = 256, 8
    a = LoRA(rank).init(key, jnp.zeros((1, fan_in)), out_features=4)["params"]["a"]
    bound = 1.0 / math.sqrt(fan_in)  # Kaiming-uniform with a = sqrt(5), as PyTorch and PEFT
    assert a.shape == (fan_in, rank)
    assert np.abs(a).max() <= bound
    assert np.abs(a).max() > 0.95 * bound
    assert np.std(a) == pytest.approx(bound / math.sqrt(3.0), rel=0.1)


def test_gaussian_init_std(key):
    fan_in, rank = 256, 8
    params = LoRA(rank, a_init="gaussian").init(key, jnp.zeros((1, fan_in)), out_features=4)
    a = np.asarray(params["params"]["a"])
    assert np.std(a) == pytest.approx(1.0 / rank, rel=0.1)
    assert abs(np.mean(a)) < 3.0 / rank / math.sqrt(a.size)
    np.testing.assert_array_equal(params["params"]["b"], np.zeros((rank, 4)))


# --- dtypes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16])
def test_bfloat16_params(x_dtype, key, randomize):
    host = nn.Dense(OUT, dtype=x_dtype)
    model, adapted = _linen_adapted(host, LoRAConfig(rank=RANK, param_dtype="bfloat16"))
    x = _x((B, D), dtype=x_dtype)
    variables = adapted.init(key, x)
    lora = variables["adapters"]["layers_0"]["lora"]
    assert lora["a"].dtype == jnp.bfloat16 and lora["b"].dtype == jnp.bfloat16
    adapters = randomize(variables["adapters"], seed=1)
    got = adapted.apply({**variables, "adapters": adapters}, x)
    assert got.dtype == x_dtype == model.apply(variables, x).dtype
    a, b = (_f64(adapters["layers_0"]["lora"][k]) for k in ("a", "b"))
    w, bias = (_f64(variables["params"]["layers_0"][k]) for k in ("kernel", "bias"))
    expected = _f64(x) @ w + bias + _f64(x) @ a @ b
    tol = 1e-5 if x_dtype == jnp.float32 else 5e-2
    np.testing.assert_allclose(_f64(got), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("front_end", ["linen", "nnx"])
def test_bfloat16_inputs(front_end, key, randomize):
    cfg = LoRAConfig(rank=RANK, alpha=ALPHA)
    x = _x((B, T, D), dtype=jnp.bfloat16)
    if front_end == "linen":
        model, adapted = _linen_adapted(nn.Dense(OUT, dtype=jnp.bfloat16), cfg)
        variables = adapted.init(key, x)
        variables = {**variables, "adapters": randomize(variables["adapters"], seed=1)}
        got, base = adapted.apply(variables, x), model.apply(variables, x)
        w, bias = (_f64(variables["params"]["layers_0"][k]) for k in ("kernel", "bias"))
        a, b = (_f64(variables["adapters"]["layers_0"]["lora"][k]) for k in ("a", "b"))
    else:
        model, reference = _nnx_adapted(
            lambda r: nnx.Linear(D, OUT, dtype=jnp.bfloat16, rngs=r), cfg
        )
        _randomize_nnx_adapters(model, randomize)
        got, base = model(x), reference(x)
        w, bias = _f64(model.host.kernel[...]), _f64(model.host.bias[...])
        lora = model.host.adapter_layer["lora"].param_values()
        a, b = _f64(lora["a"]), _f64(lora["b"])
    assert got.dtype == base.dtype == jnp.bfloat16
    expected = _f64(x) @ w + bias + SCALE * _f64(x) @ a @ b
    np.testing.assert_allclose(_f64(got), expected, rtol=5e-2, atol=5e-2)


# --- dropout on the LoRA branch ----------------------------------------------------------------


def test_linen_dropout_acts_on_lora_input_in_training_only(key, randomize):
    model, adapted = _linen_adapted(nn.Dense(OUT), LoRAConfig(rank=RANK, dropout=0.5))
    x = _x((B, T, D))
    variables = adapted.init(key, x)
    base = model.apply(variables, x)
    train = dict(adapter_train=True, rngs={"dropout": jax.random.key(1)})
    # B = 0: the branch adds nothing whatever the mask, so the host itself is not dropped.
    np.testing.assert_array_equal(adapted.apply(variables, x, **train), base)

    variables = {**variables, "adapters": randomize(variables["adapters"], seed=1)}
    a, b = (_f64(variables["adapters"]["layers_0"]["lora"][k]) for k in ("a", "b"))
    evaluated = adapted.apply(variables, x)
    np.testing.assert_allclose(evaluated, _f64(base) + _f64(x) @ a @ b, rtol=1e-5, atol=1e-5)
    trained = adapted.apply(variables, x, **train)
    assert np.abs(_f64(trained) - _f64(evaluated)).max() > 1e-2
    other_key = adapted.apply(variables, x, adapter_train=True, rngs={"dropout": jax.random.key(2)})
    assert np.abs(_f64(trained) - _f64(other_key)).max() > 1e-2
    with pytest.raises(ValueError, match="needs a PRNG key"):
        adapted.apply(variables, x, adapter_train=True)


def test_linen_dropout_acts_on_einsum_hosts_too(key, randomize):
    """The config promises dropout on the LoRA branch's input; an Einsum host must not drop it
    silently."""
    host = nn.Einsum((D, H, K), "btd,dhk->bthk")
    _, adapted = _linen_adapted(host, LoRAConfig(rank=RANK, dropout=0.5))
    x = _x((B, T, D))
    variables = adapted.init(key, x)
    variables = {**variables, "adapters": randomize(variables["adapters"], seed=1)}
    evaluated = adapted.apply(variables, x)
    trained = adapted.apply(variables, x, adapter_train=True, rngs={"dropout": jax.random.key(1)})
    assert np.abs(_f64(trained) - _f64(evaluated)).max() > 1e-2


def test_nnx_dropout_follows_train_and_eval(randomize):
    cfg = LoRAConfig(rank=RANK, dropout=0.5)
    model, reference = _nnx_adapted(lambda r: nnx.Linear(D, OUT, rngs=r), cfg)
    _randomize_nnx_adapters(model, randomize)
    x = _x((B, T, D))
    lora = model.host.adapter_layer["lora"].param_values()
    expected = _f64(reference(x)) + _f64(x) @ _f64(lora["a"]) @ _f64(lora["b"])
    model.eval()
    np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-5)
    model.train()
    first, second = model(x), model(x)
    assert np.abs(_f64(first) - expected).max() > 1e-2
    assert np.abs(_f64(first) - _f64(second)).max() > 1e-2  # the stream advances


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank": 0}, r"rank must be a positive int, got 0"),
        ({"rank": 2, "a_init": "xavier"}, r"a_init must be one of .*'xavier'"),
        ({"rank": 2, "dropout": 1.0}, r"dropout must be a float in \[0, 1\), got 1.0"),
        ({"rank": 2, "param_dtype": "int32"}, r"param_dtype must name a floating dtype"),
        ({"rank": 2, "alpha": "big"}, r"alpha must be a number or None"),
    ],
)
@pytest.mark.parametrize("cls", [LoRAConfig, LoRA])
def test_invalid_arguments_raise_at_construction(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("host", [nn.LayerNorm(), nn.Conv(4, (3,))], ids=["LayerNorm", "Conv"])
def test_linen_non_dense_host_raises_at_init(host, key):
    _, adapted = _linen_adapted(host, LoRAConfig(rank=RANK))
    with pytest.raises(ValueError, match="Dense-like"):
        adapted.init(key, _x((B, T, D)))


@pytest.mark.parametrize(
    "make_host",
    [lambda r: nnx.LayerNorm(D, rngs=r), lambda r: nnx.Conv(D, 4, (3,), rngs=r)],
    ids=["LayerNorm", "Conv"],
)
def test_nnx_non_dense_host_raises_at_add_adapter(make_host):
    model = jadapters.adapter_transform(_Holder(make_host(nnx.Rngs(0))), "host")
    with pytest.raises(ValueError, match="Dense-like"):
        model.add_adapter("lora", LoRAConfig(rank=RANK), rngs=nnx.Rngs(1))
    assert not model.is_adapter_available()


# --- LoRA on a transformer's attention --------------------------------------------------------

N_CLASSES, STEPS, LAYERS = 10, 12, 1
TF = dict(num_classes=N_CLASSES, d_model=16, num_layers=LAYERS, num_heads=2, mlp_dim=32)
LINEN_QV = r"blocks_\d+/attn/(query|value)"
NNX_QV = r"blocks/\d+/attn/(query|value)"


@pytest.fixture(scope="module")
def batch():
    tokens, labels = digits(64)
    return jnp.asarray(tokens), jnp.asarray(labels)


def _cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def test_linen_transformer_attention_lora_trains_base_frozen(batch):
    tokens, labels = batch
    base = LinenTransformer(**TF)
    adapted = jadapters.adapter_transform(base, LINEN_QV)
    adapted = adapted.add_adapter("lora", LoRAConfig(rank=4, alpha=8.0))
    variables = adapted.init(jax.random.key(0), tokens[:2])
    adapters = variables["adapters"]
    assert sorted(adapters) == [f"blocks_{i}" for i in range(LAYERS)]
    for i in range(LAYERS):
        assert list(adapters[f"blocks_{i}"]) == ["attn"]
        assert sorted(adapters[f"blocks_{i}"]["attn"]) == ["query", "value"]
        for proj in ("query", "value"):
            lora = adapters[f"blocks_{i}"]["attn"][proj]["lora"]
            assert lora["a"].shape == (16, 4) and lora["b"].shape == (4, 16)
    base_params = variables["params"]
    x = tokens[:2]
    np.testing.assert_array_equal(
        adapted.apply(variables, x), base.apply({"params": base_params}, x)
    )
    frozen = jax.tree.map(np.array, base_params)

    def loss_fn(apply, batch):
        return _cross_entropy(apply(batch[0]), batch[1])

    step = jadapters.linen_train_step(adapted, loss_fn, optax.adam(1e-2))
    opt_state = step.init(adapters)
    losses = []
    for i in range(STEPS):
        adapters, opt_state, metrics = step(
            adapters, opt_state, {"params": base_params}, batch, jax.random.key(i)
        )
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.9 * losses[0], losses
    jax.tree.map(np.testing.assert_array_equal, base_params, frozen)
    b = adapters["blocks_0"]["attn"]["query"]["lora"]["b"]
    assert np.abs(b).max() > 0.0


def test_nnx_transformer_attention_lora_trains_base_frozen(batch):
    tokens, labels = batch
    model = NNXTransformer(8, **TF, rngs=nnx.Rngs(0))
    reference = nnx.clone(model)
    model = jadapters.adapter_transform(model, NNX_QV)
    model.add_adapter("lora", LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
    hosts = model.get_adapter_modules("lora")
    assert sorted("/".join(map(str, p)) for p in hosts) == [
        f"blocks/{i}/attn/{p}" for i in range(LAYERS) for p in ("query", "value")
    ]
    np.testing.assert_array_equal(model(tokens[:2]), reference(tokens[:2]))
    frozen = jax.tree.map(np.array, nnx.state(model, nnx.Param))

    optimizer = jadapters.adapter_optimizer(model, optax.adam(1e-2))
    step = jadapters.nnx_train_step(lambda m, b: _cross_entropy(m(b[0]), b[1]))
    losses = [float(step(model, optimizer, batch)["loss"]) for _ in range(STEPS)]
    assert losses[-1] < 0.9 * losses[0], losses
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param), frozen)
    b = model.blocks[0].attn.query.adapter_layer["lora"].param_values()["b"]
    assert np.abs(b).max() > 0.0


def test_nnx_training_step_leaves_other_references_to_the_base_usable():
    """The base is frozen: a training step must not donate (and so delete) its buffers, which
    a snapshot kept for unmerging or a clone of the model still hold."""
    model, reference = _nnx_adapted(lambda r: nnx.Linear(D, OUT, rngs=r), LoRAConfig(rank=RANK))
    snapshot = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    x = _x((B, D))
    expected = np.array(reference(x))
    optimizer = jadapters.adapter_optimizer(model, optax.adam(1e-2))
    step = jadapters.nnx_train_step(lambda m, x: (m(x) ** 2).mean())
    step(model, optimizer, x)
    np.testing.assert_array_equal(snapshot["host"]["kernel"], model.host.kernel[...])
    np.testing.assert_array_equal(reference(x), expected)
