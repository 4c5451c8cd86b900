"""Reading a checkpoint's adapter arrays back: verified, onto the requested shardings.

Nothing is allocated from a file's claims before they are checked against each other and
against the model (:func:`check_claims`, from the metadata alone):

- **sizes**: each adapter array may hold at most ``max(MIN_LEAF_ELEMENTS, HOST_FACTOR * n)``
  elements, ``n`` being the base parameter elements at its host in the target model, and all
  arrays loaded together at most ``max(MIN_TOTAL_ELEMENTS, MODEL_FACTOR * N)``, ``N`` the
  model's base parameter elements. Any adapter up to several times its host's size loads;
  a file cannot make the loader allocate much more than the model it goes into. (A bound on
  the bytes of the files would not do: orbax compresses, and a freshly initialized adapter of
  zeros or ones takes almost no space.)
- **configs against arrays**: for adapter types that declare their weight schema
  (``weight_axes``; all built-in types do), the config is initialized abstractly
  (``jax.eval_shape``, no memory) at the widths the stored arrays imply, and must create
  exactly those parameter paths and shapes. So a config whose ``dim`` or ``rank`` was changed
  never reaches a front-end that would build it.

Then every stored file is checked against its listed size and SHA-256
(:func:`store.verify_files`), and orbax's own array metadata against ours. Orbax restores onto
``jax.ShapeDtypeStruct`` targets carrying the shardings, and each array is checked against its
checksum. The result is fully in memory before any model is touched.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jadapters.adapters.base import schema_widths
from jadapters.checkpoint import metadata as md
from jadapters.checkpoint import store
from jadapters.registry import build_adapter

MIN_LEAF_ELEMENTS = 2**24  # one adapter array, whatever its host
HOST_FACTOR = 4  # times the base parameter elements at the array's host
MIN_TOTAL_ELEMENTS = 2**26  # all arrays of one load, whatever the model
MODEL_FACTOR = 4  # times the model's base parameter elements


def _abstract_params(leaves: tuple[md.LeafInfo, ...]) -> dict:
    tree: dict = {}
    for info in leaves:
        node = tree
        for key in info.path[:-1]:
            node = node.setdefault(key, {})
        node[info.path[-1]] = jax.ShapeDtypeStruct(info.shape, np.dtype(info.dtype))
    return tree


def abstract_tree(meta: md.CheckpointMetadata, names: list[str]) -> dict:
    """``{name: {host path: params}}`` of ``jax.ShapeDtypeStruct`` for adapters ``names``."""
    return {
        e.name: {h.path: _abstract_params(h.params) for h in e.hosts}
        for e in (meta.get(n) for n in names)
    }


def place(abstract: Any, shardings: Any) -> Any:
    """Gives every ``ShapeDtypeStruct`` in ``abstract`` (``{name: {host: params}}``) a sharding.

    ``shardings`` is ``None`` (the default device), one ``jax.sharding.Sharding`` for all, a
    pytree of them matching ``abstract`` or a prefix of it (e.g. ``{name: sharding}``), or a
    callable ``shardings(name, host, param, x) -> Sharding`` asked once per array: ``host``
    is the host path, ``param`` the parameter's path in its adapter (``"a"``,
    ``"down/kernel"``), both ``/``-joined, and ``x`` its ``jax.ShapeDtypeStruct``.

    Raises:
      ValueError: for a tree that does not match, a leaf that is not a ``Sharding``, or a
        sharding that does not fit an array's shape (naming the adapter, host and parameter).
    """
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def is_sharding(x):
        return isinstance(x, jax.sharding.Sharding)

    if callable(shardings) and not is_sharding(shardings):
        ask = shardings
        per_leaf = jax.tree_util.tree_map_with_path(
            lambda path, x: ask(*(md.key_str(k) for k in path[:2]), _joined(path[2:]), x),
            abstract,
        )
    else:
        try:
            per_leaf = jax.tree.map(
                lambda s, sub: jax.tree.map(lambda _: s, sub),
                shardings,
                abstract,
                is_leaf=is_sharding,
            )
        except ValueError as err:
            raise ValueError(
                "shardings must be one jax.sharding.Sharding, a callable (name, host, param, x) "
                "-> Sharding, or a pytree matching the adapter tree {name: {host path: params}} "
                f"(see jadapters.abstract_adapters) or a prefix of it; the structures differ: {err}"
            ) from None

    def one(path, x, sharding):
        where = _where(*(md.key_str(k) for k in path))
        if not is_sharding(sharding):
            raise ValueError(
                f"shardings must hold jax.sharding.Sharding leaves, got {sharding!r} for {where}."
            )
        try:
            sharding.shard_shape(x.shape)
        except (ValueError, IndexError) as err:
            raise ValueError(f"shardings do not fit {where} of shape {x.shape}: {err}") from None
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(one, abstract, per_leaf)


def _joined(path: Sequence[Any]) -> str:
    return "/".join(md.key_str(k) for k in path)


def _where(name: str, host: str, *param: str) -> str:
    return f"adapter {name!r} at host {host!r}, parameter {'/'.join(param)!r}"


def _check_stored(stored: Any, entries: list[md.AdapterEntry], step: str) -> None:
    """Compares orbax's array metadata with ours, so a mismatch never reaches a restore."""
    bad = f"the adapter checkpoint at {step!r} is inconsistent:"
    ours = f"{store.METADATA}/{store.METADATA}"
    for e in entries:
        if not isinstance(stored, dict) or not isinstance(stored.get(e.name), dict):
            shown = sorted(stored)[:20] if isinstance(stored, dict) else type(stored).__name__
            raise ValueError(
                f"{bad} {store.ARRAYS}/ has no arrays for adapter {e.name!r} of {ours} "
                f"(stored: {shown}). A step of AdapterCheckpointManager holds a training tree: "
                "restore it with AdapterCheckpointManager.restore."
            )
        for i, h in enumerate(e.hosts):
            for info in h.params:
                node = stored[e.name]
                for key in (f"h{i}", *info.path):
                    node = node.get(key) if isinstance(node, dict) else None
                where = _where(e.name, h.path, *info.path)
                if not hasattr(node, "shape"):
                    raise ValueError(
                        f"{bad} {where}, listed in {ours}, is missing from {store.ARRAYS}/. Save "
                        "the adapters again."
                    )
                shape, dtype = tuple(node.shape), np.dtype(node.dtype).name
                if shape != info.shape or dtype != info.dtype:
                    raise ValueError(
                        f"{bad} {where} is stored in {store.ARRAYS}/ with shape {shape} and dtype "
                        f"{dtype}, but {ours} says {info.shape} {info.dtype}. Save the adapters "
                        "again."
                    )


