"""Adapters on an unmodified NNX model, by graph surgery on the module objects.

Each target host keeps its place, its attributes and its parameters; only its class changes,
to a subclass that mixes in :class:`~jadapters.AdapterModuleMixin` and wraps the targeted
methods. The base state therefore keeps exactly the unwrapped structure (a base checkpoint
loads as is), and adapters appear beside the host's own weights under ``adapter_layer``.
The root gains :class:`~jadapters.AdapterModelMixin` for ``"module:name"`` routing.
"""

from __future__ import annotations

import functools
from typing import Any

from flax import nnx

from jadapters.nnx.mixins import AdapterModelMixin, AdapterModuleMixin
from jadapters.targets import path_str, unmatched_error

_HOST_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}
_MODEL_CLASSES: dict[type, type] = {}


def _wrap_method(original):
    @functools.wraps(original)
    def method(self, *args, **kwargs):
        if not self.get_enabled_adapters():
            return original(self, *args, **kwargs)
        if not args:
            raise ValueError(
                f"adapters on {type(self).__name__} need the host's input as its first "
                "positional argument."
            )
        x = self.forward_input_adapters(args[0])
        y = original(self, x, *args[1:], **kwargs)
        y = self.forward_weight_adapters(x, y)
        return self.forward_enabled_adapters(y, host_input=x)

    return method


def host_class(cls: type, methods: tuple[str, ...]) -> type:
    """The adapted subclass of host class ``cls`` wrapping ``methods`` (cached, so stable)."""
    if issubclass(cls, AdapterModuleMixin):
        if "_jadapters_host_of" not in cls.__dict__:
            return cls  # a hand-written mixin module already runs its adapters
        base = cls._jadapters_host_of
        methods = tuple(sorted(set(methods) | set(getattr(cls, "_jadapters_methods", ()))))
        cls = base
    key = (cls, tuple(sorted(methods)))
    if key not in _HOST_CLASSES:
        namespace: dict[str, Any] = {
            "__slots__": (),
            "_jadapters_host_of": cls,
            "_jadapters_methods": key[1],
            "__module__": cls.__module__,
            "__qualname__": f"Adapted{cls.__qualname__}",
        }
        for name in key[1]:
            original = getattr(cls, name, None)
            if original is None or not callable(original):
                raise ValueError(
                    f"methods names {name!r}, which {cls.__name__} does not have; its methods "
                    f"include {[m for m in dir(cls) if not m.startswith('_')][:20]}."
                )
            namespace[name] = _wrap_method(original)
        _HOST_CLASSES[key] = type(f"Adapted{cls.__name__}", (cls, AdapterModuleMixin), namespace)
    return _HOST_CLASSES[key]


def model_class(cls: type) -> type:
    if issubclass(cls, AdapterModelMixin):
        return cls
    if cls not in _MODEL_CLASSES:
        _MODEL_CLASSES[cls] = type(
            f"Adapted{cls.__name__}",
            (cls, AdapterModelMixin),
            {
                "__slots__": (),
                "__module__": cls.__module__,
                "__qualname__": f"Adapted{cls.__qualname__}",
            },
        )
    return _MODEL_CLASSES[cls]


def transform_nnx(model: nnx.Module, groups, *, accepted_types=()) -> nnx.Module:
    """Adds adapter support to ``model`` in place and returns it (see ``adapter_transform``)."""
    modules = [
        (path_str(path), node)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Module)
    ]
    path_tuples = {path_str(path): tuple(path) for path, _ in nnx.iter_graph(model)}
    found: dict[str, list[tuple[str, Any]]] = {}
    methods_of: dict[int, set[str]] = {}
    for group, rules in groups:
        hosts = []
        for rule in rules:
            matched = [(p, m) for p, m in modules if p and rule.matches(p, m)]
            if not matched:
                raise unmatched_error(rule, group, [p for p, _ in modules if p])
            for p, m in matched:
                methods_of.setdefault(id(m), set()).update(rule.methods)
                if all(p != q for q, _ in hosts):
                    hosts.append((p, m))
        found[group] = hosts
    for hosts in found.values():
        for _, m in hosts:
            m.__class__ = host_class(type(m), tuple(methods_of[id(m)]))
            if accepted_types:
                m.set_accepted_adapter_types(accepted_types)
    model.__class__ = model_class(type(model))
    group_paths = []
    for group, hosts in found.items():
        group_paths.append((group, tuple(path_tuples[p] for p, _ in hosts)))
    model._adapter_groups = tuple(group_paths)
    return model
