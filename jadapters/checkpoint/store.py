"""The on-disk layout of adapter checkpoints: steps of an orbax ``CheckpointManager``.

:func:`~jadapters.save_adapters` and :class:`~jadapters.AdapterCheckpointManager` write the
same layout (format 2)::

    path/
      2/                         one step: a version of save_adapters, a training step
        adapters/                the adapter arrays, an orbax PyTree (tensorstore OCDBT; no pickle)
          jadapters_files.json   size and SHA-256 of every other file in adapters/
        opt_state/               AdapterCheckpointManager only, if given (with its own list)
        metadata/metadata        jadapters metadata (plain JSON, see metadata.py)
        _CHECKPOINT_METADATA     orbax's

Orbax writes a step into a temporary directory and renames it into place when complete (its
atomic commit); only then does it delete steps beyond ``max_to_keep``. A save killed at any
point leaves the earlier steps readable, and the next save removes its temporary directory.
One process writes a ``path`` at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jadapters.checkpoint import metadata as md

ARRAYS, OPT_STATE, METADATA = "adapters", "opt_state", "metadata"
FILES = "jadapters_files.json"


def _digest(file: str) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: str) -> set[str]:
    """The files under ``directory`` but the list and orbax's commit marker, relative, ``/``."""
    return {
        os.path.relpath(os.path.join(dirpath, name), directory).replace(os.sep, "/")
        for dirpath, _, names in os.walk(directory)
        for name in names
    } - {FILES, ocp.path.atomicity.COMMIT_SUCCESS_FILE}


class _ListedTreeHandler(ocp.PyTreeCheckpointHandler):
    """Orbax's PyTree handler that also lists its files, inside orbax's atomic commit."""

    def finalize(self, directory) -> None:
        super().finalize(directory)  # orbax's last write to the item (merges OCDBT)
        full = {rel: os.path.join(directory, *rel.split("/")) for rel in _files(directory)}
        files = {r: {"bytes": os.path.getsize(f), "sha256": _digest(f)} for r, f in full.items()}
        with open(os.path.join(directory, FILES), "w", encoding="utf-8") as f:
            json.dump(files, f, indent=1, sort_keys=True)


def open_manager(path: str, *, max_to_keep: int, async_save: bool = False):
    """An ``orbax.checkpoint.CheckpointManager`` writing this layout at ``path``."""
    registry = ocp.DefaultCheckpointHandlerRegistry()
    for item in (ARRAYS, OPT_STATE):
        handler = _ListedTreeHandler()
        registry.add(item, ocp.args.PyTreeSave, handler)
        registry.add(item, ocp.args.PyTreeRestore, handler)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,  # debris of a killed save
        create=True,
    )
    return ocp.CheckpointManager(path, options=options, handler_registry=registry)


def _directory(path: str) -> str:
    path = os.path.abspath(os.fspath(path))
    if os.path.isfile(os.path.join(path, "CHECKPOINT")):  # format 1's pointer file
        raise ValueError(f"cannot use the adapter checkpoint at {path!r}: {md.FORMAT_1_HELP}")
    return path


def write(
    path: str,
    meta: md.CheckpointMetadata,
    arrays: Mapping[str, Mapping[str, Any]],
    *,
    keep: int = 1,
) -> str:
    """Writes a new version (step) at ``path``, keeping the last ``keep``; returns its directory.

    ``arrays`` is ``{adapter name: {host path: params}}``; on disk the hosts of each adapter are
    keyed ``h0, h1, ...`` in metadata order.

    Raises:
      ValueError: for a ``path`` that is a file or a format-1 checkpoint, or a bad ``keep``.
    """
    path = _directory(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"path must be a directory for an adapter checkpoint, got file {path!r}.")
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        raise ValueError(f"keep must be a positive int (versions to keep), got {keep!r}.")
    tree = {
        e.name: {f"h{i}": _as_arrays(arrays[e.name][h.path]) for i, h in enumerate(e.hosts)}
        for e in meta.adapters
    }
    items = ocp.args.Composite(
        **{ARRAYS: ocp.args.PyTreeSave(tree), METADATA: ocp.args.JsonSave(md.to_json(meta))}
    )
    with open_manager(path, max_to_keep=keep) as manager:
        step = (manager.latest_step() or 0) + 1
        manager.save(step, args=items)
    return os.path.join(path, str(step))


def _as_arrays(tree: Any) -> Any:
    return jax.tree.map(lambda x: x if isinstance(x, jax.Array) else np.asarray(x), tree)


