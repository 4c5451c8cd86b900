"""Adapter checkpoints restore onto another mesh, with another layout, or onto one device: the
target shardings are given to ``load_adapters(..., shardings=...)``, the arrays come back
bitwise equal and placed exactly as asked, and the model computes what it computed before."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec, SingleDeviceSharding

import jadapters
from jadapters.storage import AdapterParam

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices")

AUTO = AxisType.Auto
# saved from FSDP-like names on a 2x4 mesh; restored as tensor parallel on 4 other devices
SRC_UP, SRC_DOWN = ("data", "model"), ("model", "data")
TP_UP, TP_DOWN = (None, "model"), ("model", None)
LORA = jadapters.LoRAConfig(rank=2)
TARGETS = ["tp_mesh", "one_device"]


def _src_mesh():
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(AUTO, AUTO))


def _tp_mesh():
    return jax.make_mesh((4,), ("model",), axis_types=(AUTO,), devices=jax.devices()[4:])


def _x():
    return jnp.asarray(np.random.default_rng(0).normal(size=(8, 8)), jnp.float32)


def _at(tree, *keys):
    for key in keys:
        tree = tree[key]
    return tree


def _is_spec(s):
    return isinstance(s, PartitionSpec)


def _check_loaded(got, saved, expected):
    """``got`` and ``saved`` are trees of the same structure; ``expected(path) -> Sharding``."""
    flat_saved = dict(jax.tree_util.tree_flatten_with_path(saved)[0])
    flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
    assert len(flat_got) == len(flat_saved) > 0
    for path, leaf in flat_got:
        np.testing.assert_array_equal(np.asarray(leaf), flat_saved[path], strict=True)
        assert leaf.sharding.is_equivalent_to(expected(path), leaf.ndim), (path, leaf.sharding)


# --- Linen ------------------------------------------------------------------------------------


class MLP(nn.Module):
    up_names: tuple
    down_names: tuple

    @nn.compact
    def __call__(self, x):
        part, init = nn.with_partitioning, nn.initializers.lecun_normal()
        h = nn.Dense(16, kernel_init=part(init, self.up_names), name="up")(x)
        return nn.Dense(8, kernel_init=part(init, self.down_names), name="down")(nn.relu(h))


def _named(tree, mesh):
    specs = nn.get_partition_spec(tree)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


@pytest.fixture(scope="module")
def linen_saved(tmp_path_factory):
    mesh, x = _src_mesh(), _x()
    model = jadapters.adapter_transform(MLP(SRC_UP, SRC_DOWN), "up|down").add_adapter("t", LORA)
    variables = model.init(jax.random.key(0), x)
    variables = jax.device_put(variables, _named(variables, mesh))
    base, adapters = variables["params"], variables["adapters"]
    a_sh = _named(adapters, mesh)

    def step(adapters, base):
        loss = lambda a: jnp.mean(model.apply({"params": base, "adapters": a}, x) ** 2)  # noqa: E731
        return jax.tree.map(lambda p, g: p - 0.1 * g, adapters, jax.grad(loss)(adapters))

    trained = jax.jit(step, out_shardings=a_sh)(adapters, base)
    assert not np.array_equal(nn.unbox(trained)["up"]["t"]["b"], 0)  # the step moved b
    after = {"params": base, "adapters": trained}
    out = jax.jit(model.apply)(after, x)
    path = str(tmp_path_factory.mktemp("linen") / "ckpt")
    jadapters.save_adapters(path, model, after)
    saved = jax.tree.map(np.asarray, nn.unbox(trained))
    return path, nn.unbox(base), saved, np.asarray(out)


@pytest.mark.parametrize("target", TARGETS)
def test_linen_restores_onto_the_given_shardings(linen_saved, target):
    path, base, saved, out = linen_saved
    x = _x()
    if target == "tp_mesh":
        mesh = _tp_mesh()
        model = jadapters.adapter_transform(MLP(TP_UP, TP_DOWN), "up|down")
        # the target layout: what this model derives for the adapter, on the new mesh
        abstract = jax.eval_shape(model.add_adapter("t", LORA).init, jax.random.key(0), x)
        specs = nn.get_partition_spec(abstract["adapters"])
        base = jax.device_put(base, _named(abstract["params"], mesh))

        def shardings(name, host, param, _):
            spec = _at(specs, *host.split("/"), name, *param.split("/"))
            return NamedSharding(mesh, spec)

        def expected(keys):  # keys: host, name, param... as in variables["adapters"]
            return NamedSharding(mesh, _at(specs, *(k.key for k in keys)))
    else:
        device = jax.devices()[3]
        model = jadapters.adapter_transform(MLP(SRC_UP, SRC_DOWN), "up|down")
        base = jax.device_put(base, device)
        shardings = SingleDeviceSharding(device)
        expected = lambda _: shardings  # noqa: E731

    variables = {"params": base}
    new_model, new_vars = jadapters.load_adapters(path, model, variables, shardings=shardings)
    _check_loaded(nn.unbox(new_vars["adapters"]), saved, expected)
    # Into a base that keeps its nn.Partitioned boxes, the adapters come back boxed as init
    # boxes them, so code that shards by nn.get_partition_spec keeps working.
    fresh = jax.eval_shape(model.add_adapter("t", LORA).init, jax.random.key(0), x)
    is_box = lambda z: isinstance(z, nn.Partitioned)  # noqa: E731
    rebox = lambda b, v: b.replace_boxed(v) if is_box(b) else v  # noqa: E731
    boxed = jax.tree.map(rebox, fresh["params"], base, is_leaf=is_box)
    _, boxed_vars = jadapters.load_adapters(path, model, {"params": boxed}, shardings=shardings)
    assert nn.get_partition_spec(boxed_vars["adapters"]) == nn.get_partition_spec(fresh["adapters"])
    _check_loaded(nn.unbox(boxed_vars["adapters"]), saved, expected)
    got = jax.jit(new_model.apply)(new_vars, x)
    np.testing.assert_allclose(np.asarray(got), out, rtol=1e-6, atol=1e-6)


# --- NNX --------------------------------------------------------------------------------------


def _nnx_model(up_names, down_names):
    class Block(nnx.Module):
        def __init__(self, rngs):
            init = nnx.initializers.lecun_normal()
            up_init = nnx.with_metadata(init, out_sharding=up_names)
            down_init = nnx.with_metadata(init, out_sharding=down_names)
            self.up = nnx.Linear(8, 16, kernel_init=up_init, rngs=rngs)
            self.down = nnx.Linear(16, 8, kernel_init=down_init, rngs=rngs)

        def __call__(self, x):
            return self.down(nnx.relu(self.up(x)))

    with nnx.use_eager_sharding(False):
        return jadapters.adapter_transform(Block(nnx.Rngs(0)), "up|down")


def _put(model, where):
    """Places all of ``model``'s state: on ``where``'s mesh by its own metadata, or a device."""
    state = nnx.state(model)
    if isinstance(where, jax.sharding.Mesh):
        where = nnx.get_named_sharding(state, where)
    nnx.update(model, jax.device_put(state, where))


def _nnx_forward(model, x):
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))


def _adapter_arrays(model):
    return nnx.to_pure_dict(nnx.state(model, AdapterParam))


@pytest.fixture(scope="module")
def nnx_saved(tmp_path_factory):
    x = _x()
    model = _nnx_model(SRC_UP, SRC_DOWN)
    with nnx.use_eager_sharding(False):
        model.add_adapter("t", LORA, rngs=nnx.Rngs(1))
    _put(model, _src_mesh())
    graphdef, params, rest = nnx.split(model, AdapterParam, ...)
    p_sh = jax.tree.map(lambda a: a.sharding, params)

    def step(params, rest):
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(x) ** 2)  # noqa: E731
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, jax.grad(loss)(params))

    nnx.update(model, jax.jit(step, out_shardings=p_sh)(params, rest))
    saved = jax.tree.map(np.asarray, _adapter_arrays(model))
    assert not np.array_equal(saved["up"]["adapter_layer"]["t"]["params"]["b"], 0)
    path = str(tmp_path_factory.mktemp("nnx") / "ckpt")
    jadapters.save_adapters(path, model)
    return path, saved, _nnx_forward(model, x)


@pytest.mark.parametrize("target", TARGETS)
def test_nnx_restores_onto_the_given_shardings(nnx_saved, target):
    path, saved, out = nnx_saved
    if target == "tp_mesh":
        mesh = _tp_mesh()
        model = _nnx_model(TP_UP, TP_DOWN)  # the same base values (same seed), other layout
        # the target layout from a template carrying the adapter; not from nnx.eval_shape,
        # which drops the sharding metadata (flax#5110)
        template = _nnx_model(TP_UP, TP_DOWN)
        with nnx.use_eager_sharding(False):
            template.add_adapter("t", LORA, rngs=nnx.Rngs(1))
        specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(template, AdapterParam)))
        _put(model, mesh)

        def shardings(name, host, param, _):
            keys = (*host.split("/"), "adapter_layer", name, "params", *param.split("/"))
            return NamedSharding(mesh, _at(specs, *keys))

        def expected(keys):
            return NamedSharding(mesh, _at(specs, *(k.key for k in keys)))
    else:
        device = jax.devices()[5]
        model = _nnx_model(SRC_UP, SRC_DOWN)
        _put(model, device)
        shardings = SingleDeviceSharding(device)
        expected = lambda _: shardings  # noqa: E731

    loaded = jadapters.load_adapters(path, model, shardings=shardings)
    assert loaded is model
    _check_loaded(_adapter_arrays(model), saved, expected)
    np.testing.assert_allclose(_nnx_forward(model, _x()), out, rtol=1e-6, atol=1e-6)


def test_a_callable_must_give_shardings(linen_saved):
    path, base, _, _ = linen_saved
    model = jadapters.adapter_transform(MLP(SRC_UP, SRC_DOWN), "up|down")
    with pytest.raises(ValueError, match="jax.sharding.Sharding leaves, got None for adapter 't'"):
        jadapters.load_adapters(path, model, {"params": base}, shardings=lambda *_: None)
