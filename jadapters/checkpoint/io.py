"""``save_adapters`` / ``load_adapters``: adapter-only checkpoints of Linen and NNX models.

Only the adapter partition is written, as orbax arrays beside JSON metadata (see
:mod:`jadapters.checkpoint.metadata`); nothing is pickled. Adapters are selected by their
*exact* name (NeMo selects by substring, so saving ``an4`` also writes ``an4_v2``; we do not).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jadapters._walks import shared
from jadapters.checkpoint import arrays, store
from jadapters.checkpoint import fingerprint as base_check
from jadapters.checkpoint import metadata as md
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
    """Raises ``ValueError`` if ``entries`` cannot go into the viewed model (nothing changes).

    Checks the groups, names and hosts; with ``check_base`` the structure of the base at the
    hosts against the fingerprint ``{host: leaves}``.
    """
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
            current = _host_base(view, host)
            if not current and saved:
                raise ValueError(
                    f"the base does not match the checkpoint: it has no parameters at host "
                    f"{host!r}, where the checkpoint's base has "
                    f"{[('/'.join(i.path), i.shape) for i in saved]}."
                )
            base_check.compare(host, saved, md.describe_leaves(current or {}, checksums=False))


def _host_base(view: AdapterView, host: str) -> Any:
    try:
        return view.host_base(host)
    except KeyError:
        return None


@shared
def save_adapters(
    path: str,
    model: Any,
    variables: Any = None,
    *,
    name: NameLike = None,
    keep: int = 1,
    base_content: bool = False,
) -> str:
    """Writes the adapters of ``model``, and only those, to the checkpoint directory ``path``.

    Beside the arrays goes JSON metadata: each adapter's config, group, insertion, enabled
    state, host paths and parameter shapes, dtypes and checksums; the library and format
    versions; and a fingerprint of the base at each host (its parameters' names, shapes and
    dtypes and, with ``base_content``, a digest of each one's values), which
    :func:`load_adapters` checks. Every file of the version, the metadata included, is listed
    with its size and SHA-256 and checked before it is read. Writing is crash-safe: a save
    killed part-way
    leaves the previous checkpoint at ``path`` intact. One job writes a given ``path`` at a
    time. In a multi-process job (``jax.distributed``), call it on every process with the same
    (global) arrays: each process writes the shards it holds, process 0 the metadata and file
    lists, on a ``path`` all processes see (see ``docs/SCALING.md``).

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
      base_content: also record the content of the base at the adapters' hosts (a digest of
        each parameter's values, computed where it lives, shard by shard: no parameter is
        gathered to one host, and the digest is the same for any mesh or sharding), so that
        :func:`load_adapters` refuses a base with the same shapes but other weights (another
        seed, another fine-tune), naming the parameters that differ. Costs one pass over
        those parameters, on their devices.

    Returns:
      The directory of the version written (``path/<version>``). :func:`load_adapters`,
      :func:`read_adapter_metadata`, :func:`abstract_adapters` and ``python -m jadapters
      inspect`` accept it as ``path`` too, and then read that version.

    Raises:
      ValueError: for an unknown name, a model without adapters or weights, or a wrong
        ``variables`` argument; with ``base_content``, for abstract base parameters.

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
    meta = md.build_metadata(
        adapters, fingerprint, framework=view.framework, checksums=True, base_content=base_content
    )
    return store.write(path, meta, {spec.name: hosts for spec, hosts in adapters}, keep=keep)


def adapter_metadata(
    model: Any, variables: Any = None, *, name: NameLike = None, base_content: bool = False
) -> dict:
    """The JSON metadata :func:`save_adapters` would write for ``model``, without checksums.

    Store it beside a training checkpoint (:class:`~jadapters.AdapterCheckpointManager`) so
    that the arrays there can be told apart and checked against a base later.

    Args:
      model, variables, name, base_content: as :func:`save_adapters`.

    Returns:
      A JSON-ready dict.

    >>> import jadapters
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    >>> model = jadapters.adapter_transform(model, "layers/0")
    >>> model.add_adapter("task", jadapters.LoRAConfig(rank=1), rngs=nnx.Rngs(1))
    >>> meta = adapter_metadata(model)
    >>> meta["framework"], [(a["name"], a["type"]) for a in meta["adapters"]]
    ('nnx', [('task', 'LoRA')])
    >>> sorted(meta["base_fingerprint"])  # the hosts whose base a later load checks
    ['layers/0']
    """
    view, adapters, fingerprint = _collect(model, variables, name)
    meta = md.build_metadata(
        adapters, fingerprint, framework=view.framework, checksums=False, base_content=base_content
    )
    return md.to_json(meta)


