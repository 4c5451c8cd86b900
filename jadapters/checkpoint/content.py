"""Content digests of base parameters that never need a parameter whole on one host.

A base sharded over a mesh (or over many processes) cannot be hashed byte by byte without
gathering it, and gathering a large model's base on one host is exactly what sharding avoids.
So the content of a parameter is digested *where it lives*, by a jitted reduction:

* each element gets a 32-bit hash in each of ``LANES`` lanes: a seeded mix (murmur3's
  finalizer) of its index along every axis and of the bits of its value (its words:
  bitcast to unsigned integers, one word for dtypes of at most 4 bytes, two for 8 bytes,
  real then imaginary part for complex dtypes);
* each lane is the sum of its element hashes modulo 2**32.

Integer sums are exact and commutative, so every device sums its shards, XLA adds the partial
sums across devices and processes, and the result is the same bit for bit whatever the mesh,
the sharding or the number of processes: a base saved from an FSDP mesh on two hosts and
checked on one device gives equal digests. Only ``LANES`` integers per parameter leave the
devices. The digest recorded is the SHA-256 of ``ALGORITHM``, the shape, the dtype name and
the lane sums.

The digest detects a different base (another seed, another fine-tune), not a forged one:
like the file lists (:mod:`jadapters.checkpoint.files`), it guards against mistakes and
damage, not against whoever writes the checkpoint. Host arrays (NumPy) are digested with
the same algorithm in NumPy (equal results: ``tests/test_partitioning.py``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ALGORITHM = "jadapters.lane-sum.v1"
LANES = 4
_SEEDS = (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)  # pi's first fractional words
_AXIS = 0x9E3779B9  # golden ratio: spreads consecutive indices
_WORD = 0x6A09E667  # sqrt(2): separates the words of one element


def _fmix(h: Any, xp: Any) -> Any:
    """murmur3's 32-bit finalizer on uint32 arrays (a bijection): ``xp`` is ``np`` or ``jnp``."""
    u = xp.uint32
    h = h ^ (h >> u(16))
    h = h * u(0x85EBCA6B)
    h = h ^ (h >> u(13))
    h = h * u(0xC2B2AE35)
    return h ^ (h >> u(16))


def _np_words(x: np.ndarray) -> list[np.ndarray]:
    x = np.asarray(x)
    if x.dtype == np.bool_:
        return [x.astype(np.uint32)]
    if np.issubdtype(x.dtype, np.complexfloating):
        return _np_words(x.real) + _np_words(x.imag)
    x = np.asarray(x, dtype=x.dtype.newbyteorder("<"), order="C")  # keeps 0-d arrays 0-d
    size = x.dtype.itemsize
    if size in (1, 2, 4):
        return [x.view(f"<u{size}").astype(np.uint32)]
    if size == 8:
        pair = x.view("<u4").reshape(*x.shape, 2)
        return [pair[..., 0], pair[..., 1]]
    raise ValueError(f"cannot digest the content of dtype {x.dtype.name}")


def _jnp_words(x: jax.Array) -> list[jax.Array]:
    if x.dtype == jnp.bool_:
        return [x.astype(jnp.uint32)]
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        return _jnp_words(jnp.real(x)) + _jnp_words(jnp.imag(x))
    size = np.dtype(x.dtype).itemsize
    if size in (1, 2, 4):
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
        return [jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)]
    if size == 8:
        pair = jax.lax.bitcast_convert_type(x, jnp.uint32)  # (..., 2), low word first
        return [pair[..., 0], pair[..., 1]]
    raise ValueError(f"cannot digest the content of dtype {np.dtype(x.dtype).name}")


def _lane_hashes(shape: Sequence[int], words: list[Any], xp: Any, iota: Any) -> list[Any]:
    u = xp.uint32
    out = []
    for seed in _SEEDS:
        h = u(seed)
        for axis in range(len(shape)):
            h = _fmix(h + iota(axis) * u(_AXIS), xp)
        for word in words:
            h = _fmix((h ^ word) + u(_WORD), xp)
        out.append(h)
    return out


def _np_lanes(x: Any) -> tuple[int, ...]:
    x = np.asarray(x)
    shape = x.shape

    def iota(axis):
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return np.arange(shape[axis], dtype=np.uint32).reshape(view)

    with np.errstate(over="ignore"):
        hashes = _lane_hashes(shape, _np_words(x), np, iota)
        return tuple(
            int(np.sum(np.broadcast_to(h, shape), dtype=np.uint64)) & 0xFFFFFFFF for h in hashes
        )


def _jnp_lanes(x: jax.Array) -> jax.Array:
    shape = x.shape

    def iota(axis):
        return jax.lax.broadcasted_iota(jnp.uint32, shape, axis)

    hashes = _lane_hashes(shape, _jnp_words(x), jnp, iota)
    return jnp.stack([jnp.sum(jnp.broadcast_to(h, shape), dtype=jnp.uint32) for h in hashes])


@jax.jit
def _lanes_of(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([_jnp_lanes(x) for x in leaves]) if leaves else jnp.zeros((0, LANES))


def _hex(shape: Sequence[int], dtype: Any, lanes: Sequence[int]) -> str:
    sha = hashlib.sha256(
        f"{ALGORITHM}|{tuple(int(d) for d in shape)}|{np.dtype(dtype).name}|".encode()
    )
    sha.update(b"".join(int(v).to_bytes(4, "big") for v in lanes))
    return sha.hexdigest()


def _host_value(out: jax.Array) -> np.ndarray:
    """The value of a small replicated result, from this process's own copy."""
    if out.is_fully_addressable:
        return np.asarray(out)
    if not out.is_fully_replicated:  # XLA replicates a full reduction; never seen otherwise
        raise ValueError("the content digest came back sharded; digest the base in one process")
    return np.asarray(out.addressable_data(0))


def digests(leaves: Sequence[Any]) -> list[str | None]:
    """The content digest (64 hex digits) of each array in ``leaves``; ``None`` for an
    abstract one (``jax.ShapeDtypeStruct``).

    JAX arrays are digested on their devices, in one compiled reduction per set of devices
    (a collective in a multi-process job: call it from every process); other arrays in
    NumPy. No array is gathered to the host.

    >>> import numpy as np, jax.numpy as jnp
    >>> x = np.arange(6, dtype=np.float32).reshape(2, 3)
    >>> a, b, c = digests([x, jnp.asarray(x), x.T])
    >>> a == b, a == c, len(a)
    (True, False, 64)
    """
    out: list[str | None] = [None] * len(leaves)
    groups: dict[Any, list[int]] = {}
    for i, x in enumerate(leaves):
        if isinstance(x, jax.ShapeDtypeStruct):
            continue
        if isinstance(x, jax.Array):
            key = frozenset(x.sharding.device_set) if x.committed else None
            groups.setdefault(key, []).append(i)
        else:
            x = np.asarray(x)
            out[i] = _hex(x.shape, x.dtype, _np_lanes(x))
    for indices in groups.values():
        lanes = _host_value(_lanes_of([leaves[i] for i in indices]))
        for row, i in zip(lanes, indices, strict=True):
            out[i] = _hex(leaves[i].shape, leaves[i].dtype, row)
    return out
