"""The JSON metadata beside an adapter checkpoint's arrays: what was saved and on what base.

The metadata names every adapter with its registered config, group, insertion, enabled state
and, per host path, the names, shapes, dtypes and SHA-256 checksums of its weights. It also
holds the *fingerprint* of the base the adapters attach to: for each host path, the host's own
base parameters (names, shapes, dtypes). It is plain JSON, read with ``json`` only; configs are
rebuilt through the adapter registry (:func:`jadapters.config_from_dict`), never by import.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jadapters._adapter_set import INSERTIONS, AdapterSpec, check_name
from jadapters._version import __version__
from jadapters.config import config_from_dict, config_to_dict

FORMAT_NAME = "jadapters.adapter_checkpoint"
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
    """SHA-256 of an array's bytes; ``None`` for an array not fully held by this process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None
    return hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest()


def dtype_name(x: Any) -> str:
    return np.dtype(x.dtype).name


def describe_leaves(tree: Any, *, checksums: bool) -> tuple[LeafInfo, ...]:
    """Shape, dtype (and checksum) of every array in ``tree``, sorted by path."""
    infos = (
        LeafInfo(
            path, tuple(map(int, np.shape(x))), dtype_name(x), checksum(x) if checksums else None
        )
        for path, x in flatten(tree)
    )
    return tuple(sorted(infos, key=lambda i: i.path))


def build_metadata(
    adapters: Sequence[tuple[AdapterSpec, Mapping[str, Any]]],
    fingerprint: Mapping[str, Any],
    *,
    framework: str,
    checksums: bool = True,
) -> CheckpointMetadata:
    """Metadata for ``[(spec, {host path: params tree}), ...]`` and ``{host path: base params}``."""
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
    prints = {path: describe_leaves(tree, checksums=False) for path, tree in fingerprint.items()}
    return CheckpointMetadata(entries, prints, framework, __version__)


# ---- JSON ------------------------------------------------------------------------------------


def _leaf_json(info: LeafInfo, *, with_checksum: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"path": list(info.path), "shape": list(info.shape), "dtype": info.dtype}
    if with_checksum and info.sha256 is not None:
        out["sha256"] = info.sha256
    return out


def fingerprint_json(fingerprint: Mapping[str, Sequence[LeafInfo]]) -> dict[str, Any]:
    return {
        host: [_leaf_json(i, with_checksum=False) for i in leaves]
        for host, leaves in sorted(fingerprint.items())
    }


def fingerprint_digest(fingerprint: Mapping[str, Sequence[LeafInfo]]) -> str:
    """SHA-256 of the canonical JSON of a base fingerprint: equal bases, equal digests."""
    text = json.dumps(fingerprint_json(fingerprint), sort_keys=True, separators=(",", ":"))
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
    }


class _Malformed(ValueError):
    pass


def _need(data: Any, key: str, kind: type, where: str) -> Any:
    if not isinstance(data, dict) or key not in data:
        raise _Malformed(f"{where} has no {key!r}")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _Malformed(f"{where}[{key!r}] must be {kind.__name__}, got {value!r}")
    return value


def _leaf_from_json(data: Any, where: str) -> LeafInfo:
    path = _need(data, "path", list, where)
    shape = _need(data, "shape", list, where)
    dtype = _need(data, "dtype", str, where)
    digest = data.get("sha256")
    if not path or not all(isinstance(p, str) for p in path):
        raise _Malformed(f"{where}['path'] must be a non-empty list of strings, got {path!r}")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _Malformed(f"{where}['shape'] must be non-negative ints, got {shape!r}")
    if not isinstance(digest, (str, type(None))):
        raise _Malformed(f"{where}['sha256'] must be a string, got {digest!r}")
    try:
        numeric = jax.dtypes.issubdtype(np.dtype(dtype), np.number) or dtype == "bool"
    except TypeError:
        numeric = False
    if not numeric:
        raise _Malformed(f"{where}['dtype'] {dtype!r} is not a numeric or bool dtype")
    return LeafInfo(tuple(path), tuple(shape), dtype, digest)


def _adapter_from_json(item: Any, where: str, decode: bool) -> AdapterEntry:
    name = _need(item, "name", str, where)
    check_name(name)
    config = _need(item, "config", dict, where)
    insertion = _need(item, "insertion", str, where)
    if insertion not in INSERTIONS:
        raise _Malformed(f"{where}['insertion'] must be one of {INSERTIONS}, got {insertion!r}")
    hosts = []
    for j, host in enumerate(_need(item, "hosts", list, where)):
        hwhere = f"{where}['hosts'][{j}]"
        leaves = _need(host, "params", list, hwhere)
        path = _need(host, "path", str, hwhere)
        hosts.append(
            HostEntry(path, tuple(_leaf_from_json(x, f"{hwhere}['params']") for x in leaves))
        )
    if not hosts:
        raise _Malformed(f"{where}['hosts'] is empty")
    group, enabled = _need(item, "group", str, where), _need(item, "enabled", bool, where)
    try:
        cfg = config_from_dict(config) if decode else None
    except (TypeError, KeyError, AttributeError) as err:  # a config of the wrong shape
        raise _Malformed(f"{where}['config'] is malformed: {type(err).__name__}: {err}") from None
    return AdapterEntry(name, group, config, cfg, insertion, enabled, tuple(hosts))


def from_json(data: Any, *, decode_configs: bool = True) -> CheckpointMetadata:
    """Validates and reads the metadata JSON object.

    Args:
      data: the parsed JSON.
      decode_configs: rebuild each config through the adapter registry (an unregistered type
        is an error); without it only the raw config dicts are read.

    Raises:
      ValueError: for a malformed object, an unsupported format version, or (when decoding) an
        unknown adapter type.
    """
    try:
        if _need(data, "format", str, "metadata") != FORMAT_NAME:
            raise _Malformed(f"metadata['format'] must be {FORMAT_NAME!r}, got {data['format']!r}")
        version = _need(data, "format_version", int, "metadata")
        if version == 1:
            raise ValueError(f"the adapter checkpoint metadata is not supported: {FORMAT_1_HELP}")
        if version != FORMAT_VERSION:
            newer = " Upgrade jadapters to read it." if version > FORMAT_VERSION else ""
            raise ValueError(
                f"checkpoint format version {version} is not supported; this jadapters reads "
                f"version {FORMAT_VERSION}.{newer}"
            )
        entries = [
            _adapter_from_json(item, f"metadata['adapters'][{i}]", decode_configs)
            for i, item in enumerate(_need(data, "adapters", list, "metadata"))
        ]
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise _Malformed(f"metadata lists an adapter name twice: {names}")
        prints = {}
        for host, leaves in _need(data, "base_fingerprint", dict, "metadata").items():
            where = f"metadata['base_fingerprint'][{host!r}]"
            if not isinstance(leaves, list):
                raise _Malformed(f"{where} must be a list")
            prints[host] = tuple(_leaf_from_json(x, where) for x in leaves)
        return CheckpointMetadata(
            tuple(entries),
            prints,
            _need(data, "framework", str, "metadata"),
            _need(data, "library_version", str, "metadata"),
            version,
        )
    except _Malformed as err:
        raise ValueError(
            f"adapter checkpoint metadata is malformed: {err}. Save the adapters again."
        ) from None
