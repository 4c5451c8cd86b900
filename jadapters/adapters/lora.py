"""LoRA (Hu et al. 2021): a low-rank update ``scale * A @ B`` of a host's kernel."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

import jadapters._checks as _checks
import jadapters.adapters.functional as F
from jadapters.adapters.base import AdapterConfig, AdapterMath
from jadapters.registry import register_adapter
from jadapters.strategies import ResidualAddStrategy

A_INITS = ("he_uniform", "gaussian")


def lora_scale(rank: int, alpha: float | None, rslora: bool = False) -> float:
    """``alpha / rank`` (or ``alpha / sqrt(rank)`` for rsLoRA); ``alpha=None`` means ``rank``.

    >>> lora_scale(8, 16.0), lora_scale(4, 8.0, rslora=True)
    (2.0, 4.0)
    """
    alpha = float(rank if alpha is None else alpha)
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, *, scale: float) -> jax.Array:
    """``scale * (x @ a) @ b``: the LoRA update's effect on a flattened input (pure math).

    >>> import jax.numpy as jnp
    >>> lora_delta(jnp.ones((1, 2)), jnp.ones((2, 1)), jnp.ones((1, 3)), scale=0.5)
    Array([[1., 1., 1.]], dtype=float32)
    """
    h = jnp.matmul(x, a.astype(x.dtype))
    return jnp.matmul(h, b.astype(x.dtype)) * jnp.asarray(scale, x.dtype)


CHECKS: dict[str, _checks.Check] = {
    "rank": _checks.check_positive_int,
    "alpha": functools.partial(_checks.check_number, allow_none=True, none_means="alpha = rank"),
    "rslora": _checks.check_bool,
    "dropout": _checks.check_rate,
    "a_init": functools.partial(_checks.check_choice, choices=A_INITS),
    "param_dtype": _checks.check_dtype,
    "adapter_strategy": _checks.check_strategy,
}


class LoRA(nn.Module, AdapterMath):
    """Low-rank adaptation of a host's kernel: ``W + scale * A @ B``.

    Joined with ``insertion="weight"`` (its default) to a Dense-like host (Linen ``Dense``,
    ``DenseGeneral``, ``Einsum``; NNX ``Linear``, ``LinearGeneral``, ``Einsum``), so the host
    computes ``f(x; W) + scale * f(x; A @ B)``. The kernel's input dimensions are flattened to
    ``A``'s rows and its output dimensions to ``B``'s columns. ``B`` starts at zero, so the
    host is unchanged at init; :func:`jadapters.merge_adapters` folds the update into ``W``.

    Called directly, the module maps a flattened input ``(..., in)`` to the update's output
    ``(..., out_features)``.

    Attributes:
      rank: the rank ``r`` of the update.
      alpha: scale numerator; ``scale = alpha / rank`` (``alpha / sqrt(rank)`` with
        ``rslora``); ``None`` means ``alpha = rank`` (scale 1, or ``sqrt(rank)`` with
        ``rslora``).
      rslora: use rank-stabilized scaling.
      dropout: dropout rate on the LoRA branch's input (PRNG stream ``'dropout'``).
      a_init: ``'he_uniform'`` (Kaiming-uniform, as PEFT) or ``'gaussian'`` (``1/r`` std).
      param_dtype: dtype of ``A`` and ``B`` as a string, e.g. ``'float32'``, ``'bfloat16'``.
      adapter_strategy: how the update joins the host's output; residual add by default.

    Raises:
      ValueError: at construction, for a field of the wrong type or out of range (``rank``
        not a positive int, ``alpha`` not a finite number or None, ``rslora`` not a bool,
        ``dropout`` outside ``[0, 1)``, ...); at call time, for an input that is not a floating
        array of rank >= 1 or an ``out_features`` that is not a positive int.

    >>> import jax, jax.numpy as jnp
    >>> lora = LoRA(2, alpha=4.0)
    >>> x = jnp.ones((3, 5))
    >>> variables = lora.init(jax.random.key(0), x, out_features=4)
    >>> [variables["params"][k].shape for k in ("a", "b")]
    [(5, 2), (2, 4)]
    >>> bool((lora.apply(variables, x, out_features=4) == 0).all())
    True
    """

    rank: int
    _: dataclasses.KW_ONLY
    alpha: float | None = None
    rslora: bool = False
    dropout: float = 0.0
    a_init: str = "he_uniform"
    param_dtype: str = "float32"
    adapter_strategy: Any = ResidualAddStrategy()

    field_checks: ClassVar[dict[str, _checks.Check]] = CHECKS
    default_insertion: ClassVar[str] = "weight"
    needs_out_features: ClassVar[bool] = True
    merge_insertion: ClassVar[str | None] = "weight"
    weight_axes: ClassVar[dict[str, tuple[str, ...]]] = {"a": ("in", "rank"), "b": ("rank", "out")}
    slot_fields: ClassVar[tuple[str, ...]] = ("rank", "alpha", "rslora", "dropout")

    def __post_init__(self):
        _checks.apply_checks(self, self.field_checks)
        super().__post_init__()

    @property
    def scale(self) -> float:
        return lora_scale(self.rank, self.alpha, self.rslora)

    def factors(self, in_features: int, out_features: int) -> tuple[jax.Array, jax.Array]:
        """Creates (at init) or reads the factors ``A`` ``(in, rank)`` and ``B`` ``(rank, out)``."""
        dtype = jnp.dtype(self.param_dtype)
        if self.a_init == "he_uniform":
            a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
        else:
            a_init = nn.initializers.normal(1.0 / self.rank)
        a = self.param("a", a_init, (in_features, self.rank), dtype)
        b = self.param("b", nn.initializers.zeros, (self.rank, out_features), dtype)
        return a, b

    def flat_update(self, params: Any) -> jax.Array:
        """The kernel update ``scale * A @ B`` as a ``(in, out)`` matrix, from ``params``."""
        a, b = params["a"], params["b"]
        return (a @ b) * jnp.asarray(self.scale, a.dtype)

    def to_slot(self, params: dict[str, Any], adapter: LoRA) -> dict[str, Any]:
        """``adapter``'s (padded) ``params`` as a slot of this LoRA's size: ``B`` rescaled by
        ``adapter.scale / self.scale``, so that this scale gives the adapter's update (exactly
        the same arrays when the scales are equal)."""
        if adapter.scale == self.scale:
            return params
        b = params["b"]
        ratio = jnp.asarray(adapter.scale / self.scale, jnp.float32)
        return {**params, "b": (b.astype(jnp.float32) * ratio).astype(b.dtype)}

    def fold(self, params, kernel, bias, layout, *, factor):
        """``W + factor * scale * A @ B`` in the kernel's own shape (the bias is unchanged)."""
        update = self.flat_update(params).astype(jnp.float32)
        return kernel + factor * layout.to_kernel(update), bias

    @nn.compact
    def __call__(self, x, *, out_features: int, deterministic: bool = True) -> jax.Array:
        _checks.check_input("LoRA", "x", x)
        _checks.check_positive_int("out_features", out_features)
        a, b = self.factors(x.shape[-1], out_features)
        return self.forward_from_call({"a": a, "b": b}, x, deterministic)

    @nn.nowrap
    def forward(
        self, params: Any, x: jax.Array, *, training: bool = False, key: jax.Array | None = None
    ) -> jax.Array:
        """The update's effect ``scale * dropout(x) @ A @ B`` from ``params`` (a pure
        function)."""
        _checks.check_input("LoRA", "x", x)
        if training and self.dropout > 0.0:
            x = F.dropout(x, self.dropout, key, "LoRA")
        return lora_delta(x, params["a"], params["b"], scale=self.scale)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig(AdapterConfig):
    """Frozen, JSON-serializable configuration of :class:`LoRA` (same fields).

    >>> LoRAConfig(rank=8, alpha=16.0).build().scale
    2.0
    """

    rank: int
    alpha: float | None = None
    rslora: bool = False
    dropout: float = 0.0
    a_init: str = "he_uniform"
    param_dtype: str = "float32"
    adapter_strategy: Any = ResidualAddStrategy()

    field_checks: ClassVar[dict[str, _checks.Check]] = CHECKS


register_adapter(LoRAConfig, LoRA)
