"""Running one adapter: its module, then its strategy. Every front-end goes through here."""

from __future__ import annotations

from typing import Any

import jax

from jadapters.strategies import StrategyOutput, as_strategy_output, requires_key


def apply_adapter(
    module: Any,
    variables: Any,
    x: jax.Array,
    *,
    stream: jax.Array | None = None,
    training: bool = False,
    key: jax.Array | None = None,
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
    out = module.apply(variables, x, deterministic=not training, rngs=rngs)
    strategy = module.adapter_strategy
    if not requires_key(strategy, training):
        strategy_key = None
    return as_strategy_output(strategy(stream, out, key=strategy_key, training=training))
