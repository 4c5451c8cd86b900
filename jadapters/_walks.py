"""One walk of an NNX model's graph per library operation, and the adapter revision.

Finding an NNX model's hosts, adapters and paths walks its whole graph (``nnx.iter_graph``),
and one operation asks many times: putting one adapter into a slot of two banks asked 30
times, each walk visiting every module and variable of the model (a merge asked 175 times).
Inside :func:`shared` (the slot functions, adapter checkpoints, merges and PEFT exchange run
in it), a model is walked once per adapter revision; outside it, every walk is fresh, so
that a user's own changes to the graph between calls are always seen.

The revision is a number that changes whenever any module's adapters are added, removed,
enabled or disabled: a cheap token for caches of a model's graph (this one, and the split of
the NNX compiled calls).
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from typing import Any, TypeVar

from flax import nnx

_F = TypeVar("_F", bound=Callable[..., Any])
_REVISION = [0]
# {id(root): (root, revision, [walk, index])} while a shared operation runs; None otherwise
_WALKS: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "jadapters_walks", default=None
)


def revision() -> int:
    """The adapter revision (see the module docstring)."""
    return _REVISION[0]


def bump() -> None:
    """Marks a change of adapters: every shared walk and cached split is stale."""
    _REVISION[0] += 1


def iter_graph(root: Any) -> Any:
    """``nnx.iter_graph(root)``: inside :func:`shared`, walked once per adapter revision.

    >>> from flax import nnx
    >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> [path for path, _ in iter_graph(model)][-1]
    ()
    """
    walks = _WALKS.get()
    if walks is None:
        return nnx.iter_graph(root)
    return _walk(walks, root)[0]


def paths_by_id(root: Any) -> dict[int, tuple]:
    """``{id(node): path}`` of every node of ``root``'s graph (each node's first path);
    inside :func:`shared`, built once per adapter revision."""
    walks = _WALKS.get()
    if walks is None:
        return _index(nnx.iter_graph(root))
    walk = _walk(walks, root)
    if walk[1] is None:
        walk[1] = _index(walk[0])
    return walk[1]


def _index(walk: Any) -> dict[int, tuple]:
    index: dict[int, tuple] = {}
    for path, node in walk:
        index.setdefault(id(node), tuple(path))
    return index


def _walk(walks: dict, root: Any) -> list:
    """``[walk, index or None]`` of ``root`` at the current revision."""
    hit = walks.get(id(root))
    if hit is None or hit[0] is not root or hit[1] != revision():
        hit = walks[id(root)] = (root, revision(), [list(nnx.iter_graph(root)), None])
    return hit[2]


def shared(function: _F) -> _F:
    """Runs ``function`` with one walk of each model's graph per adapter revision."""

    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        if _WALKS.get() is not None:
            return function(*args, **kwargs)
        token = _WALKS.set({})
        try:
            return function(*args, **kwargs)
        finally:
            _WALKS.reset(token)

    return run  # type: ignore[return-value]
