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

from flax import nnx

from jadapters.composition import check_members

INSERTIONS = ("output", "parallel", "input", "weight")
RESERVED_NAMES = ("global_cfg", "adapter_layer", "params", "base", "adapters")
# NNX keeps a host's adapters as attributes of an ``nnx.Dict``: a name equal to one of its
# attributes (``keys``, ``items``, ``train``, ...) would shadow it. One grammar serves both
# front-ends, so that a checkpoint written by one loads into the other.
CONTAINER_NAMES = tuple(sorted(a for a in dir(nnx.Dict) if not a.startswith("_")))
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_\-]*")


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
    # The composition block of its group that names it (see jadapters.composition), if any.
    composition: Any = None

    @property
    def qualified_name(self) -> str:
        """``"group:name"``, or ``name`` for the default group."""
        return f"{self.group}:{self.name}" if self.group else self.name


def check_name(name: Any) -> None:
    """Raises ``ValueError`` for a malformed or reserved adapter name.

    A name starts with an ASCII letter and goes on with letters, digits, ``_`` and ``-``; it
    is none of :data:`RESERVED_NAMES` nor :data:`CONTAINER_NAMES`.

    >>> check_name("task-1")
    >>> check_name("1task")
    Traceback (most recent call last):
    ...
    ValueError: adapter name must start with a letter ... got '1task'.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            "adapter name must start with a letter and contain only letters, digits, '_' and "
            f"'-' (route it to a group with 'group:name'), got {name!r}."
        )
    if name in RESERVED_NAMES or name in CONTAINER_NAMES:
        raise ValueError(
            f"adapter name {name!r} is reserved; pick another name. Reserved names are "
            f"{list(RESERVED_NAMES)} and the attributes of the NNX adapter container "
            f"{list(CONTAINER_NAMES)}."
        )


def check_group_name(group: Any) -> None:
    """Raises ``ValueError`` unless ``group`` can name a target group: any ``str`` without
    ``':'`` (which separates the group from the adapter name); ``''`` is the default group.

    >>> check_group_name("decoder")
    >>> check_group_name("a:b")
    Traceback (most recent call last):
    ...
    ValueError: target group names must be str without ':' ... got 'a:b'.
    """
    if not isinstance(group, str) or ":" in group:
        raise ValueError(
            "target group names must be str without ':' (':' separates the group from the "
            f"adapter name in 'group:name'); rename the group, got {group!r}."
        )


def split_qualified_name(name: Any, groups: Sequence[str]) -> tuple[str, str]:
    """Splits ``"group:name"`` into ``(group, name)``.

    A bare ``name`` (or ``":name"``) means the default group ``''``, and only that: a model
    whose targets declare no ``''`` group needs ``"group:name"``.

    Raises:
      ValueError: for a malformed or reserved name, more than one ``':'``, a group not in
        ``groups``, or a bare name on a model without a default group.

    >>> split_qualified_name("decoder:task", ["", "decoder"])
    ('decoder', 'task')
    >>> split_qualified_name("task", ["", "decoder"])
    ('', 'task')
    """
    if not isinstance(name, str):
        raise ValueError(
            f"adapter name must be a str such as 'task' or 'group:task', got {name!r}."
        )
    groups = list(groups)
    if name.count(":") > 1:
        raise ValueError(
            f"adapter name {name!r} has more than one ':'; write 'group:name' with one of the "
            f"groups {groups} (neither group nor adapter names may contain ':')."
        )
    group, sep, bare = name.rpartition(":")
    check_name(bare)
    if not sep and "" not in groups:
        example = f"{groups[0]}:{bare}" if groups else f"group:{bare}"
        raise ValueError(
            f"adapter name {name!r} names no group, and this model's targets declare no default "
            f"group ''; its groups are {groups}. Write 'group:name', e.g. {example!r}."
        )
    if group not in groups:
        raise ValueError(
            f"unknown adapter module {group!r} in {name!r}; valid modules are {groups}"
            + (" ('' is the default module)." if "" in groups else ".")
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
        if not isinstance(name, str):
            return None
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
        """A new set without adapter ``name``; a composition block naming it is cleared."""
        spec = self._require(name)
        block = spec.composition
        return AdapterSet(
            tuple(
                dataclasses.replace(s, composition=None)
                if block is not None and s.composition == block
                else s
                for s in self.specs
                if s is not spec
            )
        )

    def compositions(self) -> dict[str, Any]:
        """``{group: block}`` of the groups with a composition block."""
        return {s.group: s.composition for s in self.specs if s.composition is not None}

    def set_composition(self, group: str, block: Any) -> AdapterSet:
        """A new set in which ``block`` (``None``: no block, the chain) composes the adapters
        of ``group`` it names (see :mod:`jadapters.composition`).

        Raises:
          ValueError: for a block that is none of the composition blocks, an adapter it names
            that is unknown or of another group, or members in different stages.
        """
        check_group_name(group)
        if block is not None:
            check_members(group, block, self.specs)
        return AdapterSet(
            tuple(
                dataclasses.replace(
                    s, composition=block if block is not None and s.name in block.adapters else None
                )
                if s.group == group
                else s
                for s in self.specs
            )
        )

    def with_composition(self, name: str, block: Any) -> AdapterSet:
        """A new set with adapter ``name``'s block set to ``block``, unchecked (front-ends copy
        a model-level declaration to their hosts with it)."""
        return AdapterSet(
            tuple(
                dataclasses.replace(s, composition=block) if s.name == name else s
                for s in self.specs
            )
        )

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
