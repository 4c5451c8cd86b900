"""Running one adapter: its module, then its strategy. Every front-end goes through here."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jadapters.kernels import KernelLayout
from jadapters.strategies import StrategyOutput, as_strategy_output, requires_key


def apply_adapter(
    module: Any,
    variables: Any,
    x: jax.Array,
    *,
    stream: jax.Array | None = None,
    training: bool = False,
    key: jax.Array | None = None,
    out_features: int | None = None,
    output_shape: tuple[int, ...] | None = None,
) -> StrategyOutput:
    """Runs the adapter ``module`` on ``x`` and joins its output to ``stream`` by its strategy.

    Args:
      module: a Linen adapter module (e.g. :class:`jadapters.LinearAdapter`).
      variables: its variables, ``{"params": ...}``.
      x: the adapter's input.
      stream: the value its output joins; ``x`` when ``None`` (sequential adapters). A
        parallel adapter is fed the host's input as ``x`` and joins the host's output.
      training: turns on dropout and the strategy's training behaviour.
      key: PRNG key for dropout and stochastic depth; split between them.
      out_features: output width, for adapters whose ``needs_out_features`` is set
        (parallel adapters, LoRA).
      output_shape: reshape the adapter's output to this before joining (weight adapters).

    Returns:
      The strategy's :class:`~jadapters.StrategyOutput`.

    >>> import jax, jax.numpy as jnp
    >>> from jadapters import LinearAdapter
    >>> adapter = LinearAdapter(4)
    >>> x = jnp.arange(8.0).reshape(1, 8)
    >>> variables = adapter.init(jax.random.key(0), x)
    >>> bool((apply_adapter(adapter, variables, x).output == x).all())
    True
    """
    stream = x if stream is None else stream
    if training and key is None and getattr(module, "dropout", 0.0) > 0.0:
        raise ValueError(
            f"{type(module).__name__} has dropout={module.dropout} and needs a PRNG key in "
            "training, got key=None. Pass a 'dropout' PRNG stream or evaluate with training off."
        )
    dropout_key = strategy_key = None
    if training and key is not None:
        dropout_key, strategy_key = jax.random.split(key)
    rngs = {"dropout": dropout_key} if dropout_key is not None else {}
    kwargs = {}
    if getattr(module, "needs_out_features", False):
        kwargs["out_features"] = stream.shape[-1] if out_features is None else out_features
    out = module.apply(variables, x, deterministic=not training, rngs=rngs, **kwargs)
    if output_shape is not None:
        out = out.reshape(output_shape)
    if out.shape != stream.shape:
        raise ValueError(
            f"{type(module).__name__} produced shape {out.shape} but joins a stream of shape "
            f"{stream.shape}; target hosts whose output matches the adapter (a parallel "
            "adapter's output has the host output's last axis only)."
        )
    strategy = module.adapter_strategy
    if not requires_key(strategy, training):
        strategy_key = None
    return as_strategy_output(strategy(stream, out, key=strategy_key, training=training))


def apply_weight_adapter(
    module: Any,
    variables: Any,
    x: jax.Array,
    y: jax.Array,
    layout: KernelLayout,
    *,
    training: bool = False,
    key: jax.Array | None = None,
) -> StrategyOutput:
    """Runs a weight adapter (LoRA) for a host with kernel ``layout``: joins the update's
    effect on input ``x`` to the host's output ``y``.

    Dense-like hosts run the low-rank path ``(x @ A) @ B``; Einsum hosts run their equation on
    the materialized kernel update, with the same dropout on the input.
    """
    if layout.einsum_str is not None:
        dropout = getattr(module, "dropout", 0.0)
        dkey = skey = None
        if training and key is not None:
            dkey, skey = jax.random.split(key)
        if training and dropout > 0.0:
            if dkey is None:
                raise ValueError(
                    f"{type(module).__name__} has dropout={dropout} and needs a PRNG key in "
                    "training, got key=None. Pass a 'dropout' PRNG stream."
                )
            keep = jax.random.bernoulli(dkey, 1.0 - dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - dropout), jnp.zeros_like(x)).astype(x.dtype)
        update = layout.to_kernel(module.flat_update(variables["params"]))
        out = jnp.einsum(layout.einsum_str, x, update.astype(x.dtype))
        strategy = module.adapter_strategy
        skey = skey if requires_key(strategy, training) else None
        return as_strategy_output(strategy(y, out, key=skey, training=training))
    flat, batch = layout.flatten_input(x)
    return apply_adapter(
        module,
        variables,
        flat,
        stream=y,
        training=training,
        key=key,
        out_features=layout.out_features,
        output_shape=layout.output_shape(batch),
    )
