"""The JSON metadata beside an adapter checkpoint's arrays: what was saved and on what base.

The metadata names every adapter with its registered config, group, insertion, enabled state
and, per host path, the names, shapes, dtypes and SHA-256 checksums of its weights. It also
holds the *fingerprint* of the base the adapters attach to: for each host path, the host's own
base parameters (names, shapes, dtypes and, when saved with ``base_content=True``, a content
digest of each one, computed shard by shard where the parameter lives: see
:mod:`jadapters.checkpoint.content`). It is plain JSON, read with ``json`` only; configs are
rebuilt through the adapter registry (:func:`jadapters.config_from_dict`), never by import.

The file is untrusted input: :func:`from_json` checks every field's type, that no host or
parameter path repeats or nests inside another, shapes (at most ``MAX_NDIM`` axes of at most
``MAX_DIM`` each), dtypes (a numeric or bool NumPy dtype, by its canonical name), checksums (64
hex digits) and the base fingerprint's digest. What the claims mean for a model (sizes, the
configs against the arrays) is checked by :mod:`jadapters.checkpoint.arrays` before any array
is read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jadapters._adapter_set import INSERTIONS, AdapterSpec, check_name
from jadapters._version import __version__
from jadapters.checkpoint import content as content_digest
from jadapters.composition import composition_from_dict, composition_to_dict
from jadapters.config import config_from_dict, config_to_dict

FORMAT_NAME = "jadapters.adapter_checkpoint"
MAX_NDIM = 32  # axes of one array
MAX_DIM = 2**40  # one axis
_SHA256 = re.compile(r"[0-9a-f]{64}")
FORMAT_VERSION = 2
FORMAT_1_HELP = (
    "it was written in format 1 by jadapters 0.1; this jadapters reads format "
    f"{FORMAT_VERSION} only. Load it with jadapters 0.1, or convert it: load the adapters with "
    "jadapters 0.1 and save them again with this version (save_adapters), into a new directory."
)


@dataclasses.dataclass(frozen=True)
class LeafInfo:
    """One array: its key path in the tree, shape, dtype name and optional SHA-256 checksum."""

    path: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    sha256: str | None = None


@dataclasses.dataclass(frozen=True)
class HostEntry:
    """The weights one adapter holds at one host path."""

    path: str
    params: tuple[LeafInfo, ...]


@dataclasses.dataclass(frozen=True)
class AdapterEntry:
    """One saved adapter. ``cfg`` is the rebuilt config, ``None`` when read without decoding."""

    name: str
    group: str
    config: dict[str, Any]
    cfg: Any
    insertion: str
    enabled: bool
    hosts: tuple[HostEntry, ...]

    @property
    def qualified_name(self) -> str:
        return f"{self.group}:{self.name}" if self.group else self.name

    def spec(self) -> AdapterSpec:
        return AdapterSpec(self.name, self.group, self.cfg, self.insertion, self.enabled)


@dataclasses.dataclass(frozen=True)
class CheckpointMetadata:
    """Everything :func:`jadapters.save_adapters` writes beside the arrays."""

    adapters: tuple[AdapterEntry, ...]
    fingerprint: dict[str, tuple[LeafInfo, ...]]
    framework: str
    library_version: str
    format_version: int = FORMAT_VERSION
    base_content: bool = False  # the fingerprint records each base parameter's content digest
    # ((group, composition block), ...) of the saved adapters' groups; optional in files.
    compositions: tuple[tuple[str, Any], ...] = ()
    # The algorithm of the base's content digests (``content.ALGORITHM``); ``None`` without.
    content_digest: str | None = None

    def get(self, name: str) -> AdapterEntry | None:
        for entry in self.adapters:
            if entry.name == name:
                return entry
        return None


def key_str(key: Any) -> str:
    """A JAX tree-path key (dict key, sequence index, attribute) as a string."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def flatten(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    """``[(key path, leaf), ...]`` of a nested mapping of arrays, keys as strings."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(tuple(key_str(k) for k in path), leaf) for path, leaf in leaves]


