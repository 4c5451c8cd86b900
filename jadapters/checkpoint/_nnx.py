"""Taking adapters out of, and putting them into, an adapted NNX model (in place).

Each host holds its adapters in ``host.adapter_layer[name]`` (an :class:`~jadapters.NNXAdapter`
whose weights are :class:`~jadapters.AdapterParam` variables); the root routes names to groups
of hosts (:class:`~jadapters.AdapterModelMixin`). Loading adds adapters through the model's own
``add_adapter`` and then sets their weights; if anything fails part-way, the model is rolled
back to exactly what it was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax import nnx

from jadapters._adapter_set import AdapterSpec
from jadapters.checkpoint import metadata as md
from jadapters.checkpoint.fingerprint import compare as compare_fingerprint
from jadapters.nnx.mixins import AdapterModelMixin
from jadapters.targets import path_str


def _hosts(model: AdapterModelMixin, group: str) -> dict[str, Any]:
    """``{host path: host module}`` of ``group``, in the model's order."""
    paths = {id(node): path_str(path) for path, node in nnx.iter_graph(model)}
    return {paths[id(h)]: h for h in model.adapter_group_modules(group)}


def _nest(flat: Sequence[tuple[tuple[str, ...], Any]]) -> dict:
    tree: dict = {}
    for path, value in flat:
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def host_base(host: Any) -> dict:
    """The host's own base parameters (``nnx.Param``, nested, adapters excluded)."""
    state = nnx.state(host, nnx.Param)
    flat = []
    for path, var in nnx.to_flat_state(state):
        keys = tuple(str(k) for k in path)
        if "adapter_layer" not in keys:
            flat.append((keys, var.get_value()))
    return _nest(flat)


def _adapter_vars(adapter: Any) -> dict[tuple[str, ...], nnx.Variable]:
    leaves = jax.tree_util.tree_flatten_with_path(
        adapter.params, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]
    return {tuple(md.key_str(k) for k in path): var for path, var in leaves}


def collect(model: AdapterModelMixin, specs: Sequence[AdapterSpec]):
    """``([(spec, {host: params}), ...], {host: base params})`` for the adapters ``specs``."""
    out, fingerprint = [], {}
    for spec in specs:
        hosts = {}
        for path, host in _hosts(model, spec.group).items():
            adapter = host.get_adapter_module(spec.name)
            if adapter is None:
                raise ValueError(
                    f"adapter {spec.name!r} of module {spec.group!r} is missing from host "
                    f"{path!r}; the model's adapters are inconsistent."
                )
            hosts[path] = adapter.param_values()
            fingerprint[path] = host_base(host)
        out.append((spec, hosts))
    return out, fingerprint


def check(
    model: AdapterModelMixin,
    entries: Sequence[md.AdapterEntry],
    fingerprint: Mapping[str, Sequence[md.LeafInfo]],
    *,
    replace: bool,
    check_base: bool,
) -> None:
    """Raises ``ValueError`` if ``entries`` cannot go into ``model`` (nothing is changed)."""
    groups = model.adapter_module_names
    existing = model.get_adapter_specs()
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
                "overwrite it."
            )
        hosts = _hosts(model, entry.group)
        saved = [h.path for h in entry.hosts]
        missing = [p for p in saved if p not in hosts]
        extra = [p for p in hosts if p not in saved]
        if missing or extra:
            raise ValueError(
                f"adapter {entry.name!r} was saved at hosts {saved}, but adapter module "
                f"{entry.group!r} of this model has hosts {list(hosts)} (missing: {missing}, "
                f"without saved weights: {extra})."
            )
        if check_base:
            for path in saved:
                current = md.describe_leaves(host_base(hosts[path]), checksums=False)
                compare_fingerprint(path, fingerprint.get(path, ()), current)


_HOST_ATTRS = ("_adapters_spec", "adapter_layer")
_MODEL_ATTR = "_model_adapters_spec"


