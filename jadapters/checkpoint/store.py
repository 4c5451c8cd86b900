"""The on-disk layout of adapter checkpoints: steps of an orbax ``CheckpointManager``.

:func:`~jadapters.save_adapters` and :class:`~jadapters.AdapterCheckpointManager` write the
same layout (format 2)::

    path/
      2/                         one step: a version of save_adapters, a training step
        adapters/                the adapter arrays, an orbax PyTree (tensorstore OCDBT; no pickle)
          jadapters_files.json   size and SHA-256 of every other file in adapters/
        opt_state/               AdapterCheckpointManager only, if given (with its own list)
        metadata/
          metadata               jadapters metadata (plain JSON, see metadata.py)
          jadapters_files.json   its size and SHA-256
        _CHECKPOINT_METADATA     orbax's (not read)

Each list is written inside orbax's atomic commit (the item handler's ``finalize``). A reader
treats the directory as untrusted (:mod:`jadapters.checkpoint.files`): it checks an item's
files against its list (the same set of regular files, then sizes, then SHA-256) before it
parses or hands any of them to orbax, so a changed byte anywhere in what is read is an error
naming the file. The lists guard against damage, not forgery: whoever writes a checkpoint can
write matching lists, so the checks behind them (metadata fields, sizes against the model,
configs against the arrays, orbax's metadata against ours) hold for a forged one too.

Orbax writes a step into a temporary directory (``<step>.orbax-checkpoint-tmp-*``) and renames
it into place when complete (its atomic commit); only then does it prune steps beyond
``max_to_keep``, and it prunes a step by renaming it into ``path/deleting/`` (orbax's
``todelete_subdir``), which we then empty. So a listed step is always whole: a save killed at
any point leaves every listed step readable and complete, and only unlisted debris (a temporary
directory, a half-emptied ``deleting/``) that the next save removes.

One job writes a ``path`` at a time: the writer removes any temporary directory it finds,
so a second, concurrent writer would lose its save in progress (orbax's own clean-up of
temporary directories has the same limit).

In a multi-process job (``jax.distributed``), every process calls the save, as orbax asks:
each writes the shards it holds, and process 0 alone writes the metadata, the file lists
(inside orbax's commit, after orbax's barrier, so they list every process's files), removes
debris and empties ``deleting/``, with a barrier (:func:`barrier`) before the save and after
the clean-up. The path must be a file system that all processes see (one machine, NFS, a
mounted bucket); the lists are read with POSIX calls.

Readers may run beside the writer: a read pins one version and reads only its directory (no
mix of two versions); if a save prunes that version while it is read, the read starts again
on the new latest version (:func:`read_version`).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import json
import os
import pathlib
import shutil
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp

from jadapters.checkpoint import files
from jadapters.checkpoint import metadata as md

ARRAYS, OPT_STATE, METADATA = "adapters", "opt_state", "metadata"
FILES = "jadapters_files.json"
COMMIT = ocp.path.atomicity.COMMIT_SUCCESS_FILE  # orbax's marker, written after the list
DELETING = "deleting"  # pruned steps, renamed here whole, then removed
LIST_ATTEMPTS = 3  # listings of an empty-looking directory before it counts as empty
READ_ATTEMPTS = 8  # reads of a latest version that a save pruned before giving up
_T = TypeVar("_T")
_BARRIERS = itertools.count()


def primary() -> bool:
    """Whether this is the process that writes shared files (process 0; the only one in a
    single-process job)."""
    return jax.process_index() == 0


def barrier(what: str) -> None:
    """Every process of a multi-process job waits here for the others (orbax's barrier on the
    ``jax.distributed`` client); nothing in a single-process job. Every process must reach
    the same barriers in the same order."""
    if jax.process_count() > 1:
        ocp.multihost.sync_global_processes(f"jadapters_{what}_{next(_BARRIERS)}")


def _write_list(directory) -> None:
    """Writes ``FILES``: the size and SHA-256 of every other file of the item."""
    listed = files.listing(os.fspath(directory), ignore=(FILES, COMMIT))
    with open(os.path.join(directory, FILES), "w", encoding="utf-8") as f:
        json.dump(listed, f, indent=1, sort_keys=True)


class _ListedTreeHandler(ocp.PyTreeCheckpointHandler):
    """Orbax's PyTree handler that also lists its files, inside orbax's atomic commit."""

    def finalize(self, directory) -> None:
        super().finalize(directory)  # orbax's last write to the item (merges OCDBT)
        _write_list(directory)


class _ListedJsonHandler(ocp.JsonCheckpointHandler):
    """Orbax's JSON handler that also lists its file, so the metadata is checksummed too."""

    def finalize(self, directory) -> None:
        super().finalize(directory)
        _write_list(directory)


