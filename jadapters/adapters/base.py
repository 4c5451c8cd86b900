"""What every adapter shares: the config base class and the call protocol.

An adapter's functional form is a Flax Linen module whose ``__call__(x, *, deterministic)``
returns the adapter's raw output, and which carries an ``adapter_strategy`` field that joins
that output to the stream. Linen modules are pure ``init``/``apply`` functions, so the same
module serves Linen models directly and NNX models through :class:`jadapters.NNXAdapter`:
each adapter's math is written once.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, ClassVar

import jax

import jadapters._checks as _checks
from jadapters._activations import ACTIVATIONS
from jadapters.registry import build_adapter

# The field check of an adapter's ``activation``.
check_activation = functools.partial(_checks.check_choice, choices=tuple(sorted(ACTIVATIONS)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """Base class of adapter configs: frozen dataclasses whose fields match the module's.

    A subclass lists each field's check in ``field_checks`` (the same table as its module's);
    they run when the config is built, so a bad value fails there, naming the field.

    >>> import jadapters
    >>> cfg = jadapters.LoRAConfig(rank=4)
    >>> isinstance(cfg, AdapterConfig), type(cfg.build()).__name__
    (True, 'LoRA')
    >>> jadapters.LoRAConfig(rank=0)
    Traceback (most recent call last):
    ValueError: rank must be a positive int, got 0.
    """

    field_checks: ClassVar[Mapping[str, _checks.Check]] = {}

    def __post_init__(self):
        _checks.apply_checks(self, self.field_checks)

    def build(self) -> Any:
        """Builds the Flax module this config describes (through the registry)."""
        return build_adapter(self)


class AdapterMath:
    """What an adapter type owns beside its forward: where it goes by default, its weight
    schema and, if it is linear in its host's kernel, the algebra that folds it in.

    Mixed into each adapter's Linen module. Code above the adapters (merge, checkpoints,
    summaries) asks the type through these members and never reads a parameter by name.

    Attributes:
      field_checks: each configuration field's check (``jadapters._checks``); the module runs
        them in its ``__post_init__`` and its config in its own.
      default_insertion: ``"output"``, ``"parallel"``, ``"input"`` or ``"weight"``.
      needs_out_features: the module is called with ``out_features=`` (the host's output
        width).
      merge_insertion: the insertion at which :meth:`fold` applies; ``None`` for a type that
        cannot be folded into a kernel.
      weight_axes: the weight schema: each parameter's path (``"down/kernel"``) and the
        logical name of each of its axes: ``"in"``/``"out"`` (the host's input and output
        width), ``"features"`` (the width of the stream the adapter sits on), ``"rank"`` or
        ``"bottleneck"``.
    """

    field_checks: ClassVar[Mapping[str, _checks.Check]] = {}
    default_insertion: ClassVar[str] = "output"
    needs_out_features: ClassVar[bool] = False
    merge_insertion: ClassVar[str | None] = None
    weight_axes: ClassVar[Mapping[str, tuple[str, ...]]] = {}

    def fold(
        self, params: Any, kernel: jax.Array, bias: jax.Array | None, layout: Any, *, factor: float
    ) -> tuple[jax.Array, jax.Array | None]:
        """Folds ``factor`` times this adapter into ``kernel`` (and ``bias``), in float32.

        Raises:
          ValueError: for a type (or a host layout) that cannot be folded; the message
            continues a sentence whose subject is the adapter.
        """
        raise ValueError("cannot be folded into a kernel.")
