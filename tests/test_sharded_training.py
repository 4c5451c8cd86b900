"""Adapter training on 8 fake CPU devices: FSDP, tensor-parallel and FSDP x TP meshes.

One model (kernels named with the mesh axes: ``up`` is ``("data", "model")``, ``down``
``("model", "data")``) runs on three meshes of the same axes: ``(8, 1)`` is FSDP (weights and
batch split over ``data``), ``(1, 8)`` tensor parallel, ``(2, 4)`` both. For Linen and NNX, with
LoRA and a ParallelAdapter: Adam steps under ``jax.jit(in_shardings=..., out_shardings=...)``
built from the partition specs the library derives give the adapter weights of the same
steps on one device (1e-5); every adapter array and Adam moment sits on the sharding
documented in docs/SCALING.md (checked against a table written here, not the library's own
derivation); the base comes back bitwise unchanged, on its own sharding.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import jadapters
from jadapters.storage import AdapterParam

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices")

UP, DOWN = ("data", "model"), ("model", "data")
MESHES = {"fsdp": (8, 1), "tp": (1, 8), "fsdp_tp": (2, 4)}
CONFIGS = {
    "lora": jadapters.LoRAConfig(rank=2),
    "parallel": jadapters.ParallelAdapterConfig(dim=4),
}
# docs/SCALING.md's table, for a host kernel named (i, o).
DOCUMENTED = {
    "lora": lambda i, o: {"a": (i, None), "b": (None, o)},
    "parallel": lambda i, o: {
        "down": {"kernel": (i, None), "bias": (None,)},
        "up": {"kernel": (None, o), "bias": (o,)},
    },
}
STEPS = 2
# LoRA on every mesh; the ParallelAdapter (no other code path) on the mesh that splits both
# axes.
CASES = [("lora", m) for m in sorted(MESHES)] + [("parallel", "fsdp_tp")]


def _mesh(name):
    return jax.make_mesh(MESHES[name], ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def _data():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    return x, y


def _expected(kind, mesh):
    """``{host: {adapter: tree of NamedSharding}}`` as documented."""
    as_sharding = lambda names: NamedSharding(mesh, PartitionSpec(*names))  # noqa: E731
    is_names = lambda v: isinstance(v, tuple)  # noqa: E731
    return {
        host: {"t": jax.tree.map(as_sharding, DOCUMENTED[kind](*names), is_leaf=is_names)}
        for host, names in (("up", UP), ("down", DOWN))
    }


def _check_placed(arrays, shardings):
    flat = jax.tree_util.tree_flatten_with_path(arrays)[0]
    want = dict(jax.tree_util.tree_flatten_with_path(shardings)[0])
    assert len(flat) == len(want) > 0
    for path, leaf in flat:
        assert leaf.sharding.is_equivalent_to(want[path], leaf.ndim), (path, leaf.sharding)


def _same_values(a, b):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5), a, b)


def _bitwise(a, b):
    jax.tree.map(lambda u, v: np.testing.assert_array_equal(np.asarray(u), np.asarray(v)), a, b)


# --- Linen ------------------------------------------------------------------------------------


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        part, init = nn.with_partitioning, nn.initializers.lecun_normal()
        h = nn.relu(nn.Dense(16, kernel_init=part(init, UP), name="up")(x))
        return nn.Dense(8, kernel_init=part(init, DOWN), name="down")(h)


def _linen_step(adapted, tx):
    def step(adapters, opt_state, base, batch):
        x, y = batch

        def loss(a):
            return jnp.mean((adapted.apply({"params": base, "adapters": a}, x) - y) ** 2)

        grads = jax.grad(loss)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state

    return step


def _run(step, *args, steps=STEPS):
    adapters, opt_state, *rest = args
    for _ in range(steps):
        adapters, opt_state = step(adapters, opt_state, *rest)
    return adapters, opt_state


@pytest.mark.parametrize(("kind", "mesh_name"), CASES)
def test_linen_sharded_training(mesh_name, kind):
    mesh, batch = _mesh(mesh_name), _data()
    adapted = jadapters.adapter_transform(LinenMLP(), "up|down").add_adapter("t", CONFIGS[kind])
    variables = adapted.init(jax.random.key(0), batch[0])
    base = variables["params"]
    adapters = jax.tree.map(lambda a: a + 0.01, variables["adapters"])  # leave the identity
    tx = optax.adam(1e-2)
    step = _linen_step(adapted, tx)
    single, _ = _run(jax.jit(step), adapters, tx.init(adapters), base, batch)

    def shardings(tree):  # the user's own code: specs from the boxes, on this mesh
        return nn.get_sharding(tree, mesh)

    a_sh, o_sh, b_sh = shardings(adapters), shardings(tx.init(adapters)), shardings(base)
    d_sh = NamedSharding(mesh, PartitionSpec("data"))
    args = jax.device_put((adapters, tx.init(adapters), base, batch), (a_sh, o_sh, b_sh, d_sh))
    sharded_step = jax.jit(step, in_shardings=(a_sh, o_sh, b_sh, d_sh), out_shardings=(a_sh, o_sh))
    new, opt_state = _run(sharded_step, *args)

    _same_values(nn.unbox(new), nn.unbox(single))
    expected = _expected(kind, mesh)
    _check_placed(nn.unbox(new), expected)
    for moment in (opt_state[0].mu, opt_state[0].nu):  # Adam's moments sit like the adapters
        _check_placed(nn.unbox(moment), expected)
    _bitwise(args[2], base)  # the base: never written, still where it was put
    _check_placed(nn.unbox(args[2]), nn.unbox(b_sh))


# --- NNX --------------------------------------------------------------------------------------


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        init = nnx.initializers.lecun_normal()
        meta = lambda names: nnx.with_metadata(init, out_sharding=names)  # noqa: E731
        self.up = nnx.Linear(8, 16, kernel_init=meta(UP), rngs=rngs)
        self.down = nnx.Linear(16, 8, kernel_init=meta(DOWN), rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.relu(self.up(x)))


def _nnx_model(kind):
    with nnx.use_eager_sharding(False):
        model = jadapters.adapter_transform(NNXMLP(nnx.Rngs(0)), "up|down")
        model.add_adapter("t", CONFIGS[kind], rngs=nnx.Rngs(1))
    for var in jax.tree.leaves(
        nnx.state(model, AdapterParam), is_leaf=lambda v: isinstance(v, nnx.Variable)
    ):
        var.set_value(var.get_value() + 0.01)  # leave the identity
    return model


def _nnx_step(graphdef):
    def step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        x, y = batch

        def loss(model):
            return jnp.mean((model(x) - y) ** 2)

        grads = nnx.grad(loss, argnums=nnx.DiffState(0, AdapterParam))(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer))

    return step


def _adapter_arrays(tree):
    """``{host: {"t": params}}`` of a pure dict of an NNX model's adapter state."""
    return {h: {"t": tree[h]["adapter_layer"]["t"]["params"]} for h in ("up", "down")}


