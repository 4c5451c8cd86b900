"""AdapterFusion (Pfeiffer et al. 2021): attention over the outputs of trained adapters.

The fusion layer is an adapter type of its own, so that its weights are created, listed,
trained, saved and loaded like any adapter's. It runs only inside a
:class:`jadapters.Fuse` composition block, which feeds it the stream and the member adapters'
outputs; see :class:`AdapterFusion` for the formula.
"""

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

# The paper's value initialisation: ones on the diagonal, this everywhere else.
VALUE_OFF_DIAGONAL = 1e-6
# The key projection's initial standard deviation (BERT's initializer, as AdapterHub's).
KEY_STDDEV = 0.02

CHECKS: dict[str, _checks.Check] = {
    "in_features": functools.partial(_checks.check_positive_int, allow_none=True),
    "temperature": functools.partial(_checks.check_number, low=0.0, low_open=True),
    "adapter_strategy": _checks.check_strategy,
}


def value_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """The value projection's initial kernel: ones on the diagonal and
    :data:`VALUE_OFF_DIAGONAL` (``1e-6``) everywhere else, as in the paper.

    >>> value_init(None, (2, 2))
    Array([[1.e+00, 1.e-06],
           [1.e-06, 1.e+00]], dtype=float32)
    """
    del key
    rows, cols = shape
    eye = jnp.eye(rows, cols, dtype=dtype)
    return eye + jnp.asarray(VALUE_OFF_DIAGONAL, dtype) * (1 - eye)


