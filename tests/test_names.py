"""Adapter names, group names and ``targets``, on both front-ends (``fe`` is Linen or NNX).

* The name grammar (hypothesis): every accepted name round-trips through ``add_adapter`` ->
  ``get_enabled_adapters`` -> ``get_adapter_cfg``; every refused one raises ``ValueError``
  with a message and leaves the model as it was.
* A bare name means the default group ``''`` only; a model without one needs "group:name".
* ``targets`` of a form that is not accepted raise ``ValueError`` naming ``targets``.
* An adapter may be named like a module on its host's path: its weights are found by their
  exact position (host path + name), so masks, views, summaries, checkpoints and training
  all see the right adapter.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _frontends import FRONTENDS, assert_trees_equal, flat, host_copy
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import jadapters
from jadapters import LinearAdapterConfig, Target
from jadapters._adapter_set import CONTAINER_NAMES, RESERVED_NAMES

CFG = LinearAdapterConfig(dim=2)
TARGETS = {"mlp": r"blocks#\d+/mlp", "attn": r"blocks#\d+/attn"}
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_\-]*")


@pytest.fixture(scope="module", params=list(FRONTENDS))
def fe(request):
    return FRONTENDS[request.param]


def _dense_model(fe):
    """One 4 -> 4 dense host at ``layers#0``."""
    return fe.sequential(fe.dense(4, 4))


def _adapt(fe, targets):
    return jadapters.adapter_transform(_dense_model(fe), fe.path(targets))


def _add(fe, model, name, cfg=CFG):
    """``add_adapter`` in the front-end's own form: the (new) model."""
    if fe.name == "linen":
        return model.add_adapter(name, cfg)
    model.add_adapter(name, cfg, rngs=nnx.Rngs(0))
    return model


def _specs(fe, model):
    return model.adapters if fe.name == "linen" else model.get_adapter_specs()


def _assert_no_adapter(fe, model):
    assert not model.is_adapter_available()
    assert model.get_enabled_adapters() == []
    if fe.name == "nnx":
        assert not jax.tree.leaves(nnx.state(model, jadapters.AdapterParam))


def _assert_round_trip(fe, model, qualified, group, bare):
    model = _add(fe, model, qualified)
    assert model.is_adapter_available()
    assert model.get_enabled_adapters() == [bare]
    assert model.get_adapter_cfg(bare) == CFG
    (spec,) = list(_specs(fe, model))
    assert (spec.name, spec.group) == (bare, group)
    assert model.get_adapter_cfg(spec.qualified_name) == CFG
    assert spec.qualified_name == (f"{group}:{bare}" if group else bare)


# --- the adapter name grammar ---------------------------------------------------------------

_REFUSED = sorted(RESERVED_NAMES + CONTAINER_NAMES)
_accepted_names = st.from_regex(NAME, fullmatch=True).filter(lambda n: n not in _REFUSED)


@given(name=_accepted_names, form=st.sampled_from(["bare", "default", "group"]))
def test_accepted_names_round_trip(name, form):
    for fe in FRONTENDS.values():
        targets = {"": "layers#0"} if form != "group" else {"g": "layers#0"}
        qualified = {"bare": name, "default": f":{name}", "group": f"g:{name}"}[form]
        group = "g" if form == "group" else ""
        _assert_round_trip(fe, _adapt(fe, targets), qualified, group, name)


_malformed_names = st.one_of(
    st.text(max_size=8).filter(lambda n: not NAME.fullmatch(n) and ":" not in n),
    st.from_regex(NAME, fullmatch=True).map(lambda n: n + "\n"),  # '$' would have let it in
    st.from_regex(r"[_0-9\-][A-Za-z0-9_\-]*", fullmatch=True),
    st.sampled_from([None, 3, b"task", ("task",)]),
)


@given(name=_malformed_names)
def test_malformed_names_raise_and_add_nothing(name):
    for fe in FRONTENDS.values():
        model = _adapt(fe, "layers#0")
        with pytest.raises(ValueError, match=r"adapter name must .*got "):
            _add(fe, model, name)
        _assert_no_adapter(fe, model)


@pytest.mark.parametrize("name", _REFUSED)
def test_reserved_names_raise_and_add_nothing(fe, name):
    model = _adapt(fe, "layers#0")
    with pytest.raises(ValueError, match=f"adapter name '{name}' is reserved; pick another name"):
        _add(fe, model, name)
    _assert_no_adapter(fe, model)


