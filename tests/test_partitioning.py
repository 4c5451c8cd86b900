"""Adapter weights follow their host kernel's partitioning (``nn.with_partitioning`` in Linen,
``out_sharding`` metadata in NNX), so a model's own sharding code covers its adapters."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding

import jadapters
from jadapters.storage import AdapterParam

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices")

AUTO = AxisType.Auto
UP, DOWN = ("data", "model"), ("model", "data")  # mesh axis names, used as the specs directly
CONFIGS = {
    "lora": jadapters.LoRAConfig(rank=2),
    "ia3": jadapters.IA3Config(),
    "linear": jadapters.LinearAdapterConfig(dim=4),
}
# The documented derivation, from a host kernel named (i, o).
EXPECTED = {
    "lora": lambda i, o: {"a": (i, None), "b": (None, o)},
    "ia3": lambda i, o: {"scale": (o,)},
    "linear": lambda i, o: {
        "down": {"kernel": (o, None)},
        "up": {"kernel": (None, o)},
        "norm": {"scale": (o,), "bias": (o,)},
    },
}


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        part = nn.with_partitioning
        h = nn.Dense(16, kernel_init=part(nn.initializers.lecun_normal(), UP), name="up")(x)
        h = nn.relu(h)
        return nn.Dense(8, kernel_init=part(nn.initializers.lecun_normal(), DOWN), name="down")(h)


def _x(seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(8, 8)), jnp.float32)


def _adapted(kind):
    return jadapters.adapter_transform(MLP(), "up|down").add_adapter("t", CONFIGS[kind])


def _names(tree):
    boxed = lambda b: isinstance(b, nn.Partitioned)  # noqa: E731
    return jax.tree.map(lambda b: tuple(b.names) if boxed(b) else None, tree, is_leaf=boxed)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_boxed_linen_model_lifecycle(kind, tmp_path):
    adapted, x = _adapted(kind), _x()
    variables = adapted.init(jax.random.key(0), x)
    base = variables["params"]
    # the base keeps its boxes, exactly as the unwrapped model creates them
    plain = MLP().init(jax.random.key(0), x)["params"]
    assert jax.tree.structure(base) == jax.tree.structure(plain)
    assert _names(variables["adapters"]) == {
        "up": {"t": EXPECTED[kind](*UP)},
        "down": {"t": EXPECTED[kind](*DOWN)},
    }
    np.testing.assert_array_equal(adapted.apply(variables, x), MLP().apply({"params": base}, x))

    def loss(adapters):
        return jnp.sum(adapted.apply({"params": base, "adapters": adapters}, x) ** 2)

    grads = jax.grad(loss)(variables["adapters"])
    trained = jax.tree.map(lambda p, g: p - 0.1 * g, variables["adapters"], grads)
    assert _names(trained) == _names(variables["adapters"])
    after = {"params": base, "adapters": trained}
    jax.tree.map(np.testing.assert_array_equal, after["params"], plain)

    if kind != "linear":
        merged = jadapters.merge_adapters(adapted, after)
        assert jax.tree.structure(merged) == jax.tree.structure(base)
        assert _names(merged) == _names(base)
        np.testing.assert_allclose(
            MLP().apply({"params": merged}, x), adapted.apply(after, x), rtol=1e-5, atol=1e-5
        )

    jadapters.save_adapters(str(tmp_path / "ckpt"), adapted, after)
    loaded = jadapters.load_adapters(str(tmp_path / "ckpt"), adapted, variables, replace=True)
    loaded_vars = loaded[1] if isinstance(loaded, tuple) else loaded
    np.testing.assert_allclose(adapted.apply(loaded_vars, x), adapted.apply(after, x), atol=1e-6)


def test_unboxed_hosts_get_plain_weights():
    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, name="up")(x)

    adapted = jadapters.adapter_transform(Plain(), "up").add_adapter("t", CONFIGS["lora"])
    adapters = adapted.init(jax.random.key(0), _x())["adapters"]
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(adapters, is_leaf=None))
    assert not any(
        isinstance(leaf, nn.Partitioned)
        for leaf in jax.tree.leaves(adapters, is_leaf=lambda v: isinstance(v, nn.Partitioned))
    )


def test_a_rule_overrides_the_derived_names():
    def rule(host, adapter, param, derived):
        return (None, None) if (host, param) == ("up", "a") else derived

    adapted = _adapted("lora").with_sharding(rule)
    names = _names(adapted.init(jax.random.key(0), _x())["adapters"])
    assert names["up"]["t"] == {"a": (None, None), "b": (None, "model")}
    assert names["down"]["t"] == EXPECTED["lora"](*DOWN)


@pytest.mark.parametrize("shape", [(2, 4), (8, 1)], ids=["data-model", "fsdp"])
def test_linen_sharded_adam_step_matches_one_device(shape):
    mesh = jax.make_mesh(shape, ("data", "model"), axis_types=(AUTO, AUTO))
    adapted, x = _adapted("lora"), _x()
    variables = adapted.init(jax.random.key(0), x)
    base = variables["params"]
    adapters = jax.tree.map(lambda a: a + 0.01, variables["adapters"])  # leave the identity
    tx = optax.adam(0.1)

    def step(adapters, opt_state, base, x):
        grads = jax.grad(
            lambda a: jnp.mean(adapted.apply({"params": base, "adapters": a}, x) ** 2)
        )(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state

    opt_state = tx.init(adapters)
    single, _ = jax.jit(step)(adapters, opt_state, base, x)

    def shardings(tree):
        specs = nn.get_partition_spec(tree)
        is_spec = lambda s: isinstance(s, jax.sharding.PartitionSpec)  # noqa: E731
        return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=is_spec)

    a_sh, o_sh, b_sh = shardings(adapters), shardings(opt_state), shardings(base)
    x_sh = NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    sharded_step = jax.jit(step, in_shardings=(a_sh, o_sh, b_sh, x_sh), out_shardings=(a_sh, o_sh))
    args = jax.device_put((adapters, opt_state, base, x), (a_sh, o_sh, b_sh, x_sh))
    new, new_opt = sharded_step(*args)

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), new, single)
    jax.tree.map(np.testing.assert_array_equal, args[2], base)
    # every adapter array sits as its spec says; adam's mu and nu exactly like the adapters
    spec_of = nn.get_partition_spec(new)
    for leaf, spec in zip(jax.tree.leaves(new), jax.tree.leaves(spec_of), strict=True):
        assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim)
    adam = new_opt[0]
    for moment in (adam.mu, adam.nu):
        assert nn.get_partition_spec(moment) == spec_of
        for m, a in zip(jax.tree.leaves(moment), jax.tree.leaves(new), strict=True):
            assert m.sharding.is_equivalent_to(a.sharding, a.ndim)


def _nnx_model():
    class Block(nnx.Module):
        def __init__(self, rngs):
            init = nnx.initializers.lecun_normal()
            self.up = nnx.Linear(
                8, 16, kernel_init=nnx.with_metadata(init, out_sharding=UP), rngs=rngs
            )
            self.down = nnx.Linear(
                16, 8, kernel_init=nnx.with_metadata(init, out_sharding=DOWN), rngs=rngs
            )

        def __call__(self, x):
            return self.down(nnx.relu(self.up(x)))

    with nnx.use_eager_sharding(False):
        return Block(nnx.Rngs(0))


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_nnx_adapter_variables_carry_derived_sharding(kind):
    model = jadapters.adapter_transform(_nnx_model(), "up|down")
    model.add_adapter("t", CONFIGS[kind], rngs=nnx.Rngs(1))
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, AdapterParam)))
    up, down = specs["up"]["adapter_layer"]["t"]["params"], specs["down"]["adapter_layer"]["t"]
    expect = lambda names: jax.tree.map(  # noqa: E731
        lambda n: jax.sharding.PartitionSpec(*n), names, is_leaf=lambda v: isinstance(v, tuple)
    )
    assert up == expect(EXPECTED[kind](*UP))
    assert down["params"] == expect(EXPECTED[kind](*DOWN))


def test_nnx_sharded_step_matches_one_device():
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AUTO, AUTO))
    model = jadapters.adapter_transform(_nnx_model(), "up|down")
    model.add_adapter("t", CONFIGS["lora"], rngs=nnx.Rngs(1))
    graphdef, params, rest = nnx.split(model, AdapterParam, ...)
    params = jax.tree.map(lambda a: a + 0.01, params)
    x = _x()

    def step(params, rest, x):
        def loss(p):
            return jnp.mean(nnx.merge(graphdef, p, rest)(x) ** 2)

        grads = jax.grad(loss)(params)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    single = jax.jit(step)(params, rest, x)
    p_sh = nnx.get_named_sharding(params, mesh)
    r_sh = nnx.get_named_sharding(rest, mesh)
    x_sh = NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    args = jax.device_put((params, rest, x), (p_sh, r_sh, x_sh))
    new = jax.jit(step, in_shardings=(p_sh, r_sh, x_sh), out_shardings=p_sh)(*args)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), new, single)
    for leaf, sh in zip(jax.tree.leaves(new), jax.tree.leaves(p_sh), strict=True):
        assert leaf.sharding.is_equivalent_to(sh, leaf.ndim)


def test_content_digest_is_the_same_on_any_layout():
    """The base's content digest (checkpoint/content.py): NumPy and JAX agree, every mesh and
    sharding gives the same, and one changed bit or two swapped rows give another."""
    from jadapters.checkpoint.content import digests

    rng = np.random.default_rng(0)
    arrays = [
        rng.normal(size=(16, 8)).astype(np.float32),
        rng.normal(size=(8,)).astype(jnp.bfloat16),
        np.array(3.5, np.float32),
        rng.integers(-100, 100, size=(4, 4, 2)).astype(np.int32),
        rng.random(5) > 0.5,
        rng.normal(size=(3,)).astype(np.float16),
        np.zeros((0, 3), np.float32),
        (rng.normal(size=(4,)) + 1j).astype(np.complex64),
        rng.integers(-5, 5, size=(7,)).astype(np.int8),
    ]
    want = digests(arrays)
    assert len(set(want)) == len(want)
    assert digests([jnp.asarray(x) for x in arrays]) == want
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AUTO, AUTO))
    specs = [("data", "model"), ("model",), (None, "data"), ()]
    placed = [
        jax.device_put(arrays[0], NamedSharding(mesh, jax.sharding.PartitionSpec(*s)))
        for s in specs
    ]
    assert digests(placed) == want[:1] * len(specs)
    bit = arrays[0].copy()
    bit.view(np.uint32)[3, 2] ^= 1
    rows = arrays[0][[1, 0, *range(2, 16)]]
    assert want[0] not in digests([bit, rows, arrays[0].T.copy()])
    assert digests([jax.ShapeDtypeStruct((2,), jnp.float32)]) == [None]