@store.reads_one_version
def read_adapter_metadata(path: str, *, version: int | None = None) -> dict:
    """The validated JSON metadata of the adapter checkpoint at ``path``; no model needed.

    Adapter types need not be registered to read it.

    Raises:
      ValueError: for a missing or corrupted checkpoint or metadata.

    >>> import tempfile, jax, jax.numpy as jnp, flax.linen as nn, jadapters
    >>> model = jadapters.adapter_transform(nn.Sequential([nn.Dense(4)]), "layers_0")
    >>> model = model.add_adapter("task", jadapters.LoRAConfig(rank=2))
    >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> path = tempfile.mkdtemp()
    >>> _ = jadapters.save_adapters(path, model, variables)
    >>> meta = read_adapter_metadata(path)
    >>> meta["framework"], [(a["name"], a["type"], a["insertion"]) for a in meta["adapters"]]
    ('linen', [('task', 'LoRA', 'weight')])
    >>> read_adapter_metadata(tempfile.mkdtemp())  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: ...
    """
    where, meta = store.read_metadata(path, decode_configs=False, version=version)
    data = md.to_json(meta)
    data["version_dir"] = where
    data["disk_bytes"] = store.disk_bytes(where)
    return json.loads(json.dumps(data))


@store.reads_one_version
def abstract_adapters(path: str, *, name: NameLike = None, version: int | None = None) -> dict:
    """The arrays of the checkpoint at ``path`` as ``jax.ShapeDtypeStruct``.

    The tree is ``{adapter name: {host path: params}}``; build the ``shardings`` argument of
    :func:`load_adapters` from it, e.g. ``jax.tree.map(lambda x: my_sharding(x.shape), tree)``.

    Raises:
      ValueError: for a missing or corrupted checkpoint, or an unknown name.

    >>> import tempfile, jax, jax.numpy as jnp, flax.linen as nn, jadapters
    >>> model = jadapters.adapter_transform(nn.Sequential([nn.Dense(4)]), "layers_0")
    >>> model = model.add_adapter("task", jadapters.LoRAConfig(rank=2))
    >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> path = tempfile.mkdtemp()
    >>> _ = jadapters.save_adapters(path, model, variables)
    >>> tree = abstract_adapters(path)
    >>> jax.tree.map(lambda x: (x.shape, x.dtype.name), tree)
    {'task': {'layers_0': {'a': ((3, 2), 'float32'), 'b': ((2, 4), 'float32')}}}
    """
    _, meta = store.read_metadata(path, decode_configs=False, version=version)
    names = _select([(e.name, e.group) for e in meta.adapters], name, "the checkpoint")
    return arrays.abstract_tree(meta, names)


@store.reads_one_version
@shared
def load_adapters(
    path: str,
    model: Any,
    variables: Any = None,
    *,
    name: NameLike = None,
    replace: bool = False,
    shardings: Any = None,
    check_base: bool | str = True,
    rngs: Any = None,
    version: int | None = None,
) -> Any:
    """Loads adapters saved by :func:`save_adapters` into ``model``.

    The checkpoint is untrusted input. Everything is read into memory and checked before the
    model is touched, and nothing is allocated from a file's claims before they are checked:

    - every file read (the metadata, the arrays' files) against the size and SHA-256 listed
      at save time, before it is parsed; only regular files inside the version, JSON bounded
      in size and depth;
    - the metadata's fields; the adapter types against the registry; the adapter modules
      (groups) against ``model.adapter_module_names``; each adapter's hosts against the
      hosts its module targets in this model (the same set, so that no host is left with
      fresh weights beside trained ones);
    - the base at each host against the saved fingerprint (``check_base``);
    - every array's claimed size against the model (see :mod:`jadapters.checkpoint.arrays`),
      each config against the shapes of its stored arrays, orbax's array metadata against
      ours, then every array against its checksum.

    Dtypes are kept exactly. Loading several checkpoints one after another adds up their
    adapters.

    Args:
      path: the checkpoint directory (the latest version, or ``version``), or the directory
        of one version, as :func:`save_adapters` returns it.
      model: an adapted Linen (:class:`~jadapters.AdaptedLinen`) or NNX model.
      variables: the Linen model's variables (at least ``{"params": ...}``); ``None`` for NNX.
      name: ``None`` loads exactly what was saved; an exact name (a bare name resolves to its
        group through the metadata) or a list of them loads those.
      replace: overwrite adapters of the same name already in the model; else that is an error.
      shardings: where the arrays go, on any mesh or device (not only the one they were
        saved from): ``None`` (uncommitted arrays on the default device), one
        ``jax.sharding.Sharding`` for all, a pytree of them matching
        :func:`abstract_adapters` (``{name: {host path: params}}``) or a prefix of it, or a
        callable ``shardings(name, host, param, x) -> Sharding`` asked once per array
        (``host`` and ``param`` ``/``-joined paths, e.g. ``"up"`` and ``"a"``; ``x`` its
        ``jax.ShapeDtypeStruct``), e.g. to look each array up in the partition specs of the
        target model.
      check_base: what of the base at the adapters' hosts to check against the checkpoint's
        fingerprint. ``True`` (default): its structure (parameter names, shapes, dtypes),
        and its content (each parameter's digest) when the checkpoint recorded it
        (``save_adapters(..., base_content=True)``). ``"structure"``: the structure only.
        ``"content"``: both, and a checkpoint without a content fingerprint is an error.
        ``False``: nothing.
      rngs: NNX only: streams for the adapters' ``dropout``; default ``nnx.Rngs(0)``.
      version: the version to read; ``None`` for the latest.

    Returns:
      Linen: ``(new_model, new_variables)``; the inputs are unchanged. NNX: ``model``,
      changed in place.

    Raises:
      ValueError: for a missing, truncated or corrupted checkpoint, an unregistered adapter
        type, an unknown name or adapter module, a name already in the model (without
        ``replace``), hosts that differ from the saved ones, or a base that does not match
        the fingerprint (naming the host path and both shapes, or the parameters whose
        content differs). Each error about the checkpoint names the file. The model is
        unchanged then.

    >>> import tempfile, jax.numpy as jnp, jadapters
    >>> from flax import nnx
    >>> def make(out=2):
    ...     model = nnx.Sequential(nnx.Linear(3, out, rngs=nnx.Rngs(0)))
    ...     return jadapters.adapter_transform(model, "layers/0")
    >>> model = make()
    >>> model.add_adapter("task", jadapters.LoRAConfig(rank=1), rngs=nnx.Rngs(1))
    >>> path = tempfile.mkdtemp()
    >>> _ = jadapters.save_adapters(path, model)
    >>> loaded, x = load_adapters(path, make()), jnp.ones((1, 3))
    >>> loaded.get_enabled_adapters(), bool((loaded(x) == model(x)).all())
    (['task'], True)
    >>> load_adapters(path, make(out=5))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: the base does not match the checkpoint at host 'layers/0': ...
    """
    view = view_of(model, variables)
    entries, loaded, compositions = _read_checked(
        path,
        view,
        name,
        replace=replace,
        shardings=shardings,
        check_base=check_base,
        version=version,
    )
    result = view.insert([AdapterWeights(e.spec(), loaded[e.name]) for e in entries], rngs=rngs)
    return _restore_compositions(result, compositions, [e.name for e in entries])


