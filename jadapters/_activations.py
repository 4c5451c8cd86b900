"""Activation functions by name, as NeMo's adapters name them."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "identity": lambda x: x,
    "hardtanh": lambda x: jnp.clip(x, -1.0, 1.0),
    "relu": jax.nn.relu,
    "selu": jax.nn.selu,
    "swish": jax.nn.silu,
    "silu": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Returns the activation called ``name``, or raises a ``ValueError`` listing the choices."""
    check_activation(name)
    return ACTIVATIONS[name]


def check_activation(name: str, *, argument: str = "activation") -> None:
    """Raises a ``ValueError`` naming ``argument`` unless ``name`` is a known activation.

    >>> check_activation(["relu"])
    Traceback (most recent call last):
    ...
    ValueError: activation must be one of [...], got ['relu'].
    """
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"{argument} must be one of {sorted(ACTIVATIONS)}, got {name!r}.")
