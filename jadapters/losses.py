"""The auxiliary-loss channel.

Strategies may return an auxiliary loss (``ResidualAddStrategy(l2_lambda=...)`` does in
training). The front-ends record each one where JAX code can collect it:

* Linen: in the ``"adapter_losses"`` collection. Apply with
  ``mutable=["adapter_losses"]`` and pass the returned collection to
  :func:`total_auxiliary_loss`.
* NNX: as :class:`AdapterLoss` values. Run the model under
  ``nnx.capture(model, jadapters.AdapterLoss)(x)``, which returns ``(output, losses)``, or
  call it plainly and collect the ``aux_loss`` variables left on the adapters with
  ``nnx.pop(model, jadapters.AdapterLoss)``. Pass either to :func:`total_auxiliary_loss`.

Both record the sum over calls, so a host called twice contributes twice.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

AUX_LOSS_COLLECTION = "adapter_losses"


class AdapterLoss(nnx.Variable):
    """NNX variable type holding an adapter's auxiliary loss from the last forward."""


def total_auxiliary_loss(losses: Any) -> jax.Array:
    """Sums every auxiliary loss in ``losses`` (a Linen collection, an NNX state, any pytree).

    >>> import jax.numpy as jnp
    >>> total_auxiliary_loss({"block": {"a": jnp.array(0.5)}, "head": {"b": jnp.array(1.0)}})
    Array(1.5, dtype=float32)
    >>> total_auxiliary_loss({})
    Array(0., dtype=float32)
    """
    leaves = jax.tree.leaves(losses)
    total = jnp.zeros((), jnp.float32)
    for leaf in leaves:
        total = total + jnp.sum(jnp.asarray(leaf, jnp.float32))
    return total
