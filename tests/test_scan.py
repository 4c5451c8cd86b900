"""Adapters inside scanned layer stacks: Linen ``nn.scan`` and NNX ``nnx.scan`` over an
``nnx.vmap``-built stack.

Every check compares with the same model unrolled into a Python loop (same base weights, the
adapters on the selected layers only): outputs and adapter gradients, identity at init,
frozen base under training, merge, checkpoint round trip and disable.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jadapters
from jadapters.demo.models import NNXLayerStack

L = 4
SEL = (2, 3)  # the last two layers
X = jax.random.normal(jax.random.key(3), (2, 4))
TOL = dict(rtol=1e-5, atol=1e-5)
CONFIGS = {
    "lora": jadapters.LoRAConfig(rank=2),
    "ia3": jadapters.IA3Config(),
    "bottleneck": jadapters.LinearAdapterConfig(dim=2),
}


def noise(tree, seed=5):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten(
        [
            x + 0.3 * jax.random.normal(k, x.shape, x.dtype)
            for x, k in zip(leaves, keys, strict=True)
        ]
    )


# --- Linen -----------------------------------------------------------------------------------


# Kernels named with mesh axes, for the sharding tests below.
PARTITIONED = nn.with_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))


class LinenLayer(nn.Module):
    partitioned: bool = False  # the kernel boxed with axis names ("embed", "mlp")

    @nn.compact
    def __call__(self, x, _=None):
        init = PARTITIONED if self.partitioned else nn.initializers.lecun_normal()
        return jnp.tanh(nn.Dense(4, kernel_init=init, name="mlp")(x)), None


class LinenScanned(nn.Module):
    remat: str = ""  # "", "inside" (nn.remat of the layer) or "outside" (of the scan)
    partitioned: bool = False  # boxed kernels, the stack's axis named "layers"

    @nn.compact
    def __call__(self, x):
        layer = nn.remat(LinenLayer) if self.remat == "inside" else LinenLayer
        metadata = {nn.PARTITION_NAME: "layers"} if self.partitioned else {}
        scan = nn.scan(
            layer,
            variable_axes={"params": 0, jadapters.ADAPTER_COLLECTION: 0},
            split_rngs={"params": True},
            length=L,
            metadata_params=metadata,
        )
        if self.remat == "outside":
            scan = nn.remat(scan)
        return scan(self.partitioned, name="layers")(x, None)[0]


class LinenUnrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(L):
            x, _ = LinenLayer(name=f"layers_{i}")(x)
        return x


def linen_pair(cfg, remat=""):
    scanned = jadapters.adapter_transform(
        LinenScanned(remat), jadapters.Target(pattern="layers/mlp", layers=SEL)
    ).add_adapter("s", cfg)
    variables = scanned.init(jax.random.key(0), X)
    variables = {**variables, "adapters": noise(variables["adapters"])}
    unrolled = jadapters.adapter_transform(
        LinenUnrolled(), [f"layers_{i}/mlp" for i in SEL]
    ).add_adapter("s", cfg)
    slice_at = lambda tree, i: jax.tree.map(lambda a: a[i], tree)  # noqa: E731
    uvars = {
        "params": {f"layers_{i}": slice_at(variables["params"]["layers"], i) for i in range(L)},
        "adapters": {f"layers_{i}": slice_at(variables["adapters"]["layers"], i) for i in SEL},
    }
    return scanned, variables, unrolled, uvars


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_linen_scanned_equals_unrolled_on_selected_layers(kind):
    scanned, v, unrolled, uv = linen_pair(CONFIGS[kind])
    shapes = jax.tree.map(jnp.shape, v["adapters"]["layers"]["mlp"]["s"])
    assert all(s[0] == L for s in jax.tree.leaves(shapes, is_leaf=lambda s: isinstance(s, tuple)))
    np.testing.assert_allclose(scanned.apply(v, X), unrolled.apply(uv, X), **TOL)

    def grads(model, variables):
        f = lambda a: model.apply({**variables, "adapters": a}, X).sum()  # noqa: E731
        return jax.grad(f)(variables["adapters"])

    g, gu = grads(scanned, v), grads(unrolled, uv)
    for leaf in jax.tree.leaves(g):
        assert not np.any(np.asarray(leaf[: SEL[0]]))  # unselected layers: no gradient
    for i in SEL:
        got = jax.tree.map(lambda a, i=i: a[i], g["layers"])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), got, gu[f"layers_{i}"])


@pytest.mark.parametrize("remat", ["inside", "outside"])
def test_linen_scan_with_remat(remat):
    scanned, v, unrolled, uv = linen_pair(CONFIGS["lora"], remat)
    np.testing.assert_allclose(scanned.apply(v, X), unrolled.apply(uv, X), **TOL)


def test_linen_identity_at_init_disable_and_frozen_base_training():
    scanned = jadapters.adapter_transform(
        LinenScanned(), jadapters.Target(pattern="layers/mlp", layers=SEL)
    ).add_adapter("s", CONFIGS["lora"])
    v = scanned.init(jax.random.key(0), X)
    base_out = LinenScanned().apply({"params": v["params"]}, X)
    assert np.array_equal(scanned.apply(v, X), base_out)
    params = jax.tree.map(np.array, v["params"])
    step = jadapters.linen_train_step(
        scanned, lambda apply, x: jnp.mean((apply(x) - 1.0) ** 2), optax.adam(0.05)
    )
    adapters, state = v["adapters"], step.init(v["adapters"])
    losses = []
    for i in range(3):
        adapters, state, metrics = step(
            adapters, state, {"params": v["params"]}, X, jax.random.key(i)
        )
        losses.append(float(metrics["loss"]))
    assert losses[2] < losses[0]
    jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(np.array, v["params"]))
    trained = {**v, "adapters": adapters}
    assert not np.allclose(scanned.apply(trained, X), base_out)
    off = scanned.set_enabled_adapters(enabled=False)
    assert np.array_equal(off.apply(trained, X), base_out)


def test_linen_merge_and_checkpoint_round_trip(tmp_path):
    scanned, v, _, _ = linen_pair(CONFIGS["lora"])
    merged = jadapters.merge_adapters(scanned, v)
    np.testing.assert_allclose(
        LinenScanned().apply({"params": merged}, X), scanned.apply(v, X), **TOL
    )
    path = jadapters.save_adapters(str(tmp_path / "ckpt"), scanned, v)
    fresh = jadapters.adapter_transform(
        LinenScanned(), jadapters.Target(pattern="layers/mlp", layers=SEL)
    )
    model, loaded = jadapters.load_adapters(path, fresh, {"params": v["params"]})
    np.testing.assert_array_equal(model.apply(loaded, X), scanned.apply(v, X))


def test_linen_scan_without_the_collection_names_the_fix():
    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(
                LinenLayer, variable_axes={"params": 0}, split_rngs={"params": True}, length=L
            )
            return scan(name="layers")(x, None)[0]

    adapted = jadapters.adapter_transform(Plain(), "layers/mlp").add_adapter("s", CONFIGS["lora"])
    with pytest.raises(ValueError, match=r"variable_axes=\{'params': 0, jadapters\.ADAPTER_COLL"):
        adapted.init(jax.random.key(0), X)


def test_layer_selection_outside_a_stack_and_out_of_range_are_refused():
    adapted = jadapters.adapter_transform(
        LinenUnrolled(), jadapters.Target(pattern="layers_0/mlp", layers=(0,))
    ).add_adapter("s", CONFIGS["lora"])
    v = adapted.init(jax.random.key(0), X)
    with pytest.raises(ValueError, match="not inside a scanned layer stack"):
        adapted.apply(v, X)
    far = jadapters.adapter_transform(
        LinenScanned(), jadapters.Target(pattern="layers/mlp", layers=(9,))
    ).add_adapter("s", CONFIGS["lora"])
    v = far.init(jax.random.key(0), X)
    with pytest.raises(ValueError, match=r"layers=\(9,\).*out of range"):
        far.apply(v, X)
    with pytest.raises(ValueError, match="layers must be"):
        jadapters.Target(pattern="a", layers="last")


# --- NNX -------------------------------------------------------------------------------------


class NNXBlock(nnx.Module):
    def __init__(self, rngs, partitioned=False):  # the kernel named ("embed", "mlp")
        init = nnx.initializers.lecun_normal()
        init = nnx.with_partitioning(init, ("embed", "mlp")) if partitioned else init
        self.mlp = nnx.Linear(4, 4, kernel_init=init, rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.mlp(x))


class NNXScanned(NNXLayerStack):
    def __init__(self, partitioned=False, layer_name=None):  # layer_name: the stack's axis
        metadata = {nnx.PARTITION_NAME: layer_name} if layer_name else {}
        super().__init__(lambda rngs: NNXBlock(rngs, partitioned), L, transform_metadata=metadata)


class NNXUnrolled(nnx.Module):
    def __init__(self, stacked):
        self.layers = nnx.List([NNXBlock(nnx.Rngs(0)) for _ in range(L)])
        for i, block in enumerate(self.layers):
            block.mlp.kernel[...] = stacked.layers.mlp.kernel[...][i]
            block.mlp.bias[...] = stacked.layers.mlp.bias[...][i]

    def __call__(self, x):
        for block in self.layers:
            x = block(x)
        return x


def adapter_dict(model):
    return nnx.to_pure_dict(nnx.state(model, jadapters.AdapterParam))


def set_adapters(model, tree):
    state = nnx.state(model, jadapters.AdapterParam)
    nnx.replace_by_pure_dict(state, tree)
    nnx.update(model, state)


def nnx_pair(cfg):
    stack = NNXScanned()
    unrolled = jadapters.adapter_transform(NNXUnrolled(stack), [f"layers/{i}/mlp" for i in SEL])
    scanned = jadapters.adapter_transform(stack, jadapters.Target(pattern="layers/mlp", layers=SEL))
    scanned.add_adapter("s", cfg, rngs=nnx.Rngs(1))
    unrolled.add_adapter("s", cfg, rngs=nnx.Rngs(1))
    noisy = noise(adapter_dict(scanned))
    set_adapters(scanned, noisy)
    per_layer = adapter_dict(unrolled)
    stacked = noisy["layers"]["mlp"]["adapter_layer"]["s"]
    for i in SEL:
        per_layer["layers"][i]["mlp"]["adapter_layer"]["s"] = jax.tree.map(
            lambda a, i=i: a[i], stacked
        )
    set_adapters(unrolled, per_layer)
    return scanned, unrolled


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_nnx_scanned_equals_unrolled_on_selected_layers(kind):
    scanned, unrolled = nnx_pair(CONFIGS[kind])
    np.testing.assert_allclose(scanned(X), unrolled(X), **TOL)

    def grads(model):
        diff = nnx.DiffState(0, jadapters.AdapterParam)
        return nnx.to_pure_dict(nnx.grad(lambda m: m(X).sum(), argnums=diff)(model))

    g, gu = grads(scanned), grads(unrolled)
    stacked = g["layers"]["mlp"]["adapter_layer"]["s"]
    for leaf in jax.tree.leaves(stacked):
        assert leaf.shape[0] == L and not np.any(np.asarray(leaf[: SEL[0]]))
    for i in SEL:
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, **TOL),
            jax.tree.map(lambda a, i=i: a[i], stacked),
            gu["layers"][i]["mlp"]["adapter_layer"]["s"],
        )


def test_nnx_identity_training_merge_disable_and_checkpoint(tmp_path):
    model = jadapters.adapter_transform(
        NNXScanned(), jadapters.Target(pattern="layers/mlp", layers=SEL)
    )
    base_out = model(X)
    model.add_adapter("s", CONFIGS["lora"], rngs=nnx.Rngs(1))
    assert np.array_equal(model(X), base_out)  # identity at init
    base = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    optimizer = jadapters.adapter_optimizer(model, optax.adam(0.05))
    step = jadapters.nnx_train_step(lambda m, x: jnp.mean((m(x) - 1.0) ** 2))
    losses = [float(step(model, optimizer, X)["loss"]) for _ in range(3)]
    assert losses[2] < losses[0]
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, base, jax.tree.map(np.array, after))
    out = model(X)
    assert not np.allclose(out, base_out)
    # merge: the stacked kernel, folded layer by layer on the selected layers only
    merged = jadapters.merge_adapters(model)
    plain = NNXScanned()
    nnx.update(plain, merged)
    np.testing.assert_allclose(plain(X), out, **TOL)
    np.testing.assert_array_equal(
        plain.layers.mlp.kernel[...][: SEL[0]], base["layers"]["mlp"]["kernel"][: SEL[0]]
    )
    # checkpoint round trip into a fresh model
    path = jadapters.save_adapters(str(tmp_path / "ckpt"), model)
    fresh = jadapters.adapter_transform(
        NNXScanned(), jadapters.Target(pattern="layers/mlp", layers=SEL)
    )
    jadapters.load_adapters(path, fresh)
    np.testing.assert_array_equal(fresh(X), out)
    model.set_enabled_adapters(enabled=False)
    assert np.array_equal(model(X), base_out)


# --- routing inside a scanned stack --------------------------------------------------------

BANK = jadapters.AdapterBankConfig(adapter=jadapters.LoRAConfig(rank=2), slots=3)


@pytest.mark.parametrize("ids", [(2, -1), (0, 1)])
def test_linen_routing_in_a_scanned_stack_equals_unrolled(ids):
    scanned, v, unrolled, uv = linen_pair(BANK)
    ids = jnp.asarray(ids)
    np.testing.assert_allclose(
        scanned.apply(v, X, adapter_ids=ids), unrolled.apply(uv, X, adapter_ids=ids), **TOL
    )
    # a slot of a scanned bank holds one adapter per layer
    one = jadapters.slot_weights(scanned, v, bank="s", slot=1)["layers/mlp"]
    assert one["a"].shape == (L, 4, 2)
    v2 = jadapters.put_slot(scanned, v, bank="s", slot=1, weights={"layers/mlp": noise(one, 9)})
    got = jadapters.slot_weights(scanned, v2, bank="s", slot=1)["layers/mlp"]
    jax.tree.map(np.testing.assert_array_equal, got, noise(one, 9))
    untouched = jadapters.slot_weights(scanned, v2, bank="s", slot=0)["layers/mlp"]
    jax.tree.map(
        np.testing.assert_array_equal,
        untouched,
        jadapters.slot_weights(scanned, v, bank="s", slot=0)["layers/mlp"],
    )


def test_nnx_routing_in_a_scanned_stack_equals_unrolled():
    scanned, unrolled = nnx_pair(BANK)
    ids = jnp.asarray([2, 0])
    with jadapters.route(ids):
        np.testing.assert_allclose(scanned(X), unrolled(X), **TOL)


# --- sharding names of a scanned stack's adapters ------------------------------------------

EXPECTED_SPECS = {
    "i": {"scale": ("layers", "mlp")},
    "l": {"a": ("layers", "embed", None), "b": ("layers", None, "mlp")},
}


def test_linen_scanned_adapters_take_the_stack_axis_name():
    model = jadapters.adapter_transform(LinenScanned(partitioned=True), "layers/mlp")
    model = model.add_adapter("l", jadapters.LoRAConfig(rank=2)).add_adapter(
        "i", jadapters.IA3Config()
    )
    variables = model.init(jax.random.key(0), X)
    specs = nn.get_partition_spec(variables)["adapters"]["layers"]["mlp"]
    assert jax.tree.map(tuple, specs) == EXPECTED_SPECS


@pytest.mark.parametrize("layer_name", ["layers", None])
def test_nnx_scanned_adapters_take_the_stack_axis_name(layer_name):
    mesh = jax.make_mesh((1, 1, 1), ("layers", "embed", "mlp"))
    with jax.set_mesh(mesh):
        model = jadapters.adapter_transform(
            NNXScanned(partitioned=True, layer_name=layer_name), "layers/mlp"
        )
        model.add_adapter("l", jadapters.LoRAConfig(rank=2), rngs=nnx.Rngs(1))
        model.add_adapter("i", jadapters.IA3Config(), rngs=nnx.Rngs(1))
        specs = nnx.get_partition_spec(nnx.state(model, jadapters.AdapterParam))
        got = nnx.to_pure_dict(specs)["layers"]["mlp"]["adapter_layer"]
        got = {n: jax.tree.map(tuple, got[n]["params"]) for n in got}
        expected = jax.tree.map(
            lambda names: (layer_name, *names[1:]),
            EXPECTED_SPECS,
            is_leaf=lambda t: isinstance(t, tuple),
        )
        assert got == expected
        # a rule overrides the per-layer names; the layer axis keeps its own
        model.with_sharding(lambda host, adapter, param, derived: (None,) * len(derived))
        specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, jadapters.AdapterParam)))
        assert tuple(specs["layers"]["mlp"]["adapter_layer"]["l"]["params"]["a"]) == (
            layer_name,
            None,
            None,
        )


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices")
def test_linen_scanned_sharded_step_equals_one_device():
    """A scanned, sharded stack (kernels split over a 2x4 mesh): Adam steps on the mesh give
    the one-device adapter weights; the adapters sit on their derived shardings."""

    model = jadapters.adapter_transform(LinenScanned(partitioned=True), "layers/mlp")
    model = model.add_adapter("l", jadapters.LoRAConfig(rank=2))
    x = jax.random.normal(jax.random.key(1), (8, 4))
    boxed = model.init(jax.random.key(0), x)
    variables = nn.unbox(boxed)
    variables = {**variables, "adapters": noise(variables["adapters"])}
    tx = optax.adam(0.1)
    step = jadapters.linen_train_step(
        model, lambda apply, x: jnp.sum(apply(x) ** 2), tx, donate=False
    )

    def run(adapters, base):
        state = step.init(adapters)
        for i in range(2):
            adapters, state, _ = step(adapters, state, base, x, jax.random.key(i))
        return adapters

    expected = run(variables["adapters"], {"params": variables["params"]})
    mesh = jax.make_mesh((2, 4), ("embed", "mlp"))
    # the stack's "layers" axis maps to no mesh axis (nn.scan refuses a split scan axis), as
    # MaxText's logical rules map it
    specs = jax.tree.map(
        lambda p: jax.sharding.PartitionSpec(*(None if n == "layers" else n for n in p)),
        nn.get_partition_spec(boxed),
        is_leaf=lambda p: isinstance(p, jax.sharding.PartitionSpec),
    )
    placed = jax.tree.map(
        lambda v, p: jax.device_put(v, jax.sharding.NamedSharding(mesh, p)), variables, specs
    )
    got = run(placed["adapters"], {"params": placed["params"]})
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, expected)
    lora = got["layers"]["mlp"]["l"]
    assert lora["a"].sharding.spec == jax.sharding.PartitionSpec(None, "embed", None)
    assert lora["b"].sharding.spec == jax.sharding.PartitionSpec(None, None, "mlp")
    assert lora["a"].sharding.mesh.shape == mesh.shape


def test_linen_composition_blocks_in_a_scanned_stack_equal_unrolled():
    """Fuse (with its trainable fusion adapter) and Average inside a scanned stack compute
    what they compute unrolled."""
    cfg = jadapters.LinearAdapterConfig(dim=2)

    def build(model, targets):
        adapted = jadapters.adapter_transform(model, targets)
        adapted = adapted.add_adapter("a", cfg).add_adapter("b", cfg).add_adapter("c", cfg)
        adapted = adapted.add_adapter("f", jadapters.AdapterFusionConfig())
        adapted = adapted.set_composition("", jadapters.Fuse("a", "b", fusion="f"))
        return adapted

    scanned = build(LinenScanned(), "layers/mlp")
    variables = scanned.init(jax.random.key(0), X)
    variables = {**variables, "adapters": noise(variables["adapters"])}
    unrolled = build(LinenUnrolled(), r"layers_\d/mlp")
    slice_at = lambda tree, i: jax.tree.map(lambda a: a[i], tree)  # noqa: E731
    uvars = {
        "params": {f"layers_{i}": slice_at(variables["params"]["layers"], i) for i in range(L)},
        "adapters": {f"layers_{i}": slice_at(variables["adapters"]["layers"], i) for i in range(L)},
    }
    np.testing.assert_allclose(scanned.apply(variables, X), unrolled.apply(uvars, X), **TOL)

    def average(model):  # the fusion adapter runs only in its Fuse block: off here
        model = model.set_composition("", jadapters.Average("a", "c"))
        return model.set_enabled_adapters("f", False)

    np.testing.assert_allclose(
        average(scanned).apply(variables, X), average(unrolled).apply(uvars, X), **TOL
    )


@pytest.mark.parametrize("strategy", ["residual", "return_result"])
def test_linen_fuse_on_selected_layers_of_a_scanned_stack_equals_unrolled(strategy):
    """A Fuse block whose adapters (fusion included) target some layers of a scanned stack:
    those layers compute what the unrolled model with the block on them computes, and every
    other layer is the base block exactly, whatever the fusion's strategy makes of the
    members' (there: zero) deltas."""
    cfg = jadapters.LinearAdapterConfig(dim=2)
    join = {
        "residual": jadapters.ResidualAddStrategy(),
        "return_result": jadapters.ReturnResultStrategy(),
    }[strategy]

    def build(model, target):
        adapted = jadapters.adapter_transform(model, target)
        for name in ("a", "b"):
            adapted = adapted.add_adapter(name, cfg)
        adapted = adapted.add_adapter("f", jadapters.AdapterFusionConfig(adapter_strategy=join))
        return adapted.set_composition("", jadapters.Fuse("a", "b", fusion="f"))

    scanned = build(LinenScanned(), jadapters.Target(pattern="layers/mlp", layers=SEL))
    variables = scanned.init(jax.random.key(0), X)
    variables = {**variables, "adapters": noise(variables["adapters"])}
    unrolled = build(LinenUnrolled(), [f"layers_{i}/mlp" for i in SEL])
    slice_at = lambda tree, i: jax.tree.map(lambda a: a[i], tree)  # noqa: E731
    uvars = {
        "params": {f"layers_{i}": slice_at(variables["params"]["layers"], i) for i in range(L)},
        "adapters": {f"layers_{i}": slice_at(variables["adapters"]["layers"], i) for i in SEL},
    }
    out = scanned.apply(variables, X)
    np.testing.assert_allclose(out, unrolled.apply(uvars, X), **TOL)
    base = LinenScanned().apply({"params": variables["params"]}, X)
    assert not np.allclose(out, base, atol=1e-3)  # the block acts on the selected layers

    def grads(adapters):
        loss = lambda a: jnp.sum(scanned.apply({**variables, "adapters": a}, X) ** 2)  # noqa: E731
        return jax.grad(loss)(adapters)

    for leaf in jax.tree.leaves(grads(variables["adapters"])["layers"]["mlp"]["f"]):
        assert not np.any(np.asarray(leaf[: SEL[0]]))  # no gradient on the layers left out
        assert np.any(np.asarray(leaf[SEL[0] :]))


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices")
def test_nnx_scanned_sharded_step_and_forward_equal_one_device():
    """A scanned NNX stack with kernels split over a 2x4 mesh, trained and run through
    jadapters' own compiled calls: ``nnx_train_step`` on the mesh gives the one-device adapter
    weights, the base keeps its placement, the adapters and Adam's moments sit on their
    derived shardings, and ``nnx_forward`` computes the one-device output."""
    x = jax.random.normal(jax.random.key(1), (8, 4))

    def build():
        with nnx.use_eager_sharding(False):
            stack = NNXScanned(partitioned=True, layer_name="layers")
            model = jadapters.adapter_transform(stack, "layers/mlp")
            model.add_adapter("l", jadapters.LoRAConfig(rank=2), rngs=nnx.Rngs(1))
        set_adapters(model, noise(adapter_dict(model)))
        return model

    def train(model):
        optimizer = jadapters.adapter_optimizer(model, optax.adam(0.1))
        step = jadapters.nnx_train_step(lambda m, x: jnp.sum(m(x) ** 2))
        for _ in range(2):
            step(model, optimizer, x)
        return optimizer

    one = build()
    train(one)
    mesh = jax.make_mesh((2, 4), ("embed", "mlp"))
    model = build()
    state = nnx.state(model)
    # the stack's "layers" axis maps to no mesh axis (scan slices it), as MaxText's rules map it
    shardings = jax.tree.map(
        lambda p: jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(*(None if n == "layers" else n for n in p))
        ),
        nnx.get_partition_spec(state),
        is_leaf=lambda p: isinstance(p, jax.sharding.PartitionSpec),
    )
    nnx.update(model, jax.device_put(state, shardings))
    kernel = model.layers.mlp.kernel.get_raw_value()
    optimizer = train(model)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        adapter_dict(model),
        adapter_dict(one),
    )
    assert model.layers.mlp.kernel.get_raw_value() is kernel  # the base: not even copied
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "embed", "mlp")
    lora = adapter_dict(model)["layers"]["mlp"]["adapter_layer"]["l"]["params"]
    moments = nnx.to_pure_dict(nnx.state(optimizer))["opt_state"][0]
    for tree in (lora, moments["mu"]["layers"]["mlp"]["adapter_layer"]["l"]["params"]):
        assert tree["a"].sharding.spec == jax.sharding.PartitionSpec(None, "embed", None)
        assert tree["b"].sharding.spec == jax.sharding.PartitionSpec(None, None, "mlp")
        assert tree["a"].sharding.mesh.shape == mesh.shape
    np.testing.assert_allclose(jadapters.nnx_forward()(model, x), one(x), rtol=1e-5, atol=1e-6)