def _elements(tree: Any) -> int:
    return sum(math.prod(getattr(x, "shape", ())) for x in jax.tree.leaves(tree))


def _check_sizes(view: Any, entries: Sequence[md.AdapterEntry], source: str) -> None:
    base_at: dict[str, int] = {}
    total = 0
    for e in entries:
        for h in e.hosts:
            if h.path not in base_at:
                try:
                    base_at[h.path] = _elements(view.host_base(h.path))
                except KeyError:  # a host this model lacks (no base check asked for)
                    base_at[h.path] = 0
            limit = max(MIN_LEAF_ELEMENTS, HOST_FACTOR * base_at[h.path])
            for info in h.params:
                n = md.elements(info.shape)
                total += n
                if n > limit:
                    raise ValueError(
                        f"the adapter checkpoint metadata {source!r} claims {n:,} elements "
                        f"(shape {info.shape}) for {_where(e.name, h.path, *info.path)}, more "
                        f"than the {limit:,} jadapters loads there: max({MIN_LEAF_ELEMENTS:,}, "
                        f"{HOST_FACTOR} x the {base_at[h.path]:,} base parameters at that host "
                        "in this model). The file is damaged or the adapters are not for this "
                        "model. Load them into the model they were saved from."
                    )
    base = _elements(view.base_params())
    limit = max(MIN_TOTAL_ELEMENTS, MODEL_FACTOR * base)
    if total > limit:
        raise ValueError(
            f"the adapter checkpoint metadata {source!r} claims {total:,} adapter elements in "
            f"all, more than the {limit:,} jadapters loads into this model: "
            f"max({MIN_TOTAL_ELEMENTS:,}, {MODEL_FACTOR} x its {base:,} base parameters). The "
            "file is damaged or the adapters are not for this model. Load them into the model "
            "they were saved from, or fewer adapters at a time (name=...)."
        )


