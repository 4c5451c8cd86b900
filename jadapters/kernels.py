"""How a Dense-like host contracts its input with its kernel, for weight adapters.

A :class:`KernelLayout` says which kernel axes meet the input. Weight adapters (LoRA) see the
kernel as a matrix ``(in_features, out_features)``: the contracted axes flattened into rows,
the rest into columns. The layout turns a flat update back into the kernel's shape (for
merging) and runs an input through a flat update (for training and unmerged inference).
Linen ``Dense``/``DenseGeneral``/``Einsum``, NNX ``Linear``/``LinearGeneral``/``Einsum`` and
Hugging Face's Flax ``FlaxConv1D`` (GPT-2's projections) are recognized.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """Which kernel axes contract with the input.

    Attributes:
      kernel_shape: the host kernel's shape.
      in_dims: kernel axes contracted with the input, in kernel order.
      x_axes: input axes contracted (for Dense-like hosts), matching ``in_dims``.
      einsum_str: the host's einsum equation (Einsum hosts), else ``None``.
    """

    kernel_shape: tuple[int, ...]
    in_dims: tuple[int, ...]
    x_axes: tuple[int, ...] = ()
    einsum_str: str | None = None

    @property
    def out_first(self) -> bool:
        """A matrix kernel stored ``(out_features, in_features)``, as Hugging Face's Flax
        GPT-2 stores its projections (``FlaxConv1D``)."""
        return self.einsum_str is None and len(self.kernel_shape) == 2 and self.in_dims == (1,)

    @property
    def out_dims(self) -> tuple[int, ...]:
        return tuple(d for d in range(len(self.kernel_shape)) if d not in self.in_dims)

    @property
    def in_features(self) -> int:
        return math.prod(self.kernel_shape[d] for d in self.in_dims)

    @property
    def out_features(self) -> int:
        return math.prod(self.kernel_shape[d] for d in self.out_dims)

    def to_kernel(self, flat: jax.Array) -> jax.Array:
        """A flat ``(in_features, out_features)`` update in the kernel's shape and axis order."""
        in_shape = tuple(self.kernel_shape[d] for d in self.in_dims)
        out_shape = tuple(self.kernel_shape[d] for d in self.out_dims)
        block = flat.reshape(in_shape + out_shape)
        order = self.in_dims + self.out_dims
        return jnp.transpose(block, tuple(order.index(d) for d in range(len(order))))

    def flatten_input(self, x: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
        """``x`` with its contracted axes moved last and flattened; and the batch shape."""
        axes = tuple(a % x.ndim for a in self.x_axes)
        moved = jnp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
        batch = moved.shape[: x.ndim - len(axes)]
        return moved.reshape(batch + (self.in_features,)), batch

    def output_shape(self, batch: tuple[int, ...]) -> tuple[int, ...]:
        return batch + tuple(self.kernel_shape[d] for d in self.out_dims)


def _einsum_layout(einsum_str: str, kernel_shape: tuple[int, ...]) -> KernelLayout:
    spec = einsum_str.replace(" ", "")
    lhs, _, out = spec.partition("->")
    operands = lhs.split(",")
    if len(operands) != 2 or "." in spec:
        raise ValueError(
            f"einsum_str {einsum_str!r} must have exactly two operands (input, kernel) and no "
            "ellipsis for a weight adapter."
        )
    x_subs, k_subs = operands
    in_dims = tuple(i for i, c in enumerate(k_subs) if c in x_subs and c not in out)
    return KernelLayout(tuple(kernel_shape), in_dims, (), spec)


def _dense_general_layout(axis: Any, kernel_shape: tuple[int, ...], where: str) -> KernelLayout:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return KernelLayout(tuple(kernel_shape), tuple(range(len(axes))), axes, None)


# The Python modules that define Hugging Face's FlaxConv1D and the models built with it.
_HF_CONV1D_MODULES = frozenset({"transformers.models.gpt2.modeling_flax_gpt2"})


def _is_hf_conv1d(host: Any) -> bool:
    """Hugging Face's Flax ``FlaxConv1D`` (GPT-2): a Dense whose kernel is stored
    ``(features, in_features)`` and used transposed. Recognized by its class, so that
    transformers is never imported."""
    cls = type(host)
    return (
        isinstance(host, nn.Module)
        and cls.__name__ == "FlaxConv1D"
        and cls.__module__ in _HF_CONV1D_MODULES
    )


def may_hold_transposed_kernels(module: Any, _depth: int = 0) -> bool:
    """Whether a Linen ``module`` may hold kernels stored ``(out, in)``: it, or a Linen module
    among its dataclass fields (at any depth), is one of Hugging Face's Flax GPT-2 modules,
    whose projections are ``FlaxConv1D``. Submodules created inside a compact ``__call__``
    are not visible before the module runs."""
    if type(module).__module__ in _HF_CONV1D_MODULES:
        return True
    if _depth > 16 or not isinstance(module, nn.Module):
        return False
    for field in dataclasses.fields(module):
        value = getattr(module, field.name, None)
        values = value if isinstance(value, (tuple, list)) else (value,)
        if any(
            isinstance(v, nn.Module) and may_hold_transposed_kernels(v, _depth + 1) for v in values
        ):
            return True
    return False


def kernel_layout(
    host: Any, kernel_shape: tuple[int, ...] | None = None, *, stacked: bool = False
) -> KernelLayout:
    """The :class:`KernelLayout` of a Linen or NNX Dense-like host; with ``stacked``, of one
    layer of an NNX host inside a layer stack (its kernel's leading layer axis dropped).

    Raises:
      ValueError: for a host whose kernel a weight adapter cannot act on.
    """
    name = type(host).__name__
    if isinstance(host, nnx.Module):
        kernel = getattr(host, "kernel", None)
        if kernel is None:
            raise _unsupported(host)
        kernel_shape = tuple(kernel[...].shape)[1 if stacked else 0 :]
    if kernel_shape is None:
        raise _unsupported(host)
    if isinstance(host, (nn.Dense, nnx.Linear)):
        return KernelLayout(tuple(kernel_shape), (0,), (-1,), None)
    if isinstance(host, nn.DenseGeneral):
        if host.batch_dims:
            raise ValueError("DenseGeneral with batch_dims is not supported by weight adapters.")
        return _dense_general_layout(host.axis, kernel_shape, name)
    if isinstance(host, nnx.LinearGeneral):
        if getattr(host, "batch_axis", None):
            raise ValueError("LinearGeneral with batch_axis is not supported by weight adapters.")
        return _dense_general_layout(host.axis, kernel_shape, name)
    if isinstance(host, (nn.Einsum, nnx.Einsum)):
        return _einsum_layout(host.einsum_str, kernel_shape)
    if _is_hf_conv1d(host) and len(kernel_shape) == 2:
        return KernelLayout(tuple(kernel_shape), (1,), (-1,), None)
    raise _unsupported(host)


def _unsupported(host: Any) -> ValueError:
    return ValueError(
        f"weight adapters (LoRA) need a Dense-like host with a kernel (Linen Dense, "
        f"DenseGeneral, Einsum, Hugging Face FlaxConv1D; NNX Linear, LinearGeneral, Einsum), "
        f"got {type(host).__name__}. "
        "Target those submodules, or use insertion='output'/'parallel'."
    )
