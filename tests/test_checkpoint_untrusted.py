"""A checkpoint directory from anywhere: every change to its bytes or files loads exactly the
original or is a ``ValueError`` naming the damaged item, in bounded time, never a silent change.

Each example copies a pristine checkpoint, damages one file (a bit flip, a byte edit, a
truncation, appended bytes, a replacement by an empty file, deep or huge JSON, a FIFO, a link to
``/dev/zero`` or out of the checkpoint, a directory, or deletion) and reads it with one reader
(``load_adapters`` on Linen and NNX, ``read_adapter_metadata``, ``abstract_adapters``, the
inspector) under a time limit. :func:`load_outcome` classifies the result; heavier fuzzing
calls it from the benchmarks.
"""

import contextlib
import json
import os
import shutil
import signal
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_like
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jadapters
from jadapters.checkpoint import files, store
from jadapters.checkpoint import inspect as inspector
from jadapters.demo.models import LinenTransformer

CFG = jadapters.LinearAdapterConfig(dim=2)
FRONTS = ("linen", "nnx")
READERS = ("load", "metadata", "abstract", "inspect")
TIME_LIMIT = 20  # seconds for one read; a read that blocks on a FIFO would never end


# ---- what the benchmarks call ----------------------------------------------------------------


def load_outcome(read, expected, same=None):
    """``("exact" | "error" | "silent", message)``: what ``read()`` made of a checkpoint.

    ``"exact"``: it returned what ``same(result, expected)`` accepts (default: equal NumPy
    leaves); ``"error"``: it raised a ``ValueError`` (the message is returned); ``"silent"``:
    it returned something else, which must never happen. Any other exception propagates.
    """
    same = same or trees_equal
    try:
        result = read()
    except ValueError as err:
        return "error", str(err)
    return ("exact" if same(result, expected) else "silent"), ""


def trees_equal(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    if tree_a != tree_b:
        return False
    return all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y)
        for x, y in zip(leaves_a, leaves_b, strict=True)
    )


