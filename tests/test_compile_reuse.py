"""Compiled functions are reused: loaded adapters run in an already compiled apply."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jadapters


def test_linen_loaded_adapters_do_not_force_a_second_compile(tmp_path):
    model = jadapters.adapter_transform(nn.Sequential([nn.Dense(4)]), "layers_0")
    model = model.add_adapter("task", jadapters.LinearAdapterConfig(dim=2))
    x = jnp.ones((2, 3))
    variables = model.init(jax.random.key(0), x)
    apply = jax.jit(lambda v, x: model.apply(v, x))
    apply(variables, x)
    jadapters.save_adapters(tmp_path, model, variables)
    fresh = jadapters.adapter_transform(nn.Sequential([nn.Dense(4)]), "layers_0")
    loaded_model, loaded = jadapters.load_adapters(tmp_path, fresh, {"params": variables["params"]})
    assert loaded_model.adapters == model.adapters
    np.testing.assert_array_equal(apply(loaded, x), apply(variables, x))
    assert apply._cache_size() == 1


def test_nnx_loaded_adapters_do_not_force_a_second_compile(tmp_path):
    def build():
        return jadapters.adapter_transform(
            nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0))), "layers/0"
        )

    model = build()
    model.add_adapter(
        "task", jadapters.LinearAdapterConfig(dim=2), rngs=nnx.Rngs(params=1, dropout=2)
    )
    x = jnp.ones((2, 3))
    graphdef, state = nnx.split(model)
    apply = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    expected = apply(state, x)
    jadapters.save_adapters(tmp_path, model)
    fresh = build()
    jadapters.load_adapters(tmp_path, fresh)
    fresh_graphdef, fresh_state = nnx.split(fresh)
    assert fresh_graphdef == graphdef
    np.testing.assert_array_equal(apply(fresh_state, x), expected)
    assert apply._cache_size() == 1


def test_compiled_forwards_run_loaded_adapters_without_a_second_compile(tmp_path):
    """jadapters' own compiled forwards: adapters loaded from a checkpoint (into the same
    Linen model's variables; into a model that was already served, for NNX) run in the
    program compiled before."""
    x = jnp.ones((2, 3))
    model = jadapters.adapter_transform(nn.Sequential([nn.Dense(4)]), "layers_0")
    model = model.add_adapter("task", jadapters.LinearAdapterConfig(dim=2))
    variables = model.init(jax.random.key(0), x)
    forward = jadapters.linen_forward(model)
    expected = forward(variables, x)
    jadapters.save_adapters(tmp_path / "linen", model, variables)
    base = {"params": variables["params"]}
    _, loaded = jadapters.load_adapters(tmp_path / "linen", model, base, replace=True)
    np.testing.assert_array_equal(forward(loaded, x), expected)
    assert [f._cache_size() for f in forward._compiled.values()] == [1]

    served = jadapters.adapter_transform(
        nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0))), "layers/0"
    )
    served.add_adapter("task", jadapters.LinearAdapterConfig(dim=2), rngs=nnx.Rngs(1))
    nnx.update(served, jax.tree.map(lambda a: a + 0.5, nnx.state(served, jadapters.AdapterParam)))
    nnx_fwd = jadapters.nnx_forward()
    trained = nnx_fwd(served, x)
    jadapters.save_adapters(tmp_path / "nnx", served)
    nnx.update(served, jax.tree.map(jnp.zeros_like, nnx.state(served, jadapters.AdapterParam)))
    assert not np.array_equal(nnx_fwd(served, x), trained)
    jadapters.load_adapters(tmp_path / "nnx", served, replace=True)  # in place
    np.testing.assert_array_equal(nnx_fwd(served, x), trained)
    assert [f._cache_size() for f in nnx_fwd._split._compiled.values()] == [1]