def open_manager(path: str, *, max_to_keep: int, async_save: bool = False):
    """An ``orbax.checkpoint.CheckpointManager`` writing this layout at ``path``.

    It removes nothing when opened (a manager opened to restore must not remove the temporary
    directory of a save in progress elsewhere): the writer calls :func:`clean` before it saves.
    It prunes a step by renaming it into ``path/deleting/`` in one step, so that no step is
    ever listed half-deleted; :func:`empty_deleted` then removes it.
    """
    _check_step_records(path)
    registry = ocp.DefaultCheckpointHandlerRegistry()
    for item in (ARRAYS, OPT_STATE):
        handler = _ListedTreeHandler()
        registry.add(item, ocp.args.PyTreeSave, handler)
        registry.add(item, ocp.args.PyTreeRestore, handler)
    json_handler = _ListedJsonHandler()  # the metadata, listed like the arrays
    registry.add(METADATA, ocp.args.JsonSave, json_handler)
    registry.add(METADATA, ocp.args.JsonRestore, json_handler)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=False,  # at the first save instead: see clean()
        todelete_subdir=DELETING,  # prune by rename: no step is listed half-deleted
        create=True,
    )
    return ocp.CheckpointManager(path, options=options, handler_registry=registry)


def _check_step_records(path: str) -> None:
    """Orbax reads every step's ``_CHECKPOINT_METADATA`` with a plain ``open`` when a manager
    opens: a FIFO or device there would block it for ever. Refuse anything but regular files
    (or nothing: orbax then dates the step by its directory) before orbax looks."""
    if not os.path.isdir(path):
        return
    for step in steps(path):
        record = os.path.join(path, str(step), "_CHECKPOINT_METADATA")
        if os.path.lexists(record) and (os.path.islink(record) or not os.path.isfile(record)):
            raise files.damaged(
                os.path.join(path, str(step)),
                "corrupted: _CHECKPOINT_METADATA is not a regular file",
            )


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
        if primary():
            clean(path)
        barrier("clean")
        manager.save(step, args=items)  # every process: its shards; orbax syncs and commits
    if primary():
        empty_deleted(path)
    barrier("saved")
    return os.path.join(path, str(step))


def steps(path: str) -> list[int]:
    """The saved (committed) steps at ``path``, ascending, as they are on disk now."""
    return sorted(ocp.utils.checkpoint_steps(path)) if os.path.isdir(path) else []


def clean(path: str) -> None:
    """Removes the debris of killed saves at ``path``: orbax's temporary directories (found
    with orbax's own listing) and pruned steps not yet removed. For the one writer of ``path``
    only, before it saves: another writer's save in progress would be removed too."""
    for tmp in ocp.utils.tmp_checkpoints(path):
        shutil.rmtree(os.fspath(tmp.get()), ignore_errors=True)
    empty_deleted(path)


def empty_deleted(path: str) -> None:
    """Removes the steps pruned into ``path/deleting/`` (no reader lists them any more)."""
    shutil.rmtree(os.path.join(path, DELETING), ignore_errors=True)


