"""Reading a checkpoint's adapter arrays back: verified, onto the requested shardings.

Before orbax reads an array, every stored file is checked against its listed size and SHA-256
(:func:`store.verify_files`) and orbax's own array metadata against ours, so a damaged
checkpoint is reported as such and nothing is allocated from a damaged file's claims. Orbax
then restores onto ``jax.ShapeDtypeStruct`` targets carrying the shardings, and each array is
checked against its checksum. The result is fully in memory before any model is touched.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jadapters.checkpoint import metadata as md
from jadapters.checkpoint import store


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
        where = _where(*(md.key_str(k) for k in path))
        if not is_sharding(sharding):
            raise ValueError(
                f"shardings must hold jax.sharding.Sharding leaves, got {sharding!r} for {where}."
            )
        try:
            sharding.shard_shape(x.shape)
        except (ValueError, IndexError) as err:
            raise ValueError(f"shardings do not fit {where} of shape {x.shape}: {err}") from None
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(one, abstract, per_leaf)


def _where(name: str, host: str, *param: str) -> str:
    return f"adapter {name!r} at host {host!r}, parameter {'/'.join(param)!r}"


def _check_stored(stored: Any, entries: list[md.AdapterEntry]) -> None:
    """Compares orbax's array metadata with ours, so a mismatch never reaches a restore."""
    for e in entries:
        if not isinstance(stored, dict) or not isinstance(stored.get(e.name), dict):
            raise ValueError(
                f"the adapter checkpoint has no arrays for adapter {e.name!r} (stored: "
                f"{sorted(stored) if isinstance(stored, dict) else stored!r}). A step of "
                "AdapterCheckpointManager holds a training tree: restore it with "
                "AdapterCheckpointManager.restore."
            )
        for i, h in enumerate(e.hosts):
            for info in h.params:
                node = stored[e.name]
                for key in (f"h{i}", *info.path):
                    node = node.get(key) if isinstance(node, dict) else None
                where = _where(e.name, h.path, *info.path)
                if not hasattr(node, "shape"):
                    raise ValueError(
                        f"the adapter checkpoint is corrupted: {where} is missing. Save the "
                        "adapters again."
                    )
                shape, dtype = tuple(node.shape), np.dtype(node.dtype).name
                if shape != info.shape or dtype != info.dtype:
                    raise ValueError(
                        f"the adapter checkpoint is corrupted: {where} is stored with shape "
                        f"{shape} and dtype {dtype}, but the metadata says {info.shape} "
                        f"{info.dtype}. Save the adapters again."
                    )


def read_arrays(
    where: str, meta: md.CheckpointMetadata, names: list[str], shardings: Any
) -> dict[str, dict[str, Any]]:
    """Restores adapters ``names`` of the step at ``where`` onto ``shardings``, verified.

    Returns ``{name: {host path: params}}`` fully in memory.

    Raises:
      ValueError: for shardings that do not fit, missing, truncated or corrupted files, or
        arrays that differ from the metadata in shape, dtype or checksum.
    """
    entries = [meta.get(n) for n in names]
    sharded = place(abstract_tree(meta, names), shardings)
    target = {
        e.name: {f"h{i}": sharded[e.name][h.path] for i, h in enumerate(e.hosts)} for e in entries
    }
    restore_args = jax.tree.map(
        lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype),
        target,
    )
    args = ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True)
    restored = store.restore(where, store.ARRAYS, args, lambda tree: _check_stored(tree, entries))
    out: dict[str, dict[str, Any]] = {}
    for e in entries:
        out[e.name] = {h.path: restored[e.name][f"h{i}"] for i, h in enumerate(e.hosts)}
        for h in e.hosts:
            got = dict(md.flatten(out[e.name][h.path]))
            for info in h.params:
                if info.sha256 and md.checksum(got[info.path]) not in (None, info.sha256):
                    raise ValueError(
                        f"the adapter checkpoint is corrupted: {_where(e.name, h.path, *info.path)}"
                        " fails its checksum (the data changed after it was written). Save the "
                        "adapters again."
                    )
    return out
