"""``adapter_transform`` on unmodified NNX models: wrapping, groups, insertion, partitions.

Expected values come from explicit float64 NumPy formulas of the host layers and of the
LinearAdapter (``pre`` LayerNorm, swish), never from the library itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jadapters
from jadapters import AdapterParam, LinearAdapterConfig, ReturnResultStrategy, Target
from jadapters.demo.models import NNXConvNet, NNXTransformer

TARGETS = {"attn": r"blocks/\d+/attn/(query|value)", "mlp": r"blocks/\d+/mlp"}
D_MODEL, HEADS, LAYERS, DIM = 16, 2, 2, 4
HEAD_DIM = D_MODEL // HEADS


@pytest.fixture(scope="module", autouse=True)
def _quick_compiles():
    """XLA without its optimization passes: compiles about twice as fast, and these tests
    check the library's logic, not XLA's. Restored when the module ends."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


# --- helpers --------------------------------------------------------------------------------


def _normal(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _randomize_adapters(model, seed=1, scale=0.5):
    """Gives every adapter weight NumPy noise (so nothing is compiled for it)."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model, AdapterParam)
    nnx.update(
        model,
        jax.tree.map(lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), a.dtype), state),
    )


def _f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def np_adapter(params, z):
    """The LinearAdapter's raw output (norm 'pre', swish): LN(z) @ down -> swish -> @ up."""
    p, z = _f64(params), np.asarray(z, np.float64)
    mean = z.mean(-1, keepdims=True)
    var = ((z - mean) ** 2).mean(-1, keepdims=True)
    h = (z - mean) / np.sqrt(var + 1e-6) * p["norm"]["scale"] + p["norm"]["bias"]
    h = h @ p["down"]["kernel"]
    h = h / (1.0 + np.exp(-h))
    return h @ p["up"]["kernel"]


def np_linear(linear, z):
    return np.asarray(z, np.float64) @ np.asarray(linear.kernel[...], np.float64) + np.asarray(
        linear.bias[...], np.float64
    )


def adapter_params(host, name):
    return host.get_adapter_module(name).param_values()


def _flat(state):
    return {"/".join(str(k) for k in path): v for path, v in nnx.to_flat_state(state)}


def _adapter_sites(model):
    """``{(host path, adapter name)}`` of every AdapterParam in ``model``."""
    sites = set()
    for path in _flat(nnx.state(model, AdapterParam)):
        host, _, rest = path.partition("/adapter_layer/")
        sites.add((host, rest.split("/")[0]))
    return sites


def _assert_states_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def _count_dots(model, x):
    graphdef, state = nnx.split(model)
    return str(jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)).count(
        "dot_general"
    )


def _transformer(seed=0):
    return NNXTransformer(
        8,
        num_classes=10,
        d_model=D_MODEL,
        num_layers=LAYERS,
        num_heads=HEADS,
        mlp_dim=2 * D_MODEL,
        max_len=8,
        rngs=nnx.Rngs(seed),
    )


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def x():
    return _normal((2, 8, 8))


@pytest.fixture(scope="module")
def base_and_adapted():
    """``(base Param values before the transform, an untouched copy of the base, adapted)``.

    'a' goes to the default group (= 'attn', the first one), 'mlp:m' to the MLPs. The
    attention projections output ``(heads, head_dim)``, so 'a' acts per head on their last
    axis, ``head_dim`` features (as in Linen).
    """
    model = _transformer()
    before = jax.tree.map(np.array, nnx.state(model, nnx.Param))  # host copies of the values
    base = nnx.clone(model)
    adapted = jadapters.adapter_transform(model, TARGETS)
    assert adapted is model  # NNX: in place
    adapted.add_adapter("a", LinearAdapterConfig(dim=DIM), rngs=nnx.Rngs(1))
    adapted.add_adapter("mlp:m", LinearAdapterConfig(dim=DIM), rngs=nnx.Rngs(2))
    return before, base, adapted


@pytest.fixture
def adapted(base_and_adapted):
    """A fresh copy of the adapted transformer (tests may mutate it)."""
    return nnx.clone(base_and_adapted[2])


@pytest.fixture(scope="module")
def base_out(base_and_adapted, x):
    return base_and_adapted[1](x)


