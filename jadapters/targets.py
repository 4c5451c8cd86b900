"""Where adapters go: named groups of module-path rules, matched against a model's modules."""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from jadapters._adapter_set import check_group_name


@dataclasses.dataclass(frozen=True, kw_only=True)
class Target:
    """A rule selecting host modules by path.

    Module paths are the names from the root joined by ``/`` (``"encoder/layers_0/mlp"``).

    Attributes:
      pattern: a regular expression that must match the *whole* path.
      methods: the host methods adapters wrap; ``("__call__",)`` by default.
      module_types: if given, only hosts that are instances of one of these classes match.
      layers: for a host inside a scanned layer stack (Linen ``nn.scan``; NNX ``nnx.scan``
        over an ``nnx.vmap``-built stack), the layers whose adapters act, as layer indices
        (negative ones count from the end: ``range(-4, 0)`` is the last four); ``None`` (the
        default) means every layer. Weights are stacked over all layers; on the others the
        stream passes through exactly (the adapter's output is dropped) and their slice gets
        no gradient, so the model computes what the unrolled model with adapters on those
        layers only computes.

    >>> Target(pattern=r".*/mlp").matches("encoder/layers_0/mlp", object())
    True
    >>> Target(pattern="layers/mlp", layers=range(-2, 0)).layer_gate(4)
    (False, False, True, True)
    """

    pattern: str
    methods: tuple[str, ...] = ("__call__",)
    module_types: tuple[type, ...] = ()
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.pattern, str):
            raise ValueError(f"pattern must be a str regular expression, got {self.pattern!r}.")
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ValueError(
                f"pattern {self.pattern!r} is not a valid regular expression: {err}"
            ) from err
        if isinstance(self.methods, str) or not self.methods:
            raise ValueError(f"methods must be a non-empty tuple of names, got {self.methods!r}.")
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "module_types", tuple(self.module_types))
        if self.layers is not None:
            layers = self.layers
            if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
                raise ValueError(
                    f"layers must be layer indices (e.g. range(-4, 0) for the last four), got "
                    f"{layers!r}."
                )
            layers = tuple(layers)
            if not layers or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in layers
            ):
                raise ValueError(
                    f"layers must be a non-empty sequence of int layer indices (e.g. "
                    f"range(-4, 0) for the last four), got {self.layers!r}."
                )
            object.__setattr__(self, "layers", layers)

    def layer_gate(self, num_layers: int) -> tuple[bool, ...]:
        """Which of a stack's ``num_layers`` layers this rule selects.

        Raises:
          ValueError: for a layer index outside the stack.
        """
        if self.layers is None:
            return (True,) * num_layers
        bad = [i for i in self.layers if not -num_layers <= i < num_layers]
        if bad:
            raise ValueError(
                f"Target {self.pattern!r} has layers={self.layers}, but the stack has "
                f"{num_layers} layers: indices {bad} are out of range; use indices in "
                f"[-{num_layers}, {num_layers})."
            )
        chosen = {i % num_layers for i in self.layers}
        return tuple(i in chosen for i in range(num_layers))

    def matches(self, path: str, module: Any) -> bool:
        if self.module_types and not isinstance(module, self.module_types):
            return False
        return re.fullmatch(self.pattern, path) is not None

    def applies(self, path: str, module: Any, method: str) -> bool:
        """Whether a call of ``method`` on ``module`` at ``path`` is one this rule wraps."""
        return method in self.methods and self.matches(path, module)


TargetsLike = str | Target | Sequence[str | Target] | Mapping[str, Any]


_FORMS = (
    "a regex string, a Target, a list of them (the default group ''), or a mapping of group "
    'names to those (e.g. {"encoder": r"encoder/.*/mlp", "decoder": [r"decoder/.*/mlp"]})'
)


