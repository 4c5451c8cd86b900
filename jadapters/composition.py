"""Composition blocks: how the adapters of one group combine at each of its hosts, as data.

Without a block the enabled adapters of a host run as a chain (:class:`Stack` in chain
order): each one's output, joined to the stream by its strategy, is the next one's input. A
block declared for a group with ``set_composition(group, block)`` changes that for the
adapters it names; the group's other adapters still run as a chain, and the block takes the
chain position of its first member. Blocks are frozen dataclasses, written to JSON
(:func:`composition_to_dict`) and into adapter checkpoints.

With ``s`` the stream where the block runs (the host's output, or its input for ``input``
adapters), ``x_i`` what adapter ``i`` would be fed alone there and
``y_i = strategy_i(s, adapter_i(x_i))`` its full output alone (its strategy applied):

* :class:`Stack`: the members in the block's order, each on the previous one's output;
* :class:`Parallel`: ``s + sum_i (y_i - s)``, the sum of the members' deltas;
* :class:`Average`: ``sum_i (w_i / sum_j w_j) * y_i``, the weighted mean of the full
  outputs (equal weights: their mean);
* :class:`BatchSplit`: rows ``sizes[0]`` of the leading axis through the first member alone,
  the next ``sizes[1]`` through the second, and so on.
* :class:`Fuse`: ``strategy(s, sum_n a_n * (d_n @ Wv))`` with ``d_n = y_n - s`` and
  ``a_n = softmax_n(<s @ Wq + bq, d_n @ Wk + bk> / T)``: AdapterFusion, whose weights are
  those of the fusion adapter the block names (:class:`~jadapters.AdapterFusion`).

A disabled member is left out: :class:`Parallel` adds no delta for it, :class:`Average`
normalises the weights of the enabled members only, :class:`Fuse` attends over the enabled
members only, and :class:`BatchSplit` passes its rows through unchanged. All members must run
in the same stage: ``input`` adapters, ``weight`` adapters (LoRA), or ``output``/``parallel``
adapters.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from jadapters._checks import show
from jadapters.adapters.fusion import AdapterFusionConfig

# insertion -> stage: the adapters of one block run together in one stage of the host call.
STAGES = {"input": "input", "weight": "weight", "output": "output", "parallel": "output"}


def _names(kind: str, names: tuple[Any, ...], adapters: Any) -> tuple[str, ...]:
    if adapters is not None:
        if names:
            raise ValueError(
                f"{kind} takes adapter names either as arguments or as adapters=, not both; "
                f"got {show(names)} and adapters={show(adapters)}."
            )
        if isinstance(adapters, str) or not isinstance(adapters, Sequence):
            raise ValueError(
                f"{kind} adapters must be a sequence of adapter names, got {show(adapters)}."
            )
        names = tuple(adapters)
    if not names:
        raise ValueError(f"{kind} needs at least one adapter name, got adapters=().")
    for name in names:
        if not isinstance(name, str) or not name or ":" in name:
            raise ValueError(
                f"{kind} adapters must be adapter names (str, without the 'group:'; the group "
                f"is set_composition's argument), got {show(name)} in adapters={show(names)}."
            )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"{kind} names adapters {duplicates} more than once in adapters={show(names)}."
        )
    return names


@dataclasses.dataclass(frozen=True, init=False)
class Stack:
    """Runs the adapters one after the other, in the order given.

    >>> Stack("a", "b").adapters
    ('a', 'b')
    """

    adapters: tuple[str, ...]

    def __init__(self, *names: str, adapters: Sequence[str] | None = None):
        object.__setattr__(self, "adapters", _names(type(self).__name__, names, adapters))


@dataclasses.dataclass(frozen=True, init=False)
class Parallel:
    """Adds the adapters' deltas on the same input: ``s + sum_i (y_i - s)``.

    Each adapter ``i`` is fed what it would be fed alone; ``y_i`` is its output alone (its
    strategy applied) and ``s`` the stream before the block.

    >>> Parallel("a", "b")
    Parallel(adapters=('a', 'b'))
    """

    adapters: tuple[str, ...]

    def __init__(self, *names: str, adapters: Sequence[str] | None = None):
        object.__setattr__(self, "adapters", _names(type(self).__name__, names, adapters))


@dataclasses.dataclass(frozen=True, init=False)
class Average:
    """The weighted mean of the adapters' full outputs: ``sum_i (w_i / sum_j w_j) * y_i``.

    ``y_i = strategy_i(s, adapter_i(x_i))`` is adapter ``i``'s output alone, the stream
    included, so equal weights (the default) give the mean ``sum_i y_i / n``. Weights are
    finite, non-negative and sum to more than zero; they are normalised when the block runs,
    over the enabled members.

    >>> Average("a", "b", weights=(1, 3)).normalized_weights()
    (0.25, 0.75)
    >>> Average("a", "b").normalized_weights()
    (0.5, 0.5)
    """

    adapters: tuple[str, ...]
    weights: tuple[float, ...] | None = None

    def __init__(
        self,
        *names: str,
        adapters: Sequence[str] | None = None,
        weights: Sequence[float] | None = None,
    ):
        names = _names("Average", names, adapters)
        if weights is not None:
            if isinstance(weights, str) or not isinstance(weights, Sequence):
                raise ValueError(
                    f"Average weights must be a sequence, got weights={show(weights)}."
                )
            if len(weights) != len(names):
                raise ValueError(
                    f"Average needs one weight per adapter: weights={show(weights)} has "
                    f"{len(weights)}, adapters={show(names)} has {len(names)}."
                )
            bad = [
                w
                for w in weights
                if isinstance(w, bool)
                or not isinstance(w, (int, float))
                or not math.isfinite(w)
                or w < 0
            ]
            if bad:
                raise ValueError(
                    f"Average weights must be finite, non-negative numbers, got "
                    f"weights={show(weights)} (bad: {show(bad)})."
                )
            if sum(weights) <= 0:
                raise ValueError(
                    f"Average weights must sum to more than zero, got weights={show(weights)}."
                )
            weights = tuple(float(w) for w in weights)
        object.__setattr__(self, "adapters", names)
        object.__setattr__(self, "weights", weights)

    def normalized_weights(self, enabled: Sequence[str] | None = None) -> tuple[float, ...]:
        """``w_i / sum_j w_j`` over the members in ``enabled`` (all by default); a member not
        in ``enabled`` gets 0. Raises ``ValueError`` if the enabled weights sum to zero."""
        raw = self.weights or (1.0,) * len(self.adapters)
        raw = tuple(
            w if enabled is None or n in enabled else 0.0
            for n, w in zip(self.adapters, raw, strict=True)
        )
        total = sum(raw)
        if total <= 0:
            raise ValueError(
                f"the enabled adapters of {self!r} have weights summing to zero; enable an "
                "adapter with a positive weight."
            )
        return tuple(w / total for w in raw)


@dataclasses.dataclass(frozen=True, init=False)
class BatchSplit:
    """Each part of the batch (leading axis) through its own adapter.

    Rows ``[0, sizes[0])`` go through the first adapter alone, the next ``sizes[1]`` rows
    through the second, and so on. The sizes must sum to the batch: a call with another
    batch raises ``ValueError`` when it is traced.

    >>> BatchSplit("a", "b", sizes=(2, 6)).sizes
    (2, 6)
    """

    adapters: tuple[str, ...]
    sizes: tuple[int, ...]

    def __init__(
        self,
        *names: str,
        adapters: Sequence[str] | None = None,
        sizes: Sequence[int] | None = None,
    ):
        names = _names("BatchSplit", names, adapters)
        if isinstance(sizes, str) or not isinstance(sizes, Sequence):
            raise ValueError(
                f"BatchSplit needs sizes=, a sequence of one positive int per adapter, got "
                f"sizes={show(sizes)}."
            )
        if len(sizes) != len(names):
            raise ValueError(
                f"BatchSplit needs one size per adapter: sizes={show(sizes)} has {len(sizes)}, "
                f"adapters={show(names)} has {len(names)}."
            )
        bad = [s for s in sizes if isinstance(s, bool) or not isinstance(s, int) or s <= 0]
        if bad:
            raise ValueError(
                f"BatchSplit sizes must be positive ints, got sizes={show(sizes)} "
                f"(bad: {show(bad)})."
            )
        object.__setattr__(self, "adapters", names)
        object.__setattr__(self, "sizes", tuple(sizes))

    def check_batch(self, batch: int) -> None:
        """Raises ``ValueError`` unless the sizes sum to ``batch``.

        >>> BatchSplit("a", "b", sizes=(2, 2)).check_batch(5)
        Traceback (most recent call last):
        ...
        ValueError: BatchSplit sizes=(2, 2) sum to 4, but the batch (leading axis) is 5; ...
        """
        if sum(self.sizes) != batch:
            raise ValueError(
                f"BatchSplit sizes={self.sizes} sum to {sum(self.sizes)}, but the batch "
                f"(leading axis) is {batch}; declare sizes that sum to the batch."
            )


@dataclasses.dataclass(frozen=True, init=False, repr=False)
class Fuse:
    """AdapterFusion (Pfeiffer et al. 2021): attention over the adapters' outputs, queried
    by the stream, through a trainable fusion adapter.

    ``fusion`` names an adapter of the same group whose config is a
    :class:`~jadapters.AdapterFusionConfig`; it holds the fusion's query, key and value
    projections as ordinary adapter weights (listed, trained, saved and loaded like any
    adapter's). With ``d_n = y_n - s`` the enabled members' deltas::

        a_n = softmax_n(<s @ Wq + bq, d_n @ Wk + bk> / T)
        out = strategy(s, sum_n a_n * (d_n @ Wv))     (residual add: s + ...)

    (see :class:`~jadapters.AdapterFusion` for the initialisation: uniform attention and
    ``Wv`` ~ identity, so that the block starts at the members' mean output).

    Like every block, ``adapters`` lists every adapter the block runs, here the fused ones
    and then the fusion adapter; :attr:`fused` lists the fused ones. To train the fusion
    alone, keep the members enabled and train only it (``trainable=["<fusion>"]`` of
    :func:`jadapters.linen_train_step` and :func:`jadapters.adapter_optimizer`). A disabled
    fusion adapter turns the block off: the enabled members then run as a chain, as without
    a block. Members must be output, parallel or input adapters: a fusion attends over
    outputs, and a weight adapter (LoRA) has none of its own at a host (use ``Parallel`` or
    ``Average`` there).

    >>> block = Fuse("a", "b", fusion="ab")
    >>> block.fused, block.fusion, block.adapters
    (('a', 'b'), 'ab', ('a', 'b', 'ab'))
    >>> block
    Fuse(adapters=('a', 'b'), fusion='ab')
    """

    adapters: tuple[str, ...]
    fusion: str

    def __init__(
        self,
        *names: str,
        adapters: Sequence[str] | None = None,
        fusion: str | None = None,
    ):
        names = _names("Fuse", names, adapters)
        if not isinstance(fusion, str) or not fusion or ":" in fusion:
            raise ValueError(
                f"Fuse needs fusion=, the name of an adapter of the group with an "
                f"AdapterFusionConfig (str, without the 'group:'), got fusion={show(fusion)}; "
                f"e.g. Fuse({', '.join(map(repr, names))}, fusion='fusion')."
            )
        if fusion in names:
            raise ValueError(
                f"Fuse fusion={fusion!r} is also among the fused adapters={show(names)}; the "
                "fusion adapter attends over the others: name it in fusion= only."
            )
        if len(names) < 2:
            raise ValueError(
                f"Fuse fuses two or more adapters, got adapters={show(names)}; with one, run "
                "it alone (no block)."
            )
        object.__setattr__(self, "adapters", (*names, fusion))
        object.__setattr__(self, "fusion", fusion)

    @property
    def fused(self) -> tuple[str, ...]:
        """The adapters attended over, in the block's order (``adapters`` without the
        fusion adapter)."""
        return self.adapters[:-1]

    def __repr__(self) -> str:
        return f"Fuse(adapters={self.fused!r}, fusion={self.fusion!r})"


BLOCKS: tuple[type, ...] = (Stack, Parallel, Average, BatchSplit, Fuse)


def check_block(block: Any) -> None:
    """Raises ``ValueError`` unless ``block`` is a composition block."""
    if not isinstance(block, BLOCKS):
        names = [b.__name__ for b in BLOCKS]
        raise ValueError(f"block must be one of {names} (or None), got {show(block)}.")


def check_members(group: str, block: Any, specs: Sequence[Any]) -> None:
    """Raises ``ValueError`` unless every adapter ``block`` names is one of ``specs`` (the
    model's adapters), in ``group``, and all of them run in one stage."""
    check_block(block)
    by_name = {s.name: s for s in specs}
    in_group = [s.name for s in specs if s.group == group]
    for name in block.adapters:
        spec = by_name.get(name)
        if spec is None:
            raise ValueError(
                f"unknown adapter name {name!r} in {block!r}; the adapters of group {group!r} "
                f"are {in_group}."
            )
        if spec.group != group:
            raise ValueError(
                f"adapter {name!r} in {block!r} belongs to group {spec.group!r}, not to group "
                f"{group!r}; a block combines the adapters of one group (its hosts), which are "
                f"{in_group}."
            )
    if isinstance(block, Fuse):
        _check_fuse(block, by_name)
    stages = {n: by_name[n].insertion for n in block.adapters}
    if len({STAGES[i] for i in stages.values()}) > 1:
        raise ValueError(
            f"the adapters of {block!r} must run in one stage of the host call (input; weight; "
            f"output and parallel), got insertions {stages}."
        )


def _check_fuse(block: Fuse, by_name: dict[str, Any]) -> None:
    """The fusion adapter is an AdapterFusion, and every member is not one and has outputs."""
    fusion = by_name[block.fusion]
    if not isinstance(fusion.cfg, AdapterFusionConfig):
        raise ValueError(
            f"fusion={block.fusion!r} in {block!r} must name an adapter added with "
            f"jadapters.AdapterFusionConfig(), got one of type {type(fusion.cfg).__name__}; "
            f"add one, e.g. add_adapter({block.fusion!r}, jadapters.AdapterFusionConfig()), "
            "or name the one you added."
        )
    for name in block.fused:
        spec = by_name[name]
        if isinstance(spec.cfg, AdapterFusionConfig):
            raise ValueError(
                f"adapter {name!r} in {block!r} is a fusion adapter (AdapterFusionConfig); "
                "a Fuse block fuses adapters with outputs of their own: name it in fusion= of "
                "its own block, not among the fused."
            )
        if spec.insertion == "weight":
            raise ValueError(
                f"adapter {name!r} in {block!r} has insertion 'weight' "
                f"({type(spec.cfg).__name__}): it changes the host's kernel and has no output "
                "of its own to attend over, so it cannot be fused. Fuse output, parallel or "
                "input adapters; combine weight adapters with Parallel or Average."
            )


def check_foldable(spec: Any, specs: Sequence[Any]) -> None:
    """Raises ``ValueError`` if adapter ``spec`` runs in a :class:`Fuse` block whose fusion
    adapter is enabled (among ``specs``, the model's adapters): attention over adapters'
    outputs is not linear in the host's kernel, so no merge can fold it."""
    block = spec.composition
    if not isinstance(block, Fuse):
        return
    fusion = next((s for s in specs if s.name == block.fusion), None)
    if fusion is not None and fusion.enabled:
        raise ValueError(
            f"adapter {spec.name!r} runs in {block!r}, whose fusion adapter {block.fusion!r} "
            "is enabled: the fusion's softmax attention over the adapters' outputs is not "
            "linear in the host's kernel, so a fused model cannot be merged into the base. "
            f"Keep it unmerged, or disable {block.fusion!r} (the block is then off and its "
            "members chain) before merging."
        )


def composition_to_dict(block: Any) -> dict[str, Any]:
    """A JSON-ready dict of a composition block, with its ``"type"``.

    >>> composition_to_dict(Average("a", "b", weights=(1, 3)))
    {'type': 'Average', 'adapters': ['a', 'b'], 'weights': [1.0, 3.0]}
    """
    check_block(block)
    out: dict[str, Any] = {"type": type(block).__name__}
    for field in dataclasses.fields(block):
        value = getattr(block, field.name)
        out[field.name] = list(value) if isinstance(value, tuple) else value
    if isinstance(block, Fuse):  # as the constructor takes them: the fused ones only
        out["adapters"] = list(block.fused)
    return out


def composition_from_dict(data: Any) -> Any:
    """Rebuilds a block from :func:`composition_to_dict` output; every failure of this
    untrusted data is a ``ValueError``.

    >>> composition_from_dict({"type": "BatchSplit", "adapters": ["a", "b"], "sizes": [1, 3]})
    BatchSplit(adapters=('a', 'b'), sizes=(1, 3))
    >>> composition_from_dict({"type": "os.system"})
    Traceback (most recent call last):
    ...
    ValueError: unknown composition block type 'os.system'; known: [...].
    """
    table = {cls.__name__: cls for cls in BLOCKS}
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise ValueError(f"a composition block must be an object with a 'type', got {show(data)}.")
    cls = table.get(data["type"])
    if cls is None:
        raise ValueError(
            f"unknown composition block type {show(data['type'])}; known: {sorted(table)}."
        )
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in data if k != "type" and k not in known)
    if unknown:
        raise ValueError(f"unknown fields {unknown} for {cls.__name__}; known: {sorted(known)}.")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k != "type"}
    if "adapters" not in kwargs:
        raise ValueError(f"{cls.__name__} block is missing required field 'adapters'.")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"cannot build {cls.__name__} from {show(kwargs)}: {err}") from err
