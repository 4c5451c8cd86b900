"""NNX shell: holds a Linen adapter's parameters as :class:`AdapterParam` variables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jadapters._chain import apply_adapter, apply_weight_adapter
from jadapters.config import build_adapter, config_of
from jadapters.kernels import KernelLayout
from jadapters.losses import AdapterLoss
from jadapters.strategies import StrategyOutput, requires_key


class AdapterParam(nnx.Variable):
    """The NNX variable type of every adapter weight.

    It deliberately does **not** subclass ``nnx.Param``: ``nnx.state(model, nnx.Param)`` is
    exactly the base model's parameters and ``nnx.state(model, AdapterParam)`` exactly the
    adapters'. (Flax's own ``nnx.LoRAParam`` subclasses ``nnx.Param``, so a ``nnx.Param``
    filter also catches it; ours never mixes the two partitions.)

    >>> from flax import nnx
    >>> import jadapters
    >>> model = jadapters.adapter_transform(nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0))),
    ...                                     "layers/0")
    >>> model.add_adapter("task", jadapters.IA3Config(), rngs=nnx.Rngs(1))
    >>> [v.shape for v in jax.tree.leaves(nnx.state(model, AdapterParam))]
    [(2,)]
    >>> len(jax.tree.leaves(nnx.state(model, nnx.Param)))  # the base: kernel and bias
    2
    """


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
        self.params = nnx.data(jax.tree.map(AdapterParam, dict(variables["params"])))
        self.deterministic = False
        self.rngs = nnx.data(rngs["dropout"].fork() if "dropout" in rngs else None)

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
        needs_key = getattr(module, "dropout", 0.0) > 0.0 or requires_key(
            module.adapter_strategy, training
        )
        key = self.rngs() if training and needs_key and self.rngs is not None else None
        variables = {"params": self.param_values()}
        if layout is not None:
            result = apply_weight_adapter(
                module, variables, x, stream, layout, training=training, key=key
            )
        else:
            result = apply_adapter(
                module,
                variables,
                x,
                stream=stream,
                training=training,
                key=key,
                out_features=self.out_features,
            )
        if result.aux_loss is not None:
            self.sow(
                AdapterLoss,
                "aux_loss",
                result.aux_loss,
                reduce_fn=lambda a, b: a + b,
                init_fn=lambda: jnp.zeros((), jnp.float32),
            )
        return result
