"""The files of a checkpoint directory, read as untrusted input: bounded, regular files only.

A checkpoint can come from anywhere, so every file jadapters reads from one goes through here:

- only regular files are opened, never a FIFO, device or socket (a read from one could block
  forever or never end), and a symbolic link only when it resolves to a regular file inside the
  checkpoint's version directory;
- a file is opened without blocking and checked with ``fstat`` on the open descriptor, and
  read up to its listed or capped size, never further;
- JSON is read with a size cap (:data:`MAX_JSON_BYTES`), as strict UTF-8, without ``NaN`` or
  ``Infinity`` (nor numbers that overflow to them), without duplicate keys, and nested at most
  :data:`MAX_JSON_DEPTH` deep;
- a directory is walked without following links, at most :data:`MAX_DIR_DEPTH` deep and
  :data:`MAX_ENTRIES` entries.

Each violation is a ``ValueError`` that names the file, what is wrong with it and the fix.
Nothing here imports JAX or orbax.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Iterable
from typing import Any

MAX_JSON_BYTES = 16 * 2**20  # a JSON file of a checkpoint: metadata, a file list
MAX_JSON_DEPTH = 64  # jadapters' own JSON nests about 8 deep
MAX_DIR_DEPTH = 16  # orbax's item directories nest 3 deep
MAX_ENTRIES = 100_000  # files and directories of one item
FIX = "Save the adapters again, or load another copy."
_BLOCK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISLNK, "a symbolic link"),
)


def damaged(where: str, problem: str) -> ValueError:
    """The error for a damaged checkpoint: ``where`` is the version directory, ``problem``
    names the file (relative to it) and says what is wrong."""
    return ValueError(f"the adapter checkpoint at {where!r} is {problem}. {FIX}")


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "of an unknown kind"


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _relative(file: str, where: str) -> str:
    return os.path.relpath(file, where).replace(os.sep, "/")


def open_regular(file: str, where: str) -> tuple[int, int]:
    """``(descriptor, size)`` of ``file`` opened for reading; the caller closes it.

    ``file`` must be a regular file, or a symbolic link to a regular file inside ``where``
    (the version directory). The descriptor is checked, not the path, so a file swapped for a
    FIFO or device after the check is refused too.

    Raises:
      ValueError: naming the file, for a missing file, a link out of ``where``, or anything
        but a regular file.
    """
    rel = _relative(file, where)
    try:
        info = os.lstat(file)
    except FileNotFoundError:
        raise damaged(where, f"missing or truncated: data file {rel} does not exist") from None
    except OSError as err:
        raise damaged(where, f"unreadable: data file {rel}: {err.strerror}") from None
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    if stat.S_ISLNK(info.st_mode):
        target = os.path.realpath(file)
        if not _within(target, os.path.realpath(where)):
            raise damaged(
                where,
                f"not self-contained: data file {rel} is a symbolic link to {target!r}, outside "
                "the checkpoint (jadapters writes regular files only)",
            )
    else:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(file, flags)
    except OSError as err:
        raise damaged(where, f"unreadable: data file {rel}: {err.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise damaged(
            where,
            f"corrupted: data file {rel} is {_kind(info.st_mode)}, not a regular file "
            "(jadapters writes regular files only)",
        )
    return fd, info.st_size


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks, total = [], 0
    while total < limit:
        chunk = os.read(fd, min(_BLOCK, limit - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def read_bytes(file: str, where: str, limit: int) -> bytes:
    """The bytes of ``file`` (see :func:`open_regular`), refused if it has more than ``limit``.

    Raises:
      ValueError: naming the file and the limit.
    """
    fd, size = open_regular(file, where)
    try:
        data = b"" if size > limit else _read_at_most(fd, limit + 1)
    finally:
        os.close(fd)
    if size > limit or len(data) > limit:
        raise damaged(
            where,
            f"corrupted: data file {_relative(file, where)} has {max(size, len(data)):,} bytes, "
            f"more than the {limit:,} that jadapters reads from such a file",
        )
    return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key[:100]!r} appears twice in one object")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:40]!r} overflows to infinity")
    return value


def _depth(data: Any) -> int:
    deepest, stack = 0, [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth)
            if depth > MAX_JSON_DEPTH:
                break
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_json(data: bytes, rel: str, where: str) -> Any:
    """Strict JSON from ``data``, the bytes of file ``rel`` (named in errors).

    Raises:
      ValueError: for bytes that are not UTF-8, not JSON, JSON with ``NaN``/``Infinity``, a
        number that overflows, a duplicate key, or nesting deeper than ``MAX_JSON_DEPTH``.
    """
    try:
        text = data.decode("utf-8")
        value = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
            parse_float=_finite,
        )
    except UnicodeDecodeError as err:
        raise damaged(where, f"corrupted: data file {rel} is not UTF-8 text ({err})") from None
    except RecursionError:
        raise damaged(
            where, f"corrupted: data file {rel} nests JSON deeper than Python can parse"
        ) from None
    except ValueError as err:  # json.JSONDecodeError and the hooks' errors
        raise damaged(where, f"corrupted: data file {rel} is not valid JSON: {err}") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise damaged(
            where,
            f"corrupted: data file {rel} nests JSON more than {MAX_JSON_DEPTH} levels deep",
        )
    return value


def read_json(file: str, where: str, limit: int = MAX_JSON_BYTES) -> Any:
    """:func:`parse_json` of :func:`read_bytes`."""
    return parse_json(read_bytes(file, where, limit), _relative(file, where), where)


def walk(directory: str, where: str) -> list[str]:
    """The files under ``directory``, relative to it, with ``/``; links are not followed.

    Raises:
      ValueError: naming the entry, for anything but regular files, real directories and
        links to regular files inside ``where``; for more than ``MAX_ENTRIES`` entries or
        directories nested deeper than ``MAX_DIR_DEPTH``.
    """
    root = os.path.realpath(where)
    files: list[str] = []
    stack, entries = [(directory, "", 0)], 0
    while stack:
        current, prefix, depth = stack.pop()
        if depth > MAX_DIR_DEPTH:
            raise damaged(
                where,
                f"corrupted: directory {_relative(current, where)} is nested more than "
                f"{MAX_DIR_DEPTH} levels deep",
            )
        try:
            with os.scandir(current) as found:
                listed = list(found)
        except OSError as err:
            raise damaged(
                where, f"unreadable: directory {_relative(current, where)}: {err.strerror}"
            ) from None
        for entry in sorted(listed, key=lambda e: e.name):
            entries += 1
            if entries > MAX_ENTRIES:
                raise damaged(
                    where,
                    f"corrupted: {_relative(directory, where)} holds more than {MAX_ENTRIES:,} "
                    "entries",
                )
            rel = prefix + entry.name
            full = os.path.join(current, entry.name)
            if entry.is_symlink():
                target = os.path.realpath(full)
                inside = _within(target, root)
                if not inside or not os.path.isfile(target):
                    where_to = "outside the checkpoint" if not inside else "not a regular file"
                    raise damaged(
                        where,
                        f"not self-contained: {_relative(full, where)} is a symbolic link to "
                        f"{target!r}, {where_to} (jadapters writes regular files only)",
                    )
                files.append(rel)
            elif entry.is_dir(follow_symlinks=False):
                stack.append((full, rel + "/", depth + 1))
            elif entry.is_file(follow_symlinks=False):
                files.append(rel)
            else:
                mode = entry.stat(follow_symlinks=False).st_mode
                raise damaged(
                    where,
                    f"corrupted: {_relative(full, where)} is {_kind(mode)}, not a regular file "
                    "(jadapters writes regular files only)",
                )
    return files


def digest(file: str, where: str, size: int) -> str:
    """SHA-256 of ``file``, which must hold exactly ``size`` bytes; it reads no further.

    Raises:
      ValueError: naming the file, for another size or a file that is not regular.
    """
    fd, actual = open_regular(file, where)
    try:
        if actual != size:
            raise damaged(
                where,
                f"truncated or corrupted: data file {_relative(file, where)} has {actual} "
                f"bytes, expected {size}",
            )
        sha, left = hashlib.sha256(), size
        while left:
            chunk = os.read(fd, min(_BLOCK, left))
            if not chunk:
                break
            sha.update(chunk)
            left -= len(chunk)
        if left or os.read(fd, 1):
            raise damaged(
                where, f"corrupted: data file {_relative(file, where)} changed while it was read"
            )
        return sha.hexdigest()
    finally:
        os.close(fd)


def listing(directory: str, ignore: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """``{relative path: {"bytes": size, "sha256": digest}}`` of the files under ``directory``
    (what the writer stores as the list), leaving out ``ignore``."""
    out = {}
    for rel in sorted(set(walk(directory, directory)) - set(ignore)):
        full = os.path.join(directory, *rel.split("/"))
        size = os.path.getsize(full)
        out[rel] = {"bytes": size, "sha256": digest(full, directory, size)}
    return out


def _listed_path(rel: Any) -> bool:
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or "\0" in rel:
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def parse_listing(data: Any, rel: str, where: str) -> dict[str, tuple[int, str]]:
    """``{relative path: (bytes, sha256)}`` of a list file's JSON, validated.

    Raises:
      ValueError: naming the list, for anything but ``{path: {"bytes": int, "sha256": hex}}``
        with relative paths inside the item.
    """

    def malformed(why: str) -> ValueError:
        return damaged(where, f"corrupted: {rel} is malformed: {why}")

    if not isinstance(data, dict):
        raise malformed(f"expected an object, got {type(data).__name__}")
    if len(data) > MAX_ENTRIES:
        raise malformed(f"it lists more than {MAX_ENTRIES:,} files")
    out = {}
    for path, info in data.items():
        if not _listed_path(path):
            raise malformed(f"{path[:200]!r} is not a relative path inside the item")
        if not isinstance(info, dict) or set(info) != {"bytes", "sha256"}:
            raise malformed(f"the entry of {path!r} must be {{'bytes': ..., 'sha256': ...}}")
        size, sha = info["bytes"], info["sha256"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise malformed(f"the size of {path!r} must be a non-negative int, got {size!r}")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise malformed(f"the sha256 of {path!r} must be 64 hex digits, got {sha!r:.80}")
        out[path] = (size, sha)
    return out


def verify_listing(
    where: str, item: str, list_name: str, ignore: Iterable[str] = (), *, hashes: bool = True
) -> dict[str, tuple[int, str]]:
    """Checks the files of ``where/item`` against its list ``list_name``: the same set of
    files, then every size, then (unless ``hashes`` is false: a check that the item is whole,
    before a read that verifies it in full) every SHA-256. Returns the list.

    Raises:
      ValueError: naming the first file that is missing, not listed, not a regular file, has
        another size or fails its checksum, or a missing or malformed list.
    """
    directory = os.path.join(where, item)
    try:
        info = os.lstat(directory)
    except FileNotFoundError:
        raise damaged(where, f"missing or truncated: item {item}/ does not exist") from None
    if not stat.S_ISDIR(info.st_mode):
        raise damaged(where, f"corrupted: item {item}/ is {_kind(info.st_mode)}, not a directory")
    list_file = os.path.join(directory, list_name)
    named = f"{item}/{list_name}"
    if not os.path.lexists(list_file):
        raise damaged(where, f"missing or truncated: {named} does not exist")
    listed = parse_listing(read_json(list_file, where), named, where)
    found = set(walk(directory, where)) - {list_name, *ignore}
    unlisted = sorted(found - set(listed))
    if unlisted:
        raise damaged(where, f"corrupted: data file {item}/{unlisted[0]} is not listed in {named}")
    missing = sorted(set(listed) - found)
    if missing:
        raise damaged(
            where,
            f"missing or truncated: data file {item}/{missing[0]}, listed in {named}, does not "
            "exist",
        )
    for rel, (size, _) in sorted(listed.items()):
        try:
            actual = os.stat(os.path.join(directory, *rel.split("/"))).st_size
        except OSError as err:
            raise damaged(where, f"unreadable: data file {item}/{rel}: {err.strerror}") from None
        if actual != size:
            raise damaged(
                where,
                f"truncated or corrupted: data file {item}/{rel} has {actual} bytes, but {named} "
                f"lists {size}",
            )
    for rel, (size, sha) in sorted(listed.items()) if hashes else ():
        if digest(os.path.join(directory, *rel.split("/")), where, size) != sha:
            raise damaged(
                where,
                f"corrupted: data file {item}/{rel} fails its checksum in {named} (the one or "
                "the other changed after it was written)",
            )
    return listed
