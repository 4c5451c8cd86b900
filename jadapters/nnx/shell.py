"""NNX shell: holds a Linen adapter's parameters as :class:`~jadapters.AdapterParam` variables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.core.meta
import jax
import jax.numpy as jnp
from flax import nnx

from jadapters.kernels import KernelLayout
from jadapters.losses import AdapterLoss
from jadapters.registry import build_adapter, config_of
from jadapters.runtime import needs_key, run_adapter
from jadapters.storage import AdapterParam
from jadapters.strategies import StrategyOutput


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


class NNXAdapter(nnx.Module):
    """An adapter inside an NNX model: the config's Linen module plus its weights.

    The math is the Linen module's (one definition serves both front-ends); this shell owns
    the weights as :class:`AdapterParam` variables, follows ``model.train()`` /
    ``model.eval()`` through its ``deterministic`` attribute, and draws dropout and
    stochastic-depth keys from its own ``dropout`` PRNG stream.

    Args:
      cfg: an adapter config or Linen adapter module.
      sample_shape: shape of an example input, e.g. ``(1, in_features)``.
      rngs: ``nnx.Rngs`` with a ``params`` stream (initialization) and optionally a
        ``dropout`` stream (needed for dropout or stochastic depth in training).
      dtype: dtype of the example input used for initialization.
      out_features: output width, for adapters that need it (parallel adapters, LoRA).
      names: ``None``, or a function ``names(params) -> tree of axis-name tuples`` whose
        result becomes each weight's ``out_sharding`` metadata (so
        ``nnx.get_partition_spec`` returns it).

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jadapters import LinearAdapterConfig
    >>> adapter = NNXAdapter(LinearAdapterConfig(dim=2), (1, 4), rngs=nnx.Rngs(0))
    >>> x = jnp.ones((3, 4))
    >>> bool((adapter(x).output == x).all())
    True
    """

    def __init__(
        self,
        cfg: Any,
        sample_shape: Sequence[int],
        *,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        out_features: int | None = None,
        names: Any = None,
    ):
        self.cfg = config_of(cfg)
        module = build_adapter(self.cfg)
        kwargs = {}
        if getattr(module, "needs_out_features", False):
            if out_features is None:
                raise ValueError(
                    f"{type(module).__name__} needs out_features (the host's output width); "
                    "pass out_features=..."
                )
            kwargs["out_features"] = out_features
        self.out_features = out_features
        variables = module.init(rngs.params(), jnp.zeros(tuple(sample_shape), dtype), **kwargs)
        extra = sorted(set(variables) - {"params"})
        if extra:
            raise ValueError(
                f"adapter {type(module).__name__} creates collections {extra}; only 'params' "
                "are supported in adapters."
            )
        params = dict(variables["params"])
        if names is None:
            self.params = nnx.data(jax.tree.map(AdapterParam, params))
        else:
            self.params = nnx.data(jax.tree.map(_sharded_param, params, names(params)))
        self.deterministic = False
        # A stream only where the config can draw from it (dropout, stochastic depth): an
        # adapter that never draws keys carries no RNG state.
        random = needs_key(module, training=True)
        self.rngs = nnx.data(rngs["dropout"].fork() if random and "dropout" in rngs else None)

    @property
    def module(self) -> Any:
        """The Linen module that holds this adapter's math."""
        return build_adapter(self.cfg)

    def param_values(self) -> Any:
        return jax.tree.map(lambda v: v[...], self.params, is_leaf=_is_variable)

    def __call__(
        self,
        x: jax.Array,
        *,
        stream: jax.Array | None = None,
        layout: KernelLayout | None = None,
    ) -> StrategyOutput:
        """Runs the adapter on ``x`` and joins it to ``stream`` (``x`` by default).

        A weight adapter (LoRA) also takes its host's kernel ``layout``; ``stream`` is then
        the host's output.
        """
        training = not self.deterministic
        module = self.module
        result = run_adapter(
            module,
            self.param_values(),
            x,
            stream=stream,
            training=training,
            key=self.next_key() if needs_key(module, training) else None,
            out_features=self.out_features,
            layout=layout,
        )
        if result.aux_loss is not None:
            self.record_loss(result.aux_loss)
        return result

    def next_key(self) -> jax.Array | None:
        """A fresh key from the adapter's ``dropout`` stream, or ``None`` without one."""
        return self.rngs() if self.rngs is not None else None

    def record_loss(self, loss: jax.Array) -> None:
        """Adds ``loss`` to this adapter's :class:`~jadapters.AdapterLoss` of the forward.

        Inside ``nnx.capture(..., jadapters.AdapterLoss)`` the loss goes to the capture;
        otherwise it accumulates in the ``aux_loss`` variable, which ``nnx.pop(model,
        jadapters.AdapterLoss)`` collects (and removes).
        """
        loss = jnp.asarray(loss, jnp.float32)
        if hasattr(self, "__captures__"):
            self.sow(AdapterLoss, "aux_loss", loss, reduce_fn=_add, init_fn=_zero)
            return
        current = getattr(self, "aux_loss", None)
        if current is None:
            self.aux_loss = AdapterLoss(loss)
        else:
            current.set_value(current.get_value() + loss)


def _sharded_param(value: jax.Array, names: tuple[Any, ...]) -> AdapterParam:
    """An :class:`AdapterParam` with ``out_sharding`` metadata ``names``; placed on the mesh
    when one is set and NNX shards eagerly (as the host's kernel was), else only annotated."""
    if flax.core.meta.get_global_mesh() is not None and nnx.using_eager_sharding():
        return AdapterParam(value, out_sharding=names)
    param = AdapterParam(value)
    param.set_metadata(out_sharding=names)
    return param


def _add(a, b):
    return a + b


def _zero():
    return jnp.zeros((), jnp.float32)


class AdapterLayerGate(nnx.Variable):
    """Which layers of a scanned stack an adapter acts on (``Target.layers``): one flag per
    layer, sliced with the adapter's weights by ``nnx.scan``. Not a parameter: it is neither
    trained nor saved (the targets recreate it)."""


def stacked_shell(
    num_layers: int,
    gate: Sequence[bool] | None,
    cfg: Any,
    sample_shape: Sequence[int],
    *,
    rngs: nnx.Rngs,
    dtype: Any = jnp.float32,
    out_features: int | None = None,
) -> NNXAdapter:
    """An :class:`NNXAdapter` for a host inside an ``nnx.vmap``-built layer stack: its weights
    carry a leading layer axis of ``num_layers`` (each layer initialized with its own key, as
    the stack's own layers are), so ``nnx.scan`` gives each layer its own adapter. ``gate``
    (one flag per layer, or ``None`` for all) marks the layers whose adapter acts."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=num_layers)
    def create(layer_rngs: nnx.Rngs) -> NNXAdapter:
        return NNXAdapter(
            cfg, sample_shape, rngs=layer_rngs, dtype=dtype, out_features=out_features
        )

    shell = create(rngs)
    if gate is not None:
        shell.layer_gate = AdapterLayerGate(jnp.asarray(gate, jnp.bool_))
    return shell
