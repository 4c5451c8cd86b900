"""LoRA: a low-rank update of a Dense-like host's kernel, on Linen and NNX.

Every check is against an explicit formula computed here in float64 NumPy, or against the
unwrapped host run on the kernel ``W + scale * A @ B`` reshaped *by the test* (not by the
library's own layout code).

The checks both front-ends share (the update on every Dense-like host kind, identity at init,
jit, bfloat16 inputs, non-Dense hosts refused, attention LoRA training with a frozen base) are
in ``test_frontends.py``; here are the LoRA module itself, its scale and initialization, and
each front-end's own training switch for dropout.
"""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _frontends import noise_like
from absl.testing import parameterized
from flax import nnx

import jadapters
from jadapters import LoRA, LoRAConfig

B, T, D, OUT = 2, 3, 5, 6
H, K = 2, 3  # multi-dimensional features of DenseGeneral/Einsum hosts
RANK, ALPHA = 2, 3.0
SCALE = ALPHA / RANK


def _x(shape, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _f64(x):
    return np.asarray(x, np.float64)


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
        ({"rank": 2, "dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"rank": 2, "dropout": float("nan")}, r"dropout must be a finite number in \[0, 1\)"),
        ({"rank": 2, "param_dtype": "int32"}, r"param_dtype must name a floating dtype"),
        ({"rank": 2, "param_dtype": None}, r"param_dtype must name a floating dtype.*got None"),
        ({"rank": 2, "param_dtype": "flaot32"}, r"param_dtype must name .*got 'flaot32'"),
        ({"rank": 2, "alpha": "big"}, r"alpha must be a number or None \(alpha = rank\)"),
        ({"rank": 2, "alpha": True}, r"alpha must be a number or None .*got True \(bool\)"),
        ({"rank": 2, "alpha": float("nan")}, r"alpha must be a finite number, got nan"),
        ({"rank": 2, "alpha": -float("inf")}, r"alpha must be a finite number, got -inf"),
        ({"rank": 2, "alpha": 10**400}, r"alpha must be a finite number, got 1000"),
        ({"rank": 2, "rslora": 1}, r"rslora must be a bool, got 1; pass True or False"),
        ({"rank": 2, "rslora": "yes"}, r"rslora must be a bool, got 'yes'"),
        ({"rank": 2.0}, r"rank must be a positive int, got 2.0 \(float\)"),
        ({"rank": None}, r"rank must be a positive int, got None"),
        ({"rank": 2, "a_init": None}, r"a_init must be one of .*got None"),
    ],
)
@pytest.mark.parametrize("cls", [LoRAConfig, LoRA])
def test_invalid_arguments_raise_at_construction(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_numpy_scalars_become_python_values():
    cfg = LoRAConfig(rank=np.int32(4), alpha=np.float16(8.0), rslora=np.bool_(True))
    assert cfg == LoRAConfig(rank=4, alpha=8.0, rslora=True)
    assert (type(cfg.rank), type(cfg.alpha), type(cfg.rslora)) == (int, float, bool)
    assert cfg.build().scale == 4.0


# --- the module, eagerly and under jit --------------------------------------------------------


class LoRABattery(chex.TestCase):
    """Zero at init and ``scale * x @ A @ B`` after, eagerly and under ``jit`` (chex.variants)."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("plain", False), ("rslora", True))
    def test_zero_at_init_then_formula(self, rslora):
        lora = LoRA(RANK, alpha=ALPHA, rslora=rslora)
        x = _x((B, T, D))
        variables = lora.init(jax.random.key(0), x, out_features=OUT)
        forward = self.variant(lambda variables, x: lora.apply(variables, x, out_features=OUT))
        chex.assert_trees_all_equal(forward(variables, x), np.zeros((B, T, OUT), np.float32))
        variables = noise_like(variables, seed=1)
        a, b = (_f64(variables["params"][k]) for k in ("a", "b"))
        scale = ALPHA / math.sqrt(RANK) if rslora else ALPHA / RANK
        expected = scale * _f64(x) @ a @ b
        chex.assert_trees_all_close(forward(variables, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "x, out_features, match",
    [
        (jnp.ones((B, D), jnp.int32), OUT, "LoRA needs a floating x, got dtype int32"),
        (jnp.ones((), jnp.float32), OUT, r"LoRA needs x of rank >= 1"),
        (jnp.ones((B, D)), 0, "out_features must be a positive int, got 0"),
        (jnp.ones((B, D)), 2.0, r"out_features must be a positive int, got 2.0"),
    ],
)
def test_bad_input_raises_at_trace_time(x, out_features, match, key):
    with pytest.raises(ValueError, match=match):
        jax.jit(LoRA(RANK).init, static_argnames="out_features")(key, x, out_features=out_features)


# --- training ----------------------------------------------------------------------------------


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