@pytest.fixture(scope="module")
def jit_forward():
    return nnx.jit(lambda model, x: model(x))


# --- wrapping -------------------------------------------------------------------------------


def test_base_state_keeps_exactly_the_unwrapped_structure_and_values(base_and_adapted):
    before, _, adapted = base_and_adapted
    assert type(adapted).__name__ == "AdaptedNNXTransformer"
    assert isinstance(adapted, NNXTransformer)
    _assert_states_equal(nnx.state(adapted, nnx.Param), before)


def test_base_checkpoint_loads_as_is(adapted, x):
    other = _transformer(seed=5)
    nnx.update(adapted, nnx.state(other, nnx.Param))
    np.testing.assert_array_equal(adapted(x), other(x))  # adapters are identity at init


def test_identity_at_init(adapted, base_out, x):
    np.testing.assert_array_equal(adapted(x), base_out)


def test_identity_at_init_under_jit(adapted, base_and_adapted, jit_forward, x):
    np.testing.assert_array_equal(jit_forward(adapted, x), jit_forward(base_and_adapted[1], x))


def test_conv_net_keeps_params_and_batch_stats():
    model = NNXConvNet(1, num_classes=10, features=4, rngs=nnx.Rngs(0))
    model.eval()
    images = _normal((2, 8, 8, 1))
    params = jax.tree.map(np.array, nnx.state(model, nnx.Param))
    stats = jax.tree.map(np.array, nnx.state(model, nnx.BatchStat))
    base_out = model(images)
    jadapters.adapter_transform(model, r"conv_\d")
    model.add_adapter("c", LinearAdapterConfig(dim=2), rngs=nnx.Rngs(1))
    _assert_states_equal(nnx.state(model, nnx.Param), params)
    _assert_states_equal(nnx.state(model, nnx.BatchStat), stats)
    assert _adapter_sites(model) == {("conv_0", "c"), ("conv_1", "c")}
    np.testing.assert_array_equal(model(images), base_out)


def test_adapter_param_is_not_a_param():
    assert not issubclass(AdapterParam, nnx.Param)


# --- groups and routing ---------------------------------------------------------------------


def test_group_names_and_routing(adapted):
    assert adapted.adapter_module_names == ["", "attn", "mlp"]
    attn = {f"blocks/{i}/attn/{p}" for i in range(LAYERS) for p in ("query", "value")}
    mlp = {f"blocks/{i}/mlp" for i in range(LAYERS)}
    assert _adapter_sites(adapted) == {(h, "a") for h in attn} | {(h, "m") for h in mlp}
    assert adapted.get_enabled_adapters() == ["a", "m"]
    specs = {s.name: s.group for s in adapted.get_adapter_specs()}
    assert specs == {"a": "", "m": "mlp"}
    assert adapted.blocks[0].mlp.get_enabled_adapters() == ["m"]
    assert adapted.blocks[0].attn.query.get_enabled_adapters() == ["a"]
    assert set(map(_path_str, adapted.get_adapter_modules("m"))) == mlp


def _path_str(path):
    return "/".join(str(p) for p in path)


def test_unknown_group_raises_listing_valid_ones(adapted):
    with pytest.raises(ValueError, match=r"unknown adapter module 'enc'.*\['', 'attn', 'mlp'\]"):
        adapted.add_adapter("enc:z", LinearAdapterConfig(dim=DIM), rngs=nnx.Rngs(0))


def test_same_name_in_two_groups_raises(adapted):
    with pytest.raises(ValueError, match="adapter name 'm' already exists in module 'mlp'"):
        adapted.add_adapter("attn:m", LinearAdapterConfig(dim=DIM), rngs=nnx.Rngs(0))


def test_pattern_matching_nothing_raises_at_transform_listing_closest_paths_first():
    model = _transformer()
    with pytest.raises(ValueError, match=r"matches no module") as err:
        jadapters.adapter_transform(model, {"attn": r"blocks/\d+/attn/query", "x": "blocks/mlpx"})
    listed = str(err.value).split("closest first: [")[1].split("]")[0]
    assert listed.startswith("'blocks/0/mlp', 'blocks/1/mlp'")
    assert type(model) is NNXTransformer  # nothing was changed
    assert type(model.blocks[0].attn.query) is nnx.LinearGeneral


