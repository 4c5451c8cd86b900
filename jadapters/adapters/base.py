"""What every adapter shares: the config base class and the call protocol.

An adapter's functional form is a Flax Linen module whose ``__call__(x, *, deterministic)``
returns the adapter's raw output, and which carries an ``adapter_strategy`` field that joins
that output to the stream. Linen modules are pure ``init``/``apply`` functions, so the same
module serves Linen models directly and NNX models through :class:`jadapters.NNXAdapter`:
each adapter's math is written once.
"""

from __future__ import annotations

import dataclasses
from typing import Any


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
        from jadapters.config import build_adapter

        return build_adapter(self)
