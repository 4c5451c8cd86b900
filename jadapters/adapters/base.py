"""What every adapter shares: the config base class and the call protocol.

An adapter's functional form is a Flax Linen module whose ``__call__(x, *, deterministic)``
returns the adapter's raw output, and which carries an ``adapter_strategy`` field that joins
that output to the stream. Linen modules are pure ``init``/``apply`` functions, so the same
module serves Linen models directly and NNX models through :class:`jadapters.NNXAdapter`:
each adapter's math is written once.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import flax.core.meta
import jax

import jadapters._checks as _checks
from jadapters._activations import ACTIVATIONS
from jadapters.registry import build_adapter

# The field check of an adapter's ``activation``.
check_activation = functools.partial(_checks.check_choice, choices=tuple(sorted(ACTIVATIONS)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """Base class of adapter configs: frozen dataclasses whose fields match the module's.

    A subclass lists each field's check in ``field_checks`` (the same table as its module's);
    they run when the config is built, so a bad value fails there, naming the field.

    >>> import jadapters
    >>> cfg = jadapters.LoRAConfig(rank=4)
    >>> isinstance(cfg, AdapterConfig), type(cfg.build()).__name__
    (True, 'LoRA')
    >>> jadapters.LoRAConfig(rank=0)
    Traceback (most recent call last):
    ValueError: rank must be a positive int, got 0.
    """

    field_checks: ClassVar[Mapping[str, _checks.Check]] = {}

    def __post_init__(self):
        _checks.apply_checks(self, self.field_checks)

    def build(self) -> Any:
        """Builds the Flax module this config describes (through the registry)."""
        return build_adapter(self)


class AdapterMath:
    """What an adapter type owns beside its forward: where it goes by default, its weight
    schema and, if it is linear in its host's kernel, the algebra that folds it in.

    Mixed into each adapter's Linen module. Code above the adapters (merge, checkpoints,
    summaries) asks the type through these members and never reads a parameter by name.

    Attributes:
      field_checks: each configuration field's check (``jadapters._checks``); the module runs
        them in its ``__post_init__`` and its config in its own.
      default_insertion: ``"output"``, ``"parallel"``, ``"input"`` or ``"weight"``.
      needs_out_features: the module is called with ``out_features=`` (the host's output
        width).
      merge_insertion: the insertion at which :meth:`fold` applies; ``None`` for a type that
        cannot be folded into a kernel.
      forward: (optional, per type) the adapter's math as a pure function of its weights,
        ``forward(params, x, *, training, key)``; see :func:`adapter_forward`.
      weight_axes: the weight schema: each parameter's path (``"down/kernel"``) and the
        logical name of each of its axes: ``"in"``/``"out"`` (the host's input and output
        width), ``"features"`` (the width of the stream the adapter sits on), ``"rank"`` or
        ``"bottleneck"``.
    """

    field_checks: ClassVar[Mapping[str, _checks.Check]] = {}
    default_insertion: ClassVar[str] = "output"
    needs_out_features: ClassVar[bool] = False
    merge_insertion: ClassVar[str | None] = None
    weight_axes: ClassVar[Mapping[str, tuple[str, ...]]] = {}

    def forward_from_call(self, params: Any, x: jax.Array, deterministic: bool) -> jax.Array:
        """What a type's Linen ``__call__`` returns once it has declared ``params``: its
        ``forward``, with a key from the ``'dropout'`` stream where dropout is on."""
        off = deterministic or getattr(self, "dropout", 0.0) == 0.0
        key = None if off else self.make_rng("dropout")  # type: ignore[attr-defined]
        return self.forward(params, x, training=not deterministic, key=key)  # type: ignore[attr-defined]

    def fold(
        self, params: Any, kernel: jax.Array, bias: jax.Array | None, layout: Any, *, factor: float
    ) -> tuple[jax.Array, jax.Array | None]:
        """Folds ``factor`` times this adapter into ``kernel`` (and ``bias``), in float32.

        Raises:
          ValueError: for a type (or a host layout) that cannot be folded; the message
            continues a sentence whose subject is the adapter.
        """
        raise ValueError("cannot be folded into a kernel.")


def adapter_forward(
    module: Any,
    params: Any,
    x: jax.Array,
    *,
    training: bool = False,
    key: jax.Array | None = None,
    **kwargs: Any,
) -> jax.Array:
    """``module``'s raw output on ``x`` from its weights ``params``.

    A type that writes its math as a pure ``forward(params, x, *, training, key)`` (and whose
    ``__call__`` only declares the weights and calls it) is run through that, with no Flax
    scope; any other module (a registered third-party type) through ``apply``, with ``key`` as
    its ``'dropout'`` stream. ``kwargs`` (``out_features``) go to ``apply`` only: given its
    weights, an adapter's widths are theirs.

    >>> import jax, jax.numpy as jnp
    >>> from jadapters.adapters.lora import LoRA
    >>> lora, x = LoRA(2), jnp.ones((1, 4))
    >>> params = lora.init(jax.random.key(0), x, out_features=3)["params"]
    >>> adapter_forward(lora, params, x, out_features=3).shape  # LoRA.forward, no Flax scope
    (1, 3)
    """
    forward = getattr(module, "forward", None)
    if forward is not None:
        return forward(params, x, training=training, key=key)
    rngs = {"dropout": key} if key is not None else {}
    return module.apply({"params": params}, x, deterministic=not training, rngs=rngs, **kwargs)


# ---- partitioning: adapter weights follow their host kernel's axis names -----------------

# ``rule(host_path, adapter_name, param_path, derived) -> names``: overrides the derived
# axis names of one adapter weight (``param_path`` as in ``weight_axes``, e.g. ``"a"`` or
# ``"down/kernel"``; ``derived`` a tuple of one name or ``None`` per axis).
ShardingRule = Callable[[str, str, str, tuple[Any, ...]], Sequence[Any]]


def param_path(path: Sequence[Any]) -> str:
    """A parameter's path in the weight schema's form (``"down/kernel"``), from a pytree key
    path (``jax.tree_util``'s keys, or plain ones).

    >>> import jax
    >>> [param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path({"down": {"kernel": 1}})]
    ['down/kernel']
    """
    return "/".join(str(getattr(k, "key", k)) for k in path)


def schema_widths(module: Any, shapes: Mapping[str, Sequence[int]]) -> tuple[int, dict] | None:
    """``(input width, init keyword arguments)`` under which ``module`` creates parameters of
    ``shapes`` (``{param path: one layer's shape}``), read through its weight schema
    (``weight_axes``); ``None`` when no shape names the input width.

    Raises:
      ValueError: (a message to complete) for a parameter the schema lacks, a shape of another
        rank than its axes, or an axis with two sizes.

    >>> from jadapters.adapters.lora import LoRA
    >>> schema_widths(LoRA(2), {"a": (4, 2), "b": (2, 8)})
    (4, {'out_features': 8})
    """
    axes = getattr(module, "weight_axes", None) or {}
    widths: dict[str, int] = {}
    for name, shape in shapes.items():
        if name not in axes:
            raise ValueError(f"{type(module).__name__} has no parameter {name!r}")
        if len(axes[name]) != len(shape):
            raise ValueError(
                f"parameter {name!r} has axes {axes[name]} in {type(module).__name__}, but "
                f"shape {tuple(shape)}"
            )
        for axis, size in zip(axes[name], shape, strict=True):
            if widths.setdefault(axis, size) != size:
                raise ValueError(f"axis {axis!r} is {widths[axis]} and {size} in different arrays")
    width = widths.get("features", widths.get("in"))
    if width is None:
        return None
    kwargs = {}
    if getattr(module, "needs_out_features", False):
        kwargs["out_features"] = widths.get("out", widths.get("features", width))
    return width, kwargs


def unbox(tree: Any) -> Any:
    """``tree`` with flax's axis metadata boxes (``nn.Partitioned``, ...) replaced by their
    values; anything else as it is.

    >>> import flax.linen as nn, jax.numpy as jnp
    >>> unbox({"kernel": nn.Partitioned(jnp.ones(2), names=("mlp",))})["kernel"].shape
    (2,)
    """
    return flax.core.meta.unbox(tree)


def is_box(x: Any) -> bool:
    return isinstance(x, flax.core.meta.AxisMetadata)


def _flat_name(names: Sequence[Any], dims: Sequence[int]) -> Any:
    """The axis name of kernel axes ``dims`` flattened into one: the leading axis's name
    when only it is named (flattening keeps a split of the leading axis), else ``None``."""
    named = [names[d] for d in dims]
    if not named or any(n is not None for n in named[1:]):
        return None
    return named[0]


def derive_weight_names(
    module: Any,
    params: Any,
    kernel_names: Sequence[Any],
    in_dims: Sequence[int],
    insertion: str,
) -> Any:
    """The axis names of each of ``module``'s ``params``, derived from its host kernel's.

    ``kernel_names`` has one name (or ``None``) per kernel axis; ``in_dims`` are the kernel
    axes that meet the host's input. Through the type's ``weight_axes``: ``"in"`` takes the
    kernel's input-axis name, ``"out"`` its output-axis name, ``"features"`` the name of the
    axis the adapter sits on (the kernel's first input axis for an input adapter, its last
    axis otherwise), and ``"rank"``/``"bottleneck"`` (or a weight not in the schema) ``None``:
    replicated. Returns a tree like ``params`` with a tuple of names per leaf.

    >>> from jadapters.adapters.lora import LoRA
    >>> import jax.numpy as jnp
    >>> params = {"a": jnp.zeros((4, 2)), "b": jnp.zeros((2, 8))}
    >>> derive_weight_names(LoRA(2), params, ("embed", "mlp"), (0,), "weight")
    {'a': ('embed', None), 'b': (None, 'mlp')}
    """
    names = tuple(kernel_names)
    out_dims = [d for d in range(len(names)) if d not in in_dims]
    roles = {
        "in": _flat_name(names, in_dims),
        "out": _flat_name(names, out_dims),
        "features": names[in_dims[0]] if insertion == "input" and in_dims else names[-1],
    }
    schema = getattr(module, "weight_axes", {})

    def leaf(path: Any, value: Any) -> tuple[Any, ...]:
        axes = schema.get(param_path(path))
        if axes is None or len(axes) != value.ndim:
            return (None,) * value.ndim
        return tuple(roles.get(a) for a in axes)

    return jax.tree_util.tree_map_with_path(leaf, params)


def apply_rule(rule: ShardingRule | None, host: str, adapter: str, params: Any, names: Any) -> Any:
    """``names`` (a tree like ``params``) with ``rule`` applied to each weight.

    Raises:
      ValueError: if the rule returns names of the wrong length.
    """
    if rule is None:
        return names

    def leaf(path: Any, value: Any, derived: tuple[Any, ...]) -> tuple[Any, ...]:
        key = param_path(path)
        out = tuple(rule(host, adapter, key, derived))
        if len(out) != value.ndim:
            raise ValueError(
                f"the sharding rule returned {out} for weight {key!r} of adapter {adapter!r} "
                f"at host {host!r}, which has {value.ndim} axes; return one name (or None) "
                "per axis."
            )
        return out

    return jax.tree_util.tree_map_with_path(leaf, params, names)


# ---- layer stacks: adapter weights with a leading layer axis --------------------------------


def stack_size(module: Any, params: Any) -> int | None:
    """The layer count of ``params`` stacked along a leading layer axis (the weights of an
    adapter on a host inside a scanned layer stack), or ``None`` for one layer's weights.

    Read from the type's weight schema (``weight_axes``): stacked weights have one axis more
    than it lists, all of the same size. A type without a schema is never seen as stacked.

    >>> import jax.numpy as jnp
    >>> from jadapters.adapters.lora import LoRA
    >>> stack_size(LoRA(2), {"a": jnp.zeros((5, 4, 2)), "b": jnp.zeros((5, 2, 8))})
    5
    >>> stack_size(LoRA(2), {"a": jnp.zeros((4, 2)), "b": jnp.zeros((2, 8))}) is None
    True
    """
    schema = getattr(module, "weight_axes", None) or {}
    sizes = set()
    for path, value in jax.tree_util.tree_flatten_with_path(unbox(params))[0]:
        axes = schema.get(param_path(path))
        if axes is None:
            continue
        if len(value.shape) != len(axes) + 1:
            return None
        sizes.add(int(value.shape[0]))
    return sizes.pop() if len(sizes) == 1 else None