class Opaque(nnx.Module):
    """A host whose width no attribute tells."""

    def __init__(self):
        self.inner = nnx.Linear(4, 4, rngs=nnx.Rngs(0))

    def __call__(self, x):
        return self.inner(x)


class TwoHosts(nnx.Module):
    def __init__(self):
        self.known = nnx.Linear(4, 4, rngs=nnx.Rngs(1))
        self.opaque = Opaque()

    def __call__(self, x):
        return self.opaque(self.known(x))


def test_failed_add_adapter_leaves_no_adapter_behind():
    """A model-level add that fails on one host must not leave the adapter on the others.

    The group's first host has an inferable width, the second not, so the add fails part-way;
    afterwards no host may hold 's', and the name must still be free.
    """
    model = jadapters.adapter_transform(TwoHosts(), ["known", "opaque"])
    with pytest.raises(ValueError, match="cannot infer the input width"):
        model.add_adapter("s", LinearAdapterConfig(dim=2), rngs=nnx.Rngs(0))
    assert model.get_enabled_adapters() == []
    assert model.known.get_enabled_adapters() == []
    assert _adapter_sites(model) == set()
    model.add_adapter("s", LinearAdapterConfig(dim=2), rngs=nnx.Rngs(0), in_features=4)
    assert _adapter_sites(model) == {("known", "s"), ("opaque", "s")}


# --- insertion forms on a two-layer host model ---------------------------------------------


def _two_linear(insertion, strategy=None):
    x = _normal((3, 4), seed=2)
    model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 4, rngs=nnx.Rngs(1)))
    cfg = LinearAdapterConfig(dim=2, **({"adapter_strategy": strategy} if strategy else {}))
    jadapters.adapter_transform(model, "layers/1")
    model.add_adapter("p", cfg, rngs=nnx.Rngs(2), insertion=insertion)
    _randomize_adapters(model, seed=3)
    first, second = model.layers
    assert second.get_adapter_insertion("p") == insertion
    return model(x), first, second, adapter_params(second, "p"), np_linear(first, x)


def test_output_insertion():
    out, _, second, ap, h0 = _two_linear("output")
    y = np_linear(second, h0)
    np.testing.assert_allclose(out, y + np_adapter(ap, y), rtol=1e-5, atol=1e-5)


def test_parallel_insertion_residual_add():
    out, _, second, ap, h0 = _two_linear("parallel")
    expected = np_linear(second, h0) + np_adapter(ap, h0)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_parallel_insertion_return_result():
    out, _, _, ap, h0 = _two_linear("parallel", ReturnResultStrategy())
    np.testing.assert_allclose(out, np_adapter(ap, h0), rtol=1e-5, atol=1e-5)


def test_input_insertion():
    out, _, second, ap, h0 = _two_linear("input")
    expected = np_linear(second, h0 + np_adapter(ap, h0))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_two_output_adapters_chain_in_order():
    x = _normal((3, 4), seed=2)
    model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 4, rngs=nnx.Rngs(1)))
    jadapters.adapter_transform(model, "layers/0")
    model.add_adapter("first", LinearAdapterConfig(dim=2), rngs=nnx.Rngs(2))
    model.add_adapter("second", LinearAdapterConfig(dim=3), rngs=nnx.Rngs(3))
    _randomize_adapters(model, seed=4)
    first, second = model.layers
    h = np_linear(first, x)
    h = h + np_adapter(adapter_params(first, "first"), h)
    h = h + np_adapter(adapter_params(first, "second"), h)
    np.testing.assert_allclose(model(x), np_linear(second, h), rtol=1e-5, atol=1e-5)


# --- shared modules, repeated calls, other methods -----------------------------------------


class SharedTwice(nnx.Module):
    """One Linear reachable as ``dense`` and ``alias``, called once through each name."""

    def __init__(self):
        self.dense = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
        self.alias = self.dense
        self.out = nnx.Linear(4, 3, rngs=nnx.Rngs(1))

    def __call__(self, x):
        return self.out(self.alias(self.dense(x)))