def test_every_attribute_of_the_nnx_adapter_container_is_refused():
    """A name equal to one (``keys``, ``train``, ...) would shadow it on every NNX host."""
    public = {a for a in dir(nnx.Dict) if not a.startswith("_")}
    assert {"keys", "items", "train", "update"} <= public <= set(CONTAINER_NAMES)


# --- group names ------------------------------------------------------------------------------

_group_names = st.text(max_size=8).filter(lambda g: ":" not in g and "/" not in g)


@given(group=_group_names, name=_accepted_names)
def test_any_group_name_without_a_colon_round_trips(group, name):
    for fe in FRONTENDS.values():
        model = _adapt(fe, {group: "layers#0"})
        assert model.adapter_module_names == [group]
        _assert_round_trip(fe, model, f"{group}:{name}", group, name)


@given(group=st.text(max_size=8).map(lambda g: g + ":" if len(g) % 2 else ":" + g))
def test_a_group_name_with_a_colon_is_refused_at_the_transform(group):
    for fe in FRONTENDS.values():
        with pytest.raises(
            ValueError, match=r"target group names must be str without ':' .* got "
        ) as err:
            _adapt(fe, {group: "layers#0"})
        assert repr(group) in str(err.value)


@pytest.mark.parametrize("group", ["blocks/0/mlp", "/", "a/"])
def test_a_group_name_with_a_slash_is_refused_at_the_transform(group):
    """A declared group named like a module path would clash with that module's own adapters
    (NNX names their group by the module's path)."""
    for fe in FRONTENDS.values():
        with pytest.raises(ValueError, match=r"target group names must not contain '/'"):
            _adapt(fe, {group: "layers#0"})


@pytest.mark.parametrize("name", ["g:h:task", "g::task", "::task"])
def test_more_than_one_colon_is_refused(fe, name):
    model = _adapt(fe, {"g": "layers#0"})
    with pytest.raises(ValueError, match=f"adapter name '{name}' has more than one ':'"):
        _add(fe, model, name)
    _assert_no_adapter(fe, model)


# --- a bare name means the default group '' only ----------------------------------------------


def test_bare_name_without_a_default_group_raises_listing_the_groups(fe):
    model = jadapters.adapter_transform(fe.pick(linen=_LinenStack, nnx=_NNXStack), fe.path(TARGETS))
    assert model.adapter_module_names == ["mlp", "attn"]  # no implicit default group
    message = (
        r"adapter name 'task' names no group, and this model's targets declare no default "
        r"group ''; its groups are \['mlp', 'attn'\]\. Write 'group:name', e.g\. 'mlp:task'\."
    )
    for name in ("task", ":task"):
        with pytest.raises(ValueError, match=message if name == "task" else "unknown adapter"):
            _add(fe, model, name)
        _assert_no_adapter(fe, model)


def test_bare_name_goes_to_the_declared_default_group_not_the_first_listed(fe):
    x = jnp.ones((2, 4))
    base = fe.base(fe.sequential(fe.dense(4, 4), fe.dense(4, 4)), x)
    h = fe.adapt(base, fe.path({"first": "layers#0", "": "layers#1"}), [("task", CFG)], x)
    assert h.model.adapter_module_names == ["", "first"]
    assert [(s.name, s.group) for s in h.specs()] == [("task", "")]
    assert h.sites() == {(fe.path("layers#1"), "task")}


def test_nnx_model_group_without_hosts_raises():
    """A hand-written NNX model whose group has no modules: the adapter would be attached to
    nothing (``is_adapter_available()`` true, nothing saved)."""

    class Net(nnx.Module, jadapters.AdapterModelMixin):
        def __init__(self):
            self.dense = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
            self._adapter_groups = (("", ()), ("dense", (("dense",),)))

    net = Net()
    with pytest.raises(ValueError, match=r"adapter module '' of this model has no host modules"):
        net.add_adapter("task", CFG, rngs=nnx.Rngs(0))
    assert not net.is_adapter_available()
    assert not jax.tree.leaves(nnx.state(net, jadapters.AdapterParam))