def _schema_shapes(cfg: Any, leaves: Sequence[md.LeafInfo]) -> dict[tuple[str, ...], tuple]:
    """The parameter shapes ``cfg`` creates at the widths that ``leaves`` imply, initialized
    abstractly; ``{}`` for a type without a weight schema.

    Raises:
      ValueError: (a message to complete) for leaves that do not fit the schema.
    """
    module = build_adapter(cfg)
    axes = dict(getattr(module, "weight_axes", None) or {})
    if not axes:
        return {}
    # The weights of an adapter inside a scanned layer stack carry one leading layer axis
    # (of one size) beyond the schema: check one layer's shapes, then add the axis back.
    layers = {
        info.shape[0]
        for info in leaves
        if "/".join(info.path) in axes and len(info.shape) == len(axes["/".join(info.path)]) + 1
    }
    stack = ()
    if len(layers) == 1 and all(
        "/".join(i.path) in axes and len(i.shape) == len(axes["/".join(i.path)]) + 1 for i in leaves
    ):
        stack = (layers.pop(),)
        leaves = [dataclasses.replace(i, shape=tuple(i.shape[1:])) for i in leaves]
    found = schema_widths(module, {"/".join(i.path): tuple(i.shape) for i in leaves})
    if found is None:
        return {}
    width, kwargs = found
    sample = jax.ShapeDtypeStruct((1, width), jnp.float32)
    try:
        out = jax.eval_shape(lambda k, x: module.init(k, x, **kwargs), jax.random.key(0), sample)
    except Exception as err:  # an untrusted config can fail its type's own code in many ways
        raise ValueError(
            f"the config cannot be initialized at width {width}: {type(err).__name__}: "
            f"{str(err)[:300]}"
        ) from None
    return {
        tuple(path): stack + tuple(x.shape) for path, x in md.flatten(dict(out.get("params", {})))
    }


def _check_configs(entries: Sequence[md.AdapterEntry], source: str) -> None:
    cache: dict[tuple, Any] = {}
    for e in entries:
        for h in e.hosts:
            key = (
                json.dumps(e.config, sort_keys=True),
                tuple(sorted((i.path, i.shape) for i in h.params)),
            )
            if key not in cache:
                try:
                    cache[key] = _schema_shapes(e.cfg, h.params)
                except ValueError as err:
                    cache[key] = err
            expected = cache[key]
            where = f"adapter {e.name!r} at host {h.path!r}"
            if isinstance(expected, ValueError):
                raise ValueError(
                    f"the adapter checkpoint metadata {source!r} is inconsistent: the arrays "
                    f"of {where} do not fit its config {_config_text(e.config)}: {expected}. "
                    "Save the adapters again."
                ) from None
            if not expected:
                continue
            stored = {i.path: i.shape for i in h.params}
            if expected != stored:
                diff = sorted(
                    f"{'/'.join(p)}: config {expected.get(p)}, stored {stored.get(p)}"
                    for p in set(expected) | set(stored)
                    if expected.get(p) != stored.get(p)
                )
                raise ValueError(
                    f"the adapter checkpoint metadata {source!r} is inconsistent: the config "
                    f"{_config_text(e.config)} of {where} creates other parameters than the "
                    f"arrays stored ({'; '.join(diff[:4])}). Save the adapters again."
                )


def _config_text(config: dict) -> str:
    text = json.dumps(config, sort_keys=True)
    return text if len(text) <= 200 else f"{text[:180]}..."


def check_claims(view: Any, entries: Sequence[md.AdapterEntry], source: str) -> None:
    """Checks what the metadata ``source`` claims for ``entries`` before anything is
    allocated: sizes against the model in ``view``, configs against the stored shapes.

    Raises:
      ValueError: naming ``source``, the adapter, host and parameter, and the bound.
    """
    _check_sizes(view, entries, source)
    _check_configs(entries, source)


def read_arrays(
    where: str, meta: md.CheckpointMetadata, names: list[str], shardings: Any
) -> dict[str, dict[str, Any]]:
    """Restores adapters ``names`` of the step at ``where`` onto ``shardings``, verified.

    Returns ``{name: {host path: params}}`` fully in memory.

    Raises:
      ValueError: for shardings that do not fit, missing, truncated or corrupted files, or
        arrays that differ from the metadata in shape, dtype or checksum.
    """
    entries = [meta.get(n) for n in names]
    sharded = place(abstract_tree(meta, names), shardings)
    target = {
        e.name: {f"h{i}": sharded[e.name][h.path] for i, h in enumerate(e.hosts)} for e in entries
    }
    restore_args = jax.tree.map(
        lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype),
        target,
    )
    args = ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True)
    check = lambda tree: _check_stored(tree, entries, where)  # noqa: E731
    restored = store.restore(where, store.ARRAYS, args, check)
    out: dict[str, dict[str, Any]] = {}
    for e in entries:
        out[e.name] = {h.path: restored[e.name][f"h{i}"] for i, h in enumerate(e.hosts)}
        for h in e.hosts:
            got = dict(md.flatten(out[e.name][h.path]))
            for info in h.params:
                if info.sha256 and md.checksum(got[info.path]) not in (None, info.sha256):
                    raise ValueError(
                        f"the adapter checkpoint at {where!r} is corrupted: "
                        f"{_where(e.name, h.path, *info.path)} read from {store.ARRAYS}/ fails "
                        f"its checksum in {store.METADATA}/{store.METADATA} (the data changed "
                        "after it was written). Save the adapters again."
                    )
    return out