class CalledThrice(nnx.Module):
    def __init__(self):
        self.dense = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
        self.out = nnx.Linear(4, 3, rngs=nnx.Rngs(1))

    def __call__(self, x):
        for _ in range(3):
            x = self.dense(x)
        return self.out(x)


@pytest.mark.parametrize(
    "cls, pattern, calls",
    [(SharedTwice, "alias", 2), (SharedTwice, "dense", 2), (CalledThrice, "dense", 3)],
)
def test_module_called_several_times_shares_one_adapter_applied_each_call(cls, pattern, calls):
    """A shared module is reachable by several paths; a pattern matching any of them (here
    also 'dense', the name the model's code uses first) targets it."""
    x = _normal((2, 4), seed=5)
    model = jadapters.adapter_transform(cls(), pattern)
    model.add_adapter("s", LinearAdapterConfig(dim=2), rngs=nnx.Rngs(2))
    assert len(_adapter_sites(model)) == 1  # one set of weights
    _randomize_adapters(model, seed=6)
    ap = adapter_params(model.dense, "s")
    h = np.asarray(x, np.float64)
    for _ in range(calls):
        h = np_linear(model.dense, h)
        h = h + np_adapter(ap, h)
    np.testing.assert_allclose(model(x), np_linear(model.out, h), rtol=1e-5, atol=1e-5)


class Host(nnx.Module):
    def __init__(self):
        self.dense = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
        self.out_features = 4

    def __call__(self, x):
        return self.dense(x)

    def encode(self, x):
        return 2.0 * self.dense(x)


class Outer(nnx.Module):
    def __init__(self):
        self.host = Host()

    def __call__(self, x):
        return self.host(x)

    def encode(self, x):
        return self.host.encode(x)


