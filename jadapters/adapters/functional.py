"""The pure pieces adapters are computed with: Flax's ``Dense``, ``LayerNorm`` and dropout
arithmetic on explicit weights, with no module scope.

An adapter type writes its math once, as ``forward(params, x, ...)`` over these functions,
and its Linen ``__call__`` only declares the weights (:func:`declare`) and calls ``forward``.
The runtime calls ``forward`` directly, so a traced model pays for its adapters' operations
and nothing else: no Flax ``apply`` and no per-parameter shape check (Linen's ``param`` runs
``eval_shape`` on the initializer of every existing parameter it reads).

The operations are Flax's own, in Flax's order and dtypes, so an adapter's output is the same
array whether it is computed through its module or through ``forward``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """``x @ kernel + bias`` over ``x``'s last axis, computed in ``x``'s dtype, as
    ``nn.Dense(..., dtype=x.dtype)`` computes it.

    >>> import jax.numpy as jnp
    >>> dense(jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.arange(4.0))
    Array([[3., 4., 5., 6.],
           [3., 4., 5., 6.]], dtype=float32)
    """
    kernel = jnp.asarray(kernel, x.dtype)
    y = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    if bias is not None:
        y += jnp.reshape(jnp.asarray(bias, x.dtype), (1,) * (y.ndim - 1) + (-1,))
    return y


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, *, epsilon: float) -> jax.Array:
    """LayerNorm over the last axis with statistics in (at least) float32, returned in ``x``'s
    dtype, as ``nn.LayerNorm(epsilon=epsilon, dtype=x.dtype)`` computes it.

    >>> import jax.numpy as jnp
    >>> layer_norm(jnp.array([[1.0, 3.0]]), jnp.ones(2), jnp.zeros(2), epsilon=0.0)
    Array([[-1.,  1.]], dtype=float32)
    """
    stats_dtype = jnp.promote_types(x.dtype, jnp.float32)
    xs = x.astype(stats_dtype)
    mean = xs.mean(-1)
    var = jnp.maximum(0.0, lax.square(xs).mean(-1) - lax.square(mean))
    shape = (1,) * (x.ndim - 1) + (-1,)
    y = x - jnp.expand_dims(mean, -1)
    mul = lax.rsqrt(jnp.expand_dims(var, -1) + epsilon)
    mul *= scale.reshape(shape)
    y *= mul
    y += bias.reshape(shape)
    return jnp.asarray(y, x.dtype)


def dropout(x: jax.Array, rate: float, key: jax.Array | None, name: str) -> jax.Array:
    """Inverted dropout of ``x`` at ``rate`` with PRNG ``key``.

    Raises:
      ValueError: for ``key=None`` (the message names adapter ``name`` and the missing
        ``'dropout'`` stream).

    >>> import jax, jax.numpy as jnp
    >>> y = dropout(jnp.ones(1000), 0.5, jax.random.key(0), "A")
    >>> sorted({float(v) for v in y}), 400 < int((y == 0).sum()) < 600  # kept ones doubled
    ([0.0, 2.0], True)
    >>> dropout(jnp.ones(3), 0.5, None, "MyAdapter")
    Traceback (most recent call last):
    ValueError: MyAdapter has dropout=0.5 and needs a PRNG key in training, got key=None. ...
    """
    if key is None:
        raise ValueError(
            f"{name} has dropout={rate} and needs a PRNG key in training, got key=None. Pass a "
            "'dropout' PRNG stream or evaluate with training off."
        )
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)


Initializer = Callable[..., jax.Array]


class _Weights(nn.Module):
    """A scope that holds parameters only (see :func:`declare`)."""

    specs: tuple[tuple[str, Initializer, tuple[int, ...], Any], ...]

    @nn.compact
    def __call__(self) -> dict[str, jax.Array]:
        return {n: self.param(n, init, shape, dtype) for n, init, shape, dtype in self.specs}


def declare(name: str, **specs: tuple[Initializer, tuple[int, ...], Any]) -> dict[str, jax.Array]:
    """Inside a compact Linen method: creates (at init) or reads the parameters ``specs``
    (``param name -> (initializer, shape, dtype)``) in a child scope ``name``, and returns them.

    They get the paths, and at init the values, that a Flax layer named ``name`` creating the
    same parameters in the same order gets (``declare("down", kernel=(init, shape, dtype))`` is
    ``nn.Dense(..., name="down")``'s kernel).

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> class Scale(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         w = declare("scale", s=(nn.initializers.ones, (x.shape[-1],), jnp.float32))
    ...         return x * w["s"]
    >>> jax.tree.map(jnp.shape, Scale().init(jax.random.key(0), jnp.ones(3)))
    {'params': {'scale': {'s': (3,)}}}
    """
    items = tuple((n, init, tuple(shape), dtype) for n, (init, shape, dtype) in specs.items())
    return _Weights(items, name=name)()
