"""Adapters scale out with JAX's own SPMD: shard the batch (and the weights) over a Mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jadapters
from jadapters.demo.models import LinenTransformer, NNXTransformer

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices")


def _loss(apply, batch):
    return optax.softmax_cross_entropy_with_integer_labels(apply(batch[0]), batch[1]).mean()


def _batch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8, 8)).astype(np.float32)
    y = rng.integers(0, 4, size=(16,)).astype(np.int32)
    return jnp.asarray(x), jnp.asarray(y)


def test_linen_data_parallel_step_matches_single_device():
    model = LinenTransformer(num_classes=4, d_model=16, num_layers=1, num_heads=2, mlp_dim=32)
    adapted = jadapters.adapter_transform(model, r"blocks_\d+/mlp").add_adapter(
        "task", jadapters.LinearAdapterConfig(dim=4)
    )
    x, y = _batch()
    base, adapters = jadapters.split_variables(adapted.init(jax.random.key(0), x))
    adapters = jax.tree.map(lambda a: a + 0.01, adapters)  # leave the identity point
    step = jadapters.linen_train_step(adapted, _loss, optax.sgd(0.1), donate=False)

    single, _, single_metrics = step(adapters, step.init(adapters), base, (x, y), jax.random.key(1))

    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    replicated = NamedSharding(mesh, P())
    batch_sharded = NamedSharding(mesh, P("data"))
    base_r = jax.device_put(base, replicated)
    adapters_r = jax.device_put(adapters, replicated)
    x_s, y_s = jax.device_put(x, batch_sharded), jax.device_put(y, batch_sharded)
    sharded, _, metrics = step(
        adapters_r, step.init(adapters_r), base_r, (x_s, y_s), jax.random.key(1)
    )
    np.testing.assert_allclose(metrics["loss"], single_metrics["loss"], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), sharded, single
    )
    leaf = jax.tree.leaves(sharded)[0]
    assert len(leaf.sharding.device_set) == 8


def test_nnx_adapters_follow_a_model_sharding():
    x, _ = _batch()
    model = NNXTransformer(
        8, num_classes=4, d_model=16, num_layers=1, num_heads=2, mlp_dim=32, rngs=nnx.Rngs(0)
    )
    model = jadapters.adapter_transform(model, r"blocks/\d+/mlp")
    model.add_adapter("task", jadapters.LinearAdapterConfig(dim=4), rngs=nnx.Rngs(1))
    model.eval()
    expected = model(x)

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    state = nnx.state(model)
    sharded_state = jax.device_put(state, NamedSharding(mesh, P()))
    nnx.update(model, sharded_state)
    out = jax.jit(lambda m, x: m(x))(model, jax.device_put(x, NamedSharding(mesh, P("data"))))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    for leaf in jax.tree.leaves(nnx.state(model, jadapters.AdapterParam)):
        assert len(leaf.sharding.device_set) == 8
