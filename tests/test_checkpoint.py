"""Adapter-only checkpoints: save/load on Linen and NNX, safety, training resume, inspector."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import random_like
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import jadapters
from jadapters.checkpoint import arrays, store
from jadapters.checkpoint import metadata as md
from jadapters.demo.models import LinenTransformer, NNXTransformer
from jadapters.nnx.view import NNXView

CFG = jadapters.LinearAdapterConfig(dim=8)
LINEN_TARGETS = {"": r"blocks_\d+/mlp", "attn": r"blocks_\d+/attn/query"}
NNX_TARGETS = {"": r"blocks/\d+/mlp", "attn": r"blocks/\d+/attn/query"}
X = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 8)), jnp.float32)


def _same(a, b):
    def equal(x, y):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        return bool(np.array_equal(x, y))

    return jax.tree.all(jax.tree.map(equal, a, b))


# ---- Linen --------------------------------------------------------------------------------


def linen_model(mlp_dim=32, targets=LINEN_TARGETS):
    base = LinenTransformer(num_classes=3, d_model=16, num_layers=2, num_heads=2, mlp_dim=mlp_dim)
    return jadapters.adapter_transform(base, targets)


@pytest.fixture(scope="module")
def linen():
    """``(model with an4, an4_v2, attn:q (disabled), variables with random adapters)``."""
    model = linen_model()
    model = model.add_adapter("an4", CFG).add_adapter(
        "an4_v2", jadapters.LinearAdapterConfig(dim=4)
    )
    model = model.add_adapter("attn:q", CFG).set_enabled_adapters("q", False)
    variables = model.init(jax.random.key(0), X)
    variables = {**variables, "adapters": random_like(variables["adapters"], seed=1)}
    return model, variables


@pytest.fixture(scope="module")
def linen_base(linen):
    return {"params": linen[1]["params"]}


# ---- NNX ----------------------------------------------------------------------------------


def nnx_model(mlp_dim=32, num_layers=2, targets=NNX_TARGETS, seed=0):
    base = NNXTransformer(
        8,
        num_classes=3,
        d_model=16,
        num_layers=num_layers,
        num_heads=2,
        mlp_dim=mlp_dim,
        rngs=nnx.Rngs(seed),
    )
    return jadapters.adapter_transform(base, targets)


def randomize_nnx(model, seed):
    state = nnx.state(model, jadapters.AdapterParam)
    nnx.replace_by_pure_dict(state, random_like(nnx.to_pure_dict(state), seed=seed))
    nnx.update(model, state)


def nnx_adapted():
    model = nnx_model()
    model.add_adapter("an4", CFG, rngs=nnx.Rngs(1))
    model.add_adapter("an4_v2", jadapters.LinearAdapterConfig(dim=4), rngs=nnx.Rngs(2))
    model.add_adapter("attn:q", CFG, rngs=nnx.Rngs(3))
    model.set_enabled_adapters("q", False)
    randomize_nnx(model, seed=1)
    return model


@pytest.fixture(scope="module")
def nnx_source():
    return nnx_adapted()


def nnx_snapshot(model):
    return model.get_adapter_specs(), nnx.graphdef(model), nnx.state(model)


def assert_nnx_unchanged(model, snapshot):
    specs, graphdef, state = snapshot
    assert model.get_adapter_specs() == specs
    assert nnx.graphdef(model) == graphdef
    assert _same(nnx.state(model), state)


def nnx_adapter_values(model, name):
    return {
        path: adapter.param_values() for path, adapter in model.get_adapter_modules(name).items()
    }


# ---- round trips --------------------------------------------------------------------------


def test_linen_round_trip_everything(tmp_path, linen, linen_base):
    model, variables = linen
    jadapters.save_adapters(tmp_path, model, variables)
    loaded, new = jadapters.load_adapters(tmp_path, linen_model(), linen_base)
    assert loaded.adapters == model.adapters  # names, groups, configs, insertion, enabled
    assert _same(new["adapters"], variables["adapters"])
    assert new["params"] is linen_base["params"]
    np.testing.assert_array_equal(loaded.apply(new, X), model.apply(variables, X))


def test_nnx_round_trip_everything(tmp_path, nnx_source):
    jadapters.save_adapters(tmp_path, nnx_source)
    target = nnx_model()
    assert jadapters.load_adapters(tmp_path, target) is target
    assert target.get_adapter_specs() == nnx_source.get_adapter_specs()
    assert _same(
        nnx.state(target, jadapters.AdapterParam), nnx.state(nnx_source, jadapters.AdapterParam)
    )
    np.testing.assert_array_equal(target(X), nnx_source(X))


def test_linen_dtypes_and_overwrite_keep_one_version(tmp_path, linen, linen_base):
    model, variables = linen
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), variables["adapters"])
    jadapters.save_adapters(tmp_path, model, variables, name="an4")
    jadapters.save_adapters(tmp_path, model, {**variables, "adapters": bf16}, name="an4")
    assert os.listdir(tmp_path) == ["2"]  # one orbax step: version 2 replaced version 1
    _, new = jadapters.load_adapters(tmp_path, linen_model(), linen_base)
    leaves = jax.tree.leaves(new["adapters"])
    assert leaves and all(x.dtype == jnp.bfloat16 for x in leaves)
    assert _same(new["adapters"]["blocks_1"]["mlp"]["an4"], bf16["blocks_1"]["mlp"]["an4"])


def test_nnx_dtypes_kept(tmp_path):
    source = nnx_model()
    source.add_adapter("half", CFG, rngs=nnx.Rngs(0))
    for adapter in source.get_adapter_modules("half").values():
        for var in jax.tree.leaves(adapter.params, is_leaf=lambda v: isinstance(v, nnx.Variable)):
            var.set_value(var.get_value().astype(jnp.bfloat16))
    jadapters.save_adapters(tmp_path, source)
    target = jadapters.load_adapters(tmp_path, nnx_model())
    leaves = jax.tree.leaves(nnx_adapter_values(target, "half"))
    assert leaves and all(x.dtype == jnp.bfloat16 for x in leaves)


@pytest.mark.parametrize("front", ["linen", "nnx"])
def test_every_adapter_type_round_trips(tmp_path, front):
    cfgs = {
        "lora": jadapters.LoRAConfig(rank=2),
        "ia3": jadapters.IA3Config(),
        "par": jadapters.ParallelAdapterConfig(dim=4),
    }
    if front == "linen":

        def build():
            return linen_model(targets={"": r"blocks_0/mlp/fc1", "head": "head"})

        model = build()
        for name, cfg in cfgs.items():
            model = model.add_adapter(name, cfg).add_adapter(f"head:{name}_h", cfg)
        variables = model.init(jax.random.key(0), X)
        variables = {**variables, "adapters": random_like(variables["adapters"], seed=3)}
        jadapters.save_adapters(tmp_path, model, variables)
        loaded, new = jadapters.load_adapters(tmp_path, build(), {"params": variables["params"]})
        assert loaded.adapters == model.adapters
        np.testing.assert_array_equal(loaded.apply(new, X), model.apply(variables, X))
    else:

        def build():
            return nnx_model(targets={"": r"blocks/0/mlp/fc1", "head": "head"})

        model = build()
        for name, cfg in cfgs.items():
            model.add_adapter(name, cfg, rngs=nnx.Rngs(1))
            model.add_adapter(f"head:{name}_h", cfg, rngs=nnx.Rngs(2))
        randomize_nnx(model, seed=3)
        jadapters.save_adapters(tmp_path, model)
        loaded = jadapters.load_adapters(tmp_path, build())
        assert loaded.get_adapter_specs() == model.get_adapter_specs()
        np.testing.assert_array_equal(loaded(X), model(X))
    insertions = {
        a["name"]: a["insertion"] for a in jadapters.read_adapter_metadata(tmp_path)["adapters"]
    }
    assert insertions == {
        "lora": "weight",
        "lora_h": "weight",
        "ia3": "output",
        "ia3_h": "output",
        "par": "parallel",
        "par_h": "parallel",
    }


# ---- selection by exact name --------------------------------------------------------------


def test_linen_saves_exact_name_only(tmp_path, linen, linen_base):
    model, variables = linen
    jadapters.save_adapters(tmp_path, model, variables, name="an4")
    meta = jadapters.read_adapter_metadata(tmp_path)
    assert [a["name"] for a in meta["adapters"]] == ["an4"]  # NeMo would also write an4_v2
    assert set(meta["base_fingerprint"]) == {"blocks_0/mlp", "blocks_1/mlp"}
    loaded, new = jadapters.load_adapters(tmp_path, linen_model(), linen_base)
    assert loaded.adapters.names() == ["an4"]
    assert set(new["adapters"]["blocks_0"]["mlp"]) == {"an4"}


def test_nnx_saves_exact_names(tmp_path, nnx_source):
    jadapters.save_adapters(tmp_path, nnx_source, name=["an4", "attn:q"])
    meta = jadapters.read_adapter_metadata(tmp_path)
    assert [(a["name"], a["group"]) for a in meta["adapters"]] == [("an4", ""), ("q", "attn")]
    target = jadapters.load_adapters(tmp_path, nnx_model(), name="an4")
    assert [s.name for s in target.get_adapter_specs()] == ["an4"]


@pytest.mark.parametrize("front", ["linen", "nnx"])
def test_bare_name_resolves_to_saved_group(tmp_path, front, linen, linen_base, nnx_source):
    if front == "linen":
        jadapters.save_adapters(tmp_path, *linen)
        loaded, _ = jadapters.load_adapters(tmp_path, linen_model(), linen_base, name="q")
        specs = loaded.adapters
    else:
        jadapters.save_adapters(tmp_path, nnx_source)
        specs = jadapters.load_adapters(tmp_path, nnx_model(), name="q").get_adapter_specs()
    assert [(s.name, s.group, s.enabled) for s in specs] == [("q", "attn", False)]
    with pytest.raises(ValueError, match="is in module 'attn'"):
        jadapters.load_adapters(tmp_path, nnx_model(), name=":q")
    with pytest.raises(ValueError, match=r"'an4_v' is not an adapter of the checkpoint.*exactly"):
        jadapters.load_adapters(tmp_path, nnx_model(), name="an4_v")


def test_save_errors(tmp_path, linen, nnx_source):
    model, variables = linen
    with pytest.raises(ValueError, match="'an' is not an adapter of the model"):
        jadapters.save_adapters(tmp_path, model, variables, name="an")
    with pytest.raises(ValueError, match="variables is required"):
        jadapters.save_adapters(tmp_path, model)
    with pytest.raises(ValueError, match="variables must be None"):
        jadapters.save_adapters(tmp_path, nnx_source, {})
    with pytest.raises(ValueError, match="no weights"):
        jadapters.save_adapters(tmp_path, model.add_adapter("late", CFG), variables, name="late")
    with pytest.raises(ValueError, match="no adapters to save"):
        jadapters.save_adapters(tmp_path, nnx_model())
    assert not os.listdir(tmp_path)


# ---- composing, replacing, checking the target --------------------------------------------


def test_linen_loads_compose_and_replace(tmp_path, linen, linen_base):
    model, variables = linen
    jadapters.save_adapters(tmp_path / "a", model, variables, name="an4")
    jadapters.save_adapters(tmp_path / "b", model, variables, name=["an4_v2", "q"])
    loaded, new = jadapters.load_adapters(tmp_path / "a", linen_model(), linen_base)
    loaded, new = jadapters.load_adapters(tmp_path / "b", loaded, new)
    assert loaded.adapters == model.adapters
    np.testing.assert_array_equal(loaded.apply(new, X), model.apply(variables, X))
    with pytest.raises(ValueError, match="'an4' already exists.*replace=True"):
        jadapters.load_adapters(tmp_path / "a", loaded, new)
    zeros = {**new, "adapters": jax.tree.map(jnp.zeros_like, new["adapters"])}
    again, restored = jadapters.load_adapters(tmp_path / "a", loaded, zeros, replace=True)
    assert again.adapters.names() == ["an4", "an4_v2", "q"]  # chain order kept
    mlp = restored["adapters"]["blocks_0"]["mlp"]
    assert _same(mlp["an4"], variables["adapters"]["blocks_0"]["mlp"]["an4"])
    assert not jax.tree.reduce(lambda a, x: a or bool(x.any()), mlp["an4_v2"], False)


def test_nnx_loads_compose_and_replace(tmp_path, nnx_source):
    jadapters.save_adapters(tmp_path / "a", nnx_source, name="an4")
    jadapters.save_adapters(tmp_path / "b", nnx_source, name=["an4_v2", "q"])
    target = nnx_model()
    jadapters.load_adapters(tmp_path / "a", target)
    jadapters.load_adapters(tmp_path / "b", target)
    assert target.get_adapter_specs() == nnx_source.get_adapter_specs()
    np.testing.assert_array_equal(target(X), nnx_source(X))
    snapshot = nnx_snapshot(target)
    with pytest.raises(ValueError, match="'an4' already exists.*replace=True"):
        jadapters.load_adapters(tmp_path / "a", target)
    assert_nnx_unchanged(target, snapshot)
    randomize_nnx(target, seed=5)
    jadapters.load_adapters(tmp_path / "a", target, replace=True)
    assert [s.name for s in target.get_adapter_specs()] == ["an4", "an4_v2", "q"]
    assert _same(nnx_adapter_values(target, "an4"), nnx_adapter_values(nnx_source, "an4"))
    assert not _same(nnx_adapter_values(target, "an4_v2"), nnx_adapter_values(nnx_source, "an4_v2"))


def test_base_fingerprint_mismatch(tmp_path, linen, linen_base, nnx_source):
    jadapters.save_adapters(tmp_path / "l", *linen)
    wide = linen_model(mlp_dim=48)
    wide_vars = jax.eval_shape(wide.init, jax.random.key(0), X)
    wide_base = {"params": jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), wide_vars["params"])}
    with pytest.raises(ValueError, match=r"host 'blocks_0/mlp'.*\(48,\).*\(32,\)"):
        jadapters.load_adapters(tmp_path / "l", linen_model(mlp_dim=48), wide_base)
    loaded, _ = jadapters.load_adapters(tmp_path / "l", wide, wide_base, check_base=False)
    assert loaded.adapters.names() == ["an4", "an4_v2", "q"]

    jadapters.save_adapters(tmp_path / "n", nnx_source)
    target = nnx_model(mlp_dim=48)
    snapshot = nnx_snapshot(target)
    with pytest.raises(ValueError, match=r"host 'blocks/0/mlp'.*\(48,\).*\(32,\)"):
        jadapters.load_adapters(tmp_path / "n", target)
    assert_nnx_unchanged(target, snapshot)
    with pytest.raises(ValueError, match=r"missing: \['blocks/1/mlp'\]"):
        jadapters.load_adapters(tmp_path / "n", nnx_model(num_layers=1), name="an4")


def test_group_must_exist(tmp_path, linen, linen_base, nnx_source):
    jadapters.save_adapters(tmp_path / "l", *linen)
    with pytest.raises(ValueError, match=r"adapter module 'attn'.*modules are \[''\]"):
        jadapters.load_adapters(tmp_path / "l", linen_model(targets=r"blocks_\d+/mlp"), linen_base)
    jadapters.save_adapters(tmp_path / "n", nnx_source)
    target = nnx_model(targets=r"blocks/\d+/mlp")
    snapshot = nnx_snapshot(target)
    with pytest.raises(
        ValueError, match=r"adapter module 'attn'.*modules are \[''(, 'blocks/\d/mlp')*\]"
    ):
        jadapters.load_adapters(tmp_path / "n", target)
    assert_nnx_unchanged(target, snapshot)
    jadapters.load_adapters(tmp_path / "n", target, name=["an4", "an4_v2"])
    assert target.get_enabled_adapters() == ["an4", "an4_v2"]


# ---- shardings ----------------------------------------------------------------------------


def test_restore_onto_shardings(tmp_path, linen, linen_base, nnx_source):
    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    mesh = jax.make_mesh((8,), ("x",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    model, variables = linen
    jadapters.save_adapters(tmp_path / "l", model, variables, name=["an4", "q"])
    _, new = jadapters.load_adapters(tmp_path / "l", linen_model(), linen_base, shardings=rows)
    for x in jax.tree.leaves(new["adapters"]):
        assert x.sharding == rows
    assert _same(
        new["adapters"],
        {
            "blocks_0": {
                "mlp": {"an4": variables["adapters"]["blocks_0"]["mlp"]["an4"]},
                "attn": variables["adapters"]["blocks_0"]["attn"],
            },
            "blocks_1": {
                "mlp": {"an4": variables["adapters"]["blocks_1"]["mlp"]["an4"]},
                "attn": variables["adapters"]["blocks_1"]["attn"],
            },
        },
    )
    # A pytree of shardings matching abstract_adapters, here a prefix {name: sharding}.
    abstract = jadapters.abstract_adapters(tmp_path / "l")
    assert abstract["an4"]["blocks_0/mlp"]["down"]["kernel"].shape == (16, 8)
    _, new = jadapters.load_adapters(
        tmp_path / "l", linen_model(), linen_base, shardings={"an4": rows, "q": replicated}
    )
    assert new["adapters"]["blocks_0"]["mlp"]["an4"]["up"]["kernel"].sharding == rows
    assert new["adapters"]["blocks_0"]["attn"]["query"]["q"]["up"]["kernel"].sharding == replicated
    np.testing.assert_array_equal(
        new["adapters"]["blocks_0"]["mlp"]["an4"]["up"]["kernel"],
        variables["adapters"]["blocks_0"]["mlp"]["an4"]["up"]["kernel"],
    )
    with pytest.raises(ValueError, match="shardings must"):
        jadapters.load_adapters(tmp_path / "l", linen_model(), linen_base, shardings={"x": rows})
    columns = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "x"))
    with pytest.raises(
        ValueError,
        match=r"do not fit adapter 'an4' at host 'blocks_0/mlp', parameter 'norm/bias' of shape",
    ):
        jadapters.load_adapters(tmp_path / "l", linen_model(), linen_base, shardings=columns)

    jadapters.save_adapters(tmp_path / "n", nnx_source, name="an4")
    target = jadapters.load_adapters(tmp_path / "n", nnx_model(), shardings=rows)
    values = nnx_adapter_values(target, "an4")
    assert all(x.sharding == rows for x in jax.tree.leaves(values))
    assert _same(values, nnx_adapter_values(nnx_source, "an4"))


# ---- damaged checkpoints ------------------------------------------------------------------


def _data_files(path):
    out = []
    for dirpath, _, files in os.walk(os.path.join(store.step_dir(path), "adapters")):
        if os.path.basename(dirpath) == "d":
            out += [os.path.join(dirpath, f) for f in files]
    return out


def _truncate(path):
    for f in _data_files(path):
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)


def _delete(path):
    for f in _data_files(path):
        os.remove(f)


def _flip(path):
    for f in _data_files(path):
        with open(f, "r+b") as fh:
            fh.seek(os.path.getsize(f) // 2)
            byte = fh.read(1)
            fh.seek(-1, os.SEEK_CUR)
            fh.write(bytes([byte[0] ^ 0xFF]))


def _garble_metadata(path):
    with open(os.path.join(store.step_dir(path), "metadata", "metadata"), "r+") as f:
        f.seek(0)
        f.write("{garbled")


def _delete_metadata(path):
    shutil.rmtree(os.path.join(store.step_dir(path), "metadata"))


def _garble_file_list(path):
    with open(os.path.join(store.step_dir(path), "adapters", "jadapters_files.json"), "w") as f:
        f.write("[")


def _empty_file_list(path):
    with open(os.path.join(store.step_dir(path), "adapters", "jadapters_files.json"), "w") as f:
        f.write("{}")


def _garble_orbax_metadata(path):
    with open(os.path.join(store.step_dir(path), "adapters", "_METADATA"), "r+") as f:
        f.write("[")


def _edit_metadata(path, edit):
    """Edits the metadata and lists it again: a forgery consistent with its checksums, so the
    checks behind them are reached (any other edit fails the list: see _garble_metadata)."""
    file = os.path.join(store.step_dir(path), "metadata", "metadata")
    with open(file) as f:
        data = json.load(f)
    edit(data)
    with open(file, "w") as f:
        json.dump(data, f)
    store._write_list(os.path.dirname(file))


def _flip_checksum(path):
    def edit(data):
        leaf = data["adapters"][0]["hosts"][0]["params"][0]
        leaf["sha256"] = "0" * 64

    _edit_metadata(path, edit)


def _wrong_shape(path):
    def edit(data):  # consistent with the config, not with the arrays orbax stored
        entry = data["adapters"][0]
        entry["config"]["dim"] = 9
        for host in entry["hosts"]:
            for leaf in host["params"]:
                if leaf["path"][0] in ("down", "up"):
                    leaf["shape"] = [9 if d == 8 else d for d in leaf["shape"]]

    _edit_metadata(path, edit)


def _wrong_config(path):
    def edit(data):
        data["adapters"][0]["config"]["dim"] = 2**31

    _edit_metadata(path, edit)


def _wrong_dtype(path):
    def edit(data):
        data["adapters"][0]["hosts"][0]["params"][0]["dtype"] = "float16"

    _edit_metadata(path, edit)


DAMAGE = {
    "truncated data": (_truncate, "truncated or corrupted: data file .* has"),
    "deleted data": (_delete, "missing or truncated: data file .* does not exist"),
    "flipped data": (_flip, "corrupted: data file .* fails its checksum"),
    "garbled metadata": (_garble_metadata, "corrupted: data file metadata/metadata fails its"),
    "deleted metadata": (_delete_metadata, "has no metadata item"),
    "garbled file list": (_garble_file_list, "adapters/jadapters_files.json is not valid JSON"),
    "emptied file list": (_empty_file_list, "data file adapters/.* is not listed"),
    "garbled orbax metadata": (_garble_orbax_metadata, "data file adapters/_METADATA fails"),
    "checksum": (_flip_checksum, "'down/kernel' read from adapters/ fails its checksum"),
    "wrong shape": (_wrong_shape, r"stored in adapters/ with shape \(16, 8\).*says \(16, 9\)"),
    "wrong config": (_wrong_config, r"metadata/metadata' is inconsistent: the config .* creates"),
    "wrong dtype": (_wrong_dtype, r"float32, but metadata/metadata says \(16, 8\) float16"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_checkpoint_is_an_error_and_changes_nothing(tmp_path, damage, nnx_source):
    jadapters.save_adapters(tmp_path, nnx_source, name=["an4", "q"])
    corrupt, message = DAMAGE[damage]
    corrupt(tmp_path)
    target = nnx_model()
    target.add_adapter("an4", CFG, rngs=nnx.Rngs(0))
    snapshot = nnx_snapshot(target)
    with pytest.raises(ValueError, match=message):
        jadapters.load_adapters(tmp_path, target, replace=True)
    assert_nnx_unchanged(target, snapshot)


def _json_paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict | list):
        for key, value in node.items() if isinstance(node, dict) else enumerate(node):
            yield from _json_paths(value, (*prefix, key))


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.floats(allow_nan=False)
    | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=4,
)


@pytest.fixture(scope="module")
def saved_metadata(nnx_source):
    return jadapters.adapter_metadata(nnx_source, name=["an4", "q"])


@given(data=st.data())
def test_any_edit_of_the_metadata_json_reads_or_is_a_value_error(saved_metadata, data):
    edited = json.loads(json.dumps(saved_metadata))
    path = data.draw(st.sampled_from(list(_json_paths(edited))[1:]))
    node = edited
    for key in path[:-1]:
        node = node[key]
    if data.draw(st.booleans()):
        del node[path[-1]]
    else:
        node[path[-1]] = data.draw(_JSON)
    try:
        md.from_json(edited)
    except ValueError:
        pass


def test_linen_damaged_checkpoint(tmp_path, linen, linen_base):
    jadapters.save_adapters(tmp_path, *linen)
    _truncate(tmp_path)
    with pytest.raises(ValueError, match="truncated or corrupted"):
        jadapters.load_adapters(tmp_path, linen_model(), linen_base)
    with pytest.raises(ValueError, match="no adapter checkpoint"):
        jadapters.load_adapters(tmp_path / "nothing", linen_model(), linen_base)


def test_unknown_adapter_type_imports_nothing(tmp_path, nnx_source):
    jadapters.save_adapters(tmp_path, nnx_source, name="an4")

    def edit(data):
        data["adapters"][0]["config"]["type"] = "jadapters_evil_module.Evil"

    _edit_metadata(tmp_path, edit)
    target = nnx_model()
    with pytest.raises(ValueError, match="unknown adapter type 'jadapters_evil_module.Evil'"):
        jadapters.load_adapters(tmp_path, target)
    assert "jadapters_evil_module" not in sys.modules
    assert not target.is_adapter_available()
    # The inspector needs no registered type.
    meta = jadapters.read_adapter_metadata(tmp_path)
    assert meta["adapters"][0]["config"]["type"] == "jadapters_evil_module.Evil"


def test_nnx_failure_mid_load_rolls_back(tmp_path, nnx_source, monkeypatch):
    jadapters.save_adapters(tmp_path, nnx_source)
    target = nnx_model()
    target.add_adapter("an4", CFG, rngs=nnx.Rngs(0))
    snapshot = nnx_snapshot(target)
    original, calls = NNXView._assign, []

    def failing(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return original(self, *args)

    monkeypatch.setattr(NNXView, "_assign", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        jadapters.load_adapters(tmp_path, target, replace=True)
    assert_nnx_unchanged(target, snapshot)


TMP = ".orbax-checkpoint-tmp"  # orbax's temporary directory of a step being written
_KILL_SCRIPT = """
import sys
import flax.linen as nn, jax, jax.numpy as jnp, jadapters
model = jadapters.adapter_transform(nn.Sequential([nn.Dense(512)]), "layers_0")
model = model.add_adapter("big", jadapters.LinearAdapterConfig(dim=256))
variables = model.init(jax.random.key(0), jnp.ones((1, 512)))
for i in range(1000):
    adapters = jax.tree.map(lambda x: jnp.full_like(x, i), variables["adapters"])
    print(i, flush=True)
    jadapters.save_adapters(sys.argv[1], model, {**variables, "adapters": adapters})
