"""optax for a frozen base: the trainable mask, and transformations that never move the base.

Why ``optax.masked`` alone does not freeze: ``optax.masked(tx, mask)`` applies ``tx`` to the
masked leaves and passes every other leaf's *raw gradient through unchanged* as its update,
so ``optax.apply_updates`` still moves the "frozen" base by ``-grad`` (and the full gradient
is computed, so nothing is saved either). Freezing needs the base's updates set to zero:
:func:`freeze_base` routes the base to ``optax.set_to_zero()`` through
``optax.multi_transform``, which keeps optimizer state for adapter leaves only. Better still,
differentiate with respect to the adapter partition only (:mod:`jadapters.training`); then
the base gradient is never computed at all.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from jadapters.view import FROZEN, TRAINABLE, view_of


def trainable_mask(model: Any, variables: Any = None) -> Any:
    """A pytree of bools, True exactly on the enabled adapters' weights.

    Args:
      model: an adapted Linen model (then give its full ``variables``), or an adapted NNX
        model (then the mask is over ``nnx.state(model, nnx.Param, jadapters.AdapterParam)``
        and ``variables`` must be ``None``).

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import jadapters
    >>> adapted = jadapters.adapter_transform(nn.Sequential([nn.Dense(2)]), "layers_0")
    >>> adapted = adapted.add_adapter("task", jadapters.IA3Config())
    >>> variables = adapted.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> mask = trainable_mask(adapted, variables)
    >>> mask["adapters"], mask["params"]
    ({'layers_0': {'task': {'scale': True}}}, {'layers_0': {'bias': False, 'kernel': False}})
    """
    labels = param_labels(model, variables)
    return jax.tree.map(lambda label: label == TRAINABLE, labels)


def param_labels(model: Any, variables: Any = None) -> Any:
    """Labels ``"adapters"``/``"frozen"`` for ``optax.multi_transform``; see
    :func:`trainable_mask` for the tree they cover.

    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
    >>> import jadapters
    >>> adapted = jadapters.adapter_transform(nn.Sequential([nn.Dense(2)]), "layers_0")
    >>> adapted = adapted.add_adapter("task", jadapters.IA3Config())
    >>> variables = adapted.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> labels = param_labels(adapted, variables)
    >>> labels["adapters"], labels["params"]
    ({'layers_0': {'task': {'scale': 'adapters'}}},
     {'layers_0': {'bias': 'frozen', 'kernel': 'frozen'}})
    >>> tx = freeze_base(optax.adam(1e-3), labels)  # state for the adapters only:
    >>> [x.shape for x in jax.tree.leaves(tx.init(variables))]
    [(), (2,), (2,)]
    """
    return view_of(model, variables).labels()


def freeze_base(tx: optax.GradientTransformation, labels: Any) -> optax.GradientTransformation:
    """``tx`` on the adapter leaves, ``optax.set_to_zero()`` on everything else.

    Optimizer state exists for the adapter leaves only; base leaves get zero updates whatever
    gradient reaches them.

    Args:
      tx: any optax transformation.
      labels: a pytree of ``"adapters"``/``"frozen"`` labels (:func:`param_labels`) or a
        function from params to such a pytree.

    >>> import jax.numpy as jnp, optax
    >>> params = {"params": {"w": jnp.ones(2)}, "adapters": {"a": jnp.ones(2)}}
    >>> labels = {"params": {"w": "frozen"}, "adapters": {"a": "adapters"}}
    >>> tx = freeze_base(optax.sgd(1.0), labels)
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["params"]["w"], updates["adapters"]["a"]
    (Array([0., 0.], dtype=float32), Array([-1., -1.], dtype=float32))
    """
    return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)
