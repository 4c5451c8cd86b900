"""Renders the public API's docstrings as Markdown: ``python -m jadapters.apidoc``.

Every name in ``jadapters.__all__`` gets a section: its signature and docstring; for a class,
also its public methods and properties (those it defines, or takes from a jadapters base
class that is not public itself); for a constant, its value and the docstring of the module
that defines it.

>>> text = render()
>>> "## `AdaptedLinen` (class)" in text and "### `AdaptedLinen.init_adapters`" in text
True
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pathlib
import sys
from types import ModuleType
from typing import Any


def is_constant(obj: Any) -> bool:
    """Whether a public name is a plain value (documented by its module) rather than a class
    or a function.

    >>> is_constant("adapters"), is_constant(render)
    (True, False)
    """
    return not (inspect.isclass(obj) or callable(obj))


def defining_module(name: str) -> ModuleType:
    """The module that ``jadapters/__init__.py`` imports the public ``name`` from.

    >>> defining_module("ADAPTER_COLLECTION").__name__
    'jadapters.storage'
    """
    tree = ast.parse((pathlib.Path(__file__).parent / "__init__.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if any((alias.asname or alias.name) == name for alias in node.names):
                return importlib.import_module(node.module)
    raise KeyError(f"{name!r} is not imported by jadapters/__init__.py")


def _signature(obj: Any, drop_first: bool = False) -> str | None:
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    if drop_first:
        params = list(signature.parameters.values())[1:]
        signature = signature.replace(parameters=params)
    return str(signature)


def _members(cls: type, public: set[str]) -> list[tuple[str, Any]]:
    """``(name, attribute)`` of the public methods and properties ``cls`` documents: those of
    jadapters classes in its MRO that are ``cls`` itself or not public (a public base documents
    its own)."""
    members = []
    for name in sorted(dir(cls)):
        if name.startswith("_"):
            continue
        owner = next((c for c in cls.__mro__ if name in c.__dict__), None)
        if owner is None or not owner.__module__.startswith("jadapters"):
            continue
        if owner is not cls and owner.__name__ in public:
            continue
        attr = owner.__dict__[name]
        if isinstance(attr, (property, classmethod, staticmethod)) or inspect.isfunction(attr):
            members.append((name, attr))
    return members


def _member_lines(cls_name: str, name: str, attr: Any) -> list[str]:
    if isinstance(attr, property):
        lines = [f"### `{cls_name}.{name}` (property)", ""]
        doc = inspect.getdoc(attr.fget) if attr.fget else None
    else:
        func = attr.__func__ if isinstance(attr, (classmethod, staticmethod)) else attr
        signature = _signature(func, drop_first=not isinstance(attr, staticmethod))
        lines = [f"### `{cls_name}.{name}`", ""]
        if signature:
            lines += [f"`{name}{signature}`", ""]
        doc = inspect.getdoc(func)
    return lines + ([doc, ""] if doc else [])


def render() -> str:
    """The Markdown reference of every name in ``jadapters.__all__``."""
    import jadapters

    public = set(jadapters.__all__)
    lines = [
        "# jadapters API",
        "",
        "Generated from the docstrings by `python -m jadapters.apidoc`; do not edit by hand.",
        "",
    ]
    for name in sorted(jadapters.__all__, key=str.lower):
        obj = getattr(jadapters, name)
        if is_constant(obj):
            module = defining_module(name)
            lines += [f"## `{name}` (constant)", "", f"`{name} = {obj!r}`", ""]
            lines += [f"Defined in `{module.__name__}`:", "", inspect.cleandoc(module.__doc__), ""]
            continue
        kind = "class" if inspect.isclass(obj) else "function"
        lines += [f"## `{name}` ({kind})", ""]
        if kind == "function":
            signature = _signature(obj)
            if signature:
                lines += [f"`{name}{signature}`", ""]
        doc = inspect.getdoc(obj)
        if doc:
            lines += [doc, ""]
        if kind == "class":
            for member, attr in _members(obj, public):
                lines += _member_lines(name, member, attr)
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
