"""The two files of a PEFT adapter directory, written and read with bounds.

``adapter_config.json`` is a JSON object; ``adapter_model.safetensors`` is read and written by
the ``safetensors`` package (``pip install 'jadapters[interop]'``), never pickled. A file read
here is untrusted input: its size is bounded before it is read, and each tensor's claimed
shape and dtype are shown to the caller, who checks them, before its bytes are allocated.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
MAX_CONFIG_BYTES = 1 << 20
MAX_TENSORS = 100_000
MAX_KEY_CHARS = 1_000
# safetensors dtype names and the NumPy dtypes they are read as.
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _safetensors() -> tuple[Any, Any]:
    try:
        import safetensors
        import safetensors.numpy
    except ImportError:
        raise ImportError(
            "exchanging adapters with PEFT needs the safetensors package: "
            "pip install 'jadapters[interop]'."
        ) from None
    return safetensors.safe_open, safetensors.numpy.save_file


def _directory(path: Any) -> pathlib.Path:
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a directory path (str or os.PathLike), got {path!r}.")
    return pathlib.Path(path)


def write(path: Any, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> str:
    """Writes ``adapter_config.json`` and ``adapter_model.safetensors`` (metadata
    ``{"format": "pt"}``, which Hugging Face's loaders require) into directory ``path``.

    Each file is written beside its final name and then renamed over it, so a reader never
    sees half a file.
    """
    _, save_file = _safetensors()
    where = _directory(path)
    if where.exists() and not where.is_dir():
        raise ValueError(f"path {str(where)!r} exists and is not a directory; pass a directory.")
    where.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n"
    with _staged(where, WEIGHTS_NAME) as tmp:
        save_file(arrays, tmp, metadata={"format": "pt"})
    with _staged(where, CONFIG_NAME) as tmp:
        pathlib.Path(tmp).write_text(text)
    return str(where)


@contextlib.contextmanager
def _staged(where: pathlib.Path, name: str) -> Iterator[str]:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=where)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, where / name)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def read_config(path: Any) -> dict[str, Any]:
    """The JSON object in ``path/adapter_config.json`` (at most 1 MiB, standard JSON only).

    Raises:
      ValueError: for a missing directory or file, a pickled ``adapter_model.bin`` without a
        safetensors file, or a file that is too large or not a JSON object.
    """
    where = _directory(path)
    if not where.is_dir():
        raise ValueError(
            f"path {str(where)!r} is not a directory; pass the local directory that holds "
            f"{CONFIG_NAME} and {WEIGHTS_NAME} (download a hub adapter first)."
        )
    if not (where / WEIGHTS_NAME).is_file() and (where / PICKLE_NAME).exists():
        raise ValueError(
            f"{str(where / PICKLE_NAME)!r} is a pickle, which can run code when read, so it is "
            f"never loaded. In PyTorch, load it where you trust it and save it again with "
            f"model.save_pretrained(dir, safe_serialization=True) to get {WEIGHTS_NAME}."
        )
    file = where / CONFIG_NAME
    if not file.is_file():
        raise ValueError(f"{str(file)!r} is missing; a PEFT adapter directory holds {CONFIG_NAME}.")
    size = file.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValueError(
            f"{str(file)!r} has {size} bytes, more than the {MAX_CONFIG_BYTES} an adapter config "
            "may have; it is not a PEFT adapter config."
        )
    try:
        config = json.loads(file.read_bytes(), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{str(file)!r} is not valid JSON: {err}.") from None
    if not isinstance(config, dict):
        raise ValueError(f"{str(file)!r} must hold a JSON object, got {type(config).__name__}.")
    return config


class TensorFile:
    """An open ``adapter_model.safetensors``: names, claimed shapes and dtypes, then arrays."""

    def __init__(self, handle: Any, file: pathlib.Path):
        self._handle = handle
        self.file = file
        self.keys = list(handle.keys())
        if len(self.keys) > MAX_TENSORS:
            raise ValueError(f"{str(file)!r} has {len(self.keys)} tensors, over {MAX_TENSORS}.")
        for key in self.keys:
            if len(key) > MAX_KEY_CHARS:
                raise ValueError(
                    f"{str(file)!r} has a tensor name of {len(key)} characters (over "
                    f"{MAX_KEY_CHARS}): {key[:80]!r}..."
                )
        self.metadata = handle.metadata()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._handle.get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        """The claimed safetensors dtype name (``"F32"``, ``"BF16"``, ...)."""
        return str(self._handle.get_slice(key).get_dtype())

    def load(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor ``key``, after its claim is checked against ``shape`` and :data:`DTYPES`.

        Raises:
          ValueError: for another shape or dtype.
        """
        claimed, dtype = self.shape(key), self.dtype(key)
        if claimed != tuple(shape):
            raise ValueError(
                f"{key!r} in {str(self.file)!r} has shape {claimed}, expected {shape}."
            )
        if dtype not in DTYPES:
            raise ValueError(
                f"{key!r} in {str(self.file)!r} has dtype {dtype}; adapters are read as "
                f"{sorted(DTYPES)}."
            )
        return np.asarray(self._handle.get_tensor(key))


@contextlib.contextmanager
def open_tensors(path: Any, *, max_bytes: int) -> Iterator[TensorFile]:
    """``path/adapter_model.safetensors``, opened after its size is checked against
    ``max_bytes`` (safetensors itself checks that the header's offsets fit the file).

    Raises:
      ValueError: for a missing, oversized or malformed file.
    """
    safe_open, _ = _safetensors()
    file = _directory(path) / WEIGHTS_NAME
    if not file.is_file():
        raise ValueError(
            f"{str(file)!r} is missing; a PEFT adapter directory holds {WEIGHTS_NAME}."
        )
    size = file.stat().st_size
    if size > max_bytes:
        raise ValueError(
            f"{str(file)!r} has {size} bytes, more than max_bytes={max_bytes}; raise max_bytes "
            "if you trust this file."
        )
    try:
        handle = safe_open(str(file), framework="np")
    except Exception as err:  # safetensors raises its own error type for malformed files
        raise ValueError(f"{str(file)!r} is not a valid safetensors file: {err}.") from None
    with handle as opened:
        yield TensorFile(opened, file)
