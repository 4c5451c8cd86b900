"""Adapter math as pure functions of the weights (``jadapters.adapters.functional``).

Each built-in type writes its math once, as ``forward(params, x, ...)``; its Linen module only
declares the weights and calls it, and the runtime calls ``forward`` directly. These tests pin
that the pure pieces are Flax's own arithmetic (bitwise), that a module and its ``forward``
give the same array, that ``declare`` creates exactly what Flax's layers create, and that a
traced adapted model runs no adapter module through Flax's ``apply``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jadapters
import jadapters.adapters.functional as F
from jadapters.adapters.base import adapter_forward
from jadapters.demo.models import LinenTransformer, NNXTransformer

DTYPES = [jnp.float32, jnp.bfloat16]


def _x(shape, dtype, seed=0):
    return (3.0 * jax.random.normal(jax.random.key(seed), shape) + 0.5).astype(dtype)


def _noisy(tree, seed=1):
    """``tree`` plus noise, so no weight sits at its init value (zeros, ones)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [
        (a + 0.2 * jax.random.normal(k, a.shape)).astype(a.dtype)
        for a, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, noisy)


def _equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_dense_is_flax_dense(dtype, bias):
    x = _x((2, 3, 8), dtype)
    layer = nn.Dense(5, use_bias=bias, dtype=dtype)
    params = _noisy(layer.init(jax.random.key(0), x)["params"])
    expected = jax.jit(lambda p, x: layer.apply({"params": p}, x))(params, x)
    got = jax.jit(lambda p, x: F.dense(x, p["kernel"], p.get("bias")))(params, x)
    _equal(got, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("epsilon", [1e-5, 1e-2])
def test_layer_norm_is_flax_layer_norm(dtype, epsilon):
    x = _x((4, 6, 16), dtype)
    layer = nn.LayerNorm(epsilon=epsilon, dtype=dtype)
    params = _noisy(layer.init(jax.random.key(0), x)["params"])
    expected = jax.jit(lambda p, x: layer.apply({"params": p}, x))(params, x)
    got = jax.jit(lambda p, x: F.layer_norm(x, p["scale"], p["bias"], epsilon=epsilon))(params, x)
    _equal(got, expected)


def test_dropout_is_the_explicit_formula():
    x, key = _x((64, 32), jnp.float32), jax.random.key(5)
    keep = np.asarray(jax.random.bernoulli(key, 0.7, x.shape))
    expected = np.where(keep, np.asarray(x) / 0.7, 0.0)
    np.testing.assert_allclose(F.dropout(x, 0.3, key, "A"), expected, rtol=1e-6)
    assert 0.5 < keep.mean() < 0.9
    with pytest.raises(ValueError, match="A has dropout=0.3 and needs a PRNG key"):
        F.dropout(x, 0.3, None, "A")


class _FlaxLinearAdapter(nn.Module):
    """The bottleneck adapter written with Flax's own layers: the reference for ``declare``."""

    dim: int
    norm_position: str

    @nn.compact
    def __call__(self, x):
        dense = lambda n, init, name: nn.Dense(  # noqa: E731
            n, use_bias=False, dtype=x.dtype, kernel_init=init, name=name
        )
        zeros, lecun = nn.initializers.zeros, nn.initializers.lecun_normal()
        if self.norm_position == "pre":
            h = nn.LayerNorm(epsilon=1e-5, dtype=x.dtype, name="norm")(x)
            return dense(x.shape[-1], zeros, "up")(nn.swish(dense(self.dim, lecun, "down")(h)))
        h = dense(x.shape[-1], lecun, "up")(nn.swish(dense(self.dim, lecun, "down")(x)))
        norm = nn.LayerNorm(
            epsilon=1e-5, dtype=x.dtype, scale_init=zeros, bias_init=zeros, name="norm"
        )
        return norm(h)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_linear_adapter_is_the_flax_layers(dtype, norm_position):
    """Same parameter tree and init values as Flax's layers under the same key (``declare``),
    and the same output on any weights, through the module and through ``forward``."""
    x = _x((2, 5, 16), dtype)
    ours = jadapters.LinearAdapter(8, norm_position=norm_position)
    ref = _FlaxLinearAdapter(8, norm_position)
    v_ours, v_ref = ours.init(jax.random.key(3), x), ref.init(jax.random.key(3), x)
    jax.tree.map(_equal, v_ours, v_ref)
    params = _noisy(v_ref["params"])
    expected = ref.apply({"params": params}, x)
    _equal(ours.apply({"params": params}, x), expected)
    _equal(ours.forward(params, x), expected)
    jitted = jax.jit(lambda p, x: ref.apply({"params": p}, x))(params, x)
    _equal(jax.jit(lambda p, x: ours.forward(p, x))(params, x), jitted)


def _cases():
    return [
        (jadapters.LinearAdapter(4, norm_position="post", activation="gelu"), {}),
        (jadapters.LoRA(3, alpha=6.0), {"out_features": 7}),
        (jadapters.LoRA(2, rslora=True, param_dtype="bfloat16"), {"out_features": 5}),
        (jadapters.IA3(), {}),
        (jadapters.ParallelAdapter(4, learn_scale=True, scale=2.0), {"out_features": 9}),
        (jadapters.ParallelAdapter(4, activation="gelu", scale=0.5), {"out_features": 3}),
    ]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(_cases())))