def _as_rules(value: Any, group: str, targets: Any) -> tuple[Target, ...]:
    where = "targets" if value is targets else f"targets[{group!r}]"
    if isinstance(value, (str, Target)):
        value = [value]
    elif isinstance(value, (Mapping, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"{where} must be {_FORMS}; got {value!r}.")
    rules = []
    for item in value:
        if isinstance(item, str):
            rules.append(Target(pattern=item))
        elif isinstance(item, Target):
            rules.append(item)
        else:
            raise ValueError(
                f"{where} must hold regex strings or Target rules, got {item!r} in {value!r}."
            )
    if not rules:
        raise ValueError(f"{where} is empty; give at least one pattern, got {value!r}.")
    return tuple(rules)


def normalize_targets(targets: TargetsLike) -> tuple[tuple[str, tuple[Target, ...]], ...]:
    """Turns the user's ``targets`` into ``((group, rules), ...)``, ``''`` first if present.

    A pattern, a :class:`Target` or a list of them is the default group ``''``. A mapping
    names its groups; it has a default group only if it has a ``''`` entry (a bare adapter
    name then goes there; without one, every adapter needs ``"group:name"``).

    Raises:
      ValueError: for ``targets`` of any other form (naming the accepted ones), an empty
        group, a rule that is neither a regex string nor a :class:`Target`, or a group name
        that is not a ``str`` without ``':'``.

    >>> [group for group, _ in normalize_targets({"encoder": "enc/.*", "": "dec/.*"})]
    ['', 'encoder']
    >>> [group for group, _ in normalize_targets({"encoder": "enc/.*", "decoder": "dec/.*"})]
    ['encoder', 'decoder']
    >>> normalize_targets(None)
    Traceback (most recent call last):
    ...
    ValueError: targets must be a regex string, a Target, a list of them ... got None.
    """
    if isinstance(targets, Mapping):
        if not targets:
            raise ValueError(f"targets is empty; name at least one group: {_FORMS}.")
        groups = []
        for group, value in targets.items():
            check_group_name(group)
            if "/" in group:  # NNX names a module's own adapters' group by its path ("a/0/b")
                raise ValueError(
                    f"target group names must not contain '/', got {group!r}: a group named "
                    "like a module path would clash with the adapters added on that module "
                    "(NNX names their group by the module's path). Rename the group."
                )
            groups.append((group, _as_rules(value, group, targets)))
        groups.sort(key=lambda g: g[0] != "")
        return tuple(groups)
    return (("", _as_rules(targets, "", targets)),)


def pattern_matches(rules: Iterable[Target], path: str) -> bool:
    """Whether any of ``rules``' patterns matches the whole ``path`` (methods and module
    types aside: this is what a path alone can tell)."""
    return any(re.fullmatch(rule.pattern, path) is not None for rule in rules)


def closest_paths(pattern: str, paths: Iterable[str], limit: int = 12) -> list[str]:
    """Existing paths sorted by similarity to ``pattern``, most similar first."""
    paths = sorted(set(paths))
    return sorted(paths, key=lambda p: -difflib.SequenceMatcher(None, pattern, p).ratio())[:limit]


def unmatched_error(rule: Target, group: str, paths: Iterable[str]) -> ValueError:
    shown = closest_paths(rule.pattern, paths)
    return ValueError(
        f"target pattern {rule.pattern!r} (group {group!r}) matches no module. Module paths "
        f"that exist, closest first: {shown}. Patterns must match the whole path."
    )


def layer_gate(rules: Iterable[Target], path: str, num_layers: int) -> tuple[bool, ...] | None:
    """The layers of a ``num_layers`` stack at ``path`` that ``rules`` select (the union of the
    rules whose pattern matches it), or ``None`` when they select every layer.

    >>> layer_gate([Target(pattern="l/mlp", layers=(0,))], "l/mlp", 3)
    (True, False, False)
    """
    gate = [False] * num_layers
    for rule in rules:
        if re.fullmatch(rule.pattern, path) is not None:
            gate = [g or r for g, r in zip(gate, rule.layer_gate(num_layers), strict=True)]
    return None if all(gate) else tuple(gate)


def has_layer_rules(rules: Iterable[Target]) -> bool:
    """Whether any of ``rules`` selects layers of a stack."""
    return any(rule.layers is not None for rule in rules)


def path_str(path: Sequence[Any]) -> str:
    return "/".join(str(p) for p in path)