def checksum(x: Any) -> str | None:
    """SHA-256 of an array's bytes; ``None`` for an abstract array (``jax.ShapeDtypeStruct``)
    or one sharded over several processes. An array replicated over several processes (the
    adapters of a data-parallel job) is hashed from this process's own copy."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return None
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
            return None
        x = x.addressable_data(0)
    return hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest()


def dtype_name(x: Any) -> str:
    return np.dtype(x.dtype).name


def describe_leaves(tree: Any, *, checksums: bool) -> tuple[LeafInfo, ...]:
    """Shape, dtype (and checksum) of every array in ``tree``, sorted by path.

    The checksum is ``None`` for an array not fully held by this process.
    """
    infos = (
        LeafInfo(
            path, tuple(map(int, np.shape(x))), dtype_name(x), checksum(x) if checksums else None
        )
        for path, x in flatten(tree)
    )
    return tuple(sorted(infos, key=lambda i: i.path))


def describe_base(tree: Any, *, content: bool) -> tuple[LeafInfo, ...]:
    """Shape and dtype (and, with ``content``, the content digest, in the ``sha256`` field) of
    every base parameter in ``tree``, sorted by path.

    The content digest (:mod:`jadapters.checkpoint.content`) is computed on the devices that
    hold each parameter, whatever its sharding, and is the same for every layout; ``None``
    for an abstract parameter. In a multi-process job it is a collective: every process calls
    this with its part of the same global arrays.
    """
    flat = flatten(tree)
    digests = content_digest.digests([x for _, x in flat]) if content else [None] * len(flat)
    infos = (
        LeafInfo(path, tuple(map(int, np.shape(x))), dtype_name(x), digest)
        for (path, x), digest in zip(flat, digests, strict=True)
    )
    return tuple(sorted(infos, key=lambda i: i.path))


def build_metadata(
    adapters: Sequence[tuple[AdapterSpec, Mapping[str, Any]]],
    fingerprint: Mapping[str, Any],
    *,
    framework: str,
    checksums: bool = True,
    base_content: bool = False,
) -> CheckpointMetadata:
    """Metadata for ``[(spec, {host path: params tree}), ...]`` and ``{host path: base params}``.

    ``base_content`` records a content digest of every base parameter at the hosts (the
    content fingerprint, :func:`describe_base`) beside its name, shape and dtype.

    Raises:
      ValueError: with ``base_content``, for an abstract base parameter.
    """
    entries = tuple(
        AdapterEntry(
            spec.name,
            spec.group,
            config_to_dict(spec.cfg),
            spec.cfg,
            spec.insertion,
            bool(spec.enabled),
            tuple(HostEntry(p, describe_leaves(t, checksums=checksums)) for p, t in hosts.items()),
        )
        for spec, hosts in adapters
    )
    prints = {path: describe_base(tree, content=base_content) for path, tree in fingerprint.items()}
    if base_content:
        partial = [
            f"{host}:{'/'.join(i.path)}"
            for host, leaves in prints.items()
            for i in leaves
            if i.sha256 is None
        ]
        if partial:
            raise ValueError(
                f"base_content=True digests the base parameters at the hosts, but {partial[:5]} "
                "are abstract (jax.ShapeDtypeStruct). Save with the base's arrays, or save "
                "without base_content."
            )
    compositions = tuple(
        dict.fromkeys(
            (spec.group, spec.composition) for spec, _ in adapters if spec.composition is not None
        )
    )
    return CheckpointMetadata(
        entries,
        prints,
        framework,
        __version__,
        base_content=base_content,
        compositions=compositions,
        content_digest=content_digest.ALGORITHM if base_content else None,
    )


# ---- JSON ------------------------------------------------------------------------------------


def _leaf_json(info: LeafInfo, *, with_checksum: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"path": list(info.path), "shape": list(info.shape), "dtype": info.dtype}
    if with_checksum and info.sha256 is not None:
        out["sha256"] = info.sha256
    return out


def fingerprint_json(
    fingerprint: Mapping[str, Sequence[LeafInfo]], *, with_checksum: bool = True
) -> dict[str, Any]:
    """The fingerprint as JSON; each leaf's ``sha256`` (its content) where recorded."""
    return {
        host: [_leaf_json(i, with_checksum=with_checksum) for i in leaves]
        for host, leaves in sorted(fingerprint.items())
    }


