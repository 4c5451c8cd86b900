"""The parallel adapter (He et al. 2021): a bottleneck beside the host, fed its input."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

import jadapters._checks as _checks
from jadapters._activations import check_activation, get_activation
from jadapters.adapters.base import AdapterConfig, AdapterMath, adapter_fields
from jadapters.registry import register_adapter
from jadapters.strategies import ResidualAddStrategy


def _check_parallel(dim, activation, scale, learn_scale, dropout, adapter_strategy):
    _checks.check_positive_int("dim", dim)
    check_activation(activation)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a number, got {scale!r}.")
    if not isinstance(learn_scale, bool):
        raise ValueError(f"learn_scale must be a bool, got {learn_scale!r}.")
    _checks.check_rate("dropout", dropout)
    _checks.check_strategy(adapter_strategy)


class ParallelAdapter(nn.Module, AdapterMath):
    """``scale * Dense(out) (act (Dense(dim) (x)))`` beside the host: ``y = host(x) + that``.

    Joined with ``insertion="parallel"`` (its default): it sees the host's *input* and its
    output is added to the host's *output*, whose width it takes at call time, so it fits
    hosts whose input and output widths differ. The up-projection starts at zero (identity
    at init). ``scale`` is fixed, or learned from that initial value with ``learn_scale``.

    Attributes:
      dim: bottleneck width.
      activation: one of identity, hardtanh, relu, selu, swish, silu, gelu.
      scale: the output scale ``s`` (the paper uses 4 for its FFN variant).
      learn_scale: learn ``s`` as a parameter.
      dropout: dropout rate on the bottleneck's output.
      adapter_strategy: how it joins the host's output; residual add by default.

    >>> import jax, jax.numpy as jnp
    >>> adapter = ParallelAdapter(2)
    >>> x = jnp.ones((3, 5))
    >>> variables = adapter.init(jax.random.key(0), x, out_features=4)
    >>> adapter.apply(variables, x, out_features=4).shape
    (3, 4)
    """

    dim: int
    _: dataclasses.KW_ONLY
    activation: str = "relu"
    scale: float = 1.0
    learn_scale: bool = False
    dropout: float = 0.0
    adapter_strategy: Any = ResidualAddStrategy()

    default_insertion: ClassVar[str] = "parallel"
    needs_out_features: ClassVar[bool] = True
    weight_axes: ClassVar[dict[str, tuple[str, ...]]] = {
        "down/kernel": ("in", "bottleneck"),
        "down/bias": ("bottleneck",),
        "up/kernel": ("bottleneck", "out"),
        "up/bias": ("out",),
        "scale": (),  # present only with learn_scale
    }

    def __post_init__(self):
        _check_parallel(**adapter_fields(self))
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, out_features: int, deterministic: bool = True):
        h = nn.Dense(self.dim, dtype=x.dtype, name="down")(x)
        h = get_activation(self.activation)(h)
        h = nn.Dense(out_features, dtype=x.dtype, kernel_init=nn.initializers.zeros, name="up")(h)
        if self.dropout > 0.0:
            h = nn.Dropout(self.dropout, deterministic=deterministic)(h)
        if self.learn_scale:
            s = self.param("scale", nn.initializers.constant(self.scale), (), jnp.float32)
        else:
            s = jnp.asarray(self.scale, jnp.float32)
        return (h * s.astype(h.dtype)).astype(x.dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelAdapterConfig(AdapterConfig):
    """Frozen, JSON-serializable configuration of :class:`ParallelAdapter` (same fields)."""

    dim: int
    activation: str = "relu"
    scale: float = 1.0
    learn_scale: bool = False
    dropout: float = 0.0
    adapter_strategy: Any = ResidualAddStrategy()

    def __post_init__(self):
        _check_parallel(**adapter_fields(self))


register_adapter(ParallelAdapterConfig, ParallelAdapter)
