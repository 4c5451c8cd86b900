"""What every adapter shares: the config base class and the call protocol.

An adapter's functional form is a Flax Linen module whose ``__call__(x, *, deterministic)``
returns the adapter's raw output, and which carries an ``adapter_strategy`` field that joins
that output to the stream. Linen modules are pure ``init``/``apply`` functions, so the same
module serves Linen models directly and NNX models through :class:`jadapters.NNXAdapter`:
each adapter's math is written once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax

from jadapters.registry import build_adapter


def adapter_fields(obj: Any) -> dict[str, Any]:
    """The configuration fields of an adapter module or config (Linen's ``parent``/``name``
    and the keyword-only marker left out), so a module and its config share one check."""
    return {
        f.name: getattr(obj, f.name)
        for f in dataclasses.fields(obj)
        if f.name not in ("parent", "name", "_")
    }


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """Base class of adapter configs: frozen dataclasses whose fields match the module's."""

    def build(self) -> Any:
        """Builds the Flax module this config describes (through the registry)."""
        return build_adapter(self)


class AdapterMath:
    """What an adapter type owns beside its forward: where it goes by default, its weight
    schema and, if it is linear in its host's kernel, the algebra that folds it in.

    Mixed into each adapter's Linen module. Code above the adapters (merge, checkpoints,
    summaries) asks the type through these members and never reads a parameter by name.

    Attributes:
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
