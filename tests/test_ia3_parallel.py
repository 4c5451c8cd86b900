"""IA3 (a learned scale on a host's output) and the parallel adapter (a bottleneck beside the
host), against explicit formulas.

The checks both front-ends share (IA3 on Dense-like hosts, bfloat16 outputs, the parallel
adapter's formula with a fixed or learned scale) are in ``test_frontends.py``; here are the
modules themselves, IA3 on a real attention's keys and values, and the learned scale's
gradient."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
        ({"param_dtype": "int32"}, r"param_dtype must name a floating dtype"),
        ({"adapter_strategy": "add"}, r"adapter_strategy must be a strategy"),
    ],
)
@pytest.mark.parametrize("cls", [IA3Config, IA3])
def test_ia3_invalid_arguments_raise(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


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
        ({"dim": 2, "learn_scale": 1}, r"learn_scale must be a bool, got 1"),
        ({"dim": 2, "dropout": -0.1}, r"dropout must be a float in \[0, 1\)"),
    ],
)
@pytest.mark.parametrize("cls", [ParallelAdapterConfig, ParallelAdapter])
def test_parallel_invalid_arguments_raise(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)
