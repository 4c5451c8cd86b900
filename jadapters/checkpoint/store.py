"""The on-disk layout of an adapter checkpoint, and writing it so that a crash loses nothing.

A checkpoint ``path`` is a directory::

    path/
      CHECKPOINT           pointer: {"format": ..., "version": "v000002"}
      v000002/             one immutable version
        metadata.json      jadapters metadata (plain JSON), listing every file under
                           arrays/ with its size and SHA-256
        arrays/            the arrays, written by orbax (tensorstore OCDBT; no pickle)

A save writes a new version into a temporary directory, flushes it to disk, renames it into
place, then replaces the pointer atomically (temporary file, ``fsync``, ``os.replace``). Only
after the pointer has moved are older versions removed. A save killed at any point therefore
leaves the previous checkpoint readable; a later save clears the debris. One writer at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jadapters.checkpoint import metadata as md

POINTER = "CHECKPOINT"
METADATA_FILE = "metadata.json"
ARRAYS_DIR = "arrays"
_VERSION = re.compile(r"^v(\d{6,})$")
_TMP_PREFIX = ".tmp-"


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(dirpath)


def _write_json_atomic(path: str, data: Any) -> None:
    tmp = f"{path}{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _versions(path: str) -> list[tuple[int, str]]:
    out = []
    for entry in os.listdir(path):
        match = _VERSION.match(entry)
        if match and os.path.isdir(os.path.join(path, entry)):
            out.append((int(match.group(1)), entry))
    return sorted(out)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_debris(path: str, keep: str) -> None:
    """Removes old versions and temporary entries left by saves that died."""
    for _, entry in _versions(path):
        if entry != keep:
            shutil.rmtree(os.path.join(path, entry), ignore_errors=True)
    for entry in os.listdir(path):
        if _TMP_PREFIX not in entry:
            continue
        match = re.search(re.escape(_TMP_PREFIX) + r"(\d+)-", entry)
        if match and int(match.group(1)) != os.getpid() and _pid_alive(int(match.group(1))):
            continue  # another live process is writing it
        target = os.path.join(path, entry)
        if os.path.isdir(target):
            shutil.rmtree(target, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(target)


def disk_tree(meta: md.CheckpointMetadata, arrays: Mapping[str, Mapping[str, Any]]) -> dict:
    """``{name: {host path: params}}`` as stored: hosts keyed ``h0, h1, ...`` in metadata order."""
    return {
        e.name: {f"h{i}": arrays[e.name][h.path] for i, h in enumerate(e.hosts)}
        for e in meta.adapters
        if e.name in arrays
    }


def write(path: str, meta: md.CheckpointMetadata, arrays: Mapping[str, Mapping[str, Any]]) -> str:
    """Writes a new version of the checkpoint at ``path``; returns the version's directory."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"path must be a directory for an adapter checkpoint, got file {path!r}.")
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}")
    os.makedirs(tmp)
    try:
        tree = jax.tree.map(_as_array, disk_tree(meta, arrays))
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(os.path.join(tmp, ARRAYS_DIR), tree)
            checkpointer.wait_until_finished()
        meta = dataclasses.replace(meta, files=_manifest(tmp))
        with open(os.path.join(tmp, METADATA_FILE), "w", encoding="utf-8") as f:
            json.dump(md.to_json(meta), f, indent=1, sort_keys=True)
        _fsync_tree(tmp)
        versions = _versions(path)
        number = versions[-1][0] + 1 if versions else 1
        while True:
            version = f"v{number:06d}"
            try:
                os.mkdir(os.path.join(path, version))  # claims the name
            except FileExistsError:
                number += 1
                continue
            break
        os.rename(tmp, os.path.join(path, version))  # replaces the empty claim atomically
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path)
    _write_json_atomic(os.path.join(path, POINTER), {"format": md.FORMAT_NAME, "version": version})
    _remove_debris(path, keep=version)
    return os.path.join(path, version)


def file_digest(file: str) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(where: str) -> tuple[md.FileInfo, ...]:
    """Size and SHA-256 of every file orbax wrote, relative to the version directory."""
    files = []
    for dirpath, _, names in os.walk(os.path.join(where, ARRAYS_DIR)):
        for name in names:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, where).replace(os.sep, "/")
            files.append(md.FileInfo(rel, os.path.getsize(full), file_digest(full)))
    return tuple(sorted(files, key=lambda f: f.path))


def _as_array(x: Any) -> Any:
    return x if isinstance(x, jax.Array) else np.asarray(x)


def version_dir(path: str) -> str:
    """The directory of the version the pointer names.

    Raises:
      ValueError: if ``path`` holds no adapter checkpoint or its pointer is damaged.
    """
    path = os.path.abspath(os.fspath(path))
    pointer = os.path.join(path, POINTER)
    if not os.path.isfile(pointer):
        raise ValueError(
            f"no adapter checkpoint at {path!r}: it has no {POINTER!r} file. Write one with "
            "jadapters.save_adapters(path, model, ...)."
        )
    try:
        with open(pointer, encoding="utf-8") as f:
            data = json.load(f)
        version = data["version"]
        if data.get("format") != md.FORMAT_NAME or not _VERSION.match(version):
            raise ValueError(f"unexpected content {data!r}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"the adapter checkpoint pointer {pointer!r} is corrupted: {err}"
        ) from None
    target = os.path.join(path, version)
    if not os.path.isdir(target):
        raise ValueError(
            f"the adapter checkpoint at {path!r} is incomplete: its pointer names version "
            f"{version!r}, which does not exist."
        )
    return target


def read_metadata(path: str, *, decode_configs: bool = True) -> tuple[str, md.CheckpointMetadata]:
    """``(version directory, metadata)`` of the checkpoint at ``path``.

    Raises:
      ValueError: for a missing, truncated or malformed checkpoint or metadata, or (with
        ``decode_configs``) an adapter type that is not registered.
    """
    where = version_dir(path)
    file = os.path.join(where, METADATA_FILE)
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"the adapter checkpoint at {path!r} has no {METADATA_FILE}.") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(
            f"the adapter checkpoint metadata {file!r} is corrupted (not valid JSON): {err}"
        ) from None
    return where, md.from_json(data, decode_configs=decode_configs)


def disk_bytes(where: str) -> int:
    """Bytes on disk of every file under ``where``."""
    total = 0
    for dirpath, _, files in os.walk(where):
        for name in files:
            total += os.path.getsize(os.path.join(dirpath, name))
    return total
