"""``adapter_transform`` on unmodified Linen models: what only the Linen front-end has.

The functional API (``init``/``init_adapters``, modules returned anew), the variables'
collections, scopes of submodules given as attributes or built in ``setup``, host paths found
by interception (``host_paths``, lifted transforms) and ``split_variables``. What both
front-ends share (identity, groups, insertion forms, the chain, enabling, jit, summaries,
masks) is tested once for both in ``test_frontends.py``.

Expected values come from explicit float64 NumPy formulas of the host layers and of the
LinearAdapter (``pre`` LayerNorm, swish), never from the library itself.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _frontends import assert_trees_equal, np_adapter, np_dense

import jadapters
from jadapters import LinearAdapterConfig
from jadapters.demo.models import LinenConvNet, LinenTransformer

TARGETS = {"attn": r"blocks_\d+/attn/(query|value)", "mlp": r"blocks_\d+/mlp"}
D_MODEL, HEADS, LAYERS, DIM = 16, 2, 2, 4


# --- helpers --------------------------------------------------------------------------------


def _normal(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _noise_like(tree, seed=1, scale=0.5):
    """Every leaf replaced by NumPy noise (so nothing is compiled for it)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), a.dtype), tree)


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


# --- fixtures -------------------------------------------------------------------------------


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
    """'attn:a' goes to the attention projections, 'mlp:m' to the MLPs."""
    return (
        jadapters.adapter_transform(model, TARGETS)
        .add_adapter("attn:a", LinearAdapterConfig(dim=DIM))
        .add_adapter("mlp:m", LinearAdapterConfig(dim=DIM))
    )


@pytest.fixture(scope="module")
def variables(adapted, x):
    # eager: the ops compiled here are reused by every later eager call
    return adapted.init(jax.random.key(0), x)


# --- wrapping -------------------------------------------------------------------------------


def test_init_adds_only_the_adapters_collection(variables):
    """``init`` returns the base's own collections, unchanged (``test_frontends.py``), plus
    ``"adapters"``; nothing else."""
    assert sorted(variables) == ["adapters", "params"]
    conv = jadapters.adapter_transform(LinenConvNet(num_classes=10, features=4), r"conv_\d")
    conv = conv.add_adapter("c", LinearAdapterConfig(dim=2))
    shapes = jax.eval_shape(conv.init, jax.random.key(0), _normal((2, 8, 8, 1)))
    assert sorted(shapes) == ["adapters", "batch_stats", "params"]


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
    assert_trees_equal(
        adapted.init(jax.random.key(0), x)["params"], model.init(jax.random.key(0), x)["params"]
    )


# --- groups and routing ---------------------------------------------------------------------


def test_host_paths_by_group(adapted, variables, x):
    """Linen learns its host paths by running the model; ``host_paths`` reports them."""
    attn = {f"blocks_{i}/attn/{p}" for i in range(LAYERS) for p in ("query", "value")}
    mlp = {f"blocks_{i}/mlp" for i in range(LAYERS)}
    hosts = adapted.host_paths({"params": variables["params"]}, x)
    assert {g: set(h) for g, h in hosts.items()} == {"attn": attn, "mlp": mlp}


def test_adapter_added_after_init_needs_init_adapters(adapted, variables, x):
    grown = adapted.add_adapter("mlp:late", LinearAdapterConfig(dim=2))
    with pytest.raises(ValueError, match="init_adapters"):
        grown.apply(variables, x)
    grown_vars = grown.init_adapters(jax.random.key(1), variables, x)
    assert_trees_equal(grown_vars["params"], variables["params"])
    old = {(h, n) for h, n in _adapter_sites(grown_vars["adapters"]) if n != "late"}
    assert old == _adapter_sites(variables["adapters"])
    assert {h for h, n in _adapter_sites(grown_vars["adapters"]) if n == "late"} == {
        f"blocks_{i}/mlp" for i in range(LAYERS)
    }
    for name in ("a", "m"):  # existing adapter weights are kept as they were
        assert_trees_equal(
            {k: v for k, v in _flat_items(grown_vars["adapters"]) if f"/{name}/" in k},
            {k: v for k, v in _flat_items(variables["adapters"]) if f"/{name}/" in k},
        )