def read_version(path: str, version: Any, read: Callable[[Any], _T]) -> _T:
    """``read(step)`` of one saved version: ``version``, or the latest for ``None``.

    A save may prune the version a reader has picked while it reads. Pruning renames the step
    away at once, so a read that fails on a step that was listed and no longer is failed for
    that reason, not because the checkpoint is damaged: the latest version is then picked
    and read again, up to ``READ_ATTEMPTS`` times. ``read`` must read only the step it is
    given, so that a result never mixes two versions. ``read(None)`` is called when there is
    no step, to raise its own error.

    Raises:
      ValueError: what ``read`` raises on a step that is still there; for an explicit
        ``version`` pruned while it was read, or a latest version replaced on every attempt,
        an error that says so.
    """
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    for _ in range(READ_ATTEMPTS):
        listed = steps(path)
        for _ in range(LIST_ATTEMPTS):  # a listing is not a snapshot: while a save renames the
            if listed or version is not None:  # new step in and the old one out, one pass over
                break  # the directory can miss both
            listed = steps(path)
        step = version if version is not None else (listed[-1] if listed else None)
        # ``path`` may be the directory of one version (``path/<version>``): that one is read.
        own = name.isascii() and name.isdigit() and not listed and int(name) in steps(parent)
        try:
            return read(step)
        except (ValueError, OSError):
            if own and int(name) not in steps(parent):
                raise ValueError(
                    f"version {name} of the adapter checkpoint at {parent!r} was deleted while it "
                    f"was read: a newer save pruned it (keep=...). Saved versions now: "
                    f"{steps(parent)}."
                ) from None
            if step not in listed or step in steps(path):
                raise  # not a version pruned under the reader: the error is the read's own
            if version is not None:
                raise ValueError(
                    f"version {version} of the adapter checkpoint at {path!r} was deleted while "
                    f"it was read: a newer save pruned it (keep=...). Saved versions now: "
                    f"{steps(path)}."
                ) from None
    raise ValueError(
        f"the adapter checkpoint at {path!r} changed {READ_ATTEMPTS} times while it was read: "
        "each latest version was pruned by a newer save before its read ended. Read again, or "
        "read an explicit version= that is kept longer (keep=...)."
    )


