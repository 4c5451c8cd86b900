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
from flax.nnx import graphlib

from jadapters.nnx.mixins import AdapterModelMixin, AdapterModuleMixin
from jadapters.targets import path_str, unmatched_error

_HOST_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}
_MODEL_CLASSES: dict[type, type] = {}


def _wrap_method(original):
    @functools.wraps(original)
    def method(self, *args, **kwargs):
        return self._run_host(functools.partial(original, self), args, kwargs)

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


def _every_path(root: nnx.Module) -> list[tuple[tuple[Any, ...], Any]]:
    """Every ``(path, node)`` of the graph: a shared module appears under each of its paths
    (``nnx.iter_graph`` names each node once)."""
    out: list[tuple[tuple[Any, ...], Any]] = []

    def visit(node: Any, path: tuple[Any, ...], ancestors: frozenset[int]) -> None:
        out.append((path, node))
        for key, child in nnx.iter_children(node):
            if isinstance(child, nnx.Variable) or not graphlib.is_graph_node(child):
                continue
            if id(child) not in ancestors:
                visit(child, (*path, key), ancestors | {id(child)})

    visit(root, (), frozenset({id(root)}))
    return out


def transform_nnx(model: nnx.Module, groups, *, accepted_types=()) -> nnx.Module:
    """Adds adapter support to ``model`` in place and returns it (see ``adapter_transform``)."""
    modules = [
        (path_str(path), node) for path, node in _every_path(model) if isinstance(node, nnx.Module)
    ]
    canonical = {id(node): tuple(path) for path, node in nnx.iter_graph(model)}
    found: dict[str, list[Any]] = {}
    methods_of: dict[int, set[str]] = {}
    for group, rules in groups:
        hosts: list[Any] = []
        for rule in rules:
            matched = [m for p, m in modules if p and rule.matches(p, m)]
            if not matched:
                raise unmatched_error(rule, group, sorted({p for p, _ in modules if p}))
            for m in matched:
                methods_of.setdefault(id(m), set()).update(rule.methods)
                if all(m is not h for h in hosts):
                    hosts.append(m)
        found[group] = hosts
    for hosts in found.values():
        for m in hosts:
            if isinstance(m, AdapterModelMixin) or m is model:
                raise ValueError("targets match the model itself; target its submodules.")
            m.__class__ = host_class(type(m), tuple(methods_of[id(m)]))
            if accepted_types:
                m.set_accepted_adapter_types(accepted_types)
    model.__class__ = model_class(type(model))
    model._adapter_rules = tuple((group, tuple(rules)) for group, rules in groups)
    model._adapter_groups = tuple(
        (group, tuple(canonical[id(m)] for m in hosts)) for group, hosts in found.items()
    )
    return model
