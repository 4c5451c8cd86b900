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

>>> import jax, jax.numpy as jnp, flax.linen as nn, jadapters
>>> strategy = jadapters.ResidualAddStrategy(l2_lambda=0.5)  # L2 penalty on the adapter output
>>> cfg = jadapters.LinearAdapterConfig(dim=2, adapter_strategy=strategy)
>>> model = jadapters.adapter_transform(nn.Sequential([nn.Dense(2)]), "layers_0")
>>> model = model.add_adapter("task", cfg)
>>> x = jnp.ones((1, 3))
>>> variables = model.init(jax.random.key(0), x)
>>> variables["adapters"] = jax.tree.map(lambda w: w + 0.1, variables["adapters"])
>>> out, state = model.apply(
...     variables, x, adapter_train=True, rngs={"dropout": jax.random.key(1)},
...     mutable=[jadapters.AUX_LOSS_COLLECTION],
... )
>>> jax.tree.map(jnp.shape, state)
{'adapter_losses': {'layers_0': {'task': ()}}}
>>> float(jadapters.total_auxiliary_loss(state)) > 0.0
True
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

AUX_LOSS_COLLECTION = "adapter_losses"


class AdapterLoss(nnx.Variable):
    """NNX variable type holding an adapter's auxiliary loss from the last forward.

    >>> import jax, jax.numpy as jnp, jadapters
    >>> from flax import nnx
    >>> strategy = jadapters.ResidualAddStrategy(l2_lambda=0.5)
    >>> cfg = jadapters.LinearAdapterConfig(dim=2, adapter_strategy=strategy)
    >>> model = nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    >>> model = jadapters.adapter_transform(model, "layers/0")
    >>> model.add_adapter("task", cfg, rngs=nnx.Rngs(1))
    >>> out, losses = nnx.capture(model, AdapterLoss)(jnp.ones((1, 3)))
    >>> len(jax.tree.leaves(losses)), jadapters.total_auxiliary_loss(losses)  # zero-init adapter
    (1, Array(0., dtype=float32))
    >>> model.eval()  # no auxiliary losses outside training
    >>> len(jax.tree.leaves(nnx.capture(model, AdapterLoss)(jnp.ones((1, 3)))[1]))
    0
    """


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
