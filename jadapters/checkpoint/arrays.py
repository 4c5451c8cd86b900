"""Reading an adapter checkpoint's arrays back: onto the requested shardings, verified.

Before orbax reads anything, every stored file is checked against the size and SHA-256 the
metadata lists and orbax's own array metadata against ours, so a damaged checkpoint is
reported as such (and never half-read). After the restore, each array is checked against its
shape, dtype and checksum. The result is fully in memory before any model is touched.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jadapters.checkpoint import metadata as md
from jadapters.checkpoint.store import ARRAYS_DIR, file_digest


def verify_files(where: str, meta: md.CheckpointMetadata) -> None:
    """Checks every array file against the manifest in the metadata, before orbax reads it.

    Raises:
      ValueError: naming the first file that is missing, has another size, or fails its
        checksum.
    """
    for info in meta.files:
        full = os.path.join(where, *info.path.split("/"))
        if not os.path.isfile(full):
            raise ValueError(
                f"the adapter checkpoint at {where!r} is missing or truncated: data file "
                f"{info.path!r} does not exist."
            )
        size = os.path.getsize(full)
        if size != info.bytes:
            raise ValueError(
                f"the adapter checkpoint at {where!r} is truncated or corrupted: data file "
                f"{info.path!r} has {size} bytes, expected {info.bytes}."
            )
        if file_digest(full) != info.sha256:
            raise ValueError(
                f"the adapter checkpoint at {where!r} is corrupted: data file {info.path!r} "
                "fails its checksum."
            )


def _lookup(tree: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _check_stored_shapes(arrays_dir: str, entries: list[md.AdapterEntry]) -> None:
    """Compares orbax's own array metadata with ours, so a mismatch never reaches a restore."""
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            stored = checkpointer.metadata(arrays_dir).item_metadata.tree
    except Exception as err:  # orbax raises many types for damaged metadata
        raise ValueError(
            f"the adapter checkpoint arrays in {arrays_dir!r} are missing, truncated or "
            f"corrupted: {type(err).__name__}: {str(err)[:300]}"
        ) from None
    for e in entries:
        for i, h in enumerate(e.hosts):
            for info in h.params:
                node = _lookup(stored, (e.name, f"h{i}", *info.path))
                where = f"adapter {e.name!r} at host {h.path!r}, parameter {'/'.join(info.path)!r}"
                if node is None or not hasattr(node, "shape"):
                    raise ValueError(f"the adapter checkpoint is corrupted: {where} is missing.")
                shape, dtype = tuple(node.shape), np.dtype(node.dtype).name
                if shape != info.shape or dtype != info.dtype:
                    raise ValueError(
                        f"the adapter checkpoint is corrupted: {where} is stored with shape "
                        f"{shape} and dtype {dtype}, but the metadata says {info.shape} "
                        f"{info.dtype}."
                    )


def read_arrays(
    where: str, meta: md.CheckpointMetadata, names: list[str], shardings: Any
) -> dict[str, dict[str, Any]]:
    """Restores adapters ``names`` onto ``shardings`` and verifies them against the metadata.

    Returns ``{name: {host path: params}}`` fully in memory.

    Raises:
      ValueError: for missing, truncated or corrupted arrays, or arrays that differ from the
        metadata in shape, dtype or checksum.
    """
    entries = [meta.get(n) for n in names]
    abstract = {
        e.name: {f"h{i}": _abstract_params(h.params) for i, h in enumerate(e.hosts)}
        for e in entries
    }
    sharded = place(
        {
            e.name: {h.path: abstract[e.name][f"h{i}"] for i, h in enumerate(e.hosts)}
            for e in entries
        },
        shardings,
    )
    target = {
        e.name: {f"h{i}": sharded[e.name][h.path] for i, h in enumerate(e.hosts)} for e in entries
    }
    restore_args = jax.tree.map(
        lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype),
        target,
    )
    arrays_dir = os.path.join(where, ARRAYS_DIR)
    verify_files(where, meta)
    _check_stored_shapes(arrays_dir, entries)
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            restored = checkpointer.restore(
                arrays_dir,
                args=ocp.args.PyTreeRestore(
                    item=target, restore_args=restore_args, partial_restore=True
                ),
            )
        jax.block_until_ready(restored)
    except Exception as err:  # orbax and tensorstore raise many types for damaged files
        raise ValueError(
            f"the adapter checkpoint arrays in {arrays_dir!r} are missing, truncated or "
            f"corrupted: {type(err).__name__}: {str(err)[:500]}"
        ) from None
    out: dict[str, dict[str, Any]] = {}
    for e in entries:
        out[e.name] = {}
        for i, h in enumerate(e.hosts):
            params = _lookup(restored, (e.name, f"h{i}"))
            _verify(e.name, h, params)
            out[e.name][h.path] = params
    return out