def fingerprint_digest(fingerprint: Mapping[str, Sequence[LeafInfo]]) -> str:
    """SHA-256 of the canonical JSON of a base fingerprint's structure (names, shapes, dtypes;
    not the content): bases of equal structure, equal digests."""
    structure = fingerprint_json(fingerprint, with_checksum=False)
    text = json.dumps(structure, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def to_json(meta: CheckpointMetadata) -> dict[str, Any]:
    """The JSON object stored as the checkpoint's metadata item."""
    return {
        "format": FORMAT_NAME,
        "format_version": meta.format_version,
        "library_version": meta.library_version,
        "framework": meta.framework,
        "adapters": [
            {
                "name": e.name,
                "group": e.group,
                "type": str(e.config.get("type")),
                "config": e.config,
                "insertion": e.insertion,
                "enabled": e.enabled,
                "hosts": [
                    {"path": h.path, "params": [_leaf_json(i) for i in h.params]} for h in e.hosts
                ],
            }
            for e in meta.adapters
        ],
        "base_fingerprint": fingerprint_json(meta.fingerprint),
        "base_fingerprint_sha256": fingerprint_digest(meta.fingerprint),
        "base_content": meta.base_content,
        **({"base_content_digest": meta.content_digest} if meta.content_digest else {}),
        **(
            {
                "compositions": [
                    {"group": g, "block": composition_to_dict(b)} for g, b in meta.compositions
                ]
            }
            if meta.compositions
            else {}
        ),
    }


class _Malformed(ValueError):
    pass


def _need(data: Any, key: str, kind: type, where: str) -> Any:
    if not isinstance(data, dict) or key not in data:
        raise _Malformed(f"{where} has no {key!r}")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _Malformed(f"{where}[{key!r}] must be {kind.__name__}, got {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else f"{text[:100]}... ({len(text)} characters)"


def check_dtype(dtype: Any) -> str | None:
    """Why ``dtype`` is not a dtype an adapter array may have, or ``None`` if it is one: a
    numeric or bool NumPy dtype (ml_dtypes' too), written by its canonical name."""
    if not isinstance(dtype, str):
        return f"must be a dtype name, got {_short(dtype)}"
    try:
        parsed = np.dtype(dtype)
    except (TypeError, ValueError, SyntaxError):
        return f"{_short(dtype)} is not a NumPy dtype"
    numeric = parsed.name == "bool" or jax.dtypes.issubdtype(parsed, np.number)
    if parsed.name != dtype or parsed.shape != () or not numeric:
        return f"{_short(dtype)} is not a numeric or bool dtype name"
    return None


def _leaf_from_json(data: Any, where: str) -> LeafInfo:
    path = _need(data, "path", list, where)
    shape = _need(data, "shape", list, where)
    dtype = _need(data, "dtype", str, where)
    digest = data.get("sha256")
    if not path or not all(isinstance(p, str) and p for p in path):
        raise _Malformed(
            f"{where}['path'] must be a non-empty list of non-empty strings, got {_short(path)}"
        )
    if len(shape) > MAX_NDIM or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape
    ):
        raise _Malformed(
            f"{where}['shape'] must be at most {MAX_NDIM} ints in [0, {MAX_DIM}], got "
            f"{_short(shape)}"
        )
    if digest is not None and not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
        raise _Malformed(f"{where}['sha256'] must be 64 hex digits, got {_short(digest)}")
    problem = check_dtype(dtype)
    if problem:
        raise _Malformed(f"{where}['dtype'] {problem}")
    return LeafInfo(tuple(path), tuple(shape), dtype, digest)


def _leaves_from_json(items: Any, where: str) -> tuple[LeafInfo, ...]:
    """Leaves whose paths neither repeat nor nest inside one another (they form one tree)."""
    if not isinstance(items, list):
        raise _Malformed(f"{where} must be a list, got {_short(items)}")
    leaves = tuple(_leaf_from_json(x, where) for x in items)
    paths = sorted(i.path for i in leaves)
    for a, b in zip(paths, paths[1:], strict=False):
        if b[: len(a)] == a:
            raise _Malformed(
                f"{where} lists parameter {'/'.join(a)!r} "
                + ("twice" if a == b else f"and, inside it, {'/'.join(b)!r}")
            )
    return leaves


def _adapter_from_json(item: Any, where: str, decode: bool) -> AdapterEntry:
    name = _need(item, "name", str, where)
    try:
        check_name(name)
    except ValueError as err:
        raise _Malformed(f"{where}['name']: {err}") from None
    config = _need(item, "config", dict, where)
    insertion = _need(item, "insertion", str, where)
    if insertion not in INSERTIONS:
        raise _Malformed(
            f"{where}['insertion'] must be one of {INSERTIONS}, got {_short(insertion)}"
        )
    hosts = []
    for j, host in enumerate(_need(item, "hosts", list, where)):
        hwhere = f"{where}['hosts'][{j}]"
        leaves = _leaves_from_json(_need(host, "params", list, hwhere), f"{hwhere}['params']")
        hosts.append(HostEntry(_need(host, "path", str, hwhere), leaves))
    if not hosts:
        raise _Malformed(f"{where}['hosts'] is empty")
    paths = [h.path for h in hosts]
    if len(set(paths)) != len(paths):
        raise _Malformed(f"{where}['hosts'] lists a host path twice: {_short(paths)}")
    group, enabled = _need(item, "group", str, where), _need(item, "enabled", bool, where)
    if ":" in group:
        raise _Malformed(f"{where}['group'] must not contain ':', got {_short(group)}")
    cfg = None
    if decode:
        try:
            cfg = config_from_dict(config)
        except (TypeError, KeyError, AttributeError, ValueError, RecursionError) as err:
            raise _Malformed(
                f"{where}['config'] is not a config this jadapters can build: "
                f"{type(err).__name__}: {str(err)[:500]}"
            ) from None
    return AdapterEntry(name, group, config, cfg, insertion, enabled, tuple(hosts))


def from_json(
    data: Any, *, decode_configs: bool = True, source: str = "metadata"
) -> CheckpointMetadata:
    """Validates and reads the metadata JSON object.

    Args:
      data: the parsed JSON.
      decode_configs: rebuild each config through the adapter registry (an unregistered type
        is an error); without it only the raw config dicts are read.
      source: the file it was read from, named in errors.

    Raises:
      ValueError: naming ``source``, for a malformed object, an unsupported format version,
        or (when decoding) a config that cannot be built, e.g. an unknown adapter type.
    """
    try:
        if _need(data, "format", str, "metadata") != FORMAT_NAME:
            raise _Malformed(
                f"metadata['format'] must be {FORMAT_NAME!r}, got {_short(data['format'])}"
            )
        version = _need(data, "format_version", int, "metadata")
        if version == 1:
            raise ValueError(f"the adapter checkpoint metadata is not supported: {FORMAT_1_HELP}")
        if version != FORMAT_VERSION:
            newer = " Upgrade jadapters to read it." if version > FORMAT_VERSION else ""
            raise ValueError(
                f"checkpoint format version {version} of {source!r} is not supported; this "
                f"jadapters reads version {FORMAT_VERSION}.{newer}"
            )
        entries = [
            _adapter_from_json(item, f"metadata['adapters'][{i}]", decode_configs)
            for i, item in enumerate(_need(data, "adapters", list, "metadata"))
        ]
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise _Malformed(f"metadata lists an adapter name twice: {_short(names)}")
        prints = {}
        for host, leaves in _need(data, "base_fingerprint", dict, "metadata").items():
            prints[host] = _leaves_from_json(leaves, f"metadata['base_fingerprint'][{host!r}]")
        base_content = data.get("base_content", False)
        if not isinstance(base_content, bool):
            raise _Malformed(f"metadata['base_content'] must be bool, got {_short(base_content)}")
        hashed = {i.sha256 is not None for leaves in prints.values() for i in leaves}
        if hashed - {base_content}:
            raise _Malformed(
                "metadata['base_fingerprint'] "
                + ("lacks" if base_content else "has")
                + " a parameter's 'sha256', but metadata['base_content'] is "
                + str(base_content).lower()
            )
        algorithm = data.get("base_content_digest")
        if algorithm is not None and not isinstance(algorithm, str):
            raise _Malformed(
                f"metadata['base_content_digest'] must be a string, got {_short(algorithm)}"
            )
        digest = data.get("base_fingerprint_sha256")
        if digest is not None and digest != fingerprint_digest(prints):
            raise _Malformed(
                "metadata['base_fingerprint_sha256'] is not the digest of "
                "metadata['base_fingerprint']"
            )
        compositions = []
        if not isinstance(data.get("compositions", []), list):
            raise _Malformed(
                f"metadata['compositions'] must be a list, got {_short(data['compositions'])}"
            )
        for i, item in enumerate(data.get("compositions", [])):
            where = f"metadata['compositions'][{i}]"
            group = _need(item, "group", str, where)
            try:
                block = composition_from_dict(item.get("block"))
            except ValueError as err:
                raise _Malformed(f"{where}['block']: {err}") from None
            compositions.append((group, block))
        return CheckpointMetadata(
            tuple(entries),
            prints,
            _need(data, "framework", str, "metadata"),
            _need(data, "library_version", str, "metadata"),
            version,
            base_content,
            tuple(compositions),
            algorithm if base_content else None,
        )
    except _Malformed as err:
        raise ValueError(
            f"adapter checkpoint metadata {source!r} is malformed: {err}. Save the adapters again."
        ) from None


def elements(shape: Sequence[int]) -> int:
    """The element count of ``shape``, exactly (Python ints never overflow)."""
    return math.prod(shape)
