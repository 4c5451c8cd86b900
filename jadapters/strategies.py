"""Composition: pure functions that join an adapter's output to the stream.

A strategy is any callable ``strategy(x, adapter_output, *, key, training)`` that returns
either the new stream value or a :class:`StrategyOutput` (the value plus an optional scalar
auxiliary loss). The built-in strategies are frozen dataclasses: their fields are their
configuration, they are hashable (so they can live in static model structure) and they
round-trip through JSON (see :mod:`jadapters.config`). Their math lives in the pure functions
:func:`residual_add` and :func:`scaled_add`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

import jadapters._checks as _checks
from jadapters.registry import register_strategy

__all__ = [
    "AdapterStrategy",
    "StrategyOutput",
    "ReturnResultStrategy",
    "ResidualAddStrategy",
    "ScaledAddStrategy",
    "residual_add",
    "scaled_add",
]


class StrategyOutput(NamedTuple):
    """What a strategy returns: the new stream value and an optional auxiliary loss.

    Attributes:
      output: the value that continues down the stream (same shape as the input).
      aux_loss: a scalar to add to the training loss, or ``None``.

    >>> import jax.numpy as jnp
    >>> ResidualAddStrategy()(jnp.ones(2), jnp.full(2, 0.5), key=None, training=False)
    StrategyOutput(output=Array([1.5, 1.5], dtype=float32), aux_loss=None)
    """

    output: jax.Array
    aux_loss: jax.Array | None = None


@runtime_checkable
class AdapterStrategy(Protocol):
    """The protocol every strategy follows (NeMo's ``AbstractAdapterStrategy``).

    A strategy must be a pure function of its arguments: all randomness comes from ``key``.
    Set a ``requires_key`` attribute to ``True`` when it needs a key in training; callers then
    draw one from the ``"dropout"`` PRNG stream and pass it in. Strategies stored on a model
    must be hashable (a frozen dataclass is the easy way).

    >>> import dataclasses, jax.numpy as jnp
    >>> @dataclasses.dataclass(frozen=True)
    ... class HalfAdd:  # adds half the adapter's output, with an L2 penalty on it
    ...     def __call__(self, x, adapter_output, *, key=None, training=False):
    ...         return StrategyOutput(x + 0.5 * adapter_output, jnp.sum(adapter_output**2))
    >>> isinstance(HalfAdd(), AdapterStrategy), isinstance(ResidualAddStrategy(), AdapterStrategy)
    (True, True)
    >>> HalfAdd()(jnp.ones(2), jnp.ones(2), key=None, training=True)
    StrategyOutput(output=Array([1.5, 1.5], dtype=float32), aux_loss=Array(2., dtype=float32))
    """

    def __call__(
        self,
        x: jax.Array,
        adapter_output: jax.Array,
        *,
        key: jax.Array | None,
        training: bool,
    ) -> StrategyOutput | jax.Array: ...


def as_strategy_output(result: StrategyOutput | jax.Array) -> StrategyOutput:
    """Normalizes what a user strategy returned into a :class:`StrategyOutput`."""
    if isinstance(result, StrategyOutput):
        return result
    return StrategyOutput(result, None)


def requires_key(strategy: Any, training: bool) -> bool:
    """Whether ``strategy`` needs a PRNG key for this call."""
    return bool(training and getattr(strategy, "requires_key", False))


def linear_factor(strategy: Any) -> float:
    """The factor ``f`` with ``strategy(x, out) == x + f * out`` in evaluation, for merging.

    Raises:
      ValueError: for a strategy that is not such a sum (it cannot be folded into a kernel).

    >>> linear_factor(ScaledAddStrategy(scale=0.5))
    0.5
    """
    factor = getattr(strategy, "eval_factor", None)
    if factor is None:
        raise ValueError(
            f"{type(strategy).__name__} cannot be folded into a kernel; only strategies that "
            "add a fixed multiple of the adapter's output in evaluation (ResidualAddStrategy, "
            "ScaledAddStrategy) merge."
        )
    return float(factor)


def residual_add(
    x: jax.Array,
    adapter_output: jax.Array,
    *,
    key: jax.Array | None = None,
    training: bool = False,
    stochastic_depth: float = 0.0,
    l2_lambda: float = 0.0,
    per_example: bool = False,
) -> StrategyOutput:
    """``x + adapter_output``, with stochastic depth and an l2 penalty (pure math).

    In training with ``stochastic_depth = p > 0`` the adapter's contribution is dropped with
    probability ``p`` and a kept contribution is scaled by ``1 / (1 - p)``; one coin is drawn
    for the whole batch (NeMo's behaviour) or, with ``per_example``, one per example along the
    leading axis. In training with ``l2_lambda > 0`` the auxiliary loss is
    ``l2_lambda * mean_over_batch(sum(contribution ** 2))`` of the contribution actually added.

    Args:
      x: the stream value (the host's output, or the previous adapter's result).
      adapter_output: the adapter's output, same shape as ``x``.
      key: PRNG key, required in training when ``stochastic_depth > 0``.
      training: whether stochastic depth and the l2 loss are active.
      stochastic_depth: drop probability ``p`` in ``[0, 1]``.
      l2_lambda: weight of the l2 auxiliary loss, ``>= 0``.
      per_example: draw one coin per example instead of one per batch.

    Returns:
      A :class:`StrategyOutput`; ``aux_loss`` is ``None`` unless training with ``l2_lambda > 0``.

    Raises:
      ValueError: if a key is needed and ``key`` is ``None``.

    >>> import jax.numpy as jnp
    >>> residual_add(jnp.ones(3), jnp.full(3, 2.0)).output
    Array([3., 3., 3.], dtype=float32)
    """
    contribution = adapter_output
    if training and stochastic_depth > 0.0:
        if key is None:
            raise ValueError(
                f"stochastic_depth={stochastic_depth} needs a PRNG key in training, got key=None. "
                "Pass rngs with a 'dropout' stream (Linen: apply(..., rngs={'dropout': key}); "
                "NNX: give the adapter rngs=nnx.Rngs(dropout=...)) or evaluate with training off."
            )
        keep_prob = 1.0 - stochastic_depth
        if per_example:
            shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        else:
            shape = (1,) * x.ndim
        if keep_prob > 0.0:
            keep = jax.random.bernoulli(key, keep_prob, shape)
            scale = jnp.where(keep, 1.0 / keep_prob, 0.0).astype(contribution.dtype)
            contribution = contribution * scale
        else:
            contribution = jnp.zeros_like(contribution)
    aux_loss = None
    if training and l2_lambda > 0.0:
        squared = jnp.square(contribution.astype(jnp.float32))
        per_row = squared.reshape(squared.shape[0], -1).sum(axis=-1) if squared.ndim else squared
        aux_loss = l2_lambda * jnp.mean(per_row)
    return StrategyOutput(x + contribution, aux_loss)


def scaled_add(x: jax.Array, adapter_output: jax.Array, *, scale: float) -> jax.Array:
    """``x + scale * adapter_output`` (pure math).

    >>> import jax.numpy as jnp
    >>> scaled_add(jnp.ones(2), jnp.ones(2), scale=0.5)
    Array([1.5, 1.5], dtype=float32)
    """
    return x + jnp.asarray(scale, adapter_output.dtype) * adapter_output


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReturnResultStrategy:
    """Returns the adapter's output as the new stream value.

    NeMo's ``ReturnResultAdapterStrategy``.

    >>> import jax.numpy as jnp
    >>> ReturnResultStrategy()(jnp.ones(2), jnp.zeros(2), key=None, training=False).output
    Array([0., 0.], dtype=float32)
    """

    requires_key = False

    def __call__(self, x, adapter_output, *, key=None, training=False) -> StrategyOutput:
        del x, key, training
        return StrategyOutput(adapter_output, None)


_RESIDUAL_ADD_CHECKS: dict[str, _checks.Check] = {
    "stochastic_depth": functools.partial(_checks.check_number, low=0.0, high=1.0),
    "l2_lambda": functools.partial(_checks.check_number, low=0.0),
    "per_example": _checks.check_bool,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResidualAddStrategy:
    """Residual addition with stochastic depth and an l2 auxiliary loss.

    The configuration is checked when the strategy is built. See :func:`residual_add` for the
    math.

    Args:
      stochastic_depth: probability in ``[0, 1]`` of dropping the adapter in training.
      l2_lambda: weight ``>= 0`` of the l2 auxiliary loss on the adapter's contribution.
      per_example: draw the stochastic-depth coin per example instead of per batch.

    Raises:
      ValueError: if ``stochastic_depth`` is not a number in ``[0, 1]``, ``l2_lambda`` not a
        finite number ``>= 0`` or ``per_example`` not a bool.

    >>> import jax, jax.numpy as jnp
    >>> strategy = ResidualAddStrategy(stochastic_depth=1.0)
    >>> strategy(jnp.ones(2), jnp.ones(2), key=jax.random.key(0), training=True).output
    Array([1., 1.], dtype=float32)
    >>> ResidualAddStrategy(stochastic_depth=1.5)
    Traceback (most recent call last):
    ...
    ValueError: stochastic_depth must be in [0, 1], got 1.5.
    """

    stochastic_depth: float = 0.0
    l2_lambda: float = 0.0
    per_example: bool = False

    def __post_init__(self):
        _checks.apply_checks(self, _RESIDUAL_ADD_CHECKS)

    @property
    def requires_key(self) -> bool:
        return self.stochastic_depth > 0.0

    # Stochastic depth acts in training only; evaluation is the plain sum.
    eval_factor = 1.0

    def __call__(self, x, adapter_output, *, key=None, training=False) -> StrategyOutput:
        return residual_add(
            x,
            adapter_output,
            key=key,
            training=training,
            stochastic_depth=self.stochastic_depth,
            l2_lambda=self.l2_lambda,
            per_example=self.per_example,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScaledAddStrategy:
    """``x + scale * adapter_output``: residual addition with a fixed scale.

    Raises:
      ValueError: if ``scale`` is not a finite number.

    >>> import jax.numpy as jnp
    >>> ScaledAddStrategy(scale=2.0)(jnp.ones(2), jnp.ones(2), key=None, training=False).output
    Array([3., 3.], dtype=float32)
    """

    scale: float = 1.0
    requires_key = False

    def __post_init__(self):
        _checks.apply_checks(self, {"scale": _checks.check_number})

    @property
    def eval_factor(self) -> float:
        return self.scale

    def __call__(self, x, adapter_output, *, key=None, training=False) -> StrategyOutput:
        del key, training
        return StrategyOutput(scaled_add(x, adapter_output, scale=self.scale), None)


register_strategy(ResidualAddStrategy)
register_strategy(ReturnResultStrategy)
register_strategy(ScaledAddStrategy)