def _abstract_params(leaves: tuple[md.LeafInfo, ...]) -> dict:
    tree: dict = {}
    for info in leaves:
        node = tree
        for key in info.path[:-1]:
            node = node.setdefault(key, {})
        node[info.path[-1]] = jax.ShapeDtypeStruct(info.shape, np.dtype(info.dtype))
    return tree


def abstract_tree(meta: md.CheckpointMetadata, names: list[str]) -> dict:
    """``{name: {host path: params}}`` of ``jax.ShapeDtypeStruct`` for adapters ``names``."""
    return {
        e.name: {h.path: _abstract_params(h.params) for h in e.hosts}
        for e in (meta.get(n) for n in names)
    }


def place(abstract: Any, shardings: Any) -> Any:
    """Gives every ``ShapeDtypeStruct`` in ``abstract`` (``{name: {host: params}}``) a sharding.

    ``shardings`` is ``None`` (the default device), one ``jax.sharding.Sharding`` for all, or
    a pytree of them matching ``abstract`` or a prefix of it (e.g. ``{name: sharding}``).

    Raises:
      ValueError: for a tree that does not match, a leaf that is not a ``Sharding``, or a
        sharding that does not fit an array's shape (naming the adapter, host and parameter).
    """
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def is_sharding(x):
        return isinstance(x, jax.sharding.Sharding)

    try:
        per_leaf = jax.tree.map(
            lambda s, sub: jax.tree.map(lambda _: s, sub), shardings, abstract, is_leaf=is_sharding
        )
    except ValueError as err:
        raise ValueError(
            "shardings must be one jax.sharding.Sharding or a pytree matching the adapter tree "
            "{name: {host path: params}} (see jadapters.abstract_adapters) or a prefix of it; "
            f"the structures differ: {err}"
        ) from None

    def one(path, x, sharding):
        keys = [md.key_str(k) for k in path]
        where = f"adapter {keys[0]!r} at host {keys[1]!r}, parameter {'/'.join(keys[2:])!r}"
        if not is_sharding(sharding):
            raise ValueError(
                f"shardings must hold jax.sharding.Sharding leaves, got {sharding!r} for {where}."
            )
        try:
            out = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
            sharding.shard_shape(x.shape)
        except (ValueError, IndexError) as err:
            raise ValueError(f"shardings do not fit {where} of shape {x.shape}: {err}") from None
        return out

    return jax.tree_util.tree_map_with_path(one, abstract, per_leaf)


def _verify(name: str, host: md.HostEntry, params: Any) -> None:
    if params is None:
        raise ValueError(
            f"the adapter checkpoint is corrupted: adapter {name!r} has no arrays for host "
            f"{host.path!r}."
        )
    got = {path: x for path, x in md.flatten(params)}
    for info in host.params:
        x = got.get(info.path)
        where = f"adapter {name!r} at host {host.path!r}, parameter {'/'.join(info.path)!r}"
        if x is None:
            raise ValueError(f"the adapter checkpoint is corrupted: {where} is missing.")
        if tuple(x.shape) != info.shape or md.dtype_name(x) != info.dtype:
            raise ValueError(
                f"the adapter checkpoint is corrupted: {where} has shape {tuple(x.shape)} and "
                f"dtype {md.dtype_name(x)}, but the metadata says {info.shape} {info.dtype}."
            )
        if info.sha256 is not None:
            digest = md.checksum(x)
            if digest is not None and digest != info.sha256:
                raise ValueError(
                    f"the adapter checkpoint is corrupted: {where} fails its checksum "
                    "(the data changed after it was written)."
                )
