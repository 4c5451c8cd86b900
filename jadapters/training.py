"""Jit-compiled training steps that differentiate with respect to the adapters only.

The base enters the step as a constant, so XLA never computes a base weight gradient, the
optimizer holds state for adapter leaves only, and the base cannot move: it is not an output.
PRNG keys for dropout and stochastic depth are explicit arguments, and auxiliary losses
(``ResidualAddStrategy(l2_lambda=...)``) are added to the loss.

Linen::

    step = jadapters.linen_train_step(adapted, loss_fn, optax.adam(1e-3))
    opt_state = step.init(adapter_params)
    adapter_params, opt_state, metrics = step(adapter_params, opt_state, base, batch, key)

NNX::

    optimizer = jadapters.adapter_optimizer(model, optax.adam(1e-3))
    step = jadapters.nnx_train_step(loss_fn)
    metrics = step(model, optimizer, batch)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx

from jadapters.losses import AUX_LOSS_COLLECTION, AdapterLoss, total_auxiliary_loss
from jadapters.storage import ADAPTER_COLLECTION
from jadapters.view import TRAINABLE, view_of


def _split_loss(out: Any) -> tuple[jax.Array, dict]:
    if isinstance(out, tuple):
        loss, metrics = out
        return loss, dict(metrics)
    return out, {}


def _enabled_only(adapted: Any, adapters: Any) -> tuple[Any, Any]:
    """Splits the adapter tree into (enabled leaves, disabled leaves); ``None`` elsewhere."""
    view = view_of(adapted, {"params": {}, ADAPTER_COLLECTION: adapters})
    labels = view.labels()[ADAPTER_COLLECTION]
    trainable = jax.tree.map(lambda lab, x: x if lab == TRAINABLE else None, labels, adapters)
    frozen = jax.tree.map(lambda lab, x: None if lab == TRAINABLE else x, labels, adapters)
    return trainable, frozen


def _merge_enabled(trainable: Any, frozen: Any) -> Any:
    return jax.tree.map(
        lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None
    )


@dataclasses.dataclass(frozen=True)
class LinenTrainStep:
    """A compiled adapter-only training step for an :class:`~jadapters.AdaptedLinen` model.

    Call it as ``step(adapter_params, opt_state, base_variables, batch, key)``; it returns
    ``(adapter_params, opt_state, metrics)`` with ``metrics["loss"]`` (the task loss plus
    auxiliary losses) and ``metrics["aux_loss"]``. ``adapter_params`` and ``opt_state`` are
    donated: do not reuse the arrays you passed in. Only the enabled adapters train; disabled
    ones pass through untouched.
    """

    adapted: Any
    loss_fn: Callable[..., Any]
    tx: optax.GradientTransformation
    compiled: Callable[..., Any]

    def init(self, adapter_params: Any) -> Any:
        """Optimizer state for the enabled adapters' weights only."""
        trainable, _ = _enabled_only(self.adapted, adapter_params)
        return self.tx.init(trainable)

    def __call__(self, adapter_params, opt_state, base_variables, batch, key):
        return self.compiled(adapter_params, opt_state, base_variables, batch, key)


def linen_train_step(
    adapted: Any,
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    *,
    donate: bool = True,
) -> LinenTrainStep:
    """Builds a jit-compiled step that trains the enabled adapters of ``adapted``.

    Args:
      adapted: the adapted Linen model.
      loss_fn: ``loss_fn(apply, batch) -> loss`` or ``-> (loss, metrics)``, where
        ``apply(*args, **kwargs)`` runs the adapted model with the current adapter weights,
        adapters in training mode and PRNG keys bound. Keep the *base* in evaluation mode
        through its own flags (e.g. ``train=False``) so its batch statistics stay frozen.
      tx: the optax transformation for the adapters.
      donate: donate the adapter weights' and optimizer state's buffers.
    """

    def step(adapter_params, opt_state, base_variables, batch, key):
        trainable, frozen = _enabled_only(adapted, adapter_params)

        def objective(trainable):
            variables = {
                **base_variables,
                ADAPTER_COLLECTION: _merge_enabled(trainable, frozen),
            }
            aux_losses = []

            def apply(*args, **kwargs):
                out, state = adapted.apply(
                    variables,
                    *args,
                    adapter_train=True,
                    rngs={"dropout": key},
                    mutable=[AUX_LOSS_COLLECTION],
                    **kwargs,
                )
                aux_losses.append(state.get(AUX_LOSS_COLLECTION, {}))
                return out

            loss, metrics = _split_loss(loss_fn(apply, batch))
            aux = total_auxiliary_loss(aux_losses)
            return loss + aux, {**metrics, "task_loss": loss, "aux_loss": aux}

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return _merge_enabled(trainable, frozen), opt_state, {**metrics, "loss": loss}

    compiled = jax.jit(step, donate_argnums=(0, 1) if donate else ())
    return LinenTrainStep(adapted, loss_fn, tx, compiled)


def adapter_optimizer(model: nnx.Module, tx: optax.GradientTransformation) -> nnx.Optimizer:
    """An ``nnx.Optimizer`` over exactly the enabled adapters of an NNX model.

    Optimizer state exists for those weights only. It also freezes the base's BatchNorm
    statistics (see :func:`jadapters.freeze_batchnorm`).
    """
    return nnx.Optimizer(model, tx, wrt=model.unfreeze_enabled_adapters())


def nnx_train_step(loss_fn: Callable[..., Any], *, donate: bool = True) -> Callable[..., Any]:
    """Builds an ``nnx.jit``-compiled step ``step(model, optimizer, batch) -> metrics``.

    ``loss_fn(model, batch)`` returns a loss or ``(loss, metrics)``. The gradient is taken
    with respect to the enabled adapters only; auxiliary losses recorded by the adapters are
    popped and added to the loss. Dropout and stochastic-depth keys come from each adapter's
    ``dropout`` stream (pass ``rngs=nnx.Rngs(params=..., dropout=...)`` to ``add_adapter``).
    """

    def step(model, optimizer, batch):
        trainable = model.unfreeze_enabled_adapters(freeze_batchnorm=False)

        def objective(model):
            loss, metrics = _split_loss(loss_fn(model, batch))
            aux = total_auxiliary_loss(nnx.pop(model, AdapterLoss))
            return loss + aux, {**metrics, "task_loss": loss, "aux_loss": aux}

        grad_fn = nnx.value_and_grad(objective, argnums=nnx.DiffState(0, trainable), has_aux=True)
        (loss, metrics), grads = grad_fn(model)
        optimizer.update(model, grads)
        return {**metrics, "loss": loss}

    # Only the optimizer's state is donated: the model's arrays include the frozen base,
    # which other references (an unmerge snapshot, a clone) may still hold.
    return nnx.jit(step, donate_argnums=(1,) if donate else ())
