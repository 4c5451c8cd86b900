"""The Houlsby bottleneck adapter (NeMo's ``LinearAdapter``)."""

from __future__ import annotations

import dataclasses
import functools
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

NORM_POSITIONS = ("pre", "post")
# NeMo's adapter is built on PyTorch's nn.LayerNorm, whose epsilon is 1e-5 (Flax's is 1e-6).
NORM_EPSILON = 1e-5

CHECKS: dict[str, _checks.Check] = {
    "dim": _checks.check_positive_int,
    "in_features": functools.partial(_checks.check_positive_int, allow_none=True),
    "activation": check_activation,
    "norm_position": functools.partial(_checks.check_choice, choices=NORM_POSITIONS),
    "norm_epsilon": functools.partial(_checks.check_number, low=0.0, low_open=True),
    "dropout": _checks.check_rate,
    "adapter_strategy": _checks.check_strategy,
}


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
      norm_epsilon: the LayerNorm's epsilon, a positive float; ``1e-5`` by default, as NeMo's
        adapter (PyTorch's ``nn.LayerNorm``) and unlike Flax's own default of ``1e-6``, so that
        an adapter ported from NeMo gives NeMo's outputs.
      dropout: dropout rate in ``[0, 1)`` on the block's output (PRNG stream ``'dropout'``).
      adapter_strategy: how the output joins the stream; ``ResidualAddStrategy()`` by default.

    Raises:
      ValueError: at construction, for a field of the wrong type, ``dim < 1``, an unknown
        activation or norm position, a ``norm_epsilon`` that is not a positive finite number,
        or ``dropout`` outside ``[0, 1)``; at call time, for an input that is not a floating
        array of rank >= 1 or whose last axis differs from ``in_features``.

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
    norm_epsilon: float = NORM_EPSILON
    dropout: float = 0.0
    adapter_strategy: Any = ResidualAddStrategy()

    field_checks: ClassVar[dict[str, _checks.Check]] = CHECKS
    default_insertion: ClassVar[str] = "output"
    weight_axes: ClassVar[dict[str, tuple[str, ...]]] = {
        "norm/scale": ("features",),
        "norm/bias": ("features",),
        "down/kernel": ("features", "bottleneck"),
        "up/kernel": ("bottleneck", "features"),
    }
    slot_fields: ClassVar[tuple[str, ...]] = ("dim", "dropout")

    def __post_init__(self):
        _checks.apply_checks(self, self.field_checks)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        _checks.check_input("LinearAdapter", "x", x, in_features=self.in_features)
        # in_features first: with chex's assertions disabled, a mismatch still fails below.
        features = self.in_features or x.shape[-1]
        f32, width = jnp.float32, x.shape[-1]
        zeros, lecun = nn.initializers.zeros, nn.initializers.lecun_normal()
        norm_init = nn.initializers.ones if self.norm_position == "pre" else zeros
        up_init = zeros if self.norm_position == "pre" else lecun
        norm_width = width if self.norm_position == "pre" else features
        params = {}  # in the order Flax's layers would create them (the init keys follow it)
        if self.norm_position == "pre":
            params["norm"] = F.declare(
                "norm", scale=(norm_init, (norm_width,), f32), bias=(zeros, (norm_width,), f32)
            )
        params["down"] = F.declare("down", kernel=(lecun, (width, self.dim), f32))
        params["up"] = F.declare("up", kernel=(up_init, (self.dim, features), f32))
        if self.norm_position == "post":
            params["norm"] = F.declare(
                "norm", scale=(norm_init, (norm_width,), f32), bias=(zeros, (norm_width,), f32)
            )
        return self.forward_from_call(params, x, deterministic)

    @nn.nowrap
    def forward(
        self, params: Any, x: jax.Array, *, training: bool = False, key: jax.Array | None = None
    ) -> jax.Array:
        """The bottleneck's raw output (before its strategy) from ``params``: a pure function
        of the weights, with no Flax scope."""
        _checks.check_input("LinearAdapter", "x", x, in_features=self.in_features)
        act = get_activation(self.activation)
        norm = lambda h: F.layer_norm(  # noqa: E731
            h, params["norm"]["scale"], params["norm"]["bias"], epsilon=self.norm_epsilon
        )
        h = norm(x) if self.norm_position == "pre" else x
        h = F.dense(act(F.dense(h, params["down"]["kernel"])), params["up"]["kernel"])
        if self.norm_position == "post":
            h = norm(h)
        if training and self.dropout > 0.0:
            h = F.dropout(h, self.dropout, key, "LinearAdapter")
        return h.astype(x.dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinearAdapterConfig(AdapterConfig):
    """Frozen, JSON-serializable configuration of a :class:`LinearAdapter` (same fields).

    ``norm_epsilon`` defaults to ``1e-5``, the epsilon of NeMo's adapter (PyTorch's
    ``nn.LayerNorm``): jadapters follows NeMo's adapter contract, so an adapter ported from
    NeMo gives the same outputs. Flax's ``LayerNorm`` defaults to ``1e-6``; on inputs of small
    variance the two differ clearly, so set ``norm_epsilon=1e-6`` to match a Flax-native norm.
    Every field is checked when the config is built (``ValueError`` naming the field).

    >>> module = LinearAdapterConfig(dim=8, activation="relu").build()
    >>> type(module).__name__, module.dim, module.activation
    ('LinearAdapter', 8, 'relu')
    """

    dim: int
    in_features: int | None = None
    activation: str = "swish"
    norm_position: str = "pre"
    norm_epsilon: float = NORM_EPSILON
    dropout: float = 0.0
    adapter_strategy: Any = ResidualAddStrategy()

    field_checks: ClassVar[dict[str, _checks.Check]] = CHECKS


register_adapter(LinearAdapterConfig, LinearAdapter)
