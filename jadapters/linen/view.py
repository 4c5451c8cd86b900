"""The :class:`~jadapters.view.AdapterView` of a Linen model: its ``variables``, read and
rebuilt functionally.

Adapter weights live in ``variables["adapters"]`` nested by host path, then adapter name:
``{"blocks_0": {"mlp": {"task": {...}}}}``. The first key from the root that names an adapter
owns its subtree (``init`` rejects adapter names that equal a module name on a host path, so
a host component never passes for an adapter).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.core
import jax

from jadapters._adapter_set import AdapterSet, AdapterSpec
from jadapters.storage import ADAPTER_COLLECTION
from jadapters.targets import path_str
from jadapters.view import FROZEN, TRAINABLE, AdapterWeights


def adapter_of(path: Any, names: Any) -> str | None:
    """The adapter owning a leaf at ``path`` in the ``"adapters"`` collection, or ``None``."""
    for key in path:
        key = getattr(key, "key", key)
        if key in names:
            return key
    return None


def adapter_subtrees(adapters: Any, names: Any) -> dict[str, dict[str, Any]]:
    """``{adapter name: {host path: params}}`` of the ``"adapters"`` collection.

    >>> adapter_subtrees({"blocks_0": {"mlp": {"task": {"w": 1}}}}, {"task"})
    {'task': {'blocks_0/mlp': {'w': 1}}}
    """
    found: dict[str, dict[str, Any]] = {}

    def walk(node: Any, prefix: tuple[str, ...]) -> None:
        for key, value in node.items():
            if key in names:
                found.setdefault(key, {})[path_str(prefix)] = value
            elif hasattr(value, "items"):
                walk(value, (*prefix, str(key)))

    walk(adapters, ())
    return found


def _plain(tree: Any) -> Any:
    return flax.core.unfreeze(tree) if isinstance(tree, flax.core.FrozenDict) else tree


def _subtree(tree: Any, path: str) -> Any:
    node = tree
    for key in path.split("/") if path else ():
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


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


class LinenView:
    """The view of an :class:`~jadapters.AdaptedLinen` and its ``variables``."""

    framework = "linen"

    def __init__(self, model: Any, variables: Any):
        if variables is None:
            raise ValueError(
                "variables is required for a Linen model: pass the AdaptedLinen's variables "
                "(at least {'params': ..., 'adapters': ...}), got None."
            )
        if not isinstance(variables, Mapping) or "params" not in variables:
            got = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
            raise ValueError(
                "variables must be the Linen model's variables with a 'params' collection (the "
                f"base) and an 'adapters' collection, got {got}."
            )
        self.model = model
        self.variables = variables

    def specs(self) -> AdapterSet:
        return self.model.adapters

    def groups(self) -> list[str]:
        return self.model.adapter_module_names

    def _in_group(self, group: str, path: str) -> bool:
        rules = dict(self.model.groups).get(group, ())
        return any(re.fullmatch(rule.pattern, path) for rule in rules)

    def _found(self, adapters: Any, specs: Sequence[AdapterSpec]) -> dict[str, dict[str, Any]]:
        found = adapter_subtrees(adapters, set(self.specs().names()))
        return {
            spec.name: {
                host: _plain(value)
                for host, value in found.get(spec.name, {}).items()
                if isinstance(value, Mapping) and self._in_group(spec.group, host)
            }
            for spec in specs
        }

    def weights(self, specs: Sequence[AdapterSpec]) -> list[AdapterWeights]:
        found = self._found(self.variables.get(ADAPTER_COLLECTION, {}), specs)
        out = []
        for spec in specs:
            if not found[spec.name]:
                raise ValueError(
                    f"adapter {spec.name!r} has no weights in variables['adapters']: initialize "
                    "them with model.init(...) or model.init_adapters(rng, variables, *inputs)."
                )
            out.append(AdapterWeights(spec, found[spec.name]))
        return out

    def host_base(self, path: str) -> Any:
        return _plain(_subtree(self.variables["params"], path)) or {}

    def base_params(self) -> Any:
        return self.variables["params"]

    def kernel_layouts(self, inputs: Sequence[Any] | None) -> dict[str, Any]:
        """``{host path: KernelLayout}`` read from the real hosts in one abstract run on
        ``inputs``; empty without inputs."""
        return {} if inputs is None else self.model.kernel_layouts(self.variables, *inputs)

    def replace_base(self, hosts: Mapping[str, Mapping[str, Any]]) -> dict:
        params = _plain(dict(self.variables["params"]))
        for path, new in hosts.items():
            keys = path.split("/")
            params = _set_in(params, keys, {**_subtree(params, path), **new})
        return params

    def labels(self) -> dict:
        specs = self.specs()
        enabled, names = set(specs.enabled_names()), set(specs.names())

        def label_collection(name: str, tree: Any) -> Any:
            if name != ADAPTER_COLLECTION:
                return jax.tree.map(lambda _: FROZEN, tree)
            return jax.tree_util.tree_map_with_path(
                lambda p, _: TRAINABLE if adapter_of(p, names) in enabled else FROZEN, tree
            )

        return {name: label_collection(name, tree) for name, tree in self.variables.items()}

    def check_hosts(self, spec: AdapterSpec, paths: Sequence[str]) -> None:
        for path in paths:
            if not self._in_group(spec.group, path):
                patterns = [r.pattern for r in dict(self.model.groups)[spec.group]]
                raise ValueError(
                    f"host {path!r} of adapter {spec.name!r} is not a target of adapter module "
                    f"{spec.group!r} in this model (patterns {patterns})."
                )

    def insert(self, loaded: Sequence[AdapterWeights], *, rngs: Any = None) -> tuple[Any, dict]:
        """``(new_model, new_variables)`` with the loaded adapters; the inputs are unchanged."""
        del rngs
        model = self.model
        variables = _plain(self.variables)
        adapters = _plain(variables.get(ADAPTER_COLLECTION, {}))
        for item in loaded:
            spec = item.spec
            existing = model.adapters.get(spec.name)
            if existing is not None:
                for host in self._found(adapters, [existing])[existing.name]:
                    adapters = _drop_in(adapters, _keys(host, existing.name))
                # Validate through the public API, then keep the old chain position.
                trial = model.remove_adapter(existing.name).add_adapter(
                    spec.qualified_name, spec.cfg, insertion=spec.insertion
                )
                new_spec = trial.adapters.get(spec.name)
                specs = tuple(new_spec if s.name == spec.name else s for s in model.adapters)
                model = model.clone(adapters=AdapterSet(specs))
            else:
                model = model.add_adapter(spec.qualified_name, spec.cfg, insertion=spec.insertion)
            model = model.set_enabled_adapters(spec.name, spec.enabled)
            for host, params in item.hosts.items():
                adapters = _set_in(adapters, _keys(host, spec.name), params)
        return model, {**variables, ADAPTER_COLLECTION: adapters}
