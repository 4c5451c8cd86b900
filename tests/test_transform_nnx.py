"""``adapter_transform`` on unmodified NNX models: what only the NNX front-end has.

In-place class surgery (and its all-or-nothing failures), adapters held by each host module,
modules shared under several paths, targeted methods checked at the transform, and the
``AdapterParam`` partition. What both front-ends share (identity, groups, insertion forms, the
chain, enabling, jit, summaries, masks) is tested once for both in ``test_frontends.py``.

Expected values come from explicit float64 NumPy formulas of the host layers and of the
LinearAdapter (``pre`` LayerNorm, swish), never from the library itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _frontends import NNXOuter, np_adapter
from flax import nnx

import jadapters
from jadapters import AdapterParam, LinearAdapterConfig, Target
from jadapters.demo.models import NNXTransformer

TARGETS = {"attn": r"blocks/\d+/attn/(query|value)", "mlp": r"blocks/\d+/mlp"}
D_MODEL, HEADS, LAYERS, DIM = 16, 2, 2, 4


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
def adapted_transformer():
    """'attn:a' goes to the attention projections, 'mlp:m' to the MLPs."""
    model = _transformer()
    adapted = jadapters.adapter_transform(model, TARGETS)
    assert adapted is model  # NNX: in place
    adapted.add_adapter("attn:a", LinearAdapterConfig(dim=DIM), rngs=nnx.Rngs(1))
    adapted.add_adapter("mlp:m", LinearAdapterConfig(dim=DIM), rngs=nnx.Rngs(2))
    return adapted


@pytest.fixture
def adapted(adapted_transformer):
    """A fresh copy of the adapted transformer (tests may mutate it)."""
    return nnx.clone(adapted_transformer)


# --- wrapping -------------------------------------------------------------------------------


def test_transform_changes_the_classes_in_place(adapted_transformer):
    """The model and its hosts keep their identity and attributes; only their classes become
    adapted subclasses (the base state is unchanged: ``test_frontends.py``)."""
    adapted = adapted_transformer
    assert type(adapted).__name__ == "AdaptedNNXTransformer"
    assert isinstance(adapted, NNXTransformer)
    assert isinstance(adapted, jadapters.AdapterModelMixin)
    mlp = adapted.blocks[0].mlp
    assert type(mlp).__name__ == "AdaptedNNXMLP"
    assert isinstance(mlp, jadapters.AdapterModuleMixin)
    assert type(adapted.blocks[0].attn.key) is nnx.LinearGeneral  # not a target


def test_adapter_param_is_not_a_param():
    assert not issubclass(AdapterParam, nnx.Param)


# --- groups and routing ---------------------------------------------------------------------


def test_each_host_module_holds_and_runs_its_own_adapters(adapted):
    """Adapters live on the host modules: each answers for its own, and enabling at the model
    reaches every host."""
    mlp = {f"blocks/{i}/mlp" for i in range(LAYERS)}
    assert adapted.blocks[0].mlp.get_enabled_adapters() == ["m"]
    assert adapted.blocks[0].attn.query.get_enabled_adapters() == ["a"]
    assert adapted.blocks[0].mlp.get_adapter_insertion("m") == "output"
    assert set(map(_path_str, adapted.get_adapter_modules("m"))) == mlp
    adapted.set_enabled_adapters(enabled=False)
    adapted.set_enabled_adapters("m", enabled=True)
    assert adapted.blocks[1].attn.value.get_enabled_adapters() == []
    assert adapted.blocks[1].mlp.get_enabled_adapters() == ["m"]


def _path_str(path):
    return "/".join(str(p) for p in path)


def test_failed_transform_leaves_the_model_unchanged():
    """A group that matches nothing fails the transform before any class is changed (the
    message is checked in ``test_frontends.py``)."""
    model = _transformer()
    with pytest.raises(ValueError, match=r"matches no module"):
        jadapters.adapter_transform(model, {"attn": r"blocks/\d+/attn/query", "x": "blocks/mlpx"})
    assert type(model) is NNXTransformer
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


# --- shared modules, methods ----------------------------------------------------------------


class SharedTwice(nnx.Module):
    """One Linear reachable as ``dense`` and ``alias``, called once through each name."""

    def __init__(self):
        self.dense = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
        self.alias = self.dense
        self.out = nnx.Linear(4, 3, rngs=nnx.Rngs(1))

    def __call__(self, x):
        return self.out(self.alias(self.dense(x)))


@pytest.mark.parametrize("pattern", ["alias", "dense"])
def test_shared_module_is_one_host_whichever_path_targets_it(pattern):
    """A shared module is reachable by several paths; a pattern matching any of them (here
    also 'dense', the name the model's code uses first) targets it, and its one adapter runs
    at each call (a module called in a loop: ``test_frontends.py``)."""
    x = _normal((2, 4), seed=5)
    model = jadapters.adapter_transform(SharedTwice(), pattern)
    model.add_adapter("s", LinearAdapterConfig(dim=2), rngs=nnx.Rngs(2))
    assert len(_adapter_sites(model)) == 1  # one set of weights
    _randomize_adapters(model, seed=6)
    ap = adapter_params(model.dense, "s")
    h = np.asarray(x, np.float64)
    for _ in range(2):
        h = np_linear(model.dense, h)
        h = h + np_adapter(ap, h)
    np.testing.assert_allclose(model(x), np_linear(model.out, h), rtol=1e-5, atol=1e-5)


def test_unknown_method_raises():
    with pytest.raises(ValueError, match="'decode'"):
        jadapters.adapter_transform(NNXOuter(), Target(pattern="host", methods=("decode",)))


# --- partitions ----------------------------------------------------------------------------


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


def test_a_new_adapter_joins_in_the_mode_of_the_others():
    model = jadapters.adapter_transform(
        nnx.Sequential(nnx.Linear(3, 3, rngs=nnx.Rngs(0)), nnx.Linear(3, 3, rngs=nnx.Rngs(1))),
        {"": "layers/0", "second": "layers/1"},
    )
    l2 = jadapters.LinearAdapterConfig(
        dim=2, adapter_strategy=jadapters.ResidualAddStrategy(l2_lambda=1.0)
    )
    model.add_adapter("a", l2, rngs=nnx.Rngs(2))
    assert model.get_adapter_modules("a")[("layers", 0)].deterministic is False  # NNX default
    model.eval()
    model.add_adapter("second:b", l2, rngs=nnx.Rngs(3))  # on another host: the model's mode
    model.layers[0].add_adapter("c", l2, rngs=nnx.Rngs(4))  # host level: that host's mode
    shells = [m.get_adapter_module(n) for m, n in ((model.layers[1], "b"), (model.layers[0], "c"))]
    assert all(s.deterministic for s in shells)
    nnx.update(model, jax.tree.map(lambda v: v + 0.5, nnx.state(model, jadapters.AdapterParam)))
    model(jnp.ones((2, 3)))
    assert jax.tree.leaves(nnx.pop(model, jadapters.AdapterLoss)) == []  # nothing trains
    model.train()
    model(jnp.ones((2, 3)))
    assert len(jax.tree.leaves(nnx.pop(model, jadapters.AdapterLoss))) == 3  # a, b and c


def test_the_first_adapter_joins_in_the_mode_eval_set_on_the_model(x):
    """With no adapter yet, the mode comes from what ``eval()``/``train()`` set on the
    model's dropout layers: after ``model.eval()`` a new adapter's dropout is off."""
    model = jadapters.adapter_transform(_transformer(), TARGETS)  # dropout layers of rate 0
    model.eval()
    dropping = LinearAdapterConfig(dim=DIM, dropout=0.5)
    model.add_adapter("mlp:d", dropping, rngs=nnx.Rngs(params=2, dropout=3))
    model.add_adapter("blocks/0/attn/query:q", dropping, rngs=nnx.Rngs(params=4, dropout=5))
    assert all(s.deterministic for s in model.get_adapter_modules("d").values())
    _randomize_adapters(model)
    np.testing.assert_array_equal(model(x), model(x))  # evaluation: no dropout anywhere
    model.train()
    assert not jnp.array_equal(model(x), model(x))  # the adapters' dropout draws again


# --- adapters added on a host itself ---------------------------------------------------------


def test_host_level_adapter_is_listed_saved_loaded_and_trainable(adapted, x, tmp_path):
    """``model.blocks[0].mlp.add_adapter(...)`` is an adapter of the model: named by its
    host's path, listed, enabled, saved, loaded into a fresh model and trainable (training
    itself: test_module_mixin.py)."""
    adapted.blocks[0].mlp.add_adapter("h", LinearAdapterConfig(dim=DIM), rngs=nnx.Rngs(3))
    adapted.add_adapter("blocks/1/mlp:k", LinearAdapterConfig(dim=DIM), rngs=nnx.Rngs(4))
    assert adapted.get_enabled_adapters() == ["a", "m", "h", "k"]
    specs = adapted.get_adapter_specs()
    assert [specs.get(n).qualified_name for n in "hk"] == ["blocks/0/mlp:h", "blocks/1/mlp:k"]
    assert ("blocks/1/mlp", "k") in _adapter_sites(adapted)
    assert ("blocks/0/mlp", "k") not in _adapter_sites(adapted)
    _randomize_adapters(adapted)
    jadapters.save_adapters(str(tmp_path), adapted, name=["h", "blocks/1/mlp:k"])

    fresh = jadapters.adapter_transform(_transformer(), TARGETS)
    jadapters.load_adapters(str(tmp_path), fresh)
    assert fresh.get_enabled_adapters() == ["h", "k"]
    assert fresh.blocks[0].mlp.get_enabled_adapters() == ["h"]
    for host, name in ((fresh.blocks[0].mlp, "h"), (fresh.blocks[1].mlp, "k")):
        original = adapted.blocks[int(name == "k")].mlp
        _assert_states_equal(adapter_params(host, name), adapter_params(original, name))
    adapted.set_enabled_adapters("a", enabled=False)
    adapted.set_enabled_adapters("m", enabled=False)
    np.testing.assert_array_equal(fresh(x), adapted(x))

    fresh.set_enabled_adapters("blocks/1/mlp:k", enabled=False)
    assert fresh.get_enabled_adapters() == ["h"]
    assert fresh.blocks[1].mlp.get_enabled_adapters() == []
    # the trainable filter (adapter_optimizer's) covers exactly the enabled host-level one
    selected = {
        p for p, _ in nnx.to_flat_state(nnx.state(fresh, fresh.unfreeze_enabled_adapters()))
    }
    h_paths = _flat(nnx.state(fresh.blocks[0].mlp, AdapterParam))
    assert len(h_paths) == 4
    assert {"/".join(str(k) for k in p) for p in selected} == {f"blocks/0/mlp/{p}" for p in h_paths}
