"""The base fingerprint: what the adapters' hosts looked like when the adapters were saved.

For each host path the fingerprint lists the host's own base parameters (names, shapes,
dtypes), excluding adapters: its *structure*, always recorded and checked by default. Saved
with ``base_content=True`` it also holds a digest of each parameter's values: its *content*,
checked whenever recorded (unless loading asks for the structure only). Loading compares it
with the target model's base at the same paths, so adapters never silently attach to a
different base: with the structure, not to a base of another shape; with the content, not to
other weights of the same shape (another seed, another fine-tune).

Neither needs the base whole on one host. The structure comes from shapes and dtypes alone
(abstract arrays will do). The content digest (:mod:`jadapters.checkpoint.content`) is a
jitted reduction over each parameter where it lives, shard by shard, exact in integers, so
it is the same for any mesh, sharding or process count: a base saved from eight devices on
two hosts checks against the same base on one device. In a multi-process job, save and load
on every process (the digest is a collective, like the orbax save).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jadapters.checkpoint import content
from jadapters.checkpoint import metadata as md

_FIX = "Load onto the base the adapters were trained on."
CHECKS = (True, False, "structure", "content")


def mode(check_base: Any) -> tuple[bool, bool | None]:
    """``(check the structure, check the content)`` for ``load_adapters``' ``check_base``;
    the content flag is ``None`` for "when recorded".

    Raises:
      ValueError: for a value that is not one of ``CHECKS``.
    """
    if not any(check_base is c or (isinstance(c, str) and check_base == c) for c in CHECKS):
        raise ValueError(
            f"check_base must be True (the structure, and the content when the checkpoint "
            f"records it), 'structure', 'content' or False, got {check_base!r}."
        )
    if check_base is False:
        return False, False
    return True, {"structure": False, "content": True}.get(check_base)


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


def compare_content(
    saved: Mapping[str, Sequence[md.LeafInfo]],
    current: Mapping[str, Any],
    source: str,
    algorithm: str | None = content.ALGORITHM,
) -> None:
    """Raises ``ValueError`` naming every base parameter whose values differ from the content
    fingerprint ``saved`` (``{host: leaves with their digests}``, recorded with ``algorithm``);
    ``current`` is ``{host: base params}`` of the target model, already of the saved
    structure (:func:`compare`). The digests are computed where the parameters live.

    Raises:
      ValueError: for differing parameters, abstract ones, or a fingerprint recorded with
        another digest algorithm.
    """
    if algorithm != content.ALGORITHM:
        raise ValueError(
            f"the content fingerprint of the checkpoint {source!r} was recorded with digest "
            f"{algorithm!r}, but this jadapters computes {content.ALGORITHM!r}: save the "
            "adapters again with base_content=True, or pass check_base='structure'."
        )
    differ, partial = [], []
    current_prints = {
        host: md.describe_base(current.get(host) or {}, content=True) for host in saved
    }
    for host, leaves in saved.items():
        now = {i.path: i for i in current_prints[host]}
        for info in leaves:
            got = now.get(info.path)
            name = f"{host}:{'/'.join(info.path)}" if host else "/".join(info.path)
            if got is None or got.sha256 is None:
                partial.append(name)
            elif got.sha256 != info.sha256:
                differ.append(name)
    if partial:
        raise ValueError(
            f"cannot check the base's content against the checkpoint {source!r}: base "
            f"parameters {partial[:5]} are abstract (jax.ShapeDtypeStruct). Check it with the "
            "base's arrays, or pass check_base='structure' to check shapes and dtypes only."
        )
    if differ:
        more = f" and {len(differ) - 10} more" if len(differ) > 10 else ""
        shown = ", ".join(differ[:10]) + more
        raise ValueError(
            f"the base does not match the checkpoint {source!r}: it was saved with the content "
            f"of its base (base_content=True), and {len(differ)} base parameters at the "
            f"adapters' hosts have other values in this model: {shown}. {_FIX} To load onto "
            "this base anyway (e.g. one fine-tuned since), pass check_base='structure'."
        )