"""


def test_save_killed_mid_write_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt"
    model = jadapters.adapter_transform(nn.Sequential([nn.Dense(512)]), "layers_0")
    model = model.add_adapter("big", jadapters.LinearAdapterConfig(dim=256))
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 512)))
    variables = jax.tree.map(lambda s: jnp.full(s.shape, -1.0, s.dtype), variables)
    jadapters.save_adapters(path, model, variables)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(path)], stdout=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout.readline().strip() == b"0"  # about to start its first save
        deadline = time.monotonic() + 60
        while not any(TMP in e for e in os.listdir(path)) and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    leftovers = [e for e in os.listdir(path) if TMP in e]
    assert leftovers, "the kill should have landed mid-save"
    fresh = jadapters.adapter_transform(nn.Sequential([nn.Dense(512)]), "layers_0")
    loaded, new = jadapters.load_adapters(path, fresh, {"params": variables["params"]})
    values = np.unique(np.concatenate([np.ravel(x) for x in jax.tree.leaves(new["adapters"])]))
    assert values.size == 1 and values[0] in {-1.0, *range(1000)}  # one complete checkpoint
    jadapters.save_adapters(path, loaded, new)  # the next save clears the debris
    entries = os.listdir(path)
    assert len(entries) == 1 and entries[0].isdigit(), entries


def test_versions_and_retention(tmp_path, nnx_source):
    jadapters.save_adapters(tmp_path, nnx_source, name="an4")
    where, meta = store.read_metadata(tmp_path)
    weights = arrays.read_arrays(where, meta, ["an4"], None)
    assert store.write(tmp_path, meta, weights, keep=2) == str(tmp_path / "2")
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]
    assert store.read_metadata(tmp_path, version=1)[0] == str(tmp_path / "1")
    with pytest.raises(ValueError, match=r"version 5 is not in .*saved versions: \[1, 2\]"):
        store.read_metadata(tmp_path, version=5)
    store.write(tmp_path, meta, weights)  # keeps 1 by default
    assert os.listdir(tmp_path) == ["3"]
    with pytest.raises(ValueError, match="keep must be a positive int"):
        store.write(tmp_path, meta, weights, keep=0)


def test_format_1_checkpoint_is_a_clear_error(tmp_path, nnx_source, saved_metadata, capsys):
    from jadapters.__main__ import main

    (tmp_path / "v000001").mkdir()
    (tmp_path / "CHECKPOINT").write_text('{"format": "jadapters.adapter_checkpoint"}')
    message = r"written in format 1 by jadapters 0.1.*Load it with jadapters 0.1"
    with pytest.raises(ValueError, match=message):
        jadapters.load_adapters(tmp_path, nnx_model())
    with pytest.raises(ValueError, match=message):
        jadapters.save_adapters(tmp_path, nnx_source)
    assert main(["inspect", str(tmp_path)]) == 1
    assert "format 1 by jadapters 0.1" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["CHECKPOINT", "v000001"]
    with pytest.raises(ValueError, match=message):
        md.from_json({**saved_metadata, "format_version": 1})


# ---- training runs ------------------------------------------------------------------------


def test_manager_keeps_last_steps(tmp_path):
    tree = {"w": jnp.zeros((3,), jnp.float32)}
    with jadapters.AdapterCheckpointManager(tmp_path, max_to_keep=3) as manager:
        for step in range(5):
            manager.save(step, {"w": tree["w"] + step}, metadata={"step": step})
        assert manager.all_steps() == [2, 3, 4] and manager.latest_step() == 4
        restored = manager.restore(3, adapters=tree)
        assert restored.step == 3 and restored.metadata == {"step": 3}
        np.testing.assert_array_equal(restored.adapters["w"], [3.0, 3.0, 3.0])
        assert restored.opt_state is None
        with pytest.raises(ValueError, match="step 0 is not in"):
            manager.restore(0)
        with pytest.raises(ValueError, match="no optimizer state"):
            manager.restore(4, opt_state=tree)
        with pytest.raises(ValueError, match="already saved"):
            manager.save(4, tree)
    with pytest.raises(ValueError, match="max_to_keep"):
        jadapters.AdapterCheckpointManager(tmp_path, max_to_keep=0)


@pytest.mark.parametrize("async_save", [False, True])
def test_manager_steps_share_the_layout_and_checks(tmp_path, nnx_source, async_save):
    adapters = nnx.to_pure_dict(nnx.state(nnx_source, jadapters.AdapterParam))
    opt_state = {"mu": jax.tree.map(jnp.zeros_like, adapters), "count": jnp.zeros((), jnp.int32)}
    meta = jadapters.adapter_metadata(nnx_source)
    with jadapters.AdapterCheckpointManager(tmp_path, async_save=async_save) as manager:
        manager.save(7, adapters, opt_state, metadata=meta)
        manager.wait_until_finished()
    where = str(tmp_path / "7")
    assert sorted(os.listdir(where)) == sorted(
        ["_CHECKPOINT_METADATA", "adapters", "metadata", "opt_state", "commit_success.txt"]
    )
    for item in ("adapters", "opt_state"):
        assert os.path.isfile(os.path.join(where, item, "jadapters_files.json"))
    # One reader: the inspector reads a training run's metadata as it reads save_adapters'.
    assert jadapters.read_adapter_metadata(tmp_path)["version_dir"] == where
    with pytest.raises(ValueError, match="restore it with AdapterCheckpointManager.restore"):
        jadapters.load_adapters(tmp_path, nnx_model())
    with jadapters.AdapterCheckpointManager(tmp_path) as manager:
        restored = manager.restore(adapters=adapters, opt_state=opt_state)
        assert _same(restored.adapters, adapters) and _same(restored.opt_state, opt_state)
        assert restored.metadata == meta
        _flip(tmp_path)
        with pytest.raises(ValueError, match="data file adapters/.* fails its checksum"):
            manager.restore(adapters=adapters)


def _batches(n):
    rng = np.random.default_rng(7)
    return [
        {"x": rng.standard_normal((4, 4, 8)).astype(np.float32), "y": rng.integers(0, 3, (4,))}
        for _ in range(n)
    ]


def _xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _single(tree):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), tree)


def test_linen_training_resumes_exactly(tmp_path):
    model = jadapters.adapter_transform(
        LinenTransformer(num_classes=3, d_model=16, num_layers=1, num_heads=2, mlp_dim=32),
        r"blocks_\d+/mlp",
    ).add_adapter("task", CFG)
    batches, keys = _batches(10), [jax.random.key(i) for i in range(10)]
    step = jadapters.linen_train_step(
        model, lambda apply, b: _xent(apply(b["x"]), b["y"]), optax.adam(1e-2)
    )
    variables = model.init(jax.random.key(0), X)
    base = {"params": variables["params"]}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "base", base)
    adapters = variables["adapters"]
    opt_state = step.init(adapters)
    manager = jadapters.AdapterCheckpointManager(tmp_path / "run", max_to_keep=2)
    losses = []
    for i in range(10):
        if i == 5:
            manager.save(
                i,
                adapters,
                opt_state,
                metadata=jadapters.adapter_metadata(model, {**base, "adapters": adapters}),
            )
        adapters, opt_state, metrics = step(adapters, opt_state, base, batches[i], keys[i])
        losses.append(float(metrics["loss"]))
    manager.close()

    # A fresh start: every array comes from the two checkpoints.
    abstract = jax.eval_shape(model.init, jax.random.key(1), X)
    with ocp.StandardCheckpointer() as checkpointer:
        base = checkpointer.restore(tmp_path / "base", _single({"params": abstract["params"]}))
    with jadapters.AdapterCheckpointManager(tmp_path / "run") as manager:
        assert manager.latest_step() == 5
        restored = manager.restore(
            adapters=_single(abstract["adapters"]),
            opt_state=_single(jax.eval_shape(step.init, abstract["adapters"])),
        )
    assert restored.metadata["adapters"][0]["name"] == "task"
    adapters, opt_state, resumed = restored.adapters, restored.opt_state, []
    for i in range(5, 10):
        adapters, opt_state, metrics = step(adapters, opt_state, base, batches[i], keys[i])
        resumed.append(float(metrics["loss"]))
    np.testing.assert_allclose(resumed, losses[5:], rtol=1e-6)


def test_nnx_training_resumes_exactly(tmp_path):
    def build(seed):
        model = nnx_model(num_layers=1, targets=r"blocks/\d+/mlp", seed=seed)
        model.add_adapter("task", CFG, rngs=nnx.Rngs(seed + 1))
        return model, jadapters.adapter_optimizer(model, optax.adam(1e-2))

    def loss_fn(model, batch):
        return _xent(model(batch["x"]), batch["y"])

    step = jadapters.nnx_train_step(loss_fn)
    batches = _batches(10)
    model, optimizer = build(0)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "base", nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    losses = []
    with jadapters.AdapterCheckpointManager(tmp_path / "run") as manager:
        for i in range(10):
            if i == 5:
                manager.save(
                    i,
                    nnx.to_pure_dict(nnx.state(model, jadapters.AdapterParam)),
                    nnx.to_pure_dict(nnx.state(optimizer)),
                    metadata=jadapters.adapter_metadata(model),
                )
            losses.append(float(step(model, optimizer, batches[i])["loss"]))

    model, optimizer = build(100)  # different base and adapter weights until restored
    base = nnx.state(model, nnx.Param)
    with ocp.StandardCheckpointer() as checkpointer:
        nnx.replace_by_pure_dict(
            base, checkpointer.restore(tmp_path / "base", nnx.to_pure_dict(base))
        )
    nnx.update(model, base)
    adapters, opt = nnx.state(model, jadapters.AdapterParam), nnx.state(optimizer)
    with jadapters.AdapterCheckpointManager(tmp_path / "run") as manager:
        restored = manager.restore(
            adapters=nnx.to_pure_dict(adapters), opt_state=nnx.to_pure_dict(opt)
        )
    nnx.replace_by_pure_dict(adapters, restored.adapters)
    nnx.replace_by_pure_dict(opt, restored.opt_state)
    nnx.update(model, adapters)
    nnx.update(optimizer, opt)
    resumed = [float(step(model, optimizer, batches[i])["loss"]) for i in range(5, 10)]
    np.testing.assert_allclose(resumed, losses[5:], rtol=1e-6)


# ---- inspector ----------------------------------------------------------------------------


def test_inspect_cli(tmp_path, linen, capsys):
    from jadapters.__main__ import main

    jadapters.save_adapters(tmp_path, *linen)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for text in [
        "an4_v2",
        "attn",
        "LinearAdapter",
        "output",
        "blocks_1/attn/query",
        "down/kernel",
        "(16, 8)",
        "float32",
        "base fingerprint sha256:",
        "fc1/kernel",
        "(16, 32)",
        "bytes on disk",
    ]:
        assert text in out, text
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    by_name = {a["name"]: a for a in data["adapters"]}
    assert by_name["q"]["group"] == "attn" and by_name["q"]["enabled"] is False
    assert by_name["an4"]["param_count"] == 2 * (16 * 8 + 8 * 16 + 2 * 16)
    assert by_name["an4"]["param_bytes"] == 4 * by_name["an4"]["param_count"]
    assert data["disk_bytes"] > 0 and data["format_version"] == md.FORMAT_VERSION == 2
    assert main(["inspect", str(tmp_path / "missing")]) == 1
    assert "no adapter checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "--help"])
    assert exit_info.value.code == 0
    assert "--json" in capsys.readouterr().out


def test_loading_logs_no_warning(tmp_path, caplog):
    """A whole checkpoint loads without a word in the log (orbax's checkpointer looked for a
    step's metadata file inside each item and warned that it was missing)."""
    model = jadapters.adapter_transform(nn.Sequential([nn.Dense(4)]), "layers_0")
    model = model.add_adapter("t", jadapters.LoRAConfig(rank=2))
    variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
    jadapters.save_adapters(str(tmp_path), model, variables)
    fresh = jadapters.adapter_transform(nn.Sequential([nn.Dense(4)]), "layers_0")
    with caplog.at_level("WARNING"):
        jadapters.load_adapters(str(tmp_path), fresh, {"params": variables["params"]})
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []
