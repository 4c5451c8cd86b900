"""The base fingerprint: what the adapters' hosts looked like when the adapters were saved.

For each host path the fingerprint lists the host's own base parameters (names, shapes,
dtypes), excluding adapters. Loading compares it with the target model's base at the same
paths, so adapters never silently attach to a different base.
"""

from __future__ import annotations

from collections.abc import Sequence

from jadapters.checkpoint import metadata as md

_FIX = "Load onto the base the adapters were trained on."


def compare(host: str, saved: Sequence[md.LeafInfo], current: Sequence[md.LeafInfo]) -> None:
    """Raises ``ValueError`` naming ``host`` unless the base parameters match the fingerprint."""
    have = {i.path: i for i in current}
    want = {i.path: i for i in saved}
    for path, info in want.items():
        name, now = "/".join(path), have.get(path)
        if now is None:
            raise ValueError(
                f"the base does not match the checkpoint: host {host!r} has no parameter "
                f"{name!r} (saved shape {info.shape}, dtype {info.dtype}); it has "
                f"{sorted('/'.join(p) for p in have)}. {_FIX}"
            )
        if (now.shape, now.dtype) != (info.shape, info.dtype):
            raise ValueError(
                f"the base does not match the checkpoint at host {host!r}: parameter {name!r} "
                f"has shape {now.shape} and dtype {now.dtype} in this model, but shape "
                f"{info.shape} and dtype {info.dtype} in the checkpoint's base. {_FIX}"
            )
    extra = sorted("/".join(p) for p in set(have) - set(want))
    if extra:
        raise ValueError(
            f"the base does not match the checkpoint: host {host!r} has parameters {extra} "
            f"that the checkpoint's base did not have. {_FIX}"
        )
