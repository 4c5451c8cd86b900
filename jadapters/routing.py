"""Per-example routing: which slot of each adapter bank every example of a batch runs through.

:func:`route` sets the ids for the calls made inside it; the runtime reads them when it
reaches an :class:`~jadapters.AdapterBank`. The ids are data (an int array, traced under
``jit``), so a new mix of adapters in the next batch is the same compiled program.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp

from jadapters.adapters.bank import check_ids

_IDS: contextvars.ContextVar[Any] = contextvars.ContextVar("jadapters_adapter_ids", default=None)


@contextlib.contextmanager
def route(adapter_ids: Any) -> Iterator[None]:
    """Routes each example of the calls inside through its own slot of every adapter bank.

    ``adapter_ids[i]`` is the slot that example ``i`` (the leading axis of a host's input)
    runs through in every :class:`~jadapters.AdapterBank` of the model, or ``-1`` for none
    (the base alone). Works for Linen and NNX alike, inside ``jit`` (the ids may be traced:
    use it inside the jitted function) and outside. Linen's ``apply(..., adapter_ids=ids)``
    is the same thing.

    Concrete ids are checked: a 1-d integer array (here), each value ``-1`` or a slot index
    of the bank (where the bank runs). A traced id outside ``[-1, slots)`` gives NaN outputs
    for its example.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jadapters
    >>> model = jadapters.adapter_transform(nn.Sequential([nn.Dense(3)]), "layers_0")
    >>> bank = jadapters.AdapterBankConfig(adapter=jadapters.LoRAConfig(rank=2), slots=4)
    >>> model = model.add_adapter("tenants", bank)
    >>> x = jnp.ones((2, 5))
    >>> variables = model.init(jax.random.key(0), x)
    >>> with route(jnp.array([0, -1])):
    ...     y = model.apply(variables, x)
    >>> y.shape
    (2, 3)
    """
    bounds = check_ids(adapter_ids)  # once here, not at every bank the call reaches
    token = _IDS.set((jnp.asarray(adapter_ids), bounds))
    try:
        yield
    finally:
        _IDS.reset(token)


def current_ids() -> tuple[Any, tuple[int, int] | None] | None:
    """``(ids, (min, max))`` set by the innermost :func:`route` (``(ids, None)`` for traced
    ids), or ``None`` outside one."""
    return _IDS.get()
