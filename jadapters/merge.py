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
from flax import nnx

from jadapters._adapter_set import AdapterSpec
from jadapters.adapters.ia3 import IA3Config
from jadapters.adapters.lora import LoRAConfig
from jadapters.config import build_adapter
from jadapters.kernels import KernelLayout, kernel_layout
from jadapters.linen.transform import ADAPTER_COLLECTION, AdaptedLinen, adapter_subtrees
from jadapters.strategies import ResidualAddStrategy, ScaledAddStrategy


def _strategy_factor(spec: AdapterSpec) -> float:
    strategy = spec.cfg.adapter_strategy
    if type(strategy) is ResidualAddStrategy:
        return 1.0  # stochastic depth acts in training only; evaluation is the plain sum
    if type(strategy) is ScaledAddStrategy:
        return float(strategy.scale)
    raise ValueError(
        f"adapter {spec.name!r} joins the stream with {type(strategy).__name__}, which cannot "
        "be folded into a kernel; only ResidualAddStrategy and ScaledAddStrategy merge."
    )


def _check_mergeable(spec: AdapterSpec) -> None:
    if isinstance(spec.cfg, LoRAConfig) and spec.insertion == "weight":
        return
    if isinstance(spec.cfg, IA3Config) and spec.insertion == "output":
        return
    raise ValueError(
        f"adapter {spec.name!r} ({type(spec.cfg).__name__.removesuffix('Config')}, "
        f"insertion {spec.insertion!r}) cannot be merged: only LoRA (weight) and IA3 (output) "
        "are linear in the host's kernel. Disable it, or keep it unmerged."
    )


def _check_last_axis_from_kernel(layout: KernelLayout, spec: AdapterSpec) -> None:
    if layout.einsum_str is None:
        return
    lhs, _, out = layout.einsum_str.partition("->")
    kernel_subs = lhs.split(",")[1]
    if not out or not kernel_subs or out[-1] != kernel_subs[-1]:
        raise ValueError(
            f"adapter {spec.name!r} (IA3) scales the last output axis of einsum "
            f"{layout.einsum_str!r}, which is not the kernel's last axis, so it cannot be "
            "folded into the kernel; keep it unmerged."
        )


def _fold(
    kernel: jax.Array,
    bias: jax.Array | None,
    layout: KernelLayout,
    specs: Sequence[tuple[AdapterSpec, Any, float]],
) -> tuple[jax.Array, jax.Array | None]:
    """Folds ``(spec, params, weight)`` into ``kernel``/``bias``: weight adapters first, then
    output adapters in chain order, as the forward applies them."""
    new_kernel = kernel.astype(jnp.float32)
    new_bias = None if bias is None else bias.astype(jnp.float32)
    for spec, params, weight in specs:
        if spec.insertion == "weight":
            factor = weight * _strategy_factor(spec)
            update = build_adapter(spec.cfg).flat_update(params).astype(jnp.float32)
            new_kernel = new_kernel + factor * layout.to_kernel(update)
    for spec, params, weight in specs:
        if spec.insertion == "output":
            _check_last_axis_from_kernel(layout, spec)
            factor = weight * _strategy_factor(spec)
            scale = 1.0 + factor * (params["scale"].astype(jnp.float32) - 1.0)
            # IA3 scales the output's last axis: the kernel's (and bias's) last axis. Broadcast
            # explicitly, as rank promotion may be configured to raise.
            new_kernel = new_kernel * scale.reshape((1,) * (new_kernel.ndim - 1) + (-1,))
            if new_bias is not None:
                new_bias = new_bias * scale.reshape((1,) * (new_bias.ndim - 1) + (-1,))
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
                    f"input (axis {others[0]} fits the LoRA input width {in_features} too); {fix}."
                )
            return KernelLayout(tuple(kernel_shape), tuple(range(n)), tuple(range(-n, 0)))
    raise ValueError(
        f"cannot tell which axes of the kernel {kernel_shape} at {path!r} meet the input "
        f"(LoRA input width {in_features}); {fix}."
    )