@contextlib.contextmanager
def time_limit(seconds=TIME_LIMIT):
    def expired(signum, frame):
        raise TimeoutError(f"a checkpoint read ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---- models -----------------------------------------------------------------------------------


class Two(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(8, 8, rngs=rngs)
        self.b = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, x):
        return self.b(self.a(x))


def nnx_build(seed=0):
    return jadapters.adapter_transform(Two(nnx.Rngs(seed)), r"a|b")


def nnx_weights(model):
    return nnx.to_pure_dict(nnx.state(model, jadapters.AdapterParam))


def linen_build():
    return jadapters.adapter_transform(nn.Sequential([nn.Dense(8), nn.Dense(8)]), r"layers_\d")


@pytest.fixture(scope="module")
def sources():
    """``{front: (save arguments, reader of a path, expected load result)}``."""
    linen = linen_build().add_adapter("t", CFG)
    variables = linen.init(jax.random.key(0), jnp.ones((1, 8)))
    variables = {**variables, "adapters": random_like(variables["adapters"], seed=1)}
    base = {"params": variables["params"]}

    def linen_load(path):
        model, new = jadapters.load_adapters(path, linen_build(), base)
        return model.adapters, new["adapters"]

    source = nnx_build()
    source.add_adapter("t", CFG, rngs=nnx.Rngs(1))
    state = nnx.state(source, jadapters.AdapterParam)
    nnx.replace_by_pure_dict(state, random_like(nnx.to_pure_dict(state), seed=2))
    nnx.update(source, state)

    def nnx_load(path):
        model = jadapters.load_adapters(path, nnx_build())
        return model.get_adapter_specs(), nnx_weights(model)

    return {
        "linen": ((linen, variables), linen_load, (linen.adapters, variables["adapters"])),
        "nnx": ((source,), nnx_load, (source.get_adapter_specs(), nnx_weights(source))),
    }


def _same_load(got, expected):
    return got[0] == expected[0] and trees_equal(got[1], expected[1])


def _describe(path):
    data = inspector.describe(path)
    inspector.render(data)
    return {k: v for k, v in data.items() if k not in ("disk_bytes", "path", "version_dir")}


def _reader(kind, front, sources):
    """``(read(path), same(a, b))`` of reader ``kind``."""
    if kind == "load":
        return sources[front][1], _same_load
    if kind == "metadata":

        def metadata(path):
            data = jadapters.read_adapter_metadata(path)
            return {k: v for k, v in data.items() if k not in ("disk_bytes", "version_dir")}

        return metadata, lambda a, b: a == b
    if kind == "abstract":
        return jadapters.abstract_adapters, lambda a, b: a == b
    return _describe, lambda a, b: a == b


@pytest.fixture(scope="module")
def pristine(sources, tmp_path_factory):
    """``{front: (checkpoint root, sorted files of its one version, relative)}``."""
    out = {}
    for front in FRONTS:
        root = str(tmp_path_factory.mktemp(f"pristine_{front}"))
        where = jadapters.save_adapters(root, *sources[front][0])
        names = sorted(
            os.path.relpath(os.path.join(d, f), where).replace(os.sep, "/")
            for d, _, fs in os.walk(where)
            for f in fs
        )
        out[front] = (root, names)
    return out


@pytest.fixture(scope="module")
def expected(sources, pristine):
    """``{(front, reader): result on the pristine checkpoint}``, the "exact" outcome."""
    out = {}
    for front in FRONTS:
        for kind in READERS:
            read, _ = _reader(kind, front, sources)
            out[front, kind] = sources[front][2] if kind == "load" else read(pristine[front][0])
    return out


@contextlib.contextmanager
def damaged_copy(pristine_root):
    work = tempfile.mkdtemp(prefix="jadapters_untrusted_")
    try:
        root = os.path.join(work, "ckpt")
        shutil.copytree(pristine_root, root, symlinks=True)
        yield root, store.step_dir(root)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check_outcome(front, kind, rel, damage, sources, expected, where_root):
    """Reads the damaged copy at ``where_root`` and asserts exact-or-named-error."""
    read, same = _reader(kind, front, sources)
    with time_limit():
        result, message = load_outcome(lambda: read(where_root), expected[front, kind], same)
    assert result != "silent", f"{damage} of {rel} changed what {kind} returns, silently"
    if result == "error":
        item = rel.split("/")[0] + "/" if "/" in rel else rel
        assert item in message, (damage, rel, message)
    else:  # nothing read was changed: orbax's step metadata, a commit marker, or arrays that
        # a reader of the metadata alone does not read
        unread = os.path.basename(rel) in ("_CHECKPOINT_METADATA", store.COMMIT)
        assert unread or (kind != "load" and rel.startswith("adapters/")), (damage, rel)


# ---- bit flips, byte edits, truncations, appended bytes, deletions ----------------------------


def _flip(file, data):
    size = os.path.getsize(file)
    if not size:
        return "empty: nothing to flip"
    bit = data.draw(st.integers(0, 8 * size - 1), label="bit")
    with open(file, "r+b") as f:
        f.seek(bit // 8)
        byte = f.read(1)[0]
        f.seek(bit // 8)
        f.write(bytes([byte ^ (1 << (bit % 8))]))
    return f"flip of bit {bit}"


def _edit(file, data):
    size = os.path.getsize(file)
    op = data.draw(st.sampled_from(["byte", "truncate", "append", "delete", "empty"]), label="op")
    if op == "byte" and size:
        at = data.draw(st.integers(0, size - 1), label="at")
        value = data.draw(st.integers(0, 255), label="value")
        with open(file, "r+b") as f:
            f.seek(at)
            f.write(bytes([value]))
        return f"byte {at} set to {value}"
    if op == "truncate" and size:
        length = data.draw(st.integers(0, size - 1), label="length")
        os.truncate(file, length)
        return f"truncation to {length} bytes"
    if op == "append":
        extra = data.draw(st.binary(min_size=1, max_size=64), label="extra")
        with open(file, "ab") as f:
            f.write(extra)
        return f"{len(extra)} bytes appended"
    if op == "delete":
        os.remove(file)
        return "deletion"
    open(file, "wb").close()
    return "emptied"


@pytest.mark.parametrize("front", FRONTS)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_bit_flips_and_byte_edits_never_load_silently(front, sources, pristine, expected, data):
    root, names = pristine[front]
    rel = data.draw(st.sampled_from(names), label="file")
    kind = data.draw(st.sampled_from(READERS), label="reader")
    damage = data.draw(st.sampled_from([_flip, _edit]), label="damage")
    with damaged_copy(root) as (copy, where):
        what = damage(os.path.join(where, *rel.split("/")), data)
        check_outcome(front, kind, rel, what, sources, expected, copy)


def _every_bit_of(text, front, rel, sources, expected, pristine):
    """Flips every bit of file ``rel`` of ``front``'s checkpoint in turn, for ``load``."""
    root, _ = pristine[front]
    with damaged_copy(root) as (copy, where):
        file = os.path.join(where, *rel.split("/"))
        with open(file, "rb") as f:
            original = f.read()
        for bit in range(8 * len(original)):
            changed = bytearray(original)
            changed[bit // 8] ^= 1 << (bit % 8)
            with open(file, "wb") as f:
                f.write(changed)
            check_outcome(front, "load", rel, f"{text} bit {bit}", sources, expected, copy)


def test_every_bit_of_the_metadata_list_is_covered(sources, expected, pristine):
    # The list is checked against the content it lists: a flip in it is never trusted.
    _every_bit_of("flip of", "linen", "metadata/jadapters_files.json", sources, expected, pristine)


# ---- files replaced by hostile ones -----------------------------------------------------------


def _huge_claim(file):
    leaf = {"path": ["w"], "shape": [2**40, 2**40], "dtype": "float32"}
    text = json.dumps({"format": "jadapters.adapter_checkpoint", "adapters": [leaf] * 1000})
    with open(file, "w") as f:
        f.write(text)


def _deep(file):
    with open(file, "w") as f:
        f.write("[" * 100_000 + "]" * 100_000)


def _fifo(file):
    os.mkfifo(file)


def _dev_zero(file):
    os.symlink("/dev/zero", file)


def _outside(file):
    target = os.path.join(tempfile.gettempdir(), "jadapters_outside_target.json")
    with open(target, "wb") as f:
        f.write(b"{}")
    os.symlink(target, file)


def _directory(file):
    os.mkdir(file)


REPLACEMENTS = {
    "empty": lambda file: open(file, "wb").close(),
    "huge claim": _huge_claim,
    "deep nesting": _deep,
    "fifo": _fifo,
    "link to /dev/zero": _dev_zero,
    "link out of the checkpoint": _outside,
    "directory": _directory,
}


@pytest.mark.parametrize("front", FRONTS)
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_replaced_files_are_errors_never_hangs(front, sources, pristine, expected, data):
    root, names = pristine[front]
    rel = data.draw(st.sampled_from(names), label="file")
    kind = data.draw(st.sampled_from(READERS), label="reader")
    how = data.draw(st.sampled_from(sorted(REPLACEMENTS)), label="replacement")
    with damaged_copy(root) as (copy, where):
        file = os.path.join(where, *rel.split("/"))
        os.remove(file)
        REPLACEMENTS[how](file)
        check_outcome(front, kind, rel, how, sources, expected, copy)


@pytest.mark.parametrize("how", ["fifo", "link to /dev/zero", "link out of the checkpoint"])
def test_special_files_are_refused_by_name(how, sources, pristine, expected):
    for rel in ("metadata/metadata", "adapters/manifest.ocdbt", "metadata/jadapters_files.json"):
        with damaged_copy(pristine["nnx"][0]) as (copy, where):
            file = os.path.join(where, *rel.split("/"))
            os.remove(file)
            REPLACEMENTS[how](file)
            with time_limit(), pytest.raises(ValueError, match="regular file|outside") as err:
                sources["nnx"][1](copy)
            assert rel.split("/")[0] + "/" in str(err.value)


def test_unlisted_extra_file_and_missing_items(sources, pristine, expected):
    with damaged_copy(pristine["linen"][0]) as (copy, where):
        with open(os.path.join(where, "adapters", "extra"), "w") as f:
            f.write("x")
        with pytest.raises(ValueError, match="data file adapters/extra is not listed"):
            sources["linen"][1](copy)
    for item in ("adapters", "metadata"):
        with damaged_copy(pristine["linen"][0]) as (copy, where):
            shutil.rmtree(os.path.join(where, item))
            with pytest.raises(ValueError, match=f"{item}"):
                sources["linen"][1](copy)
            with open(os.path.join(where, item), "w") as f:
                f.write("{}")
            with pytest.raises(ValueError, match=f"item {item}/ is a regular file, not a dir"):
                sources["linen"][1](copy)


# ---- the JSON reader --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        (b'{"a": NaN}', "NaN is not a JSON number"),
        (b'{"a": -Infinity}', "-Infinity is not a JSON number"),
        (b'{"a": 1e999}', "overflows to infinity"),
        (b'{"a": 1, "a": 2}', "key 'a' appears twice"),
        (b'{"a": "\xff"}', "not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nests JSON deeper than Python can parse"),
        (b"[" * 65 + b"]" * 65, "more than 64 levels deep"),
        (b"1" * 5000, "not valid JSON"),
        (b"", "not valid JSON"),
    ],
)
def test_json_is_read_strictly(text, message):
    with pytest.raises(ValueError, match=f"data file x/f.json {message}|{message}") as err:
        files.parse_json(text, "x/f.json", "/ckpt/1")
    assert "x/f.json" in str(err.value) and "Save the adapters again" in str(err.value)


def test_json_size_is_capped_before_reading(tmp_path):
    file = tmp_path / "big.json"
    with open(file, "wb") as f:
        f.truncate(files.MAX_JSON_BYTES + 1)  # sparse: nothing is written, nothing read
    with pytest.raises(ValueError, match=r"big.json has 16,777,217 bytes, more than the 16,777"):
        files.read_json(str(file), str(tmp_path))


# ---- forgeries consistent with the checksums: the checks behind them ---------------------------


def _forge_metadata(where, edit):
    """Edits the metadata and lists it again: a forgery consistent with the checksums."""
    file = os.path.join(where, "metadata", "metadata")
    with open(file) as f:
        data = json.load(f)
    raw = edit(data)
    with open(file, "wb") as f:
        f.write(json.dumps(data).encode() if raw is None else raw)
    store._write_list(os.path.dirname(file))


def _set_dim(dim):
    def edit(data):
        data["adapters"][0]["config"]["dim"] = dim

    return edit


def _claim_dim(dim):
    def edit(data):  # config and shapes agree; orbax's arrays do not
        entry = data["adapters"][0]
        entry["config"]["dim"] = dim
        for host in entry["hosts"]:
            for leaf in host["params"]:
                if leaf["path"][0] in ("down", "up"):
                    leaf["shape"] = [dim if d == 2 else d for d in leaf["shape"]]

    return edit


FORGERIES = {
    "hostile dim in the config": (_set_dim(2**40), "is inconsistent: the config .* creates"),
    "config off by one": (_set_dim(3), r"down/kernel: config \(8, 3\), stored \(8, 2\)"),
    "claims beyond the model": (_claim_dim(2**22), r"claims 33,554,432 elements .* more than"),
    "claims within bounds": (_claim_dim(5), r"stored in adapters/ with shape \(8, 2\).*\(8, 5\)"),
    "deep nesting": (lambda data: b"[" * 65 + b"]" * 65, "more than 64 levels deep"),
    "not UTF-8": (lambda data: json.dumps(data).encode()[:-1] + b"\xff}", "not UTF-8"),
}


@pytest.mark.parametrize("front", FRONTS)
@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_forged_claims_are_checked_before_anything_is_built(front, forgery, sources, pristine):
    edit, message = FORGERIES[forgery]
    with damaged_copy(pristine[front][0]) as (copy, where):
        _forge_metadata(where, edit)
        with time_limit(), pytest.raises(ValueError, match=message) as err:
            sources[front][1](copy)
        assert "metadata/metadata" in str(err.value)


def test_nnx_model_is_untouched_by_a_hostile_config(pristine):
    with damaged_copy(pristine["nnx"][0]) as (copy, where):
        _forge_metadata(where, _set_dim(2**40))
        target = nnx_build()
        before = nnx.state(target)
        with time_limit(), pytest.raises(ValueError, match="inconsistent"):
            jadapters.load_adapters(copy, target)
        assert not target.is_adapter_available()
        assert trees_equal(nnx.state(target), before)


# ---- the hosts of a Linen adapter, the base's content, version directories -------------------


def _transformer(layers):
    base = LinenTransformer(
        num_classes=10, d_model=16, num_layers=layers, num_heads=2, mlp_dim=32, max_len=8
    )
    return jadapters.adapter_transform(base, {"mlp": r"blocks_\d+/mlp"})


def _ones(model, x):
    """``model``'s variables, all ones: the structure of ``init`` without compiling it."""
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)
    return jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), abstract)


