"""The Houlsby bottleneck adapter (NeMo's ``LinearAdapter``)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax

import jadapters._checks as _checks
from jadapters._activations import check_activation, get_activation
from jadapters.adapters.base import AdapterConfig, AdapterMath, adapter_fields
from jadapters.registry import register_adapter
from jadapters.strategies import ResidualAddStrategy

NORM_POSITIONS = ("pre", "post")


def _check_linear(dim, in_features, activation, norm_position, dropout, adapter_strategy):
    _checks.check_positive_int("dim", dim)
    _checks.check_positive_int("in_features", in_features, allow_none=True)
    check_activation(activation)
    _checks.check_choice("norm_position", norm_position, NORM_POSITIONS)
    _checks.check_rate("dropout", dropout)
    _checks.check_strategy(adapter_strategy)


class LinearAdapter(nn.Module, AdapterMath):
    """Bottleneck adapter: ``LayerNorm -> Dense(dim) -> act -> Dense(in)`` (``norm_position='pre'``)
    or ``Dense(dim) -> act -> Dense(in) -> LayerNorm`` (``'post'``), then dropout.

    The block's last layer (the up-projection for ``pre``, the LayerNorm's scale and bias for
    ``post``) starts at zero, so the adapter's output is zero at init and, joined by
    :class:`~jadapters.ResidualAddStrategy`, the stream passes through exactly unchanged.
    The module returns the raw adapter output; its ``adapter_strategy`` joins it to the stream
    (:func:`jadapters.apply_adapter` does both).

    Computation runs in the input's dtype; parameters are float32.

    Attributes:
      dim: bottleneck width.
      in_features: input (and output) width; ``None`` infers it from the input.
      activation: one of identity, hardtanh, relu, selu, swish, silu, gelu.
      norm_position: ``'pre'`` or ``'post'``.
      dropout: dropout rate in ``[0, 1)`` on the block's output (PRNG stream ``'dropout'``).
      adapter_strategy: how the output joins the stream; ``ResidualAddStrategy()`` by default.

    Raises:
      ValueError: at construction, for ``dim < 1``, an unknown activation or norm position, or
        ``dropout`` outside ``[0, 1)``.

    >>> import jax, jax.numpy as jnp
    >>> adapter = LinearAdapter(4)
    >>> x = jnp.ones((2, 8))
    >>> variables = adapter.init(jax.random.key(0), x)
    >>> bool((adapter.apply(variables, x) == 0).all())
    True
    """

    dim: int
    _: dataclasses.KW_ONLY
    in_features: int | None = None
    activation: str = "swish"
    norm_position: str = "pre"
    dropout: float = 0.0
    adapter_strategy: Any = ResidualAddStrategy()

    default_insertion: ClassVar[str] = "output"
    weight_axes: ClassVar[dict[str, tuple[str, ...]]] = {
        "norm/scale": ("features",),
        "norm/bias": ("features",),
        "down/kernel": ("features", "bottleneck"),
        "up/kernel": ("bottleneck", "features"),
    }

    def __post_init__(self):
        _check_linear(**adapter_fields(self))
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        features = x.shape[-1]
        if self.in_features is not None and features != self.in_features:
            raise ValueError(
                f"LinearAdapter was built with in_features={self.in_features} but got an input "
                f"with last axis {features} (shape {x.shape}); set in_features={features} or None."
            )
        act = get_activation(self.activation)
        dense = lambda n, zero, name: nn.Dense(  # noqa: E731
            n,
            use_bias=False,
            dtype=x.dtype,
            kernel_init=nn.initializers.zeros if zero else nn.initializers.lecun_normal(),
            name=name,
        )
        if self.norm_position == "pre":
            h = nn.LayerNorm(dtype=x.dtype, name="norm")(x)
            h = dense(self.dim, False, "down")(h)
            h = dense(features, True, "up")(act(h))
        else:
            h = dense(self.dim, False, "down")(x)
            h = dense(features, False, "up")(act(h))
            h = nn.LayerNorm(
                dtype=x.dtype,
                scale_init=nn.initializers.zeros,
                bias_init=nn.initializers.zeros,
                name="norm",
            )(h)
        if self.dropout > 0.0:
            h = nn.Dropout(self.dropout, deterministic=deterministic)(h)
        return h.astype(x.dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinearAdapterConfig(AdapterConfig):
    """Frozen, JSON-serializable configuration of a :class:`LinearAdapter` (same fields).

    >>> module = LinearAdapterConfig(dim=8, activation="relu").build()
    >>> type(module).__name__, module.dim, module.activation
    ('LinearAdapter', 8, 'relu')
    """

    dim: int
    in_features: int | None = None
    activation: str = "swish"
    norm_position: str = "pre"
    dropout: float = 0.0
    adapter_strategy: Any = ResidualAddStrategy()

    def __post_init__(self):
        _check_linear(**adapter_fields(self))


register_adapter(LinearAdapterConfig, LinearAdapter)
