"""IA3 (Liu et al. 2022): a learned per-feature scale on a host's output."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

import jadapters._checks as _checks
from jadapters.adapters.base import AdapterConfig, AdapterMath
from jadapters.registry import register_adapter
from jadapters.strategies import ResidualAddStrategy


def ia3_delta(y: jax.Array, scale: jax.Array) -> jax.Array:
    """``y * (scale - 1)``: what IA3 adds to the stream, so that ``y + delta == y * scale``.

    >>> import jax.numpy as jnp
    >>> ia3_delta(jnp.full(2, 2.0), jnp.array([1.0, 3.0]))
    Array([0., 4.], dtype=float32)
    """
    # Broadcast over the leading axes explicitly: rank promotion may be configured to raise.
    scale = scale.astype(y.dtype).reshape((1,) * (y.ndim - 1) + scale.shape)
    return y * (scale - jnp.ones((), y.dtype))


CHECKS: dict[str, _checks.Check] = {
    "in_features": functools.partial(_checks.check_positive_int, allow_none=True),
    "param_dtype": _checks.check_dtype,
    "adapter_strategy": _checks.check_strategy,
}


class IA3(nn.Module, AdapterMath):
    """Rescales the host's output features by a learned vector ``l`` (ones at init).

    Joined after the host's output (``insertion="output"``): with the default residual
    add, the stream becomes ``y * l``. Target the key and value projections of attention (and
    the MLP's first layer) as in the paper. The scale acts on the last axis; because
    ``y * l`` is linear in the host's kernel, :func:`jadapters.merge_adapters` folds it into
    the kernel and bias.

    Attributes:
      in_features: width of the scaled axis; ``None`` infers it from the input.
      param_dtype: dtype of ``l``.
      adapter_strategy: residual add (the only strategy that keeps IA3's meaning).

    Raises:
      ValueError: at construction, for a field of the wrong type or out of range; at call time,
        for an input that is not a floating array of rank >= 1 or whose last axis differs from
        ``in_features``.

    >>> import jax, jax.numpy as jnp
    >>> ia3 = IA3()
    >>> y = jnp.ones((2, 4))
    >>> variables = ia3.init(jax.random.key(0), y)
    >>> bool((ia3.apply(variables, y) == 0).all())
    True
    """

    _: dataclasses.KW_ONLY
    in_features: int | None = None
    param_dtype: str = "float32"
    adapter_strategy: Any = ResidualAddStrategy()

    field_checks: ClassVar[dict[str, _checks.Check]] = CHECKS
    default_insertion: ClassVar[str] = "output"
    merge_insertion: ClassVar[str | None] = "output"
    weight_axes: ClassVar[dict[str, tuple[str, ...]]] = {"scale": ("features",)}

    def __post_init__(self):
        _checks.apply_checks(self, self.field_checks)
        super().__post_init__()

    def fold(self, params, kernel, bias, layout, *, factor):
        """Scales the kernel axis that makes the output's last axis (the kernel's last, or
        its first for a kernel stored ``(out, in)``), and the bias, by ``1 + factor * (l - 1)``.

        Raises:
          ValueError: for an Einsum host whose output's last axis is not its kernel's last.
        """
        if layout.einsum_str is not None:
            lhs, _, out = layout.einsum_str.partition("->")
            kernel_subs = lhs.split(",")[1]
            if not out or not kernel_subs or out[-1] != kernel_subs[-1]:
                raise ValueError(
                    f"scales the last output axis of einsum {layout.einsum_str!r}, which is not "
                    "the kernel's last axis, so it cannot be folded into the kernel; keep it "
                    "unmerged."
                )
        scale = 1.0 + factor * (params["scale"].astype(jnp.float32) - 1.0)
        # Broadcast explicitly: rank promotion may be configured to raise.
        axis = kernel.ndim - 1 if layout.einsum_str is not None else layout.out_dims[-1]
        kernel = kernel * scale.reshape(tuple(-1 if d == axis else 1 for d in range(kernel.ndim)))
        if bias is not None:
            bias = bias * scale.reshape((1,) * (bias.ndim - 1) + (-1,))
        return kernel, bias

    @nn.compact
    def __call__(self, y: jax.Array, *, deterministic: bool = True) -> jax.Array:
        del deterministic
        _checks.check_input("IA3", "y", y, in_features=self.in_features)
        # in_features first: with chex's assertions disabled, a mismatch still fails below.
        features = self.in_features or y.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.dtype(self.param_dtype))
        return self.forward({"scale": scale}, y)

    @nn.nowrap
    def forward(
        self, params: Any, y: jax.Array, *, training: bool = False, key: jax.Array | None = None
    ) -> jax.Array:
        """``y * (scale - 1)`` from ``params`` (a pure function)."""
        del training, key
        _checks.check_input("IA3", "y", y, in_features=self.in_features)
        return ia3_delta(y, params["scale"])


@dataclasses.dataclass(frozen=True, kw_only=True)
class IA3Config(AdapterConfig):
    """Frozen, JSON-serializable configuration of :class:`IA3` (same fields).

    >>> import jadapters
    >>> cfg = IA3Config(param_dtype="bfloat16")
    >>> cfg.build().param_dtype, jadapters.config_to_dict(cfg)["type"]
    ('bfloat16', 'IA3')
    >>> IA3Config(param_dtype="int8")  # checked when built, naming the field
    Traceback (most recent call last):
    ValueError: param_dtype must name a floating dtype such as 'float32' or 'bfloat16', got 'int8'.
    """

    in_features: int | None = None
    param_dtype: str = "float32"
    adapter_strategy: Any = ResidualAddStrategy()

    field_checks: ClassVar[dict[str, _checks.Check]] = CHECKS


register_adapter(IA3Config, IA3)