def test_linen_refuses_a_base_with_more_target_hosts(tmp_path):
    x = jnp.ones((1, 8, 4), jnp.float32)  # (batch, time, features)
    two = _transformer(2).add_adapter("mlp:t", jadapters.LinearAdapterConfig(dim=4))
    variables = _ones(two, x)
    jadapters.save_adapters(tmp_path, two, variables)
    three = _transformer(3)
    with pytest.raises(ValueError, match=r"also targets \['blocks_2/mlp'\]"):
        jadapters.load_adapters(tmp_path, three, _ones(three, x))
    base = {"params": variables["params"]}
    loaded, _ = jadapters.load_adapters(tmp_path, _transformer(2), base)
    assert loaded.adapters.names() == ["t"]


@pytest.mark.parametrize("front", FRONTS)
def test_base_content_fingerprint(front, sources, tmp_path):
    args = sources[front][0]
    jadapters.save_adapters(tmp_path / "c", *args, base_content=True)
    jadapters.save_adapters(tmp_path / "s", *args)
    meta = jadapters.read_adapter_metadata(tmp_path / "c")
    assert meta["base_content"] is True
    assert all("sha256" in leaf for leaves in meta["base_fingerprint"].values() for leaf in leaves)
    if front == "linen":
        model, variables = args
        other = linen_build().init(jax.random.key(7), jnp.ones((1, 8)))["params"]

        def load(path, base, **kwargs):
            return jadapters.load_adapters(path, linen_build(), {"params": base}, **kwargs)

        same, hosts = variables["params"], ("layers_0:kernel", "layers_1:kernel")
    else:

        def load(path, seed, **kwargs):
            return jadapters.load_adapters(path, nnx_build(seed), **kwargs)

        same, other, hosts = 0, 7, ("a:kernel", "b:kernel")  # the source's base has seed 0
    load(tmp_path / "c", same)  # the same base: loads
    load(tmp_path / "c", same, check_base="content")
    with pytest.raises(ValueError, match="2 base parameters .* other values") as err:
        load(tmp_path / "c", other)  # another seed, the same shapes
    assert all(h in str(err.value) for h in hosts)  # biases start at zero: equal
    load(tmp_path / "c", other, check_base="structure")
    load(tmp_path / "s", other)  # by default only what was recorded is checked
    with pytest.raises(ValueError, match="records its structure only"):
        load(tmp_path / "s", same, check_base="content")
    with pytest.raises(ValueError, match="check_base must be True"):
        load(tmp_path / "s", same, check_base="weights")


def test_version_directory_is_a_path(sources, tmp_path, capsys):
    from jadapters.__main__ import main

    (source,) = sources["nnx"][0]
    first = jadapters.save_adapters(tmp_path, source, keep=2)
    second = jadapters.save_adapters(tmp_path, source, keep=2)
    assert second == os.path.join(tmp_path, "2")
    target = jadapters.load_adapters(second, nnx_build())
    assert trees_equal(nnx_weights(target), nnx_weights(source))
    assert jadapters.read_adapter_metadata(first)["version_dir"] == first
    assert jadapters.abstract_adapters(first)["t"]["a"]["down"]["kernel"].shape == (8, 2)
    assert main(["inspect", second]) == 0
    assert f"version dir {second}" in capsys.readouterr().out
    with pytest.raises(ValueError, match="is the directory of version 2, but version=1"):
        jadapters.load_adapters(second, nnx_build(), version=1)
    jadapters.load_adapters(second, nnx_build(), version=2)
