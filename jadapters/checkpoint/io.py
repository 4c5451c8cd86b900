"""``save_adapters`` / ``load_adapters``: adapter-only checkpoints of Linen and NNX models.

Only the adapter partition is written, as orbax arrays beside JSON metadata (see
:mod:`jadapters.checkpoint.metadata`); nothing is pickled. Adapters are selected by their
*exact* name (NeMo selects by substring, so saving ``an4`` also writes ``an4_v2``; we do not).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jadapters.checkpoint import arrays, store
from jadapters.checkpoint import metadata as md
from jadapters.checkpoint.fingerprint import compare as compare_fingerprint
from jadapters.view import AdapterView, AdapterWeights, requested_names, view_of

NameLike = str | Sequence[str] | None


def _select(available: Sequence[tuple[str, str]], name: NameLike, where: str) -> list[str]:
    """Exact-name selection from ``[(name, group), ...]``; ``"group:name"`` checks the group."""
    groups = dict(available)
    requested = requested_names(name)
    if requested is None:
        return [n for n, _ in available]
    out = []
    for item in requested:
        group, sep, bare = item.rpartition(":")
        if bare not in groups:
            raise ValueError(
                f"name {item!r} is not an adapter of {where}; available: "
                f"{[f'{g}:{n}' if g else n for n, g in available]}. Names match exactly."
            )
        if sep and group != groups[bare]:
            raise ValueError(
                f"name {item!r} names adapter module {group!r}, but adapter {bare!r} of "
                f"{where} is in module {groups[bare]!r}."
            )
        out.append(bare)
    return out


def _collect(model: Any, variables: Any, name: NameLike):
    view = view_of(model, variables)
    specs = view.specs()
    if not len(specs):
        raise ValueError("the model has no adapters to save; add one with add_adapter first.")
    names = _select([(s.name, s.group) for s in specs], name, "the model")
    chosen = view.weights([s for s in specs if s.name in names])
    fingerprint = {host: view.host_base(host) for item in chosen for host in item.hosts}
    return view, [(item.spec, dict(item.hosts)) for item in chosen], fingerprint


def _check(view: AdapterView, entries, fingerprint, *, replace: bool, check_base: bool) -> None:
    """Raises ``ValueError`` if ``entries`` cannot go into the viewed model (nothing changes)."""
    groups = view.groups()
    existing = view.specs()
    for entry in entries:
        if entry.group not in groups:
            raise ValueError(
                f"adapter {entry.name!r} belongs to adapter module {entry.group!r}, which this "
                f"model does not have; its modules are {groups}. Adapt the model with that "
                "group in adapter_transform's targets."
            )
        if existing.get(entry.name) is not None and not replace:
            raise ValueError(
                f"adapter {entry.name!r} already exists in the model; pass replace=True to "
                "overwrite it or remove it first."
            )
        view.check_hosts(entry.spec(), [h.path for h in entry.hosts])
    if check_base:
        for host, saved in fingerprint.items():
            try:
                current = view.host_base(host)
            except KeyError:
                current = None
            if not current and saved:
                raise ValueError(
                    f"the base does not match the checkpoint: it has no parameters at host "
                    f"{host!r}, where the checkpoint's base has "
                    f"{[('/'.join(i.path), i.shape) for i in saved]}."
                )
            compare_fingerprint(host, saved, md.describe_leaves(current or {}, checksums=False))


def save_adapters(
    path: str, model: Any, variables: Any = None, *, name: NameLike = None, keep: int = 1
) -> str:
    """Writes the adapters of ``model``, and only those, to the checkpoint directory ``path``.

    Beside the arrays goes JSON metadata: each adapter's config, group, insertion, enabled
    state, host paths and parameter shapes, dtypes and checksums; the library and format
    versions; and a fingerprint of the base at each host (its parameters' names, shapes and
    dtypes), which :func:`load_adapters` checks. Writing is crash-safe: a save killed part-way
    leaves the previous checkpoint at ``path`` intact. One process writes a given ``path`` at a
    time (in a multi-host job, save from one process, with the adapters fully addressable).

    Args:
      path: the checkpoint directory (an orbax ``CheckpointManager`` directory: one step per
        version); created if needed. Each save writes a new version atomically.
      model: an adapted model: an :class:`~jadapters.AdaptedLinen` or an adapted NNX model.
      variables: the Linen model's variables (at least ``{"params": ..., "adapters": ...}``);
        ``None`` for NNX.
      name: ``None`` for every adapter, or an exact name (``"name"`` or ``"group:name"``) or a
        list of them.
      keep: how many versions to keep; older ones are deleted once the new one is
        complete (default 1: a save replaces the previous checkpoint).

    Returns:
      The directory of the version written.

    Raises:
      ValueError: for an unknown name, a model without adapters or weights, or a wrong
        ``variables`` argument.

    >>> import tempfile, jax, jax.numpy as jnp, flax.linen as nn, jadapters
    >>> model = jadapters.adapter_transform(nn.Sequential([nn.Dense(4)]), "layers_0")
    >>> model = model.add_adapter("task", jadapters.LinearAdapterConfig(dim=2))
    >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> path = tempfile.mkdtemp()
    >>> _ = jadapters.save_adapters(path, model, variables)
    >>> fresh = jadapters.adapter_transform(nn.Sequential([nn.Dense(4)]), "layers_0")
    >>> fresh, new = jadapters.load_adapters(path, fresh, {"params": variables["params"]})
    >>> fresh.get_enabled_adapters()
    ['task']
    """
    view, adapters, fingerprint = _collect(model, variables, name)
    meta = md.build_metadata(adapters, fingerprint, framework=view.framework, checksums=True)
    return store.write(path, meta, {spec.name: hosts for spec, hosts in adapters}, keep=keep)


def adapter_metadata(model: Any, variables: Any = None, *, name: NameLike = None) -> dict:
    """The JSON metadata :func:`save_adapters` would write for ``model``, without checksums.

    Store it beside a training checkpoint (:class:`~jadapters.AdapterCheckpointManager`) so
    that the arrays there can be told apart and checked against a base later.

    Args:
      model, variables, name: as :func:`save_adapters`.

    Returns:
      A JSON-ready dict.
    """
    view, adapters, fingerprint = _collect(model, variables, name)
    meta = md.build_metadata(adapters, fingerprint, framework=view.framework, checksums=False)
    return md.to_json(meta)


def read_adapter_metadata(path: str, *, version: int | None = None) -> dict:
    """The validated JSON metadata of the adapter checkpoint at ``path``; no model needed.

    Adapter types need not be registered to read it.

    Raises:
      ValueError: for a missing or corrupted checkpoint or metadata.
    """
    where, meta = store.read_metadata(path, decode_configs=False, version=version)
    data = md.to_json(meta)
    data["version_dir"] = where
    data["disk_bytes"] = store.disk_bytes(where)
    return json.loads(json.dumps(data))


def abstract_adapters(path: str, *, name: NameLike = None, version: int | None = None) -> dict:
    """The arrays of the checkpoint at ``path`` as ``jax.ShapeDtypeStruct``.

    The tree is ``{adapter name: {host path: params}}``; build the ``shardings`` argument of
    :func:`load_adapters` from it, e.g. ``jax.tree.map(lambda x: my_sharding(x.shape), tree)``.

    Raises:
      ValueError: for a missing or corrupted checkpoint, or an unknown name.
    """
    _, meta = store.read_metadata(path, decode_configs=False, version=version)
    names = _select([(e.name, e.group) for e in meta.adapters], name, "the checkpoint")
    return arrays.abstract_tree(meta, names)


def load_adapters(
    path: str,
    model: Any,
    variables: Any = None,
    *,
    name: NameLike = None,
    replace: bool = False,
    shardings: Any = None,
    check_base: bool = True,
    rngs: Any = None,
    version: int | None = None,
) -> Any:
    """Loads adapters saved by :func:`save_adapters` into ``model``.

    Everything is read into memory and checked before the model is touched: the metadata,
    every array against its shape, dtype and checksum, the adapter types against the
    registry, the adapter modules (groups) against ``model.adapter_module_names``, and the
    base at each host against the saved fingerprint. Dtypes are kept exactly. Loading several
    checkpoints one after another adds up their adapters.

    Args:
      path: the checkpoint directory.
      model: an adapted Linen (:class:`~jadapters.AdaptedLinen`) or NNX model.
      variables: the Linen model's variables (at least ``{"params": ...}``); ``None`` for NNX.
      name: ``None`` loads exactly what was saved; an exact name (a bare name resolves to its
        group through the metadata) or a list of them loads those.
      replace: overwrite adapters of the same name already in the model; else that is an error.
      shardings: where the arrays go: ``None`` (the default device), one
        ``jax.sharding.Sharding`` for all, or a pytree of them matching
        :func:`abstract_adapters` (``{name: {host path: params}}``) or a prefix of it.
      check_base: verify the base against the checkpoint's fingerprint.
      rngs: NNX only: streams for the adapters' ``dropout``; default ``nnx.Rngs(0)``.
      version: the version to read; ``None`` for the latest.

    Returns:
      Linen: ``(new_model, new_variables)``; the inputs are unchanged. NNX: ``model``,
      changed in place.

    Raises:
      ValueError: for a missing, truncated or corrupted checkpoint, an unregistered adapter
        type, an unknown name or adapter module, a name already in the model (without
        ``replace``), or a base that does not match the fingerprint (naming the host path and
        both shapes). The model is unchanged then.
    """
    view = view_of(model, variables)
    where, meta = store.read_metadata(path, version=version)
    names = _select([(e.name, e.group) for e in meta.adapters], name, "the checkpoint")
    entries = [meta.get(n) for n in names]
    hosts = list(dict.fromkeys(h.path for e in entries for h in e.hosts))
    if check_base:
        unknown = [p for p in hosts if p not in meta.fingerprint]
        if unknown:
            raise ValueError(
                "adapter checkpoint metadata is malformed: no base fingerprint for hosts "
                f"{unknown}."
            )
    fingerprint = {p: meta.fingerprint.get(p, ()) for p in hosts}
    _check(view, entries, fingerprint, replace=replace, check_base=check_base)
    loaded = arrays.read_arrays(where, meta, names, shardings)
    if shardings is None:
        # Uncommitted, like arrays from init: a function compiled on those runs these as is.
        loaded = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), loaded)
    return view.insert([AdapterWeights(e.spec(), loaded[e.name]) for e in entries], rngs=rngs)