def reads_one_version(function: Callable[..., _T]) -> Callable[..., _T]:
    """Decorates a reader ``function(path, ..., version=None, ...)`` with :func:`read_version`:
    it is called with ``version`` set to one saved version, retried if a save prunes it."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def pinned(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)

        def read(step):
            bound.arguments["version"] = step
            return function(*bound.args, **bound.kwargs)

        return read_version(bound.arguments["path"], bound.arguments.get("version"), read)

    return pinned


def _as_arrays(tree: Any) -> Any:
    return jax.tree.map(lambda x: x if isinstance(x, jax.Array) else np.asarray(x), tree)


def _version_of(path: str) -> int | None:
    """The version ``path`` is, when it is the directory of a saved version (what
    :func:`~jadapters.save_adapters` returns); else ``None``."""
    parent, name = os.path.split(path)
    if not (name.isascii() and name.isdigit() and name == str(int(name))):
        return None
    if not any(os.path.isdir(os.path.join(path, item)) for item in (ARRAYS, METADATA)):
        return None
    return int(name) if int(name) in steps(parent) else None


def step_dir(path: str, version: int | None = None) -> str:
    """The directory of ``version`` (default: the latest) of the checkpoint at ``path``.

    ``path`` may also be the directory of one saved version (``path/<version>``, what
    :func:`~jadapters.save_adapters` returns): that version is read.

    Raises:
      ValueError: if ``path`` holds no checkpoint, or not that version, or one of format 1,
        or the version's entry is not a directory.
    """
    path = _directory(path)
    saved = steps(path)
    if not saved:
        own = _version_of(path)
        if own is not None:
            if version not in (None, own):
                raise ValueError(
                    f"{path!r} is the directory of version {own}, but version={version!r} was "
                    f"asked for; pass the checkpoint directory {os.path.dirname(path)!r} to "
                    "choose another version."
                )
            return path
        raise ValueError(
            f"no adapter checkpoint at {path!r}: it holds no complete saved version. Write one "
            "with jadapters.save_adapters(path, model, ...)."
        )
    if version is None:
        version = saved[-1]
    if version not in saved:
        raise ValueError(f"version {version!r} is not in {path!r}; saved versions: {saved}.")
    where = os.path.join(path, str(version))
    if not os.path.isdir(where) or os.path.islink(where):
        raise ValueError(
            f"version {version} of the adapter checkpoint at {path!r} is not a directory named "
            f"{str(version)!r} there; each version is a directory {path}/<version>. Save the "
            "adapters again."
        )
    return where


def read_json(where: str) -> Any:
    """The JSON metadata item of the step at ``where``, checked against its list first and
    read as untrusted JSON (:mod:`jadapters.checkpoint.files`).

    Raises:
      ValueError: for a missing, damaged, oversized or malformed metadata item, naming the file.
    """
    if not os.path.lexists(os.path.join(where, METADATA)):
        raise ValueError(
            f"the adapter checkpoint at {where!r} has no metadata item {METADATA!r}. Save the "
            "adapters again."
        )
    verify_files(where, METADATA)
    return files.read_json(os.path.join(where, METADATA, METADATA), where)


def read_metadata(
    path: str, *, decode_configs: bool = True, version: int | None = None
) -> tuple[str, md.CheckpointMetadata]:
    """``(step directory, metadata)`` of ``version`` (default: the latest) at ``path``.

    Raises:
      ValueError: for a missing, truncated or malformed checkpoint or metadata, or (with
        ``decode_configs``) an adapter type that is not registered.
    """
    where = step_dir(path, version)
    source = os.path.join(where, METADATA, METADATA)
    return where, md.from_json(read_json(where), decode_configs=decode_configs, source=source)


def verify_files(where: str, item: str, *, hashes: bool = True) -> None:
    """Checks ``item``'s files against its list before anything reads them: the same set of
    files, all regular (no FIFO, device or link out of the step), then sizes, then hashes
    (unless ``hashes`` is false).

    Raises:
      ValueError: naming the first file that is missing, not listed, not a regular file, has
        another size or fails its checksum, or a missing or malformed list.
    """
    files.verify_listing(where, item, FILES, ignore=(COMMIT,), hashes=hashes)


def _orbax(where: str, item: str, read: Callable[[], Any]) -> Any:
    try:
        return read()
    except Exception as err:  # orbax and tensorstore raise many types for damage or a mismatch
        raise ValueError(
            f"the adapter checkpoint at {where!r} is unreadable: orbax cannot read the arrays "
            f"of item {item}/: {type(err).__name__}: {str(err)[:500]}. {files.FIX}"
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
            # the item's own metadata, from its handler: the checkpointer's would also look
            # for a step's metadata file inside the item and log that it is missing
            handler = ocp.PyTreeCheckpointHandler()
            try:
                tree = _orbax(where, item, lambda: handler.metadata(pathlib.Path(directory)).tree)
            finally:
                handler.close()
            check(tree)
        read = lambda: jax.block_until_ready(checkpointer.restore(directory, args=args))  # noqa: E731
        return _orbax(where, item, read)


def disk_bytes(where: str) -> int:
    """Bytes on disk of every file under ``where``.

    Raises:
      ValueError: if ``where`` or one of its files is gone (a save pruned the step).
    """

    def walk_error(err: OSError):
        raise err

    try:
        if not os.path.isdir(where):
            raise FileNotFoundError(f"no directory {where!r}")
        return sum(
            os.path.getsize(os.path.join(dirpath, name))
            for dirpath, _, names in os.walk(where, onerror=walk_error)
            for name in names
        )
    except OSError as err:
        raise ValueError(f"the adapter checkpoint step {where!r} is gone: {err}") from None
