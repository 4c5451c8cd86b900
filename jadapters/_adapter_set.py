"""The bookkeeping shared by every front-end: names, groups, insertion and enabled state.

An :class:`AdapterSet` is an immutable, hashable value, so it can sit in static model
structure (a Linen module field, an NNX graph's static attributes) and a change to it means a
new trace. All naming rules and their errors live here, once.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import Any

INSERTIONS = ("output", "parallel", "input", "weight")
RESERVED_NAMES = ("global_cfg", "adapter_layer", "params", "base", "adapters")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """One adapter: its name, target group, config, insertion form and enabled state.

    >>> from jadapters import LinearAdapterConfig
    >>> AdapterSpec("task", "decoder", LinearAdapterConfig(dim=4), "output").qualified_name
    'decoder:task'
    """

    name: str
    group: str
    cfg: Any
    insertion: str
    enabled: bool = True

    @property
    def qualified_name(self) -> str:
        """``"group:name"``, or ``name`` for the default group."""
        return f"{self.group}:{self.name}" if self.group else self.name


def check_name(name: Any) -> None:
    """Raises ``ValueError`` for a malformed or reserved adapter name."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"adapter name must start with a letter or '_' and contain only letters, digits, "
            f"'_' and '-' (route to a module with 'module:name'), got {name!r}."
        )
    if name in RESERVED_NAMES:
        raise ValueError(
            f"adapter name {name!r} is reserved; reserved names are {list(RESERVED_NAMES)}."
        )


def split_qualified_name(name: Any, groups: Sequence[str]) -> tuple[str, str]:
    """Splits ``"group:name"`` into ``(group, name)``; a bare name goes to the default ``''``.

    Raises:
      ValueError: for a malformed or reserved name, or a group not in ``groups``.
    """
    if not isinstance(name, str):
        raise ValueError(f"adapter name must be a str, got {name!r}.")
    group, sep, bare = name.rpartition(":")
    if not sep:
        group, bare = "", name
    check_name(bare)
    if group not in groups:
        raise ValueError(
            f"unknown adapter module {group!r} in {name!r}; valid modules are "
            f"{list(groups)} ('' is the default module)."
        )
    return group, bare


def check_insertion(insertion: Any) -> None:
    if insertion not in INSERTIONS:
        raise ValueError(f"insertion must be one of {list(INSERTIONS)}, got {insertion!r}.")


@dataclasses.dataclass(frozen=True)
class AdapterSet:
    """An ordered, immutable collection of :class:`AdapterSpec` (insertion order is chain order).

    >>> from jadapters import LinearAdapterConfig
    >>> spec = AdapterSpec("task", "", LinearAdapterConfig(dim=4), "output")
    >>> AdapterSet().add(spec).set_enabled("task", False).enabled_names()
    []
    """

    specs: tuple[AdapterSpec, ...] = ()

    def __iter__(self):
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def enabled(self) -> list[AdapterSpec]:
        return [s for s in self.specs if s.enabled]

    def enabled_names(self) -> list[str]:
        return [s.name for s in self.specs if s.enabled]

    def get(self, name: str) -> AdapterSpec | None:
        """The adapter called ``name``; a ``"group:name"`` must also match its group."""
        group, sep, bare = name.rpartition(":")
        for spec in self.specs:
            if spec.name == bare and (not sep or spec.group == group):
                return spec
        return None

    def add(self, spec: AdapterSpec) -> AdapterSet:
        """A new set with ``spec`` appended; raises ``ValueError`` on a duplicate name."""
        check_name(spec.name)
        check_insertion(spec.insertion)
        existing = self.get(spec.name)
        if existing is not None:
            where = f" in module {existing.group!r}" if existing.group else ""
            raise ValueError(
                f"adapter name {spec.name!r} already exists{where}; names must be unique "
                "across the model. Pick another name or remove the existing adapter."
            )
        return AdapterSet(self.specs + (spec,))

    def remove(self, name: str) -> AdapterSet:
        spec = self._require(name)
        return AdapterSet(tuple(s for s in self.specs if s is not spec))

    def _require(self, name: str) -> AdapterSpec:
        if not self.specs:
            raise ValueError("no adapter is available: add one with add_adapter(name, cfg) first.")
        spec = self.get(name)
        if spec is None:
            available = [s.qualified_name for s in self.specs]
            raise ValueError(f"unknown adapter name {name!r}; available: {available}.")
        return spec

    def set_enabled(self, name: str | None = None, enabled: bool = True) -> AdapterSet:
        """A new set with one adapter (or all, for ``name=None``) enabled or disabled."""
        if not self.specs:
            raise ValueError(
                "no adapter is available to enable or disable: add one with "
                "add_adapter(name, cfg) first."
            )
        if name is None:
            targets = set(self.names())
        else:
            targets = {self._require(name).name}
        return AdapterSet(
            tuple(
                dataclasses.replace(s, enabled=bool(enabled)) if s.name in targets else s
                for s in self.specs
            )
        )

    def in_group(self, group: str) -> AdapterSet:
        return AdapterSet(tuple(s for s in self.specs if s.group == group))

    @classmethod
    def of(cls, specs: Iterable[AdapterSpec]) -> AdapterSet:
        result = cls()
        for spec in specs:
            result = result.add(spec)
        return result


def check_accepted(cfg: Any, module_cls: type, accepted: Sequence[type]) -> None:
    """Raises ``ValueError`` if ``accepted`` is non-empty and lists neither type of ``cfg``."""
    if accepted and not any(t in (type(cfg), module_cls) for t in accepted):
        names = [t.__name__ for t in accepted]
        raise ValueError(
            f"adapter type {module_cls.__name__} is not accepted here; accepted types are "
            f"{names}. Use set_accepted_adapter_types to change them."
        )
