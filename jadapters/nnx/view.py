"""The :class:`~jadapters.view.AdapterView` of an adapted NNX model: read and changed in place.

Each host holds its adapters in ``host.adapter_layer[name]`` (an :class:`~jadapters.NNXAdapter`
whose weights are :class:`~jadapters.AdapterParam` variables); the root routes names to groups
of hosts (:class:`~jadapters.AdapterModelMixin`). Inserting adds adapters through the model's
own ``add_adapter`` and then sets their weights; if anything fails part-way, the model is
rolled back to exactly what it was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax import nnx

from jadapters._adapter_set import AdapterSet, AdapterSpec
from jadapters._walks import paths_by_id
from jadapters.adapters.base import stack_size
from jadapters.kernels import kernel_layout
from jadapters.registry import build_adapter
from jadapters.storage import NNX_ADAPTER_ATTR, AdapterParam
from jadapters.targets import path_str
from jadapters.view import FROZEN, TRAINABLE, AdapterWeights


def _key(key: Any) -> str:
    return str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key))))


def _nest(flat: Sequence[tuple[tuple[str, ...], Any]]) -> dict:
    tree: dict = {}
    for path, value in flat:
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _host_base(host: Any) -> dict:
    flat = []
    for path, var in nnx.to_flat_state(nnx.state(host, nnx.Param)):
        keys = tuple(str(k) for k in path)
        if NNX_ADAPTER_ATTR not in keys:
            flat.append((keys, var.get_value()))
    return _nest(flat)


def _variables(shell: Any) -> dict[tuple[str, ...], nnx.Variable]:
    leaves = jax.tree_util.tree_flatten_with_path(
        shell.params, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]
    return {tuple(_key(k) for k in path): var for path, var in leaves}


class NNXView:
    """The view of an NNX model adapted by :func:`jadapters.adapter_transform`."""

    framework = "nnx"

    def __init__(self, model: Any, variables: Any = None):
        if variables is not None:
            raise ValueError(
                "variables must be None for an NNX model, which holds its own weights; got "
                f"{type(variables).__name__}."
            )
        self.model = model

    def specs(self) -> AdapterSet:
        return self.model.get_adapter_specs()

    def groups(self) -> list[str]:
        """The model's adapter modules (groups), then the paths of the other adapter-capable
        modules inside it: the group of an adapter added on such a module itself."""
        groups = list(self.model.adapter_module_names)
        return groups + [p for p in self.model._adapter_hosts() if p not in groups]

    def hosts(self, group: str) -> dict[str, Any]:
        """``{host path: host module}`` of ``group``, in the model's order."""
        paths = paths_by_id(self.model)
        return {path_str(paths[id(h)]): h for h in self.model._group_modules(group)}

    def in_group(self, group: str, path: str) -> bool:
        return group in self.groups() and path in self.hosts(group)

    def _all_hosts(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for group in self.groups():
            out.update(self.hosts(group))
        return out

    def weights(self, specs: Sequence[AdapterSpec]) -> list[AdapterWeights]:
        out = []
        for spec in specs:
            hosts = {}
            for path, host in self.hosts(spec.group).items():
                shell = host.get_adapter_module(spec.name)
                if shell is None:
                    raise ValueError(
                        f"adapter {spec.name!r} of module {spec.group!r} is missing from host "
                        f"{path!r}; the model's adapters are inconsistent."
                    )
                hosts[path] = shell.param_values()
            out.append(AdapterWeights(spec, hosts))
        return out

    def layer_flags(self, path: str, spec: AdapterSpec, size: int) -> tuple[bool, ...] | None:
        del size  # the shell holds one flag per layer
        shell = self._all_hosts()[path].get_adapter_module(spec.name)
        gate = getattr(shell, "layer_gate", None)
        return None if gate is None else tuple(bool(g) for g in gate[...])

    def host_base(self, path: str) -> dict:
        return _host_base(self._all_hosts()[path])

    def base_params(self) -> Any:
        return nnx.state(self.model, nnx.Param)

    def kernel_layouts(self, inputs: Sequence[Any] | None) -> dict[str, Any]:
        del inputs  # NNX hosts are read directly
        layouts = {}
        for path, host in self._all_hosts().items():
            if getattr(host, "kernel", None) is not None:
                stacked = any(
                    stack_size(shell.module, shell.param_values()) is not None
                    for shell in dict(getattr(host, NNX_ADAPTER_ATTR, None) or {}).values()
                )
                layouts[path] = kernel_layout(host, stacked=stacked)
        return layouts

    def replace_base(self, hosts: Mapping[str, Mapping[str, Any]]) -> nnx.State:
        pure = nnx.to_pure_dict(nnx.state(self.model, nnx.Param))
        for path, new in hosts.items():
            node = pure
            for key in path.split("/") if path else ():
                node = node[int(key) if key.isdigit() and key not in node else key]
            node.update(new)
        merged = nnx.state(self.model, nnx.Param)
        nnx.replace_by_pure_dict(merged, pure)
        return merged

    def labels(self) -> dict:
        trainable = self.model.unfreeze_enabled_adapters(freeze_batchnorm=False)
        state = nnx.state(self.model, nnx.Any(nnx.Param, AdapterParam))
        flat = nnx.to_flat_state(state)
        labels = [(path, TRAINABLE if trainable(path, var) else FROZEN) for path, var in flat]
        return nnx.to_pure_dict(nnx.from_flat_state(labels))

    def check_hosts(self, spec: AdapterSpec, paths: Sequence[str]) -> None:
        hosts = self.hosts(spec.group)
        missing = [p for p in paths if p not in hosts]
        extra = [p for p in hosts if p not in paths]
        if missing or extra:
            raise ValueError(
                f"adapter {spec.name!r} was saved at hosts {list(paths)}, but adapter module "
                f"{spec.group!r} of this model has hosts {list(hosts)} (missing: {missing}, "
                f"without saved weights: {extra})."
            )

    def insert(self, loaded: Sequence[AdapterWeights], *, rngs: Any = None) -> Any:
        """Adds (or replaces) the loaded adapters in place, rolling back on any failure."""
        rngs = rngs if rngs is not None else nnx.Rngs(0, dropout=0)
        snapshot = _snapshot(self.model)
        assigned: list = []
        try:
            for item in loaded:
                spec = item.spec
                existing = self.specs().get(spec.name)
                same = existing is not None and (
                    existing.group,
                    existing.cfg,
                    existing.insertion,
                ) == (spec.group, spec.cfg, spec.insertion)
                if existing is not None and not same:
                    self.model.remove_adapter(existing.name)
                if not same:
                    self.model.add_adapter(
                        spec.qualified_name,
                        spec.cfg,
                        rngs=rngs,
                        insertion=spec.insertion,
                        in_features=_saved_width(spec, item.hosts),
                    )
                self._assign(spec, item.hosts, assigned)
                self.model.set_enabled_adapters(spec.name, spec.enabled)
        except BaseException:
            _rollback(self.model, snapshot, assigned)
            raise
        return self.model

    def _assign(self, spec: AdapterSpec, arrays: Mapping[str, Any], assigned: list) -> None:
        for path, host in self.hosts(spec.group).items():
            variables = _variables(host.get_adapter_module(spec.name))
            values = {
                tuple(_key(k) for k in p): x
                for p, x in jax.tree_util.tree_flatten_with_path(arrays[path])[0]
            }
            if set(variables) != set(values):
                raise ValueError(
                    f"adapter {spec.name!r} at host {path!r} has parameters "
                    f"{sorted('/'.join(p) for p in variables)} in this model but "
                    f"{sorted('/'.join(p) for p in values)} in the checkpoint."
                )
            for key, var in variables.items():
                old = var.get_value()
                if tuple(old.shape) != tuple(values[key].shape):
                    raise ValueError(
                        f"adapter {spec.name!r} at host {path!r}: parameter {'/'.join(key)!r} "
                        f"has shape {tuple(old.shape)} in this model but "
                        f"{tuple(values[key].shape)} in the checkpoint (the adapter's input "
                        "width differs)."
                    )
                assigned.append((var, old))
                var.set_value(values[key])


def _saved_width(spec: AdapterSpec, hosts: Mapping[str, Any]) -> int | None:
    """The adapter's input width as its saved weights show it (the axis its weight schema
    calls ``"features"`` or ``"in"``), when every host agrees; else ``None``.

    An adapter added with ``in_features=...`` (a width its host does not show) is rebuilt
    with that width, which nothing but its weights records.
    """
    axes = build_adapter(spec.cfg).weight_axes
    widths = set()
    for params in hosts.values():
        found = None
        for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
            names = axes.get("/".join(_key(k) for k in path), ())
            shift = 1 if len(x.shape) == len(names) + 1 else 0  # a layer stack's weights
            for axis, name in enumerate(names):
                if name in ("features", "in") and axis + shift < len(x.shape):
                    found = int(x.shape[axis + shift])
                    break
            if found is not None:
                break
        widths.add(found)
    return widths.pop() if len(widths) == 1 else None


_HOST_ATTRS = ("_adapters_spec", NNX_ADAPTER_ATTR)
_MODEL_ATTR = "_model_adapters_spec"


def _snapshot(model: Any):
    """The adapter bookkeeping of the model and every host, to restore on failure."""
    hosts = []
    for host in model._adapter_hosts().values():
        attrs = {a: vars(host)[a] for a in _HOST_ATTRS if a in vars(host)}
        layer = attrs.get(NNX_ADAPTER_ATTR)
        hosts.append((host, attrs, None if layer is None else dict(layer)))
    return vars(model).get(_MODEL_ATTR), hosts


def _rollback(model: Any, snapshot, assigned) -> None:
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
            current = attrs[NNX_ADAPTER_ATTR]
            if vars(host).get(NNX_ADAPTER_ATTR) is not current:
                setattr(host, NNX_ADAPTER_ATTR, current)
            for key in list(current.keys()):  # re-insert all: keeps the original order
                del current[key]
            for key, value in layer.items():
                current[key] = value
    if model_set is None:
        if _MODEL_ATTR in vars(model):
            delattr(model, _MODEL_ATTR)
    else:
        setattr(model, _MODEL_ATTR, model_set)