@pytest.mark.parametrize(
    "targets",
    [
        {"mlp": r"blockz_\d+/mlp"},  # every pattern misses: was KeyError 'adapters'
        {"mlp": [r"blocks_\d+/mlp", r"blockz_\d+/mlp"]},  # one misses: was silent
        {"mlp": r"blocks_\d+/mlp", "attn": r"blockz_\d+/attn/query"},  # another group's
    ],
    ids=["all-miss", "one-of-two-misses", "other-group-misses"],
)
def test_init_adapters_checks_the_targets_like_init(model, variables, x, targets):
    adapted = jadapters.adapter_transform(model, targets)
    adapted = adapted.add_adapter("mlp:late", LinearAdapterConfig(dim=2))
    message = r"target pattern 'blockz_.*' \(group '(mlp|attn)'\) matches no module\. Module"
    with pytest.raises(ValueError, match=message) as from_init:
        adapted.init(jax.random.key(1), x)
    with pytest.raises(ValueError, match=message) as from_init_adapters:
        adapted.init_adapters(jax.random.key(1), {"params": variables["params"]}, x)
    assert str(from_init_adapters.value) == str(from_init.value)
    assert "Module paths that exist, closest first: ['blocks_" in str(from_init.value)


def test_init_adapters_without_adapters_returns_the_variables(model, variables, x):
    adapted = jadapters.adapter_transform(model, TARGETS)
    base = {"params": variables["params"]}
    assert adapted.init_adapters(jax.random.key(1), base, x) == base
    grown = adapted.add_adapter("mlp:late", LinearAdapterConfig(dim=2))
    grown_vars = grown.init_adapters(jax.random.key(1), base, x)
    assert sorted(grown_vars) == ["adapters", "params"]
    assert _adapter_sites(grown_vars["adapters"]) == {(f"blocks_{i}/mlp", "late") for i in (0, 1)}


def _flat_items(tree):
    return [
        ("/".join(str(k.key) for k in path), leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


# --- setup-style modules -------------------------------------------------------------------


class SetupShared(nn.Module):
    """Setup-style; ``dense`` is called twice."""

    def setup(self):
        self.dense = nn.Dense(4)
        self.out = nn.Dense(3)

    def __call__(self, x):
        return self.out(self.dense(self.dense(x)))


def test_setup_module_called_twice_shares_one_adapter_applied_each_call():
    """A submodule bound in ``setup`` is one host however often it is called (the compact
    form is in ``test_frontends.py``)."""
    x = _normal((2, 4), seed=5)
    adapted = jadapters.adapter_transform(SetupShared(), "dense").add_adapter(
        "s", LinearAdapterConfig(dim=2)
    )
    variables = adapted.init(jax.random.key(0), x)
    assert _adapter_sites(variables["adapters"]) == {("dense", "s")}  # one set of weights
    assert_trees_equal(variables["params"], SetupShared().init(jax.random.key(0), x)["params"])
    variables = {**variables, "adapters": _noise_like(variables["adapters"], seed=6)}
    p, ap = variables["params"], variables["adapters"]["dense"]["s"]
    h = np.asarray(x, np.float64)
    for _ in range(2):
        h = np_dense(p["dense"], h)
        h = h + np_adapter(ap, h)
    np.testing.assert_allclose(
        adapted.apply(variables, x), np_dense(p["out"], h), rtol=1e-5, atol=1e-5
    )


# --- lifted transforms: remat (scan: test_frontends.py) ---------------------------------------


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


# --- partitions ----------------------------------------------------------------------------


def test_split_merge_round_trip(variables):
    base, adapters = jadapters.split_variables(variables)
    assert sorted(base) == ["params"]
    assert adapters is variables["adapters"]
    merged = jadapters.merge_variables(base, adapters)
    assert sorted(merged) == sorted(variables)
    assert_trees_equal(merged, variables)