def _snapshot(model: AdapterModelMixin):
    """The adapter bookkeeping of the model and every host, to restore on failure."""
    hosts = []
    for group in model.adapter_module_names:
        for host in model.adapter_group_modules(group):
            attrs = {a: vars(host)[a] for a in _HOST_ATTRS if a in vars(host)}
            layer = attrs.get("adapter_layer")
            hosts.append((host, attrs, None if layer is None else dict(layer)))
    return vars(model).get(_MODEL_ATTR), hosts


def _rollback(model: AdapterModelMixin, snapshot, assigned) -> None:
    model_set, hosts = snapshot
    for var, old in reversed(assigned):
        var.set_value(old)
    for host, attrs, layer in hosts:
        for attr in _HOST_ATTRS:
            if attr not in attrs and attr in vars(host):
                delattr(host, attr)
        if "_adapters_spec" in attrs:
            host._adapters_spec = attrs["_adapters_spec"]
        if layer is not None:
            current = attrs["adapter_layer"]
            if vars(host).get("adapter_layer") is not current:
                host.adapter_layer = current
            for key in list(current.keys()):  # re-insert all: keeps the original order
                del current[key]
            for key, value in layer.items():
                current[key] = value
    if model_set is None:
        if _MODEL_ATTR in vars(model):
            delattr(model, _MODEL_ATTR)
    else:
        setattr(model, _MODEL_ATTR, model_set)


def _remove(model: AdapterModelMixin, spec: AdapterSpec) -> None:
    # NNX's mixins have no remove_adapter yet; this mirrors what one would do.
    for host in model.adapter_group_modules(spec.group):
        if host._adapter_set().get(spec.name) is not None:
            host._set_adapter_set(host._adapter_set().remove(spec.name))
            del host.adapter_layer[spec.name]
    model._model_adapters_spec = model._model_adapter_set().remove(spec.name)


def _assign(model, entry: md.AdapterEntry, arrays: Mapping[str, Any], assigned: list) -> None:
    for path, host in _hosts(model, entry.group).items():
        variables = _adapter_vars(host.get_adapter_module(entry.name))
        values = dict(md.flatten(arrays[path]))
        if set(variables) != set(values):
            raise ValueError(
                f"adapter {entry.name!r} at host {path!r} has parameters "
                f"{sorted('/'.join(p) for p in variables)} in this model but "
                f"{sorted('/'.join(p) for p in values)} in the checkpoint."
            )
        for key, var in variables.items():
            old = var.get_value()
            if tuple(old.shape) != tuple(values[key].shape):
                raise ValueError(
                    f"adapter {entry.name!r} at host {path!r}: parameter {'/'.join(key)!r} has "
                    f"shape {tuple(old.shape)} in this model but {tuple(values[key].shape)} in "
                    "the checkpoint (the adapter's input width differs)."
                )
            assigned.append((var, old))
            var.set_value(values[key])


def insert(
    model: AdapterModelMixin,
    entries: Sequence[md.AdapterEntry],
    arrays: Mapping[str, Mapping[str, Any]],
    *,
    rngs: nnx.Rngs,
) -> None:
    """Adds (or replaces) the loaded adapters in ``model``, rolling back on any failure."""
    snapshot = _snapshot(model)
    assigned: list = []
    try:
        for entry in entries:
            existing = model.get_adapter_specs().get(entry.name)
            same = existing is not None and (existing.group, existing.cfg, existing.insertion) == (
                entry.group,
                entry.cfg,
                entry.insertion,
            )
            if existing is not None and not same:
                _remove(model, existing)
            if not same:
                model.add_adapter(
                    entry.qualified_name, entry.cfg, rngs=rngs, insertion=entry.insertion
                )
            _assign(model, entry, arrays[entry.name], assigned)
            model.set_enabled_adapters(entry.name, entry.enabled)
    except BaseException:
        _rollback(model, snapshot, assigned)
        raise