def test_target_methods_wrap_only_the_named_method():
    x = _normal((2, 4), seed=7)
    model = jadapters.adapter_transform(Outer(), Target(pattern="host", methods=("encode",)))
    model.add_adapter("e", LinearAdapterConfig(dim=2), rngs=nnx.Rngs(1))
    assert _adapter_sites(model) == {("host", "e")}
    _randomize_adapters(model, seed=8)
    h = np_linear(model.host.dense, x)
    ap = adapter_params(model.host, "e")
    np.testing.assert_allclose(
        model.encode(x), 2.0 * h + np_adapter(ap, 2.0 * h), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(model(x), h, rtol=1e-6, atol=1e-6)  # __call__ is not wrapped


def test_unknown_method_raises():
    with pytest.raises(ValueError, match="'decode'"):
        jadapters.adapter_transform(Outer(), Target(pattern="host", methods=("decode",)))


# --- scanned layer stacks ---------------------------------------------------------------------


class Block(nnx.Module):
    def __init__(self, rngs):
        self.mlp = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        return self.mlp(x)


class ScanStack(nnx.Module):
    """Three blocks created with ``nnx.vmap`` and run with ``nnx.scan`` (Flax's recipe)."""

    def __init__(self, rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return Block(rngs)

        self.layers = create(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)

        return body(x, self.layers)


def test_hosts_inside_a_scanned_stack_raise_a_clear_error():
    """The host's weights are stacked (3, 4, 4); unstacked adapter weights cannot be scanned.

    Today JAX fails inside ``nnx.scan`` with 'scan got values with different leading axis
    sizes: 4, 4, 4, 2, 3, 3'; the library should say that adapters do not support scanned
    (stacked) hosts, when the adapter is added or run.
    """
    x = _normal((2, 4))
    model = jadapters.adapter_transform(ScanStack(nnx.Rngs(0)), "layers/mlp")
    with pytest.raises(ValueError, match=r"(?is)adapter.*scan|scan.*adapter"):
        model.add_adapter("s", LinearAdapterConfig(dim=2), rngs=nnx.Rngs(1))
        model(x)


# --- jit, enabling, compiled computation ----------------------------------------------------


def test_jit_equals_no_jit(adapted, jit_forward, x):
    _randomize_adapters(adapted)
    np.testing.assert_allclose(jit_forward(adapted, x), adapted(x), rtol=1e-5, atol=1e-5)


def test_enable_disable(adapted, base_out, x):
    _randomize_adapters(adapted)
    on = adapted(x)
    assert np.abs(np.asarray(on - base_out)).max() > 1e-3
    adapted.set_enabled_adapters(enabled=False)
    assert adapted.get_enabled_adapters() == [] and adapted.is_adapter_available()
    np.testing.assert_array_equal(adapted(x), base_out)
    # disabling 'a' equals zeroing its up-projection (its raw output is then exactly zero)
    adapted.set_enabled_adapters("m", enabled=True)
    assert adapted.get_enabled_adapters() == ["m"]
    assert adapted.blocks[1].attn.value.get_enabled_adapters() == []
    only_m = adapted(x)
    adapted.set_enabled_adapters(enabled=True)
    for i in range(LAYERS):
        for proj in ("query", "value"):
            up = getattr(adapted.blocks[i].attn, proj).adapter_layer["a"].params["up"]["kernel"]
            up[...] = jnp.zeros_like(up[...])
    np.testing.assert_array_equal(only_m, adapted(x))


def test_disabled_adapters_leave_no_trace_in_the_computation(adapted, base_and_adapted, x):
    base = _count_dots(base_and_adapted[1], x)
    assert base == 2 + 8 * LAYERS  # embed, head; per block q, k, v, out, 2 einsums, fc1, fc2
    hosts_a, hosts_m = 2 * LAYERS, LAYERS
    assert _count_dots(adapted, x) == base + 2 * (hosts_a + hosts_m)
    adapted.set_enabled_adapters("a", enabled=False)
    assert _count_dots(adapted, x) == base + 2 * hosts_m
    adapted.set_enabled_adapters(enabled=False)
    assert _count_dots(adapted, x) == base


# --- partitions, masks and summary ----------------------------------------------------------


def test_split_model_round_trip(adapted, x):
    _randomize_adapters(adapted)
    graphdef, adapters, base = jadapters.split_model(adapted)
    flat_adapters = nnx.to_flat_state(adapters)
    assert all(isinstance(v, AdapterParam) for _, v in flat_adapters)
    assert {k for k in _flat(adapters)} == {k for k in _flat(nnx.state(adapted, AdapterParam))}
    assert not any(isinstance(v, AdapterParam) for _, v in nnx.to_flat_state(base))
    _assert_states_equal(nnx.state(base, nnx.Param), nnx.state(adapted, nnx.Param))
    rebuilt = nnx.merge(graphdef, adapters, base)
    np.testing.assert_array_equal(rebuilt(x), adapted(x))


def test_trainable_mask_is_true_exactly_on_enabled_adapters(adapted):
    adapted.set_enabled_adapters("a", enabled=False)
    mask = _flat(nnx.State(jadapters.trainable_mask(adapted)))
    params = _flat(nnx.state(adapted, nnx.Any(nnx.Param, AdapterParam)))
    assert set(mask) == set(params)
    for path, trainable in mask.items():
        assert trainable == ("/adapter_layer/m/" in path), path
    labels = _flat(nnx.State(jadapters.param_labels(adapted)))
    assert {p for p, v in labels.items() if v == "adapters"} == {p for p, v in mask.items() if v}


def test_summarize(adapted):
    summary = jadapters.summarize(adapted)
    rows = {r.name: r for r in summary.rows}
    assert list(rows) == ["a", "m"]
    assert (rows["a"].group, rows["m"].group) == ("", "mlp")
    assert set(rows["a"].hosts) == {
        f"blocks/{i}/attn/{p}" for i in range(LAYERS) for p in ("query", "value")
    }
    assert set(rows["m"].hosts) == {f"blocks/{i}/mlp" for i in range(LAYERS)}

    def per_host(d):  # pre norm scale+bias, down, up
        return 2 * d + d * DIM + DIM * d

    assert rows["a"].params == 2 * LAYERS * per_host(HEAD_DIM)
    assert rows["m"].params == LAYERS * per_host(D_MODEL)
    base_leaves = jax.tree.leaves(nnx.state(adapted, nnx.Param))
    assert summary.base_params == sum(v.size for v in base_leaves)
    text = str(summary)
    assert f"total: {summary.adapter_params:,} adapter parameters" in text
    assert "blocks/0/mlp/m/down/kernel: (16, 4)" in text
