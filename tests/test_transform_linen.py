"""``adapter_transform`` on unmodified Linen models: wrapping, groups, insertion, partitions.

Expected values come from explicit float64 NumPy formulas of the host layers and of the
LinearAdapter (``pre`` LayerNorm, swish), never from the library itself.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jadapters
from jadapters import LinearAdapterConfig, ReturnResultStrategy, Target
from jadapters.demo.models import LinenConvNet, LinenTransformer

TARGETS = {"attn": r"blocks_\d+/attn/(query|value)", "mlp": r"blocks_\d+/mlp"}
D_MODEL, HEADS, LAYERS, DIM = 16, 2, 2, 4
HEAD_DIM = D_MODEL // HEADS


# --- helpers --------------------------------------------------------------------------------


def _normal(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _noise_like(tree, seed=1, scale=0.5):
    """Every leaf replaced by NumPy noise (so nothing is compiled for it)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), a.dtype), tree)


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


def np_dense(params, z):
    p = _f64(params)
    return np.asarray(z, np.float64) @ p["kernel"] + p["bias"]


def _flat_paths(tree):
    return {
        "/".join(str(k.key) for k in path)
        for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _adapter_sites(adapter_tree):
    """``{(host path, adapter name)}`` from an ``"adapters"`` collection."""
    sites = set()
    for path in _flat_paths(adapter_tree):
        parts = path.split("/")
        # leaves are <host>/<name>/{norm,down,up}/<leaf>
        sites.add(("/".join(parts[:-3]), parts[-3]))
    return sites


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def _count_dots(fn, *args):
    return str(jax.make_jaxpr(fn)(*args)).count("dot_general")


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _quick_compiles():
    """XLA without its optimization passes: compiles about twice as fast, and these tests
    check the library's logic, not XLA's. Restored when the module ends."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="module")
def x():
    return _normal((2, 8, 8))


@pytest.fixture(scope="module")
def model():
    return LinenTransformer(
        num_classes=10,
        d_model=D_MODEL,
        num_layers=LAYERS,
        num_heads=HEADS,
        mlp_dim=2 * D_MODEL,
        max_len=8,
    )


@pytest.fixture(scope="module")
def adapted(model):
    """'a' goes to the default group (= 'attn', the first one), 'mlp:m' to the MLPs."""
    return (
        jadapters.adapter_transform(model, TARGETS)
        .add_adapter("a", LinearAdapterConfig(dim=DIM))
        .add_adapter("mlp:m", LinearAdapterConfig(dim=DIM))
    )


@pytest.fixture(scope="module")
def variables(adapted, x):
    # eager: the ops compiled here are reused by every later eager call
    return adapted.init(jax.random.key(0), x)


@pytest.fixture(scope="module")
def base_params(model, x):
    return model.init(jax.random.key(0), x)["params"]


@pytest.fixture(scope="module")
def jit_apply(adapted):
    """One compiled forward for the tests that need one (same shapes: compiled once)."""
    return jax.jit(adapted.apply)


@pytest.fixture(scope="module")
def noisy(variables):
    """The variables with non-zero adapter weights."""
    return {**variables, "adapters": _noise_like(variables["adapters"])}


# --- wrapping -------------------------------------------------------------------------------


def test_base_params_have_exactly_the_unwrapped_structure_and_values(variables, base_params):
    assert sorted(variables) == ["adapters", "params"]
    _assert_trees_equal(variables["params"], base_params)


def test_base_checkpoint_loads_as_is_and_adapters_are_identity_at_init(
    adapted, model, variables, base_params, x
):
    base_out = model.apply({"params": base_params}, x)
    out = adapted.apply({"params": base_params, "adapters": variables["adapters"]}, x)
    np.testing.assert_array_equal(out, base_out)


def test_identity_at_init_under_jit(jit_apply, model, variables, x):
    out = jit_apply(variables, x)
    np.testing.assert_array_equal(out, jax.jit(model.apply)({"params": variables["params"]}, x))


def test_conv_net_keeps_params_and_batch_stats():
    model = LinenConvNet(num_classes=10, features=4)
    images = _normal((2, 8, 8, 1))
    adapted = jadapters.adapter_transform(model, r"conv_\d").add_adapter(
        "c", LinearAdapterConfig(dim=2)
    )
    variables = adapted.init(jax.random.key(0), images)
    base = model.init(jax.random.key(0), images)
    assert sorted(variables) == ["adapters", "batch_stats", "params"]
    _assert_trees_equal(variables["params"], base["params"])
    _assert_trees_equal(variables["batch_stats"], base["batch_stats"])
    assert _adapter_sites(variables["adapters"]) == {("conv_0", "c"), ("conv_1", "c")}
    np.testing.assert_array_equal(adapted.apply(variables, images), model.apply(base, images))


@pytest.mark.parametrize("kind", ["attribute", "sequential"])
def test_submodules_passed_as_attributes_init_like_the_unwrapped_model(kind):
    """Same key, same base values, also for submodules given as dataclass fields.

    Those are bound under the wrapper's ``model`` child scope before ``nn.share_scope``
    re-parents them, so their PRNG streams keep the extra ``model`` fold.
    """

    class WithInner(nn.Module):
        inner: nn.Module

        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="head")(self.inner(x))

    if kind == "attribute":
        model = WithInner(nn.Dense(4))
    else:
        model = nn.Sequential([nn.Dense(4), nn.Dense(4)])
    x = _normal((2, 4))
    adapted = jadapters.adapter_transform(model, ".*")
    _assert_trees_equal(
        adapted.init(jax.random.key(0), x)["params"], model.init(jax.random.key(0), x)["params"]
    )


def test_transforming_twice_raises(adapted):
    with pytest.raises(ValueError, match="already adapted"):
        jadapters.adapter_transform(adapted, "x")


# --- groups and routing ---------------------------------------------------------------------


def test_group_names_and_routing(adapted, variables, x):
    assert adapted.adapter_module_names == ["", "attn", "mlp"]
    attn = {f"blocks_{i}/attn/{p}" for i in range(LAYERS) for p in ("query", "value")}
    mlp = {f"blocks_{i}/mlp" for i in range(LAYERS)}
    assert _adapter_sites(variables["adapters"]) == {(h, "a") for h in attn} | {
        (h, "m") for h in mlp
    }
    hosts = adapted.host_paths({"params": variables["params"]}, x)
    assert {g: set(h) for g, h in hosts.items()} == {"": attn, "attn": attn, "mlp": mlp}


def test_unknown_group_raises_listing_valid_ones(adapted):
    with pytest.raises(ValueError, match=r"unknown adapter module 'enc'.*\['', 'attn', 'mlp'\]"):
        adapted.add_adapter("enc:z", LinearAdapterConfig(dim=DIM))


def test_same_name_in_two_groups_raises(adapted):
    with pytest.raises(ValueError, match="adapter name 'm' already exists in module 'mlp'"):
        adapted.add_adapter("attn:m", LinearAdapterConfig(dim=DIM))


def test_pattern_matching_nothing_raises_at_init_listing_closest_paths_first(model, x):
    adapted = jadapters.adapter_transform(model, r"blocks_\d+/mlpx")  # no error yet
    adapted = adapted.add_adapter("z", LinearAdapterConfig(dim=DIM))
    with pytest.raises(ValueError, match=r"matches no module") as err:
        jax.eval_shape(adapted.init, jax.random.key(0), x)
    listed = str(err.value).split("closest first: [")[1].split("]")[0]
    assert listed.startswith("'blocks_0/mlp', 'blocks_1/mlp'")


def test_adapter_added_after_init_needs_init_adapters(adapted, variables, x):
    grown = adapted.add_adapter("mlp:late", LinearAdapterConfig(dim=2))
    with pytest.raises(ValueError, match="init_adapters"):
        grown.apply(variables, x)
    grown_vars = grown.init_adapters(jax.random.key(1), variables, x)
    _assert_trees_equal(grown_vars["params"], variables["params"])
    old = {(h, n) for h, n in _adapter_sites(grown_vars["adapters"]) if n != "late"}
    assert old == _adapter_sites(variables["adapters"])
    assert {h for h, n in _adapter_sites(grown_vars["adapters"]) if n == "late"} == {
        f"blocks_{i}/mlp" for i in range(LAYERS)
    }
    for name in ("a", "m"):  # existing adapter weights are kept as they were
        _assert_trees_equal(
            {k: v for k, v in _flat_items(grown_vars["adapters"]) if f"/{name}/" in k},
            {k: v for k, v in _flat_items(variables["adapters"]) if f"/{name}/" in k},
        )


def _flat_items(tree):
    return [
        ("/".join(str(k.key) for k in path), leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


# --- insertion forms on a two-layer host model ---------------------------------------------


@pytest.fixture(scope="module")
def two_dense():
    return nn.Sequential([nn.Dense(4), nn.Dense(4)]), _normal((3, 4), seed=2)


def _one_adapter(two_dense, insertion, strategy=None):
    seq, x = two_dense
    cfg = LinearAdapterConfig(dim=2, **({"adapter_strategy": strategy} if strategy else {}))
    adapted = jadapters.adapter_transform(seq, "layers_1").add_adapter(
        "p", cfg, insertion=insertion
    )
    variables = adapted.init(jax.random.key(0), x)
    variables = {**variables, "adapters": _noise_like(variables["adapters"], seed=3)}
    params, ap = variables["params"], variables["adapters"]["layers_1"]["p"]
    h0 = np_dense(params["layers_0"], x)
    return adapted.apply(variables, x), params, ap, h0


def test_output_insertion(two_dense):
    out, params, ap, h0 = _one_adapter(two_dense, "output")
    y = np_dense(params["layers_1"], h0)
    np.testing.assert_allclose(out, y + np_adapter(ap, y), rtol=1e-5, atol=1e-5)


def test_parallel_insertion_residual_add(two_dense):
    out, params, ap, h0 = _one_adapter(two_dense, "parallel")
    expected = np_dense(params["layers_1"], h0) + np_adapter(ap, h0)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_parallel_insertion_return_result(two_dense):
    out, _, ap, h0 = _one_adapter(two_dense, "parallel", ReturnResultStrategy())
    np.testing.assert_allclose(out, np_adapter(ap, h0), rtol=1e-5, atol=1e-5)


def test_input_insertion(two_dense):
    out, params, ap, h0 = _one_adapter(two_dense, "input")
    expected = np_dense(params["layers_1"], h0 + np_adapter(ap, h0))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_two_output_adapters_chain_in_order(two_dense):
    seq, x = two_dense
    adapted = (
        jadapters.adapter_transform(seq, "layers_0")
        .add_adapter("first", LinearAdapterConfig(dim=2))
        .add_adapter("second", LinearAdapterConfig(dim=3))
    )
    variables = adapted.init(jax.random.key(0), x)
    variables = {**variables, "adapters": _noise_like(variables["adapters"], seed=4)}
    p, ap = variables["params"], variables["adapters"]["layers_0"]
    h = np_dense(p["layers_0"], x)
    h = h + np_adapter(ap["first"], h)
    h = h + np_adapter(ap["second"], h)
    expected = np_dense(p["layers_1"], h)
    np.testing.assert_allclose(adapted.apply(variables, x), expected, rtol=1e-5, atol=1e-5)


# --- setup/compact styles, shared modules, other methods -----------------------------------


class SetupShared(nn.Module):
    """Setup-style; ``dense`` is called twice."""

    def setup(self):
        self.dense = nn.Dense(4)
        self.out = nn.Dense(3)

    def __call__(self, x):
        return self.out(self.dense(self.dense(x)))


class CompactLoop(nn.Module):
    """Compact; ``dense`` is called three times."""

    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(4, name="dense")
        for _ in range(3):
            x = dense(x)
        return nn.Dense(3, name="out")(x)


@pytest.mark.parametrize("cls, calls", [(SetupShared, 2), (CompactLoop, 3)])
def test_module_called_several_times_shares_one_adapter_applied_each_call(cls, calls):
    x = _normal((2, 4), seed=5)
    adapted = jadapters.adapter_transform(cls(), "dense").add_adapter(
        "s", LinearAdapterConfig(dim=2)
    )
    variables = adapted.init(jax.random.key(0), x)
    assert _adapter_sites(variables["adapters"]) == {("dense", "s")}  # one set of weights
    _assert_trees_equal(variables["params"], cls().init(jax.random.key(0), x)["params"])
    variables = {**variables, "adapters": _noise_like(variables["adapters"], seed=6)}
    p, ap = variables["params"], variables["adapters"]["dense"]["s"]
    h = np.asarray(x, np.float64)
    for _ in range(calls):
        h = np_dense(p["dense"], h)
        h = h + np_adapter(ap, h)
    np.testing.assert_allclose(
        adapted.apply(variables, x), np_dense(p["out"], h), rtol=1e-5, atol=1e-5
    )


class Host(nn.Module):
    def setup(self):
        self.dense = nn.Dense(4)

    def __call__(self, x):
        return self.dense(x)

    def encode(self, x):
        return 2.0 * self.dense(x)


class Outer(nn.Module):
    def setup(self):
        self.host = Host()

    def __call__(self, x):
        return self.host(x)

    def encode(self, x):
        return self.host.encode(x)


def test_target_methods_wrap_only_the_named_method_and_top_level_call():
    x = _normal((2, 4), seed=7)
    adapted = jadapters.adapter_transform(
        Outer(), Target(pattern="host", methods=("encode",))
    ).add_adapter("e", LinearAdapterConfig(dim=2))
    variables = adapted.init(jax.random.key(0), "encode", x, method="call")
    assert _adapter_sites(variables["adapters"]) == {("host", "e")}
    variables = {**variables, "adapters": _noise_like(variables["adapters"], seed=8)}
    p, ap = variables["params"], variables["adapters"]["host"]["e"]
    h = np_dense(p["host"]["dense"], x)
    np.testing.assert_allclose(
        adapted.apply(variables, "encode", x, method="call"),
        2.0 * h + np_adapter(ap, 2.0 * h),
        rtol=1e-5,
        atol=1e-5,
    )
    # __call__ is not a targeted method: it runs the host without the adapter
    np.testing.assert_allclose(adapted.apply(variables, x), h, rtol=1e-6, atol=1e-6)


# --- lifted transforms: remat, scan -----------------------------------------------------------


class RematBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="mlp")(x)


class RematStack(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = nn.remat(RematBlock)(name=f"blocks_{i}")(x)
        return x


def test_hosts_inside_nn_remat_keep_their_paths():
    """Remat'd blocks: hosts are found at their real paths ('blocks_0/mlp', as in the params),
    each with its own adapter weights applied at its own call."""
    x = _normal((2, 4), seed=9)
    adapted = jadapters.adapter_transform(RematStack(), r"blocks_\d/mlp").add_adapter(
        "s", LinearAdapterConfig(dim=2)
    )
    variables = adapted.init(jax.random.key(0), x)
    assert _adapter_sites(variables["adapters"]) == {("blocks_0/mlp", "s"), ("blocks_1/mlp", "s")}
    variables = {**variables, "adapters": _noise_like(variables["adapters"], seed=10)}
    h = np.asarray(x, np.float64)
    for i in range(2):
        h = np_dense(variables["params"][f"blocks_{i}"]["mlp"], h)
        h = h + np_adapter(variables["adapters"][f"blocks_{i}"]["mlp"]["s"], h)
    np.testing.assert_allclose(adapted.apply(variables, x), h, rtol=1e-5, atol=1e-5)


class ScanLayer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.Dense(4, name="mlp")(x), None


class ScanStack(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            ScanLayer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )
        return stack(name="layers")(x, None)[0]


@pytest.mark.parametrize("pattern", ["layers/mlp", r".*mlp"])
def test_hosts_inside_nn_scan_raise_a_clear_error(pattern):
    """Adapters on hosts inside ``nn.scan`` are unsupported (the scan does not carry the
    ``adapters`` collection); say so, naming scan.

    Today 'layers/mlp' (the host's real path, as in the params) "matches no module" because
    the path is computed as 'mlp' from the lifted scope, and '.*mlp' fails with "added after
    the variables were created", which is not what happened.
    """
    x = _normal((2, 4))
    adapted = jadapters.adapter_transform(ScanStack(), pattern).add_adapter(
        "s", LinearAdapterConfig(dim=2)
    )
    with pytest.raises(ValueError, match="scan"):
        adapted.init(jax.random.key(0), x)


# --- jit, enabling, compiled computation ----------------------------------------------------


def test_jit_equals_no_jit(jit_apply, adapted, noisy, x):
    np.testing.assert_allclose(jit_apply(noisy, x), adapted.apply(noisy, x), rtol=1e-5, atol=1e-5)


def test_enable_disable(adapted, model, noisy, x):
    base_out = model.apply({"params": noisy["params"]}, x)
    off = adapted.set_enabled_adapters(enabled=False)
    assert off.get_enabled_adapters() == [] and off.is_adapter_available()
    np.testing.assert_array_equal(off.apply(noisy, x), base_out)
    assert np.abs(np.asarray(adapted.apply(noisy, x) - base_out)).max() > 1e-3
    # disabling 'a' equals zeroing its up-projection (its raw output is then exactly zero)
    zeroed = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.zeros_like(v) if _keys(path)[-3:] == ("a", "up", "kernel") else v,
        noisy,
    )
    only_m = adapted.set_enabled_adapters("a", enabled=False)
    assert only_m.get_enabled_adapters() == ["m"]
    np.testing.assert_array_equal(only_m.apply(noisy, x), adapted.apply(zeroed, x))


def _keys(path):
    return tuple(str(k.key) for k in path)


def test_disabled_adapters_leave_no_trace_in_the_computation(adapted, model, variables, x):
    base = _count_dots(model.apply, {"params": variables["params"]}, x)
    assert base == 2 + 8 * LAYERS  # embed, head; per block q, k, v, out, 2 einsums, fc1, fc2
    hosts_a, hosts_m = 2 * LAYERS, LAYERS
    assert _count_dots(adapted.apply, variables, x) == base + 2 * (hosts_a + hosts_m)
    only_m = adapted.set_enabled_adapters("a", enabled=False)
    assert _count_dots(only_m.apply, variables, x) == base + 2 * hosts_m
    off = adapted.set_enabled_adapters(enabled=False)
    assert _count_dots(off.apply, variables, x) == base


# --- partitions and summary -----------------------------------------------------------------


def test_split_merge_round_trip(variables):
    base, adapters = jadapters.split_variables(variables)
    assert sorted(base) == ["params"]
    assert adapters is variables["adapters"]
    merged = jadapters.merge_variables(base, adapters)
    assert sorted(merged) == sorted(variables)
    _assert_trees_equal(merged, variables)


def test_summarize(adapted, variables, base_params):
    summary = jadapters.summarize(adapted, variables)
    rows = {r.name: r for r in summary.rows}
    assert list(rows) == ["a", "m"]
    assert (rows["a"].group, rows["m"].group) == ("", "mlp")
    assert set(rows["a"].hosts) == {
        f"blocks_{i}/attn/{p}" for i in range(LAYERS) for p in ("query", "value")
    }
    assert set(rows["m"].hosts) == {f"blocks_{i}/mlp" for i in range(LAYERS)}

    def per_host(d):  # pre norm scale+bias, down, up
        return 2 * d + d * DIM + DIM * d

    assert rows["a"].params == 2 * LAYERS * per_host(HEAD_DIM)  # query/value act per head
    assert rows["m"].params == LAYERS * per_host(D_MODEL)
    assert rows["m"].bytes == 4 * rows["m"].params
    assert summary.adapter_params == rows["a"].params + rows["m"].params
    assert summary.base_params == sum(x.size for x in jax.tree.leaves(base_params))
    text = str(summary)
    assert f"total: {summary.adapter_params:,} adapter parameters" in text
    assert "blocks_0/mlp/m/down/kernel: (16, 4)" in text
    for name in ("a", "m"):
        assert f"  {name}: hosts " in text
