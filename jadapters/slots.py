"""Slots of an adapter bank: put adapters in, take them out, without recompiling.

A bank's weights are arrays of a fixed shape (``slots`` stacked adapters), so putting a new
adapter into a slot changes values only: a function already compiled for the model runs the
new adapter as is. :class:`SlotTable` keeps which adapter is in which slot, on the host.

Each function works on both front-ends through the model's view. Linen returns the new
``variables`` (the model itself does not change: a slot holds no structure); NNX changes the
model in place and returns it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jadapters._adapter_set import AdapterSpec
from jadapters._checks import show
from jadapters._walks import shared
from jadapters.adapters.bank import slot_params
from jadapters.adapters.base import param_path, schema_widths
from jadapters.checkpoint.io import read_checked
from jadapters.registry import build_adapter
from jadapters.view import AdapterView, AdapterWeights, view_of


def _bank(view: AdapterView, bank: Any) -> AdapterSpec:
    spec = view.specs().get(bank) if isinstance(bank, str) else None
    if spec is None:
        banks = [s.qualified_name for s in view.specs() if _is_bank(s)]
        raise ValueError(
            f"bank must name an adapter bank of the model, got {show(bank)}; its banks: {banks}."
        )
    if not _is_bank(spec):
        raise ValueError(
            f"bank {bank!r} is a {type(spec.cfg).__name__}, not an adapter bank; add one with "
            "add_adapter(name, jadapters.AdapterBankConfig(adapter=cfg, slots=n))."
        )
    return spec


def _is_bank(spec: AdapterSpec) -> bool:
    return getattr(build_adapter(spec.cfg), "routed", False)


def _slot(spec: AdapterSpec, slot: Any) -> int:
    slots = spec.cfg.slots
    if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)) or not 0 <= slot < slots:
        raise ValueError(
            f"slot must be an int in [0, {slots}) for bank {spec.qualified_name!r}, got "
            f"{show(slot)}."
        )
    return int(slot)


def _slot_axis(spec: AdapterSpec) -> Any:
    """``axis(path, value)``: where the slot axis of a bank weight is. It follows the layer
    axes of a scanned stack, which come first."""
    schema = build_adapter(spec.cfg).weight_axes

    def axis(path: Any, value: Any) -> int:
        axes = schema.get(f"slots/{param_path(path)}")
        return 0 if axes is None else max(np.ndim(value) - len(axes), 0)

    return axis


def _one(spec: AdapterSpec, stacked: Any, slot: int) -> Any:
    axis = _slot_axis(spec)
    return jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.take(p, slot, axis=axis(path, p)), stacked["slots"]
    )


def _with(spec: AdapterSpec, stacked: Any, slot: int, new: Any) -> dict:
    axis = _slot_axis(spec)

    def put(path, p, value):
        index = (slice(None),) * axis(path, p) + (slot,)
        return p.at[index].set(value)

    return {"slots": jax.tree_util.tree_map_with_path(put, stacked["slots"], new)}


def _result(view: AdapterView, spec: AdapterSpec, hosts: Mapping[str, Any]) -> Any:
    result = view.insert([AdapterWeights(spec, hosts)])
    return result[1] if isinstance(result, tuple) else result


@shared
def slot_weights(model: Any, variables: Any = None, *, bank: str, slot: int) -> dict:
    """``{host path: params}`` of slot ``slot`` of adapter bank ``bank``, shaped as one adapter
    of the bank's inner config (padding included).

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jadapters
    >>> model = jadapters.adapter_transform(nn.Sequential([nn.Dense(3)]), "layers_0")
    >>> cfg = jadapters.AdapterBankConfig(adapter=jadapters.IA3Config(), slots=2)
    >>> model = model.add_adapter("tenants", cfg)
    >>> variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> slot_weights(model, variables, bank="tenants", slot=1)
    {'layers_0': {'scale': Array([1., 1., 1.], dtype=float32)}}
    """
    view = view_of(model, variables)
    spec = _bank(view, bank)
    slot = _slot(spec, slot)
    [weights] = view.weights([spec])
    return {host: _one(spec, stacked, slot) for host, stacked in weights.hosts.items()}


@shared
def put_slot(
    model: Any,
    variables: Any = None,
    *,
    bank: str,
    slot: int,
    weights: Mapping[str, Any],
    cfg: Any = None,
) -> Any:
    """Puts an adapter's ``weights`` (``{host path: params}``) into slot ``slot`` of ``bank``.

    ``cfg`` is the adapter's config (default: the bank's inner config). A smaller adapter
    (rank, bottleneck width) is zero-padded to the slot's size, which is exact; LoRA's ``B``
    is rescaled so that the slot's ``alpha / rank`` gives the adapter's own scale.

    Returns:
      Linen: the new ``variables`` (the inputs are unchanged). NNX: ``model``, changed in
      place.

    Raises:
      ValueError: for an unknown bank or slot, weights at other hosts than the bank's, an
        adapter of another type or with other fields (see :func:`jadapters.adapters.bank.
        check_fits`), or a weight larger than the slot.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jadapters
    >>> model = jadapters.adapter_transform(nn.Sequential([nn.Dense(3)]), "layers_0")
    >>> cfg = jadapters.AdapterBankConfig(adapter=jadapters.IA3Config(), slots=2)
    >>> model = model.add_adapter("tenants", cfg)
    >>> variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> new = {"layers_0": {"scale": jnp.array([2.0, 2.0, 2.0])}}
    >>> variables = put_slot(model, variables, bank="tenants", slot=1, weights=new)
    >>> slot_weights(model, variables, bank="tenants", slot=1)["layers_0"]["scale"]
    Array([2., 2., 2.], dtype=float32)
    """
    view = view_of(model, variables)
    spec = _bank(view, bank)
    slot = _slot(spec, slot)
    cfg = spec.cfg.adapter if cfg is None else cfg
    [current] = view.weights([spec])
    if not isinstance(weights, Mapping) or set(weights) != set(current.hosts):
        got = sorted(weights) if isinstance(weights, Mapping) else show(weights)
        raise ValueError(
            f"weights must map each host of bank {spec.qualified_name!r} to its params: "
            f"hosts {sorted(current.hosts)}, got {got}."
        )
    hosts = {}
    for host, stacked in current.hosts.items():
        padded = slot_params(weights[host], cfg, spec.cfg.adapter, _one(spec, stacked, slot))
        hosts[host] = _with(spec, stacked, slot, padded)
    return _result(view, spec, hosts)


@shared
def clear_slot(model: Any, variables: Any = None, *, bank: str, slot: int) -> Any:
    """Frees slot ``slot`` of ``bank``: its weights become a freshly initialised adapter's,
    which leaves every example routed there unchanged (identity at init). Returns as
    :func:`put_slot` does.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jadapters
    >>> model = jadapters.adapter_transform(nn.Sequential([nn.Dense(3)]), "layers_0")
    >>> cfg = jadapters.AdapterBankConfig(adapter=jadapters.IA3Config(), slots=2)
    >>> model = model.add_adapter("tenants", cfg)
    >>> variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> new = {"layers_0": {"scale": jnp.array([2.0, 2.0, 2.0])}}
    >>> variables = put_slot(model, variables, bank="tenants", slot=1, weights=new)
    >>> variables = clear_slot(model, variables, bank="tenants", slot=1)
    >>> slot_weights(model, variables, bank="tenants", slot=1)["layers_0"]["scale"]
    Array([1., 1., 1.], dtype=float32)
    """
    view = view_of(model, variables)
    spec = _bank(view, bank)
    slot = _slot(spec, slot)
    inner = build_adapter(spec.cfg.adapter)
    [current] = view.weights([spec])
    hosts = {}
    for host, stacked in current.hosts.items():
        fresh = _fresh(inner, _one(spec, stacked, slot), host)
        hosts[host] = _with(spec, stacked, slot, fresh)
    return _result(view, spec, hosts)


def _fresh(inner: Any, like: Any, host: str) -> Any:
    """Freshly initialised params of ``inner`` shaped like ``like`` (widths from its schema)."""
    schema = getattr(inner, "weight_axes", {}) or {}
    shapes = {}  # one layer's shapes of the weights in the schema (a stack's layer axes first)
    for path, value in jax.tree_util.tree_leaves_with_path(like):
        axes = schema.get(param_path(path))
        if axes is not None and np.ndim(value) >= len(axes):
            shapes[param_path(path)] = np.shape(value)[np.ndim(value) - len(axes) :]
    found = schema_widths(inner, shapes)
    if found is None:
        raise ValueError(
            f"cannot tell the input width of the {type(inner).__name__} at host {host!r} from "
            "its weights; put a fresh adapter's weights with put_slot instead."
        )
    width, kwargs = found
    params = inner.init(jax.random.key(0), jnp.zeros((1, width)), **kwargs)["params"]
    # the same fresh adapter on every layer of a scanned stack
    return jax.tree.map(
        lambda p, old: jnp.broadcast_to(p, old.shape).astype(old.dtype), params, like
    )


@shared
def load_slot(
    path: str,
    model: Any,
    variables: Any = None,
    *,
    bank: str,
    slot: int,
    name: str | None = None,
    check_base: bool | str = True,
    version: int | None = None,
) -> Any:
    """Loads adapter ``name`` of the checkpoint at ``path`` into slot ``slot`` of ``bank``.

    The checkpoint is read and checked as :func:`jadapters.load_adapters` reads it (hashes,
    bounds, base fingerprint at the hosts); the adapter must belong to the bank's adapter
    module (group), sit at the same hosts and fit the slot (:func:`put_slot`). Nothing of the
    model's structure changes, so a compiled function keeps running: no recompile.

    Returns:
      As :func:`put_slot`.

    Raises:
      ValueError: for everything :func:`jadapters.load_adapters` refuses, a checkpoint with
        several adapters and no ``name``, or an adapter that does not fit the bank.

    >>> import tempfile, jax, jax.numpy as jnp, flax.linen as nn, jadapters
    >>> base = nn.Sequential([nn.Dense(3)])
    >>> task = jadapters.adapter_transform(base, "layers_0").add_adapter(
    ...     "task", jadapters.IA3Config())
    >>> x = jnp.ones((2, 4))
    >>> trained = task.init(jax.random.key(0), x)
    >>> trained["adapters"]["layers_0"]["task"]["scale"] = jnp.full(3, 2.0)
    >>> path = tempfile.mkdtemp()
    >>> _ = jadapters.save_adapters(path, task, trained)
    >>> cfg = jadapters.AdapterBankConfig(adapter=jadapters.IA3Config(), slots=4)
    >>> model = jadapters.adapter_transform(base, "layers_0").add_adapter("tenants", cfg)
    >>> variables = model.init(jax.random.key(0), x)
    >>> variables = {**variables, "params": trained["params"]}  # the same base
    >>> variables = load_slot(path, model, variables, bank="tenants", slot=2)
    >>> slot_weights(model, variables, bank="tenants", slot=2)["layers_0"]["scale"]
    Array([2., 2., 2.], dtype=float32)
    """
    view = view_of(model, variables)
    spec = _bank(view, bank)
    loaded = read_checked(path, view, name, check_base=check_base, version=version)
    if len(loaded) != 1:
        raise ValueError(
            f"name must pick one adapter of the checkpoint at {path!r}, which holds "
            f"{[s.qualified_name for s, _ in loaded]}; pass name=..."
        )
    [(saved, hosts)] = loaded
    if saved.group != spec.group:
        raise ValueError(
            f"adapter {saved.qualified_name!r} of the checkpoint belongs to adapter module "
            f"{saved.group!r}, but bank {spec.qualified_name!r} to {spec.group!r}; load it "
            "into a bank of the same module."
        )
    return put_slot(model, variables, bank=bank, slot=slot, weights=hosts, cfg=saved.cfg)


class SlotTable:
    """Which adapter is in which slot of a bank: a small host-side table for serving.

    >>> table = SlotTable(2)
    >>> table.assign("legal"), table.assign("medical")
    (0, 1)
    >>> table.ids(["medical", None, "legal"]).tolist()
    [1, -1, 0]
    >>> table.free("legal")
    0
    >>> table.assign("code")
    0
    >>> table.assign("math")
    Traceback (most recent call last):
    ValueError: all 2 slots are taken (['code', 'medical']); free one with free(name) first.
    """

    def __init__(self, slots: int):
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots must be a positive int, got {show(slots)}.")
        self.slots = slots
        self._by_name: dict[str, int] = {}

    @property
    def names(self) -> dict[str, int]:
        """``{adapter name: slot}``."""
        return dict(self._by_name)

    def assign(self, name: str) -> int:
        """Takes the first free slot for ``name`` and returns it."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {show(name)}.")
        if name in self._by_name:
            raise ValueError(f"{name!r} is already in slot {self._by_name[name]}.")
        taken = set(self._by_name.values())
        for slot in range(self.slots):
            if slot not in taken:
                self._by_name[name] = slot
                return slot
        raise ValueError(
            f"all {self.slots} slots are taken ({sorted(self._by_name)}); free one with "
            "free(name) first."
        )

    def free(self, name: str) -> int:
        """Frees ``name``'s slot and returns it (clear its weights with :func:`clear_slot`)."""
        slot = self.slot(name)
        del self._by_name[name]
        return slot

    def slot(self, name: str) -> int:
        """The slot holding ``name``."""
        if name not in self._by_name:
            raise ValueError(f"{show(name)} is in no slot; loaded: {sorted(self._by_name)}.")
        return self._by_name[name]

    def ids(self, names: Iterable[str | None]) -> np.ndarray:
        """One routing id per example: the slot of each name, ``-1`` for ``None`` (the base)."""
        return np.asarray([-1 if n is None else self.slot(n) for n in names], np.int32)