def step_dir(path: str, version: int | None = None) -> str:
    """The directory of ``version`` (default: the latest) of the checkpoint at ``path``.

    Raises:
      ValueError: if ``path`` holds no checkpoint, or not that version, or one of format 1.
    """
    path = _directory(path)
    steps = sorted(ocp.utils.checkpoint_steps(path)) if os.path.isdir(path) else []
    if not steps:
        raise ValueError(
            f"no adapter checkpoint at {path!r}: it holds no complete saved version. Write one "
            "with jadapters.save_adapters(path, model, ...)."
        )
    if version is None:
        version = steps[-1]
    if version not in steps:
        raise ValueError(f"version {version!r} is not in {path!r}; saved versions: {steps}.")
    return os.path.join(path, str(version))


def read_json(where: str) -> Any:
    """The JSON metadata item of the step at ``where``."""
    file = os.path.join(where, METADATA)
    try:
        with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
            return checkpointer.restore(file, args=ocp.args.JsonRestore())
    except FileNotFoundError:
        raise ValueError(
            f"the adapter checkpoint at {where!r} has no metadata item {METADATA!r}. Save the "
            "adapters again."
        ) from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(
            f"the adapter checkpoint metadata {file!r} is corrupted (not valid JSON): {err}. "
            "Save the adapters again."
        ) from None


def read_metadata(
    path: str, *, decode_configs: bool = True, version: int | None = None
) -> tuple[str, md.CheckpointMetadata]:
    """``(step directory, metadata)`` of ``version`` (default: the latest) at ``path``.

    Raises:
      ValueError: for a missing, truncated or malformed checkpoint or metadata, or (with
        ``decode_configs``) an adapter type that is not registered.
    """
    where = step_dir(path, version)
    return where, md.from_json(read_json(where), decode_configs=decode_configs)


def verify_files(where: str, item: str) -> None:
    """Checks ``item``'s files against its list, sizes before hashes, before orbax reads them.

    Raises:
      ValueError: naming the first file that is missing, not listed, has another size or
        fails its checksum, or a missing or malformed list.
    """
    directory = os.path.join(where, item)
    bad = f"the adapter checkpoint at {where!r} is"
    fix = "Save the adapters again, or load another copy."
    try:
        with open(os.path.join(directory, FILES), encoding="utf-8") as f:
            files = json.load(f)
        listed = [(str(p), int(i["bytes"]), str(i["sha256"])) for p, i in files.items()]
    except FileNotFoundError:
        raise ValueError(
            f"{bad} missing or truncated: {item}/{FILES} does not exist. {fix}"
        ) from None
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as err:
        raise ValueError(f"{bad} corrupted: {item}/{FILES} is malformed: {err}. {fix}") from None
    unlisted = sorted(_files(directory) - {rel for rel, _, _ in listed})
    if unlisted:
        raise ValueError(f"{bad} corrupted: data file {item}/{unlisted[0]} is not listed. {fix}")
    for rel, size, _ in listed:
        full = os.path.join(directory, *rel.split("/"))
        if not os.path.isfile(full):
            raise ValueError(
                f"{bad} missing or truncated: data file {item}/{rel} does not exist. {fix}"
            )
        if os.path.getsize(full) != size:
            raise ValueError(
                f"{bad} truncated or corrupted: data file {item}/{rel} has "
                f"{os.path.getsize(full)} bytes, expected {size}. {fix}"
            )
    for rel, _, digest in listed:
        if _digest(os.path.join(directory, *rel.split("/"))) != digest:
            raise ValueError(f"{bad} corrupted: data file {item}/{rel} fails its checksum. {fix}")


def _orbax(where: str, item: str, read: Callable[[], Any]) -> Any:
    try:
        return read()
    except Exception as err:  # orbax and tensorstore raise many types for damage or a mismatch
        raise ValueError(
            f"the adapter checkpoint arrays in {os.path.join(where, item)!r} cannot be read: "
            f"{type(err).__name__}: {str(err)[:500]}"
        ) from None


def restore(
    where: str,
    item: str,
    args: ocp.args.PyTreeRestore,
    check: Callable[[Any], None] | None = None,
) -> Any:
    """Restores ``item`` of the step at ``where`` with orbax, verified, fully in memory.

    Its files are checked first (:func:`verify_files`); then ``check``, if given, sees orbax's
    metadata tree (shapes and dtypes as stored) before any array is read.

    Raises:
      ValueError: for damaged files, a failed ``check``, or anything orbax cannot restore.
    """
    verify_files(where, item)
    directory = os.path.join(where, item)
    with ocp.PyTreeCheckpointer() as checkpointer:
        if check is not None:
            check(_orbax(where, item, lambda: checkpointer.metadata(directory).item_metadata.tree))
        read = lambda: jax.block_until_ready(checkpointer.restore(directory, args=args))  # noqa: E731
        return _orbax(where, item, read)


def disk_bytes(where: str) -> int:
    """Bytes on disk of every file under ``where``."""
    return sum(
        os.path.getsize(os.path.join(dirpath, name))
        for dirpath, _, names in os.walk(where)
        for name in names
    )