def _get(tree: Any, path: Sequence[str]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _merge_linen(adapted: AdaptedLinen, variables: Mapping, chosen, layouts=None) -> dict:
    params = jax.tree.map(lambda x: x, dict(variables["params"]))
    found = adapter_subtrees(variables.get(ADAPTER_COLLECTION, {}), set(adapted.adapters.names()))
    hosts: dict[tuple[str, ...], list] = {}
    for spec, weight in chosen:  # chosen follows the chain order
        for host, value in found.get(spec.name, {}).items():
            hosts.setdefault(tuple(host.split("/")), []).append((spec, value, weight))
    for path, entries in hosts.items():
        host = _get(params, path)
        kernel = host["kernel"]
        lora = [p for s, p, _ in entries if s.insertion == "weight"]
        if layouts is not None and "/".join(path) in layouts:
            layout = layouts["/".join(path)]
        elif lora:
            layout = _leading_layout(tuple(kernel.shape), lora[0]["a"].shape[0], "/".join(path))
        else:
            layout = KernelLayout(tuple(kernel.shape), (0,), (-1,))
        new_kernel, new_bias = _fold(kernel, host.get("bias"), layout, entries)
        parent = params
        for key in path[:-1]:
            parent[key] = dict(parent[key])
            parent = parent[key]
        parent[path[-1]] = {**host, "kernel": new_kernel}
        if new_bias is not None:
            parent[path[-1]]["bias"] = new_bias
    return params


def _merge_nnx(model: nnx.Module, chosen) -> nnx.State:
    from jadapters.nnx.mixins import AdapterModuleMixin

    base = nnx.state(model, nnx.Param)
    pure = base.to_pure_dict()
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, AdapterModuleMixin) or not node.is_adapter_available():
            continue
        entries = []
        for spec, weight in chosen:
            shell = node.get_adapter_module(spec.name)
            if shell is not None:
                entries.append((spec, shell.param_values(), weight))
        if not entries:
            continue
        layout = kernel_layout(node)
        bias = getattr(node, "bias", None)
        new_kernel, new_bias = _fold(
            node.kernel[...], None if bias is None else bias[...], layout, entries
        )
        host = _get(pure, path)
        host["kernel"] = new_kernel
        if new_bias is not None:
            host["bias"] = new_bias
    merged = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(merged, pure)
    return merged


def merge_adapters(
    model: Any,
    variables: Mapping | None = None,
    *,
    names: str | Sequence[str] | None = None,
    weights: Mapping[str, float] | None = None,
    inputs: Sequence[Any] | None = None,
) -> Any:
    """Folds LoRA and IA3 adapters into the base kernels and returns the new base parameters.

    Args:
      model: an adapted Linen model (give its ``variables``) or an adapted NNX model.
      variables: the Linen model's variables, ``{"params": ..., "adapters": ...}``.
      names: adapters to merge; ``None`` merges every enabled adapter.
      weights: merge weight per adapter name (default 1.0), e.g. ``{"a": 0.5, "b": 0.5}``
        for an average of two LoRAs.
      inputs: Linen only: example positional inputs. The host modules are then read in an
        abstract run, which is exact for every host kind. Without them, a LoRA host's input
        axes are taken to lead its kernel (true of ``Dense`` and ``DenseGeneral``); a kernel
        whose shape leaves that in doubt is refused. An ``Einsum`` host with a 2-D kernel that
        contracts its second axis needs ``inputs``.

    Returns:
      Linen: the merged ``params`` dict; run the *unwrapped* model on it
      (``model.apply({"params": merged}, x)``) for exactly the base model's computation.
      NNX: the merged ``nnx.State`` of the base parameters (the model is not changed);
      ``nnx.update(model, merged)`` and ``model.set_enabled_adapters(enabled=False)`` give
      the merged model. To unmerge, keep a copy of the base *before* updating,
      ``original = nnx.state(model, nnx.Param).to_pure_dict()``, and ``nnx.update(model,
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
    """
    if isinstance(model, AdaptedLinen):
        if variables is None:
            raise ValueError("variables must be given to merge a Linen model; got None.")
        chosen = _select(list(model.adapters), names, weights)
        layouts = None if inputs is None else model.kernel_layouts(variables, *inputs)
        return _merge_linen(model, variables, chosen, layouts)
    if isinstance(model, nnx.Module) and hasattr(model, "get_adapter_specs"):
        chosen = _select(list(model.get_adapter_specs()), names, weights)
        return _merge_nnx(model, chosen)
    raise ValueError(
        f"model must be an adapted Linen or NNX model (see adapter_transform), got "
        f"{type(model).__name__}."
    )