@pytest.mark.parametrize(("kind", "mesh_name"), CASES)
def test_nnx_sharded_training(mesh_name, kind):
    mesh, batch = _mesh(mesh_name), _data()
    tx = optax.adam(1e-2)

    def build():
        model = _nnx_model(kind)
        return nnx.split((model, nnx.Optimizer(model, tx, wrt=AdapterParam)))

    graphdef, state = build()
    base_before = nnx.to_pure_dict(nnx.state(nnx.merge(graphdef, state)[0], nnx.Param))
    step = _nnx_step(graphdef)
    single = state
    for _ in range(STEPS):
        single = jax.jit(step)(single, batch)

    graphdef, state = build()
    s_sh = nnx.get_named_sharding(state, mesh)  # the user's own code: from the metadata
    d_sh = NamedSharding(mesh, PartitionSpec("data"))
    state, batch = jax.device_put((state, batch), (s_sh, d_sh))
    sharded_step = jax.jit(step, in_shardings=(s_sh, d_sh), out_shardings=s_sh)
    for _ in range(STEPS):
        state = sharded_step(state, batch)

    model, optimizer = nnx.merge(graphdef, state)
    single_model, _ = nnx.merge(graphdef, single)
    new = _adapter_arrays(nnx.to_pure_dict(nnx.state(model, AdapterParam)))
    _same_values(new, _adapter_arrays(nnx.to_pure_dict(nnx.state(single_model, AdapterParam))))
    expected = _expected(kind, mesh)
    _check_placed(new, expected)
    opt = nnx.to_pure_dict(nnx.state(optimizer))["opt_state"][0]
    for moment in (opt["mu"], opt["nu"]):  # Adam's moments sit like the adapters
        _check_placed(_adapter_arrays(moment), expected)
    base = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    _bitwise(base, base_before)
    kernels = {h: base[h]["kernel"] for h in ("up", "down")}
    _check_placed(
        kernels,
        {h: NamedSharding(mesh, PartitionSpec(*n)) for h, n in (("up", UP), ("down", DOWN))},
    )


