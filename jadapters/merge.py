"""Folding linear adapters into the base kernels for inference at the base model's cost.

``merge_adapters`` returns *new* base parameters: JAX arrays are immutable, so the original
base stays as it was, for unmerging (use it again; with NNX, copy it out of the model before
updating the model) or for switching to another adapter.
LoRA folds as ``W + w * scale * A @ B`` and IA3 as ``W * (1 + w * (l - 1))`` (bias too), where
``w`` is the adapter's merge weight (1 by default), so weighted combinations of several LoRAs
merge too. Adapters that are not linear in the host's kernel (bottlenecks with a
nonlinearity, parallel or input adapters) cannot be folded: merging one is an error that names
it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jadapters._adapter_set import AdapterSpec
from jadapters._walks import shared
from jadapters.adapters.base import stack_size
from jadapters.composition import check_foldable
from jadapters.kernels import KernelLayout
from jadapters.registry import build_adapter
from jadapters.strategies import linear_factor
from jadapters.view import view_of


def _check_mergeable(spec: AdapterSpec) -> None:
    module = build_adapter(spec.cfg)
    kind = type(spec.cfg).__name__.removesuffix("Config")
    if getattr(module, "routed", False):
        raise ValueError(
            f"adapter {spec.name!r} is an adapter bank: its slots are routed per example, so "
            "no single kernel holds them. Merge one slot's adapter instead: take its weights "
            "with jadapters.slot_weights and load them as an ordinary adapter."
        )
    if module.merge_insertion is None or spec.insertion != module.merge_insertion:
        raise ValueError(
            f"adapter {spec.name!r} ({kind}, insertion {spec.insertion!r}) cannot be merged: "
            "only adapters linear in the host's kernel (LoRA as 'weight', IA3 as 'output') "
            "fold into it. Disable it, or keep it unmerged."
        )
    try:
        linear_factor(spec.cfg.adapter_strategy)
    except ValueError as err:
        raise ValueError(f"adapter {spec.name!r} joins the stream with {err}") from None


def _fold(
    kernel: jax.Array,
    bias: jax.Array | None,
    layout: KernelLayout,
    entries: Sequence[tuple[AdapterSpec, Any, float]],
) -> tuple[jax.Array, jax.Array | None]:
    """Folds ``(spec, params, weight)`` into ``kernel``/``bias`` in float32, as the forward
    applies them: weight adapters first, then the others in chain order."""
    new_kernel = kernel.astype(jnp.float32)
    new_bias = None if bias is None else bias.astype(jnp.float32)
    ordered = sorted(entries, key=lambda e: e[0].insertion != "weight")  # stable
    for spec, params, weight in ordered:
        factor = weight * linear_factor(spec.cfg.adapter_strategy)
        try:
            new_kernel, new_bias = build_adapter(spec.cfg).fold(
                params, new_kernel, new_bias, layout, factor=factor
            )
        except ValueError as err:
            kind = type(spec.cfg).__name__.removesuffix("Config")
            raise ValueError(f"adapter {spec.name!r} ({kind}) {err}") from None
    return new_kernel.astype(kernel.dtype), None if bias is None else new_bias.astype(bias.dtype)


def _select(specs, names, weights) -> list[tuple[AdapterSpec, float]]:
    if names is None:
        chosen = [s for s in specs if s.enabled]
    else:
        names = [names] if isinstance(names, str) else list(names)
        known = {s.name: s for s in specs}
        for name in names:
            if name.rpartition(":")[2] not in known:
                raise ValueError(f"unknown adapter name {name!r}; available: {list(known)}.")
        wanted = {n.rpartition(":")[2] for n in names}
        chosen = [s for s in specs if s.name in wanted]
    weights = dict(weights or {})
    unknown = sorted(set(weights) - {s.name for s in chosen})
    if unknown:
        raise ValueError(f"weights names adapters not being merged: {unknown}.")
    for spec in chosen:
        check_foldable(spec, specs)
        _check_mergeable(spec)
    return [(s, float(weights.get(s.name, 1.0))) for s in chosen]


def _leading_layout(kernel_shape: tuple[int, ...], in_features: int, path: str) -> KernelLayout:
    """The layout of Dense/DenseGeneral hosts (input axes first), when shapes make it certain."""
    fix = "pass inputs=(example inputs,) to merge_adapters so the host itself is read"
    for n in range(1, len(kernel_shape)):
        if math.prod(kernel_shape[:n]) == in_features:
            # An Einsum may contract a middle kernel axis of the same size instead (such as
            # "btd,hdk->bthk" with h == d); the last axis is taken to be an output axis, as
            # in DenseGeneral(axis=(-2, -1)) attention output projections.
            others = [d for d in range(n, len(kernel_shape) - 1) if kernel_shape[d] == in_features]
            if others:
                raise ValueError(
                    f"cannot tell which axes of the kernel {kernel_shape} at {path!r} meet the "
                    f"input (axis {others[0]} fits the adapter's input width {in_features} "
                    f"too); {fix}."
                )
            return KernelLayout(tuple(kernel_shape), tuple(range(n)), tuple(range(-n, 0)))
    raise ValueError(
        f"cannot tell which axes of the kernel {kernel_shape} at {path!r} meet the input "
        f"(adapter input width {in_features}); {fix}."
    )


def _inferred_layout(path: str, kernel: jax.Array, entries) -> KernelLayout:
    """A host's layout from shapes alone: a weight adapter's flat update tells the input
    width; output adapters act on the last axis only."""
    for spec, params, _ in entries:
        if spec.insertion == "weight":
            in_features = build_adapter(spec.cfg).flat_update(params).shape[0]
            return _leading_layout(tuple(kernel.shape), in_features, path)
    return KernelLayout(tuple(kernel.shape), (0,), (-1,))


def _merge(view, chosen, inputs) -> Any:
    hosts: dict[str, list] = {}
    for item in view.weights([spec for spec, _ in chosen]):  # chosen follows the chain order
        weight = dict((s.name, w) for s, w in chosen)[item.spec.name]
        for path, params in item.hosts.items():
            hosts.setdefault(path, []).append((item.spec, params, weight))
    layouts = view.kernel_layouts(inputs)
    new = {}
    for path, entries in hosts.items():
        base = view.host_base(path)
        if "kernel" not in base:
            raise ValueError(
                f"host {path!r} has no kernel to fold adapters {[s.name for s, _, _ in entries]} "
                "into; merge adapters of Dense-like hosts only."
            )
        gates = [_stack_gate(view, path, spec, params) for spec, params, _ in entries]
        if any(g is not None for g in gates):
            kernel, bias = _fold_stack(view, path, base, layouts.get(path), entries, gates)
            new[path] = {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}
            continue
        layout = layouts.get(path) or _inferred_layout(path, base["kernel"], entries)
        kernel, bias = _fold(base["kernel"], base.get("bias"), layout, entries)
        new[path] = {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}
    return view.replace_base(new)


def _stack_gate(view, path: str, spec: AdapterSpec, params: Any) -> tuple[bool, ...] | None:
    """``None`` for a host outside a layer stack; for one inside, one flag per layer: the
    layers where adapter ``spec`` (whose weights at ``path`` are ``params``) acts."""
    size = stack_size(build_adapter(spec.cfg), params)
    if size is None:
        return None
    return view.layer_flags(path, spec, size) or (True,) * size


def _fold_stack(view, path, base, layout, entries, gates):
    """Folds adapters into a layer stack's kernel (leading layer axis), layer by layer: each
    adapter into the layers where it acts (``Target.layers``), as the forward applies it."""
    if any(g is None for g in gates):
        raise ValueError(
            f"host {path!r} holds layer-stacked adapters beside unstacked ones "
            f"({[s.name for s, _, _ in entries]}); save and merge them separately."
        )
    kernel, bias = base["kernel"], base.get("bias")
    kernels, biases = [], []
    for layer in range(kernel.shape[0]):
        here = [
            (spec, jax.tree.map(lambda w, i=layer: w[i], params), weight)
            for (spec, params, weight), gate in zip(entries, gates, strict=True)
            if gate[layer]
        ]
        k, b = kernel[layer], None if bias is None else bias[layer]
        if here:
            lay = layout or _inferred_layout(path, k, here)
            k, b = _fold(k, b, lay, here)
        kernels.append(k)
        biases.append(b)
    return jnp.stack(kernels), None if bias is None else jnp.stack(biases)


@shared
def merge_adapters(
    model: Any,
    variables: Mapping | None = None,
    *,
    names: str | Sequence[str] | None = None,
    weights: Mapping[str, float] | None = None,
    inputs: Sequence[Any] | Any | None = None,
) -> Any:
    """Folds LoRA and IA3 adapters into the base kernels and returns the new base parameters.

    Args:
      model: an adapted Linen model (give its ``variables``) or an adapted NNX model.
      variables: the Linen model's variables, ``{"params": ..., "adapters": ...}``.
      names: adapters to merge; ``None`` merges every enabled adapter.
      weights: merge weight per adapter name (default 1.0), e.g. ``{"a": 0.5, "b": 0.5}``
        for an average of two LoRAs.
      inputs: Linen only: example inputs of the model, as in ``model.apply(variables,
        *inputs)``: a tuple or list of positional inputs, or one input on its own
        (``inputs=x`` is ``inputs=(x,)``; a dict or an array is always one input). The host
        modules are then read in an abstract run, which is exact for every host kind. Without
        them, a LoRA host's input axes are taken to lead its kernel (true of ``Dense`` and
        ``DenseGeneral``); a kernel whose shape leaves that in doubt is refused. An ``Einsum``
        host with a 2-D kernel that contracts its second axis needs ``inputs``.

    Returns:
      Linen: the merged ``params`` dict; run the *unwrapped* model on it
      (``model.apply({"params": merged}, x)``) for exactly the base model's computation.
      NNX: the merged ``nnx.State`` of the base parameters (the model is not changed);
      ``nnx.update(model, merged)`` and ``model.set_enabled_adapters(enabled=False)`` give
      the merged model. To unmerge, keep a copy of the base *before* updating,
      ``original = nnx.to_pure_dict(nnx.state(model, nnx.Param))``, and ``nnx.update(model,
      original)`` later: ``nnx.state`` holds the model's own variables, which
      ``nnx.update`` overwrites in place.

    Raises:
      ValueError: naming any adapter that cannot be folded, or an unknown name.

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import jadapters
    >>> base = nn.Sequential([nn.Dense(4)])
    >>> adapted = jadapters.adapter_transform(base, "layers_0")
    >>> adapted = adapted.add_adapter("lora", jadapters.LoRAConfig(rank=2))
    >>> x = jnp.ones((1, 3))
    >>> variables = adapted.init(jax.random.key(0), x)
    >>> merged = merge_adapters(adapted, variables)
    >>> bool(jnp.allclose(base.apply({"params": merged}, x), adapted.apply(variables, x)))
    True
    >>> merged["layers_0"]["kernel"].shape  # the base's own shapes, LoRA folded in
    (3, 4)

    With example inputs the hosts are read in an abstract run (needed by some ``Einsum`` hosts):

    >>> merged = merge_adapters(adapted, variables, inputs=x)
    >>> bool(jnp.allclose(base.apply({"params": merged}, x), adapted.apply(variables, x)))
    True
    """
    view = view_of(model, variables)
    chosen = _select(list(view.specs()), names, weights)
    return _merge(view, chosen, _positional(inputs))


def _positional(inputs: Any) -> tuple | None:
    """The model's positional inputs: a tuple or list as they are, anything else as one input
    (an array given as ``inputs=x`` would otherwise be split along its first axis)."""
    if inputs is None:
        return None
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
