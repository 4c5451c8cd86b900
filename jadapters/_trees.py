"""Nested dicts addressed by key paths: read, set or drop one node, copying only the dicts on
its path. Linen's variables and adapter trees are such dicts (``host/adapter/param``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def path_keys(path: str) -> list[str]:
    """The keys of a ``"/"``-joined path; none for the root ``""``.

    >>> path_keys("blocks_0/mlp"), path_keys("")
    (['blocks_0', 'mlp'], [])
    """
    return path.split("/") if path else []


def subtree(tree: Any, path: str) -> Any:
    """The node of nested dict ``tree`` at ``"/"``-joined ``path``; ``None`` where it is missing.

    >>> subtree({"blocks_0": {"mlp": {"a": 1}}}, "blocks_0/mlp")
    {'a': 1}
    """
    node = tree
    for key in path_keys(path):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def get_in(tree: Mapping, keys: Sequence[str]) -> Any:
    """The node of nested dict ``tree`` at ``keys``, which must be there (:func:`subtree`
    for a ``"/"``-joined path that may not be).

    >>> get_in({"a": {"b": 1}}, ("a", "b"))
    1
    """
    for key in keys:
        tree = tree[key]
    return tree


def set_in(tree: Mapping, keys: Sequence[str], value: Any) -> dict:
    """A copy of ``tree`` with ``value`` at ``keys`` (``value`` itself for no keys); only the
    dicts on the path are copied.

    >>> set_in({"a": {"b": 1, "c": 2}}, ["a", "b"], 3)
    {'a': {'b': 3, 'c': 2}}
    """
    if not keys:
        return value
    out = dict(tree)
    if len(keys) == 1:
        out[keys[0]] = value
        return out
    child = out.get(keys[0], {})
    out[keys[0]] = set_in(child if isinstance(child, Mapping) else {}, keys[1:], value)
    return out


def drop_in(tree: Mapping, keys: Sequence[str]) -> dict:
    """A copy of ``tree`` without the node at ``keys`` (and without dicts it leaves empty)."""
    out = dict(tree)
    if len(keys) == 1:
        out.pop(keys[0], None)
        return out
    if isinstance(out.get(keys[0]), Mapping):
        out[keys[0]] = drop_in(out[keys[0]], keys[1:])
        if not out[keys[0]]:
            del out[keys[0]]
    return out
