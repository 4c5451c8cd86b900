"""IA3 (a learned scale on a host's output) and the parallel adapter (a bottleneck beside the
host), against explicit formulas.

The checks both front-ends share (IA3 on Dense-like hosts, bfloat16 outputs, the parallel
adapter's formula with a fixed or learned scale) are in ``test_frontends.py``; here are the
modules themselves, IA3 on a real attention's keys and values, and the learned scale's
gradient."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _frontends import noise_like
from absl.testing import parameterized

import jadapters
from jadapters import IA3, IA3Config, ParallelAdapter, ParallelAdapterConfig
from jadapters.adapters.ia3 import ia3_delta
from jadapters.demo.models import LinenTransformer

B, T, D_IN, D_OUT = 2, 3, 5, 7
K = 3


def _x(shape, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _f64(x):
    return np.asarray(x, np.float64)


def _linen(host, name, cfg):
    model = nn.Sequential([host])
    return model, jadapters.adapter_transform(model, "layers_0").add_adapter(name, cfg)


def _random_ia3_scale(shape, seed=1):
    return jnp.asarray(1.0 + 0.5 * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# --- IA3 --------------------------------------------------------------------------------------


def test_ia3_delta_is_y_times_l_minus_one():
    y, scale = _x((B, T, K)), _random_ia3_scale((K,))
    expected = _f64(y) * (_f64(scale) - 1.0)
    np.testing.assert_allclose(ia3_delta(y, scale), expected, rtol=1e-6, atol=1e-6)


def test_ia3_on_attention_key_value_equals_rescaled_kernels(key):
    """IA3 on k/v of a real attention equals the base with k/v kernel and bias times ``l``."""
    # The same sizes as the other transformer tests, so that eager ops compiled there are reused.
    base = LinenTransformer(num_classes=10, d_model=16, num_layers=2, num_heads=2, mlp_dim=32)
    adapted = jadapters.adapter_transform(base, r"blocks_\d+/attn/(key|value)")
    adapted = adapted.add_adapter("ia3", IA3Config())
    x = _x((2, 8, 8))
    variables = adapted.init(key, x)
    attn_adapters = variables["adapters"]["blocks_0"]["attn"]
    assert set(attn_adapters) == {"key", "value"}
    assert attn_adapters["key"]["ia3"]["scale"].shape == (8,)  # head_dim
    np.testing.assert_array_equal(
        adapted.apply(variables, x), base.apply({"params": variables["params"]}, x)
    )

    blocks, projections = ("blocks_0", "blocks_1"), ("key", "value")
    scales = {
        (blk, p): _random_ia3_scale((8,), seed=i)
        for i, (blk, p) in enumerate((b, p) for b in blocks for p in projections)
    }
    adapters = {
        blk: {"attn": {p: {"ia3": {"scale": scales[blk, p]}} for p in projections}}
        for blk in blocks
    }
    got = adapted.apply({"params": variables["params"], "adapters": adapters}, x)
    params = dict(variables["params"])
    for blk in blocks:
        attn = dict(params[blk]["attn"])
        for p in projections:
            # kernel (16, 2, 8) and bias (2, 8): scale their last (head_dim) axis
            s = scales[blk, p].reshape((1, 8))
            attn[p] = {"kernel": attn[p]["kernel"] * s[None], "bias": attn[p]["bias"] * s}
        params[blk] = {**params[blk], "attn": attn}
    expected = base.apply({"params": params}, x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(_f64(got) - _f64(base.apply(variables, x))).max() > 1e-3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"in_features": 0}, r"in_features must be a positive int or None"),
        ({"in_features": 2.0}, r"in_features must be a positive int or None .*got 2.0"),
        ({"in_features": "4"}, r"in_features must be a positive int or None .*got '4'"),
        ({"param_dtype": "int32"}, r"param_dtype must name a floating dtype"),
        ({"param_dtype": 32}, r"param_dtype must name a floating dtype.*got 32"),
        ({"adapter_strategy": "add"}, r"adapter_strategy must be a strategy"),
    ],
)
@pytest.mark.parametrize("cls", [IA3Config, IA3])
def test_ia3_invalid_arguments_raise(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize(
    "y, match",
    [
        (jnp.ones((B, K + 1)), rf"IA3 was built with in_features={K} but got an input with last"),
        (jnp.ones((B, K), jnp.int32), "IA3 needs a floating y, got dtype int32"),
        (jnp.ones((), jnp.float32), r"IA3 needs y of rank >= 1"),
    ],
)
def test_ia3_bad_input_raises_at_trace_time(y, match, key):
    with pytest.raises(ValueError, match=match):
        jax.jit(IA3(in_features=K).init)(key, y)


# --- parallel adapter --------------------------------------------------------------------------

DIM = 3


def _np_parallel(params, x, scale):
    p = jax.tree.map(_f64, params)
    h = np.maximum(_f64(x) @ p["down"]["kernel"] + p["down"]["bias"], 0.0)  # relu
    return scale * (h @ p["up"]["kernel"] + p["up"]["bias"])


def test_learned_scale_gets_a_gradient(key, randomize):
    cfg = ParallelAdapterConfig(dim=DIM, activation="relu", scale=4.0, learn_scale=True)
    _, adapted = _linen(nn.Dense(D_OUT), "par", cfg)
    x = _x((B, D_IN))
    variables = adapted.init(key, x)
    adapters = randomize(variables["adapters"], seed=1)

    def loss(adapters):
        return adapted.apply({"params": variables["params"], "adapters": adapters}, x).sum()

    grads = jax.grad(loss)(adapters)["layers_0"]["par"]
    params = adapters["layers_0"]["par"]
    # d/ds sum(host(x) + s * up(relu(down(x)))) = sum(up(relu(down(x))))
    expected = _np_parallel(params, x, 1.0).sum()
    np.testing.assert_allclose(grads["scale"], expected, rtol=1e-5)


def test_parallel_adapter_module_directly(key, randomize):
    adapter = ParallelAdapter(DIM, activation="relu", scale=0.5)
    x = _x((B, D_IN))
    variables = adapter.init(key, x, out_features=D_OUT)
    np.testing.assert_array_equal(
        adapter.apply(variables, x, out_features=D_OUT), np.zeros((B, D_OUT))
    )
    variables = randomize(variables, seed=2)
    np.testing.assert_allclose(
        adapter.apply(variables, x, out_features=D_OUT),
        _np_parallel(variables["params"], x, 0.5),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dim": 0}, r"dim must be a positive int, got 0"),
        ({"dim": 2, "scale": "big"}, r"scale must be a number, got 'big'"),
        ({"dim": 2, "scale": None}, r"scale must be a number, got None"),
        ({"dim": 2, "scale": float("nan")}, r"scale must be a finite number, got nan"),
        ({"dim": 2, "scale": float("inf")}, r"scale must be a finite number, got inf"),
        ({"dim": 2, "scale": 1j}, r"scale must be a number, got 1j \(complex\)"),
        ({"dim": 2, "learn_scale": 1}, r"learn_scale must be a bool, got 1"),
        ({"dim": 2, "learn_scale": None}, r"learn_scale must be a bool, got None"),
        ({"dim": 2, "activation": "tanh"}, r"activation must be one of .*got 'tanh'"),
        ({"dim": 2, "dropout": -0.1}, r"dropout must be in \[0, 1\), got -0.1"),
        ({"dim": 2, "dropout": float("inf")}, r"dropout must be a finite number in \[0, 1\)"),
    ],
)
@pytest.mark.parametrize("cls", [ParallelAdapterConfig, ParallelAdapter])
def test_parallel_invalid_arguments_raise(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_parallel_numpy_scalars_become_python_values():
    cfg = ParallelAdapterConfig(dim=np.int64(2), scale=np.float32(4.0), learn_scale=np.bool_(True))
    assert cfg == ParallelAdapterConfig(dim=2, scale=4.0, learn_scale=True)
    assert (type(cfg.dim), type(cfg.scale), type(cfg.learn_scale)) == (int, float, bool)


def test_parallel_bad_input_raises_at_trace_time(key):
    adapter = ParallelAdapter(DIM)
    with pytest.raises(ValueError, match="ParallelAdapter needs a floating x, got dtype int32"):
        adapter.init(key, jnp.ones((B, D_IN), jnp.int32), out_features=D_OUT)
    with pytest.raises(ValueError, match="out_features must be a positive int, got -1"):
        adapter.init(key, jnp.ones((B, D_IN)), out_features=-1)


# --- the modules, eagerly and under jit ----------------------------------------------------------


class IA3AndParallelBattery(chex.TestCase):
    """Identity at init and the explicit formula, eagerly and under ``jit`` (chex.variants)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_ia3_identity_at_init_then_formula(self):
        ia3 = IA3()
        y = _x((B, T, K))
        variables = ia3.init(jax.random.key(0), y)
        forward = self.variant(lambda v, y: jadapters.apply_adapter(ia3, v, y).output)
        chex.assert_trees_all_equal(forward(variables, y), y)
        scale = _random_ia3_scale((K,))
        expected = _f64(y) * _f64(scale)
        chex.assert_trees_all_close(
            forward({"params": {"scale": scale}}, y), expected, rtol=1e-6, atol=1e-6
        )

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("fixed_scale", False), ("learned_scale", True))
    def test_parallel_identity_at_init_then_formula(self, learn_scale):
        adapter = ParallelAdapter(DIM, activation="relu", scale=0.5, learn_scale=learn_scale)
        x, stream = _x((B, D_IN)), _x((B, D_OUT), seed=1)
        variables = adapter.init(jax.random.key(0), x, out_features=D_OUT)
        forward = self.variant(
            lambda v, x, s: jadapters.apply_adapter(adapter, v, x, stream=s).output
        )
        chex.assert_trees_all_equal(forward(variables, x, stream), stream)
        variables = noise_like(variables, seed=2)
        params = variables["params"]
        scale = float(params["scale"]) if learn_scale else 0.5
        expected = _f64(stream) + _np_parallel(params, x, scale)
        chex.assert_trees_all_close(forward(variables, x, stream), expected, rtol=1e-5, atol=1e-5)