# --- the override rule, both front-ends -------------------------------------------------------


def _replicate_a(host, adapter, param, derived):
    return (None,) * len(derived) if param == "a" else derived


def test_rule_overrides_the_derived_names_in_both_front_ends():
    documented = DOCUMENTED["lora"]
    linen = jadapters.adapter_transform(LinenMLP(), "up|down", sharding=_replicate_a)
    linen = linen.add_adapter("t", CONFIGS["lora"])
    specs = nn.get_partition_spec(linen.init(jax.random.key(0), _data()[0])["adapters"])
    assert specs["up"]["t"] == {"a": PartitionSpec(None, None), "b": PartitionSpec(None, "model")}

    with nnx.use_eager_sharding(False):
        model = jadapters.adapter_transform(NNXMLP(nnx.Rngs(0)), "up|down")
        model.add_adapter("t", CONFIGS["lora"], rngs=nnx.Rngs(1))

    def nnx_specs():
        state = nnx.state(model, AdapterParam)
        specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
        return {h: specs[h]["adapter_layer"]["t"]["params"] for h in ("up", "down")}

    as_specs = lambda tree: {  # noqa: E731
        k: PartitionSpec(*v) for k, v in tree.items()
    }
    assert nnx_specs()["up"] == as_specs(documented(*UP))
    assert model.with_sharding(_replicate_a) is model  # in place, existing adapters too
    assert nnx_specs()["up"] == {"a": PartitionSpec(None, None), "b": PartitionSpec(None, "model")}
    assert nnx_specs()["down"]["a"] == PartitionSpec(None, None)
    with nnx.use_eager_sharding(False):
        model.add_adapter("u", CONFIGS["lora"], rngs=nnx.Rngs(2))  # later adapters follow it
    state = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, AdapterParam)))
    assert state["up"]["adapter_layer"]["u"]["params"]["a"] == PartitionSpec(None, None)
    model.with_sharding(None)
    assert nnx_specs()["up"] == as_specs(documented(*UP))
    with nnx.use_eager_sharding(False):
        again = jadapters.adapter_transform(NNXMLP(nnx.Rngs(0)), "up|down", sharding=_replicate_a)
        again.add_adapter("t", CONFIGS["lora"], rngs=nnx.Rngs(1))
    spec = nnx.get_partition_spec(nnx.state(again, AdapterParam))
    assert nnx.to_pure_dict(spec)["up"]["adapter_layer"]["t"]["params"]["a"] == PartitionSpec(
        None, None
    )


def test_rule_moves_weights_already_on_a_mesh():
    mesh = _mesh("fsdp_tp")
    with jax.set_mesh(mesh):
        model = jadapters.adapter_transform(NNXMLP(nnx.Rngs(0)), "up|down")
        model.add_adapter("t", CONFIGS["lora"], rngs=nnx.Rngs(1))
    a = model.up.adapter_layer["t"].params["a"]
    assert a.get_value().sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec("data")), 2)
    model.with_sharding(_replicate_a)
    a = model.up.adapter_layer["t"].params["a"]
    assert a.get_value().sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec()), 2)