class AdapterFusion(nn.Module, AdapterMath):
    """The AdapterFusion layer: attention over adapters' outputs, queried by the stream.

    With ``s`` the stream where the :class:`~jadapters.Fuse` block runs (the host's output
    for output adapters), ``d_n = y_n - s`` the delta of member ``n`` (its output alone, its
    strategy applied, less the stream; for a residual adapter its raw output) and ``T`` the
    ``temperature``::

        q     = s @ Wq + bq                      (query, from the stream)
        k_n   = d_n @ Wk + bk                    (keys, from each adapter's output)
        v_n   = d_n @ Wv                         (values, no bias)
        a_n   = softmax_n(<q, k_n> / T)          (over the adapters, at each position)
        fused = sum_n a_n * v_n
        out   = strategy(s, fused)               (ResidualAddStrategy: s + fused)

    In the paper's notation (section 3.2): ``s_t = softmax(h_t^T Q (x) z_{t,n}^T K)``,
    ``z'_{t,n} = z_{t,n}^T V``, ``o_t = s_t^T Z'_t``, with ``h_t`` the sublayer's output (the
    stream ``s`` here) and ``z_{t,n}`` adapter ``n``'s output without its residual (``d_n``
    here); the residual is added after the fusion, and ``Q`` and ``K`` carry biases, as in
    AdapterHub's implementation (``residual_before=False``, value projection before the
    weighted sum). The scores are not scaled by ``sqrt(d)``, as in both.

    Initialisation: ``Wv`` has ones on the diagonal and ``1e-6`` elsewhere (the paper's);
    ``Wk`` is normal with standard deviation ``0.02`` and ``bk = 0`` (BERT's, as
    AdapterHub's); ``Wq = 0`` and ``bq = 0``. The paper draws ``Wq`` at random too; a zero
    query makes every score ``0`` at init, so the attention is exactly uniform and the fused
    output is the mean of the members' outputs up to the ``1e-6`` terms of ``Wv``:
    ``out = s + (1/N) sum_n d_n @ Wv = mean_n y_n + O(1e-6)``. Gradients still flow: the
    query's gradient is ``k_n``-weighted, and ``Wk`` moves once ``Wq`` has.

    The :class:`~jadapters.Fuse` block passes ``values``, the deltas ``d_n`` stacked, of shape
    ``(N, *query.shape)``; ``init`` may leave them out (the weights depend on the width only),
    and any other call without them is an error: a fusion layer outside a ``Fuse`` block has
    nothing to attend over. Parameters are float32; the computation runs in the query's dtype
    and the softmax in float32.

    Attributes:
      in_features: the stream's width; ``None`` infers it from the input.
      temperature: ``T > 0``, a fixed divisor of the scores. The paper's AdapterHub code can
        anneal ``T`` from 50 down to 1 during training (off by default there); a schedule is
        the training loop's business here: build the model with another ``temperature``
        (a new config, so a new trace). ``1.0`` by default.
      adapter_strategy: joins the fused output to the stream; ``ResidualAddStrategy()``.

    Raises:
      ValueError: at construction, for a field of the wrong type or out of range; at call
        time, for an input that is not a floating array of rank >= 1, or ``values`` whose
        shape is not ``(N, *query.shape)``.

    >>> import jax, jax.numpy as jnp
    >>> fusion = AdapterFusion()
    >>> s = jnp.ones((2, 3))
    >>> d = jnp.stack([jnp.full((2, 3), 1.0), jnp.full((2, 3), 3.0)])  # two adapters' deltas
    >>> params = fusion.init(jax.random.key(0), s)
    >>> out = fusion.apply(params, s, d)  # uniform attention at init: the mean delta, 2.0
    >>> bool(jnp.allclose(out, 2.0, atol=1e-5))
    True
    """

    _: dataclasses.KW_ONLY
    in_features: int | None = None
    temperature: float = 1.0
    adapter_strategy: Any = ResidualAddStrategy()

    field_checks: ClassVar[dict[str, _checks.Check]] = CHECKS
    default_insertion: ClassVar[str] = "output"
    # Two axes of one width: only the stream side is named (sharded like the host's output);
    # the projection side is replicated, so that no two axes of a weight share a mesh axis.
    weight_axes: ClassVar[dict[str, tuple[str, ...]]] = {
        "query/kernel": ("features", "projection"),
        "query/bias": ("projection",),
        "key/kernel": ("features", "projection"),
        "key/bias": ("projection",),
        "value/kernel": ("features", "projection"),
    }

    def __post_init__(self):
        _checks.apply_checks(self, self.field_checks)
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        query: jax.Array,
        values: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        del deterministic  # no dropout
        _checks.check_input("AdapterFusion", "query", query, in_features=self.in_features)
        if values is None:
            if not self.is_initializing():
                raise ValueError(
                    "an AdapterFusion adapter runs only inside a Fuse block, which feeds it the "
                    "adapters' outputs; declare set_composition(group, jadapters.Fuse(<adapters>, "
                    "fusion=<its name>)) before running the model (Linen: before init), or "
                    "disable it."
                )
            values = query[None]  # creating the weights: one adapter whose output is the query
        if values.ndim != query.ndim + 1 or values.shape[1:] != query.shape:
            raise ValueError(
                f"AdapterFusion takes values of shape (N, *query.shape) = (N, "
                f"{', '.join(map(str, query.shape))}), one row per adapter, got "
                f"{tuple(values.shape)}."
            )
        features = self.in_features or query.shape[-1]
        dense = functools.partial(nn.Dense, features, dtype=query.dtype)
        q = dense(kernel_init=nn.initializers.zeros, name="query")(query)
        k = dense(kernel_init=nn.initializers.normal(KEY_STDDEV), name="key")(values)
        v = dense(use_bias=False, kernel_init=value_init, name="value")(values)
        scores = jnp.einsum("...d,n...d->n...", q, k).astype(jnp.float32) / self.temperature
        weights = jax.nn.softmax(scores, axis=0).astype(query.dtype)
        return jnp.einsum("n...,n...d->...d", weights, v).astype(query.dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterFusionConfig(AdapterConfig):
    """Frozen, JSON-serializable configuration of :class:`AdapterFusion` (same fields).

    Add it like any adapter, in the group of the adapters it fuses, and name it in a
    :class:`~jadapters.Fuse` block; alone (outside a block) it is refused.

    >>> cfg = AdapterFusionConfig(temperature=2.0)
    >>> type(cfg.build()).__name__, cfg.build().temperature
    ('AdapterFusion', 2.0)
    >>> AdapterFusionConfig(temperature=0)
    Traceback (most recent call last):
    ValueError: temperature must be > 0, got 0.
    """

    in_features: int | None = None
    temperature: float = 1.0
    adapter_strategy: Any = ResidualAddStrategy()

    field_checks: ClassVar[dict[str, _checks.Check]] = CHECKS


register_adapter(AdapterFusionConfig, AdapterFusion)