# --- targets ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "targets, where",
    [
        (None, "targets"),
        (3, "targets"),
        (b"layers", "targets"),
        ({"g": 3}, r"targets\['g'\]"),
        ({"g": {"layers": "x"}}, r"targets\['g'\]"),
    ],
    ids=["none", "int", "bytes", "group-int", "group-mapping"],
)
def test_targets_of_another_form_raise_naming_the_accepted_forms(fe, targets, where):
    with pytest.raises(ValueError) as err:
        jadapters.adapter_transform(_dense_model(fe), targets)
    message = str(err.value)
    assert re.match(f"{where} must be a regex string, a Target, a list of them", message)
    assert "or a mapping of group names to those" in message
    value = targets if where == "targets" else targets["g"]
    assert message.endswith(f"; got {value!r}.")


@pytest.mark.parametrize(
    "targets, match",
    [
        ([], r"targets is empty; give at least one pattern, got \[\]"),
        ({"g": []}, r"targets\['g'\] is empty; give at least one pattern"),
        ({}, r"targets is empty; name at least one group"),
        ([3], r"targets must hold regex strings or Target rules, got 3 in \[3\]"),
        ({1: "layers"}, r"target group names must be str without ':' .* got 1\."),
    ],
)
def test_empty_or_malformed_targets_raise(fe, targets, match):
    with pytest.raises(ValueError, match=match):
        jadapters.adapter_transform(_dense_model(fe), targets)


# --- names equal to modules on a host's path ----------------------------------------------------


class _LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="mlp")(nn.Dense(4, name="attn")(x))