def test_module_and_forward_agree(case, dtype):
    module, kwargs = _cases()[case]
    x = _x((3, 16), dtype)
    params = _noisy(module.init(jax.random.key(0), x, **kwargs)["params"])
    expected = module.apply({"params": params}, x, **kwargs)
    _equal(module.forward(params, x), expected)
    _equal(adapter_forward(module, params, x, **kwargs), expected)


@pytest.mark.parametrize("case", [i for i, (m, _) in enumerate(_cases()) if hasattr(m, "dropout")])
def test_dropout_through_forward(case):
    """In training with a key, dropout masks what the adapter's math drops, by the explicit
    formula; the module draws its key from the ``'dropout'`` stream."""
    module, kwargs = _cases()[case]
    module = module.clone(dropout=0.25)
    x, key = _x((64, 16), jnp.float32), jax.random.key(9)
    params = _noisy(module.init(jax.random.key(0), x, **kwargs)["params"])
    dropped = module.forward(params, x, training=True, key=key)
    plain = module.forward(params, x)
    assert not np.allclose(dropped, plain)
    via_module = module.apply(
        {"params": params}, x, deterministic=False, rngs={"dropout": key}, **kwargs
    )
    assert via_module.shape == dropped.shape
    with pytest.raises(ValueError, match="needs a PRNG key"):
        module.forward(params, x, training=True, key=None)


def test_a_type_without_forward_runs_through_apply():
    """A registered third-party module that has no ``forward`` is applied as a module, with
    ``key`` as its ``'dropout'`` stream."""

    class Scale(nn.Module):
        @nn.compact
        def __call__(self, x, *, deterministic=True):
            s = self.param("s", nn.initializers.constant(2.0), ())
            return nn.Dropout(0.5, deterministic=deterministic)(x * s)

    x = jnp.ones((4, 8))
    params = Scale().init(jax.random.key(0), x)["params"]
    np.testing.assert_array_equal(adapter_forward(Scale(), params, x), 2.0 * x)
    key = jax.random.key(1)
    expected = Scale().apply({"params": params}, x, deterministic=False, rngs={"dropout": key})
    _equal(adapter_forward(Scale(), params, x, training=True, key=key), expected)


def _forbid_apply(monkeypatch):
    calls = []

    def apply(self, *args, **kwargs):
        calls.append(type(self).__name__)
        raise AssertionError(f"{type(self).__name__}.apply called while tracing")

    for cls in (jadapters.LinearAdapter, jadapters.LoRA):
        monkeypatch.setattr(cls, "apply", apply)
    return calls


MODEL = dict(num_classes=4, d_model=16, num_layers=2, num_heads=2, mlp_dim=32, max_len=8)


def test_traced_linen_model_applies_no_adapter_module(monkeypatch):
    x = jnp.ones((2, 8, 6))
    targets = {"mlp": r"blocks_\d+/mlp", "query": r"blocks_\d+/attn/query"}
    adapted = (
        jadapters.adapter_transform(LinenTransformer(**MODEL), targets)
        .add_adapter("mlp:bottleneck", jadapters.LinearAdapterConfig(dim=4))
        .add_adapter("query:lora", jadapters.LoRAConfig(rank=2))
    )
    variables = adapted.init(jax.random.key(0), x)
    expected = jax.jit(adapted.apply)(variables, x)
    calls = _forbid_apply(monkeypatch)
    _equal(jax.jit(lambda v, x: adapted.apply(v, x))(variables, x), expected)
    assert calls == []


def test_traced_nnx_model_applies_no_adapter_module(monkeypatch):
    x = jnp.ones((2, 8, 6))
    model = NNXTransformer(6, rngs=nnx.Rngs(0), **MODEL)
    jadapters.adapter_transform(
        model, {"mlp": r"blocks/\d+/mlp", "query": r"blocks/\d+/attn/query"}
    )
    model.add_adapter("mlp:bottleneck", jadapters.LinearAdapterConfig(dim=4), rngs=nnx.Rngs(1))
    model.add_adapter("query:lora", jadapters.LoRAConfig(rank=2), rngs=nnx.Rngs(2))
    model.eval()
    graphdef, state = nnx.split(model)
    expected = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    calls = _forbid_apply(monkeypatch)
    got = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x) + 0.0)(state, x)
    _equal(got, expected)
    assert calls == []
