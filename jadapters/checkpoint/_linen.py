"""Taking adapters out of, and putting them into, an :class:`~jadapters.AdaptedLinen` model.

Linen keeps adapter weights in ``variables["adapters"]`` nested by host path, then adapter
name: ``{"blocks_0": {"mlp": {"task": {...}}}}``. A host path is recognized as a place where
a key equal to an adapter's name sits at a path its group's target patterns match.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.core

from jadapters._adapter_set import AdapterSet, AdapterSpec
from jadapters.checkpoint import metadata as md
from jadapters.checkpoint.fingerprint import compare as compare_fingerprint
from jadapters.linen.transform import ADAPTER_COLLECTION, AdaptedLinen, adapter_subtrees


def _plain(tree: Any) -> Any:
    return flax.core.unfreeze(tree) if isinstance(tree, flax.core.FrozenDict) else tree


def _group_matches(model: AdaptedLinen, group: str, path: str) -> bool:
    rules = dict(model.groups).get(group, ())
    return any(re.fullmatch(rule.pattern, path) for rule in rules)


def _find(model: AdaptedLinen, adapters: Mapping, specs: Sequence[AdapterSpec]):
    """``{name: {host path: params}}`` for ``specs`` found in the adapter collection."""
    found = adapter_subtrees(adapters, set(model.adapters.names()))
    return {
        spec.name: {
            host: _plain(value)
            for host, value in found.get(spec.name, {}).items()
            if isinstance(value, Mapping) and _group_matches(model, spec.group, host)
        }
        for spec in specs
    }


def _subtree(tree: Any, path: str) -> Any:
    node = tree
    for key in path.split("/") if path else ():
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _base_params(variables: Mapping) -> Mapping:
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError(
            "variables must be the Linen model's variables with a 'params' collection (the "
            f"base) and an 'adapters' collection, got keys {sorted(variables or {})}."
        )
    return variables["params"]


def collect(model: AdaptedLinen, variables: Any, specs: Sequence[AdapterSpec]):
    """``([(spec, {host: params}), ...], {host: base params})`` for the adapters ``specs``.

    Raises:
      ValueError: if ``variables`` lacks the base or any selected adapter's weights.
    """
    base = _base_params(variables)
    found = _find(model, variables.get(ADAPTER_COLLECTION, {}), specs)
    out, fingerprint = [], {}
    for spec in specs:
        hosts = found[spec.name]
        if not hosts:
            raise ValueError(
                f"adapter {spec.name!r} has no weights in variables['adapters']: initialize "
                "them with model.init(...) or model.init_adapters(rng, variables, *inputs)."
            )
        out.append((spec, hosts))
        for host in hosts:
            fingerprint[host] = _plain(_subtree(base, host)) or {}
    return out, fingerprint


def _set_in(tree: Mapping, keys: Sequence[str], value: Any) -> dict:
    """A copy of ``tree`` with ``value`` at ``keys``; only the dicts on the path are copied."""
    out = dict(tree)
    if len(keys) == 1:
        out[keys[0]] = value
        return out
    child = out.get(keys[0], {})
    out[keys[0]] = _set_in(child if isinstance(child, Mapping) else {}, keys[1:], value)
    return out


def _drop_in(tree: Mapping, keys: Sequence[str]) -> dict:
    out = dict(tree)
    if len(keys) == 1:
        out.pop(keys[0], None)
        return out
    if isinstance(out.get(keys[0]), Mapping):
        out[keys[0]] = _drop_in(out[keys[0]], keys[1:])
        if not out[keys[0]]:
            del out[keys[0]]
    return out


def _keys(host: str, name: str) -> list[str]:
    return (host.split("/") if host else []) + [name]


def check(
    model: AdaptedLinen,
    variables: Any,
    entries: Sequence[md.AdapterEntry],
    fingerprint: Mapping[str, Sequence[md.LeafInfo]],
    *,
    replace: bool,
    check_base: bool,
) -> None:
    """Raises ``ValueError`` if ``entries`` cannot go into ``model`` (nothing is changed).

    ``fingerprint`` is the saved base fingerprint of the entries' host paths.
    """
    if not isinstance(variables, Mapping):
        raise ValueError(
            "variables is required to load adapters into a Linen model: pass the model's "
            f"variables (at least {{'params': ...}}), got {type(variables).__name__}."
        )
    base = _base_params(variables)
    groups = model.adapter_module_names
    for entry in entries:
        if entry.group not in groups:
            raise ValueError(
                f"adapter {entry.name!r} belongs to adapter module {entry.group!r}, which this "
                f"model does not have; its modules are {groups}. Adapt the model with that "
                "group in adapter_transform's targets."
            )
        if model.adapters.get(entry.name) is not None and not replace:
            raise ValueError(
                f"adapter {entry.name!r} already exists in the model; pass replace=True to "
                "overwrite it or remove it first."
            )
        for host in entry.hosts:
            if not _group_matches(model, entry.group, host.path):
                raise ValueError(
                    f"host {host.path!r} of adapter {entry.name!r} is not a target of adapter "
                    f"module {entry.group!r} in this model (patterns "
                    f"{[r.pattern for r in dict(model.groups)[entry.group]]})."
                )
    if check_base:
        for host, saved in fingerprint.items():
            tree = _subtree(base, host)
            if tree is None and saved:
                raise ValueError(
                    f"the base does not match the checkpoint: it has no parameters at host "
                    f"{host!r}, where the checkpoint's base has "
                    f"{[('/'.join(i.path), i.shape) for i in saved]}."
                )
            current = md.describe_leaves(tree or {}, checksums=False)
            compare_fingerprint(host, saved, current)


def insert(
    model: AdaptedLinen,
    variables: Any,
    entries: Sequence[md.AdapterEntry],
    arrays: Mapping[str, Mapping[str, Any]],
) -> tuple[AdaptedLinen, dict]:
    """Returns ``(new_model, new_variables)`` with the loaded adapters (already checked)."""
    variables = _plain(variables)
    adapters = _plain(variables.get(ADAPTER_COLLECTION, {}))
    for entry in entries:
        existing = model.adapters.get(entry.name)
        if existing is not None:
            old = _find(model, adapters, [existing])[existing.name]
            for host in old:
                adapters = _drop_in(adapters, _keys(host, existing.name))
            # Validate through the public API, then keep the old chain position.
            trial = model.remove_adapter(existing.name).add_adapter(
                entry.qualified_name, entry.cfg, insertion=entry.insertion
            )
            new_spec = trial.adapters.get(entry.name)
            specs = tuple(new_spec if s.name == entry.name else s for s in model.adapters)
            model = model.clone(adapters=AdapterSet(specs))
        else:
            model = model.add_adapter(entry.qualified_name, entry.cfg, insertion=entry.insertion)
        model = model.set_enabled_adapters(entry.name, entry.enabled)
        for host, params in arrays[entry.name].items():
            adapters = _set_in(adapters, _keys(host, entry.name), params)
    return model, {**variables, ADAPTER_COLLECTION: adapters}
