"""An adapter bank: ``slots`` adapters of one type, stacked, for per-example routing.

A bank is an adapter type of its own (:class:`AdapterBankConfig`), so it is added, saved,
loaded, counted and trained like any adapter. Its weights are its inner adapter's weights with
a leading ``slots`` axis, one slice per slot. In a call made under :func:`jadapters.route`
(or Linen's ``apply(..., adapter_ids=ids)``) each example ``i`` of the batch runs through slot
``ids[i]`` alone, or through none when ``ids[i] == -1``: the runtime gathers each example's
slice and runs the inner adapter once over the batch (``jax.vmap``), so the cost does not grow
with the number of slots.

Adapters of a smaller size go into a larger slot zero-padded along their ``rank`` or
``bottleneck`` axes (:func:`slot_params`), which is exact: a padded rank column of LoRA's
``A`` meets a zero row of ``B``, and a padded hidden unit of a bottleneck adapter has a zero
row in its up projection, so it adds exactly zero.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jadapters._checks as _checks
from jadapters.adapters.base import AdapterConfig, AdapterMath, param_path
from jadapters.registry import adapter_type_name, build_adapter, register_adapter

# The most slots a bank may have: a bound for configs read from files.
MAX_SLOTS = 1 << 16
# Axes that a smaller adapter may fill only in part (zero-padded to the slot's size).
PADDED_AXES = ("rank", "bottleneck")


def _check_adapter(name: str, value: Any) -> Any:
    """A registered adapter config that is not itself a bank."""
    if not isinstance(value, AdapterConfig) or isinstance(value, AdapterBankConfig):
        raise ValueError(
            f"{name} must be the config of one adapter (e.g. jadapters.LoRAConfig(rank=8)), not "
            f"a bank, got {_checks.show(value)}."
        )
    adapter_type_name(value)  # registered, or a ValueError naming the fix
    return value


def _check_slots(name: str, value: Any) -> int:
    value = _checks.check_positive_int(name, value)
    if value > MAX_SLOTS:
        raise ValueError(f"{name} must be at most {MAX_SLOTS}, got {value}.")
    return value


CHECKS: dict[str, _checks.Check] = {"adapter": _check_adapter, "slots": _check_slots}


class AdapterBank(nn.Module, AdapterMath):
    """``slots`` adapters of one type with stacked weights, routed per example.

    Add it like any adapter; its insertion, strategy and input width are its inner
    adapter's. The runtime routes each example through its own slot (see
    :func:`jadapters.route`); the weights of slot ``k`` are ``tree[k]`` of every array.
    Every slot starts as a freshly initialised inner adapter (identity at init).

    Attributes:
      adapter: the inner adapter's config, the size of every slot (the largest rank or
        bottleneck width to be served).
      slots: the number of slots.

    >>> import jax, jax.numpy as jnp, jadapters
    >>> bank = AdapterBank(jadapters.LoRAConfig(rank=2), slots=3)
    >>> x = jnp.ones((2, 4))
    >>> params = bank.init(jax.random.key(0), x, out_features=5)["params"]
    >>> jax.tree.map(jnp.shape, params)
    {'slots': {'a': (3, 4, 2), 'b': (3, 2, 5)}}
    """

    adapter: Any
    _: dataclasses.KW_ONLY
    slots: int = 1

    field_checks: ClassVar[dict[str, _checks.Check]] = CHECKS
    routed: ClassVar[bool] = True

    def __post_init__(self):
        _checks.apply_checks(self, self.field_checks)
        super().__post_init__()

    @property
    def inner(self) -> Any:
        """The inner adapter module (one slot)."""
        return build_adapter(self.adapter)

    @property
    def default_insertion(self) -> str:  # type: ignore[override]
        return self.inner.default_insertion

    @property
    def needs_out_features(self) -> bool:  # type: ignore[override]
        return getattr(self.inner, "needs_out_features", False)

    @property
    def weight_axes(self) -> Mapping[str, tuple[str, ...]]:  # type: ignore[override]
        axes = getattr(self.inner, "weight_axes", {}) or {}
        return {f"slots/{k}": ("slot", *v) for k, v in axes.items()}

    @property
    def adapter_strategy(self) -> Any:
        return self.inner.adapter_strategy

    @property
    def dropout(self) -> float:
        return getattr(self.inner, "dropout", 0.0)

    def fold(self, params, kernel, bias, layout, *, factor):
        raise ValueError(
            "is an adapter bank: its slots are routed per example, so no single kernel holds "
            "them. Merge one slot's adapter instead (take its weights with "
            "jadapters.slot_weights, load them as an adapter of their own)."
        )

    @nn.compact
    def __call__(self, x, *, out_features: int | None = None, deterministic: bool = True):
        """Creates the stacked weights; returns the inner adapter's raw output for every
        example through slot 0 (the runtime routes; this call only fixes the shapes)."""
        inner = self.inner
        kwargs = {} if out_features is None else {"out_features": out_features}

        def init(rng):
            keys = jax.random.split(rng, self.slots)
            return jax.vmap(lambda k: inner.init(k, x, **kwargs)["params"])(keys)

        stacked = self.param("slots", init)
        first = jax.tree.map(lambda p: p[0], stacked)
        return inner.apply({"params": first}, x, deterministic=deterministic, **kwargs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterBankConfig(AdapterConfig):
    """Frozen, JSON-serializable configuration of :class:`AdapterBank` (same fields).

    >>> import jadapters
    >>> cfg = AdapterBankConfig(adapter=jadapters.LoRAConfig(rank=8), slots=4)
    >>> jadapters.config_from_json(jadapters.config_to_json(cfg)) == cfg
    True
    >>> AdapterBankConfig(adapter=jadapters.LoRAConfig(rank=8), slots=0)
    Traceback (most recent call last):
    ValueError: slots must be a positive int, got 0.
    """

    adapter: Any
    slots: int = 1

    field_checks: ClassVar[dict[str, _checks.Check]] = CHECKS
    # Fields that hold an adapter config (written to files as a nested config).
    config_fields: ClassVar[tuple[str, ...]] = ("adapter",)


register_adapter(AdapterBankConfig, AdapterBank)


# ---- putting adapters into slots ----------------------------------------------------------


def _schema(module: Any) -> Mapping[str, tuple[str, ...]]:
    return getattr(module, "weight_axes", {}) or {}


def check_fits(cfg: Any, slot_cfg: Any) -> None:
    """Raises ``ValueError`` unless an adapter of config ``cfg`` fits a slot of ``slot_cfg``:
    the same type, and every field equal but the size fields the type pads
    (``slot_fields``: LoRA's ``rank``, ``alpha``, ``rslora`` and ``dropout``; a bottleneck
    adapter's ``dim`` and ``dropout``)."""
    if type(cfg) is not type(slot_cfg):
        raise ValueError(
            f"a {type(cfg).__name__} adapter does not fit a bank of {type(slot_cfg).__name__} "
            "slots; load it into a bank of its own type."
        )
    free = getattr(build_adapter(slot_cfg), "slot_fields", ())
    for field in dataclasses.fields(cfg):
        if field.name in free:
            continue
        if getattr(cfg, field.name) != getattr(slot_cfg, field.name):
            raise ValueError(
                f"the adapter's {field.name}={_checks.show(getattr(cfg, field.name))} differs "
                f"from the bank's {field.name}={_checks.show(getattr(slot_cfg, field.name))}; "
                f"only {sorted(free)} may differ between an adapter and its slot."
            )


def _pad(path: str, value: Any, target: Any, axes: tuple[str, ...] | None) -> jax.Array:
    """``value`` zero-padded to ``target``'s shape along its rank/bottleneck axes. Leading axes
    beyond the schema's (a scanned stack's layer axis) must match exactly."""
    value = jnp.asarray(value)
    if value.shape == tuple(target.shape):
        return value.astype(target.dtype)
    lead = value.ndim - len(axes) if axes is not None else -1
    if lead < 0 or value.ndim != len(target.shape):
        raise ValueError(
            f"weight {path!r} has shape {value.shape}, the slot's is {tuple(target.shape)}."
        )
    widths = []
    for axis, size, full in zip(
        ("layers",) * lead + tuple(axes), value.shape, target.shape, strict=True
    ):
        if size == full:
            widths.append((0, 0))
        elif axis in PADDED_AXES and size < full:
            widths.append((0, full - size))
        else:
            raise ValueError(
                f"weight {path!r} has shape {value.shape}, the slot's is "
                f"{tuple(target.shape)}: its {axis!r} axis ({size}) "
                + (
                    "is larger than the slot's; build the bank at the largest size to serve."
                    if axis in PADDED_AXES
                    else "must equal the slot's."
                )
            )
    return jnp.pad(value, widths).astype(target.dtype)


def slot_params(params: Any, cfg: Any, slot_cfg: Any, like: Any) -> Any:
    """``params`` of an adapter of config ``cfg``, as one slot of a bank of ``slot_cfg``
    slots, shaped and typed like ``like`` (one slot's arrays): zero-padded along the rank or
    bottleneck axes, then converted by the type (LoRA rescales ``B`` so that the slot's scale
    gives the adapter's own).

    Raises:
      ValueError: if the adapter does not fit the slot (:func:`check_fits`) or a weight's
        shape does not.
    """
    check_fits(cfg, slot_cfg)
    axes = _schema(build_adapter(slot_cfg))
    flat = {param_path(p): v for p, v in jax.tree_util.tree_leaves_with_path(params)}
    slot = [param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(like)]
    if set(flat) != set(slot):
        raise ValueError(f"the adapter has weights {sorted(flat)}, a slot has {sorted(slot)}.")

    def pad(path: Any, target: Any) -> jax.Array:
        key = param_path(path)
        return _pad(key, flat[key], target, axes.get(key))

    padded = jax.tree_util.tree_map_with_path(pad, like)
    convert = getattr(build_adapter(slot_cfg), "to_slot", None)
    return padded if convert is None else convert(padded, build_adapter(cfg))


def gather_slots(params: Any, ids: jax.Array) -> Any:
    """Each example's slot weights: ``tree[clip(ids)]`` of every stacked array."""
    slots = jax.tree.leaves(params)[0].shape[0]
    index = jnp.clip(ids, 0, slots - 1)
    return jax.tree.map(lambda p: jnp.take(p, index, axis=0), params)


def check_ids(ids: Any) -> tuple[int, int] | None:
    """Checks concrete routing ids (integers, one axis, none below ``-1``) and returns their
    ``(min, max)``; ``None`` for traced ids, whose values are not known."""
    try:
        array = np.asarray(ids)
    except jax.errors.TracerArrayConversionError:
        return None  # traced: out-of-range ids give NaN where they are used
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"adapter_ids must be a 1-d integer array (one slot index per example, -1 for "
            f"the base), got {_checks.show(ids)}."
        )
    bounds = (int(array.min()), int(array.max())) if array.size else (0, 0)
    check_range(bounds)
    return bounds


def check_range(bounds: tuple[int, int] | None, slots: int | None = None) -> None:
    """Raises unless the ids' ``(min, max)`` lie in ``[-1, slots)``; ``None``: traced ids."""
    if bounds is None:
        return
    low, high = bounds
    if low < -1 or (slots is not None and high >= slots):
        bound = "" if slots is None else f" and below the bank's {slots} slots"
        raise ValueError(
            f"adapter_ids must be -1 (the base) or a slot index{bound}, got values from {low} "
            f"to {high}."
        )