class _LinenStack(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _LinenBlock(name="blocks_0")(x)


class _NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.Linear(4, 4, rngs=rngs)
        self.mlp = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        return self.mlp(self.attn(x))


class _NNXStack(nnx.Module):
    def __init__(self):
        self.blocks = nnx.List([_NNXBlock(nnx.Rngs(0))])

    def __call__(self, x):
        return self.blocks[0](x)


@pytest.fixture(scope="module")
def clashing(fe):
    """Hosts ``blocks#0/mlp`` and ``blocks#0/attn`` with adapters named like modules on their
    paths: ``mlp`` and the block's own name at the MLP, ``attn`` at the attention; ``other``
    is named like nothing. All but ``other`` are added to the initialized model."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4)), jnp.float32)
    base = fe.base(fe.pick(linen=_LinenStack, nnx=_NNXStack), x)
    h = fe.adapt(base, fe.path(TARGETS), [("mlp:other", CFG)], x)
    for name in ("mlp:mlp", f"mlp:{_block(fe)}", "attn:attn"):  # Linen: init_adapters
        h.add(name, CFG)
    return h.randomize(seed=3), x


def _block(fe):
    return fe.pick(linen="blocks_0", nnx="blocks")


def _expected_sites(fe):
    mlp, attn = fe.path("blocks#0/mlp"), fe.path("blocks#0/attn")
    by_name = {"mlp": [mlp], "other": [mlp], _block(fe): [mlp], "attn": [attn]}
    return by_name, {(host, name) for name, hosts in by_name.items() for host in hosts}


def test_names_like_modules_on_the_host_path_are_found_at_their_exact_position(fe, clashing):
    h, _ = clashing
    by_name, sites = _expected_sites(fe)
    assert h.sites() == sites
    view = h.view()
    items = view.weights(list(view.specs()))
    assert {item.spec.name: sorted(item.hosts) for item in items} == {
        n: sorted(p) for n, p in by_name.items()
    }
    for item in items:
        for host, params in item.hosts.items():
            assert_trees_equal(jax.tree.map(np.asarray, params), h.params_at(host, item.spec.name))
    rows = {r.name: r for r in h.summary().rows}
    assert {n: sorted(r.hosts) for n, r in rows.items()} == {
        n: sorted(p) for n, p in by_name.items()
    }


@pytest.mark.parametrize("disabled", ["mlp", "other", "attn"])
def test_mask_marks_exactly_the_enabled_adapters_whatever_their_names(fe, clashing, disabled):
    h = clashing[0].copy()
    h.set_enabled(disabled, enabled=False)
    mask, labels, owners = flat(h.mask()), flat(h.labels()), h.owners()
    assert set(mask) == set(labels) == set(owners)
    assert {o for o in owners.values() if o} == set(_expected_sites(fe)[0])
    for path, owner in owners.items():
        trains = owner is not None and owner != disabled
        assert mask[path] == trains, path
        assert labels[path] == ("adapters" if trains else "frozen"), path


def test_names_like_modules_save_and_load(fe, clashing, tmp_path):
    h, x = clashing
    h = h.copy()
    h.set_enabled("mlp", enabled=False)
    variables = getattr(h, "variables", None)  # Linen's; NNX holds its own
    meta = jadapters.adapter_metadata(h.model, variables)
    saved = {a["name"]: sorted(host["path"] for host in a["hosts"]) for a in meta["adapters"]}
    assert saved == {n: sorted(p) for n, p in _expected_sites(fe)[0].items()}
    jadapters.save_adapters(str(tmp_path), h.model, variables)
    fresh = fe.adapt(h.base, fe.path(TARGETS), [], x)
    if fe.name == "linen":
        model, variables = jadapters.load_adapters(
            str(tmp_path), fresh.model, {"params": h.base_params()}
        )
        fresh.model, fresh.variables = model, variables
    else:
        jadapters.load_adapters(str(tmp_path), fresh.model)
    assert fresh.enabled() == h.enabled()
    assert fresh.sites() == h.sites()
    for host, name in h.sites():
        assert_trees_equal(fresh.params_at(host, name), h.params_at(host, name))
    np.testing.assert_array_equal(fresh(x), h(x))


def test_names_like_modules_train_exactly_the_enabled_adapters(fe, clashing):
    """The adapter named like the block is disabled: the others, on hosts inside that
    block, still train."""
    h, x = clashing
    h = h.copy()
    disabled = _block(fe)
    h.set_enabled(disabled, enabled=False)
    before = {site: host_copy(h.params_at(*site)) for site in h.sites()}
    base = host_copy(h.base_params())
    h.train(lambda out, batch: jnp.mean(out**2), optax.sgd(0.5), [(x,)])
    for (host, name), old in before.items():
        same = jax.tree.leaves(jax.tree.map(np.array_equal, h.params_at(host, name), old))
        if name == disabled:
            assert all(same), (host, name)  # bitwise unchanged
        else:
            assert not any(same), (host, name)  # every weight of an enabled adapter moved
    assert_trees_equal(h.base_params(), base)


# --- the one position that cannot be told apart (Linen) ------------------------------------------


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="mlp")(nn.Dense(4, name="proj")(x))


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _Block(name="block")(x)


@pytest.mark.parametrize(
    "targets",
    [r"block(/mlp)?", Target(pattern=".*", module_types=(nn.Dense,))],
    ids=["block-and-its-mlp", "dense-anywhere"],
)
@pytest.mark.parametrize("when", ["init", "init_adapters"])
def test_linen_name_of_a_module_below_a_target_path_is_refused(targets, when):
    """Adapter ``mlp`` with ``block`` a target path of its group: the key ``mlp`` under
    ``block`` would hold both the adapter's weights at ``block`` and the module
    ``block/mlp``'s adapters. It is refused before any weight is read or written."""
    x = jnp.ones((2, 4))
    model = jadapters.adapter_transform(_Net(), targets)
    message = (
        r"adapter name 'mlp' equals module 'block/mlp' on host path 'block/mlp', and 'block' "
        r"is a target path of its group '' .* Rename the adapter"
    )
    with pytest.raises(ValueError, match=message):
        if when == "init":
            model.add_adapter("mlp", CFG).init(jax.random.key(0), x)
        else:
            variables = model.add_adapter("other", CFG).init(jax.random.key(0), x)
            model.add_adapter("other", CFG).add_adapter("mlp", CFG).init_adapters(
                jax.random.key(1), variables, x
            )
    fine = model.add_adapter("task", CFG).init(jax.random.key(0), x)  # any other name
    assert "task" in fine["adapters"]["block"]["mlp"]


def test_linen_pattern_matching_the_adapters_own_layers_adapts_only_the_model():
    """``.*`` matches every module of the model, never the adapters' own layers (which once
    recursed without end)."""
    x = jnp.ones((2, 4))
    model = jadapters.adapter_transform(_Net(), ".*").add_adapter("task", CFG)
    variables = model.init(jax.random.key(0), x)
    hosts = {"/".join(p[:-1]) for p in _paths(variables["adapters"], "task")}
    assert hosts == {"block", "block/proj", "block/mlp"}
    np.testing.assert_array_equal(
        model.apply(variables, x), _Net().apply({"params": variables["params"]}, x)
    )


def _paths(tree, name):
    """Paths in ``tree`` that end at a key ``name`` (its subtree not walked)."""
    out = []

    def walk(node, prefix):
        for key, value in node.items():
            if key == name:
                out.append((*prefix, key))
            elif isinstance(value, dict):
                walk(value, (*prefix, key))

    walk(tree, ())
    return out