def _read_checked(
    path: str,
    view: AdapterView,
    name: NameLike,
    *,
    replace: bool,
    shardings: Any,
    check_base: bool | str,
    version: int | None,
) -> tuple[list, dict, Any]:
    """Reads and checks (as :func:`load_adapters` documents) the adapters ``name`` of version
    ``version`` of the checkpoint at ``path`` against ``view``; returns ``(entries, {name:
    {host: params}}, compositions)`` without touching the model."""
    structure, content = base_check.mode(check_base)
    where, meta = store.read_metadata(path, version=version)
    source = os.path.join(where, store.METADATA, store.METADATA)
    names = _select([(e.name, e.group) for e in meta.adapters], name, "the checkpoint")
    entries = [meta.get(n) for n in names]
    hosts = list(dict.fromkeys(h.path for e in entries for h in e.hosts))
    if structure:
        unknown = [p for p in hosts if p not in meta.fingerprint]
        if unknown:
            raise ValueError(
                f"adapter checkpoint metadata {source!r} is malformed: no base fingerprint for "
                f"hosts {unknown}. Save the adapters again."
            )
    if content and not meta.base_content:
        raise ValueError(
            f"check_base='content' needs the content of the base, but the checkpoint {source!r} "
            "records its structure only: save it with save_adapters(..., base_content=True), or "
            "pass check_base=True to check the structure."
        )
    fingerprint = {p: meta.fingerprint.get(p, ()) for p in hosts}
    _check(view, entries, fingerprint, replace=replace, check_base=structure)
    arrays.check_claims(view, entries, source)
    if meta.base_content and content is not False:
        current = {host: _host_base(view, host) for host in fingerprint}
        base_check.compare_content(fingerprint, current, source, meta.content_digest)
    loaded = arrays.read_arrays(where, meta, names, shardings)
    if shardings is None:
        # Uncommitted, like arrays from init: a function compiled on those runs these as is.
        loaded = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), loaded)
    return entries, loaded, meta.compositions


@store.reads_one_version
def read_checked(
    path: str,
    view: AdapterView,
    name: NameLike = None,
    *,
    check_base: bool | str = True,
    version: int | None = None,
) -> list[tuple[Any, dict]]:
    """The adapters ``name`` of the checkpoint at ``path``, read and checked against ``view``
    as :func:`load_adapters` does (names already in the model are allowed), as ``[(spec,
    {host path: params}), ...]``; the model is not touched."""
    entries, loaded, _ = _read_checked(
        path, view, name, replace=True, shardings=None, check_base=check_base, version=version
    )
    return [(e.spec(), loaded[e.name]) for e in entries]


def _restore_compositions(result: Any, compositions: Any, names: Sequence[str]) -> Any:
    """Declares again the saved composition blocks whose adapters were all loaded, through the
    model's own ``set_composition`` (a new model in Linen's ``(model, variables)``; NNX changes
    the model in place)."""
    for group, block in compositions:
        if not set(block.adapters) <= set(names):
            continue
        if isinstance(result, tuple):
            result = (result[0].set_composition(group, block), *result[1:])
        else:
            result.set_composition(group, block)
    return result
