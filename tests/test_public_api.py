"""The public names not exercised elsewhere under their own name: each does what it says."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jadapters
from jadapters.demo.models import LinenTransformer


@pytest.fixture(scope="module")
def linen():
    model = LinenTransformer(num_classes=3, d_model=16, num_layers=1, num_heads=2, mlp_dim=32)
    adapted = jadapters.adapter_transform(model, {"mlp": r"blocks_\d+/mlp"})
    adapted = adapted.add_adapter("mlp:task", jadapters.LinearAdapterConfig(dim=4))
    x = jnp.ones((2, 8, 8))
    return adapted, adapted.init(jax.random.key(0), x), x


def test_adapter_set_and_spec_are_immutable_values():
    spec = jadapters.AdapterSpec("a", "decoder", jadapters.LinearAdapterConfig(dim=2), "output")
    assert spec.qualified_name == "decoder:a"
    adapters = jadapters.AdapterSet().add(spec)
    disabled = adapters.set_enabled("decoder:a", False)
    assert adapters.enabled_names() == ["a"] and disabled.enabled_names() == []
    assert adapters != disabled and hash(adapters) == hash(jadapters.AdapterSet(adapters.specs))
    with pytest.raises(ValueError, match="unknown adapter name 'encoder:a'"):
        adapters.set_enabled("encoder:a", False)


def test_adapted_linen_keeps_adapters_in_their_collection(linen):
    adapted, variables, _ = linen
    assert isinstance(adapted, jadapters.AdaptedLinen)
    assert sorted(variables) == sorted(["params", jadapters.ADAPTER_COLLECTION])
    assert set(variables[jadapters.ADAPTER_COLLECTION]["blocks_0"]["mlp"]) == {"task"}


def test_summary_counts_the_adapter_parameters(linen):
    adapted, variables, _ = linen
    summary = jadapters.summarize(adapted, variables)
    assert isinstance(summary, jadapters.AdapterSummary)
    d, dim = 16, 4
    assert summary.adapter_params == 2 * d + d * dim + dim * d  # norm, down, up


def test_linen_train_step_is_a_linen_train_step(linen):
    adapted, variables, x = linen
    base, adapters = jadapters.split_variables(variables)
    step = jadapters.linen_train_step(
        adapted,
        lambda apply, b: optax.softmax_cross_entropy_with_integer_labels(apply(b[0]), b[1]).mean(),
        optax.sgd(0.1),
        donate=False,
    )
    assert isinstance(step, jadapters.LinenTrainStep)
    new, _, metrics = step(
        adapters, step.init(adapters), base, (x, jnp.zeros(2, jnp.int32)), jax.random.key(0)
    )
    assert float(metrics["aux_loss"]) == 0.0
    moved = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(new), strict=True)
    ]
    assert any(moved)


def test_adapter_filter_selects_enabled_adapter_weights_only():
    class Block(nnx.Module, jadapters.AdapterModuleMixin):
        def __init__(self, rngs):
            self.linear = nnx.Linear(4, 4, rngs=rngs)
            self.adapter_features = 4

        def __call__(self, x):
            return self.forward_enabled_adapters(self.linear(x))

    block = Block(nnx.Rngs(0))
    block.add_adapter("on", jadapters.LinearAdapterConfig(dim=2), rngs=nnx.Rngs(1))
    block.add_adapter("off", jadapters.LinearAdapterConfig(dim=2), rngs=nnx.Rngs(2))
    block.set_enabled_adapters("off", enabled=False)
    selected = block.unfreeze_enabled_adapters()
    assert isinstance(selected, jadapters.AdapterFilter)
    paths = {path[:2] for path, _ in nnx.to_flat_state(nnx.state(block, selected))}
    assert paths == {("adapter_layer", "on")}


def test_lora_delta_is_the_explicit_formula():
    rng = np.random.default_rng(0)
    x, a, b = (rng.standard_normal(s).astype(np.float32) for s in ((3, 5), (5, 2), (2, 4)))
    np.testing.assert_allclose(
        jadapters.lora_delta(x, a, b, scale=0.5), 0.5 * x @ a @ b, rtol=1e-5, atol=1e-6
    )


def test_restored_checkpoint_carries_step_and_weights(tmp_path):
    adapters = {"host": {"task": {"w": jnp.arange(3.0)}}}
    with jadapters.AdapterCheckpointManager(str(tmp_path), max_to_keep=1) as manager:
        manager.save(7, adapters)
        restored = manager.restore(adapters=adapters)
    assert isinstance(restored, jadapters.RestoredCheckpoint)
    assert restored.step == 7
    np.testing.assert_array_equal(restored.adapters["host"]["task"]["w"], jnp.arange(3.0))
