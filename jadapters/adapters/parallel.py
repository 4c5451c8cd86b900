"""The parallel adapter (He et al. 2021): a bottleneck beside the host, fed its input."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

import jadapters._checks as _checks
import jadapters.adapters.functional as F
from jadapters._activations import get_activation
from jadapters.adapters.base import AdapterConfig, AdapterMath, check_activation
from jadapters.registry import register_adapter
from jadapters.strategies import ResidualAddStrategy

CHECKS: dict[str, _checks.Check] = {
    "dim": _checks.check_positive_int,
    "activation": check_activation,
    "scale": _checks.check_number,
    "learn_scale": _checks.check_bool,
    "dropout": _checks.check_rate,
    "adapter_strategy": _checks.check_strategy,
}


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

    Raises:
      ValueError: at construction, for a field of the wrong type or out of range (``scale``
        must be a finite number, ``learn_scale`` a bool, ``dropout`` in ``[0, 1)``); at call
        time, for an input that is not a floating array of rank >= 1 or an ``out_features``
        that is not a positive int.

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

    field_checks: ClassVar[dict[str, _checks.Check]] = CHECKS
    default_insertion: ClassVar[str] = "parallel"
    needs_out_features: ClassVar[bool] = True
    weight_axes: ClassVar[dict[str, tuple[str, ...]]] = {
        "down/kernel": ("in", "bottleneck"),
        "down/bias": ("bottleneck",),
        "up/kernel": ("bottleneck", "out"),
        "up/bias": ("out",),
        "scale": (),  # present only with learn_scale
    }
    slot_fields: ClassVar[tuple[str, ...]] = ("dim", "dropout")

    def __post_init__(self):
        _checks.apply_checks(self, self.field_checks)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, out_features: int, deterministic: bool = True):
        _checks.check_input("ParallelAdapter", "x", x)
        _checks.check_positive_int("out_features", out_features)
        f32, zeros = jnp.float32, nn.initializers.zeros
        params = {
            "down": F.declare(
                "down",
                kernel=(nn.initializers.lecun_normal(), (x.shape[-1], self.dim), f32),
                bias=(zeros, (self.dim,), f32),
            ),
            "up": F.declare(
                "up",
                kernel=(zeros, (self.dim, out_features), f32),
                bias=(zeros, (out_features,), f32),
            ),
        }
        if self.learn_scale:
            params["scale"] = self.param("scale", nn.initializers.constant(self.scale), (), f32)
        return self.forward_from_call(params, x, deterministic)

    @nn.nowrap
    def forward(
        self, params: Any, x: jax.Array, *, training: bool = False, key: jax.Array | None = None
    ) -> jax.Array:
        """``scale * up(act(down(x)))`` from ``params`` (a pure function)."""
        _checks.check_input("ParallelAdapter", "x", x)
        h = F.dense(x, params["down"]["kernel"], params["down"]["bias"])
        h = get_activation(self.activation)(h)
        h = F.dense(h, params["up"]["kernel"], params["up"]["bias"])
        if training and self.dropout > 0.0:
            h = F.dropout(h, self.dropout, key, "ParallelAdapter")
        s = params["scale"] if self.learn_scale else jnp.asarray(self.scale, jnp.float32)
        return (h * s.astype(h.dtype)).astype(x.dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelAdapterConfig(AdapterConfig):
    """Frozen, JSON-serializable configuration of :class:`ParallelAdapter` (same fields).

    >>> cfg = ParallelAdapterConfig(dim=4, activation="gelu", scale=0.5)
    >>> module = cfg.build()
    >>> module.dim, module.activation, module.scale
    (4, 'gelu', 0.5)
    >>> ParallelAdapterConfig(dim=4, activation="tanh")  # checked when built, naming the field
    Traceback (most recent call last):
    ValueError: activation must be one of [...], got 'tanh'.
    """

    dim: int
    activation: str = "relu"
    scale: float = 1.0
    learn_scale: bool = False
    dropout: float = 0.0
    adapter_strategy: Any = ResidualAddStrategy()

    field_checks: ClassVar[dict[str, _checks.Check]] = CHECKS


register_adapter(ParallelAdapterConfig, ParallelAdapter)
