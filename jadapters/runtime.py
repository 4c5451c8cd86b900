"""The adapter runtime: the one place that runs adapters around a host call.

Both front-ends call :func:`run_host` from their interception point (Linen: a method
interceptor; NNX: the adapted host class's wrapped method). What differs between them is only
where weights live and where keys come from; they pass that in as a :class:`HostIO`. The
runtime owns everything else, once:

* the insertion order: ``input`` adapters before the host, then ``weight`` adapters (they
  change the host itself), then ``output`` and ``parallel`` adapters in chain order;
* what each adapter is fed (a parallel adapter sees the host's input and joins its output; a
  weight adapter sees the host's input through the host's kernel layout);
* PRNG keys: drawn only for an adapter that needs one in training (dropout or a strategy with
  ``requires_key``), then split between the adapter's dropout and its strategy;
* the strategy that joins each adapter's output to the stream, and the auxiliary losses.

Disabled adapters are visited for their weights only (Linen creates them at ``init``) and add
nothing to the computation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp

import jadapters.adapters.functional as F
from jadapters._adapter_set import AdapterSpec
from jadapters.adapters.bank import check_range, gather_slots
from jadapters.adapters.base import adapter_forward
from jadapters.composition import Average, BatchSplit, Fuse, Parallel, Stack
from jadapters.kernels import KernelLayout
from jadapters.registry import build_adapter
from jadapters.routing import current_ids
from jadapters.strategies import StrategyOutput, as_strategy_output, requires_key


class HostIO(Protocol):
    """What a front-end provides for one host call: where weights and keys come from."""

    path: str
    creates_weights: bool  # visit disabled adapters too, so their weights get created

    def weights(
        self, spec: AdapterSpec, adapter: Any, sample: jax.ShapeDtypeStruct, out_features
    ) -> Any:
        """The adapter's params; a front-end that creates weights lazily initializes them on
        zeros of ``sample``'s shape and dtype (with ``out_features`` where the type needs it)."""

    def key(self, spec: AdapterSpec) -> jax.Array | None:
        """A fresh PRNG key for the adapter, or ``None`` where no stream is available."""

    def layout(self) -> KernelLayout:
        """The host's kernel layout, for weight adapters."""

    def gate(self, spec: AdapterSpec) -> jax.Array | None:
        """In one layer of a scanned stack whose target selects layers (``Target.layers``):
        a boolean scalar, whether this layer has the adapter; ``None`` where every layer has."""


def needs_key(module: Any, training: bool) -> bool:
    """Whether adapter ``module`` draws randomness in this call."""
    if not training:
        return False
    return getattr(module, "dropout", 0.0) > 0.0 or requires_key(module.adapter_strategy, True)


def run_adapter(
    module: Any,
    params: Any,
    x: jax.Array,
    *,
    stream: jax.Array | None = None,
    training: bool = False,
    key: jax.Array | None = None,
    out_features: int | None = None,
    layout: KernelLayout | None = None,
) -> StrategyOutput:
    """Runs one adapter on ``x`` and joins its output to ``stream`` by its strategy.

    Args:
      module: a Linen adapter module (e.g. :class:`jadapters.LinearAdapter`).
      params: its parameters.
      x: the adapter's input.
      stream: the value its output joins; ``x`` when ``None`` (sequential adapters).
      training: turns on dropout and the strategy's training behaviour.
      key: PRNG key for dropout and stochastic depth; split between them.
      out_features: output width for adapters whose ``needs_out_features`` is set; the
        stream's last axis by default.
      layout: the host's kernel layout, for a weight adapter (LoRA). ``stream`` is then the
        host's output and ``x`` its input.
    """
    stream = x if stream is None else stream
    name = type(module).__name__
    rate = getattr(module, "dropout", 0.0)
    if training and rate > 0.0 and key is None:
        F.dropout(x, rate, None, name)  # raises the error that names the missing stream
    dropout_key = strategy_key = None
    if training and key is not None:
        dropout_key, strategy_key = jax.random.split(key)
    if layout is not None and layout.einsum_str is not None:
        # An Einsum host runs its own equation on the materialized kernel update.
        if training and rate > 0.0:
            x = F.dropout(x, rate, dropout_key, name)
        update = layout.to_kernel(module.flat_update(params))
        out = jnp.einsum(layout.einsum_str, x, update.astype(x.dtype))
    else:
        output_shape = None
        if layout is not None:
            x, batch = layout.flatten_input(x)
            out_features, output_shape = layout.out_features, layout.output_shape(batch)
        kwargs = {}
        if getattr(module, "needs_out_features", False):
            kwargs["out_features"] = stream.shape[-1] if out_features is None else out_features
        out = adapter_forward(module, params, x, training=training, key=dropout_key, **kwargs)
        if output_shape is not None:
            out = out.reshape(output_shape)
    if out.shape != stream.shape:
        raise ValueError(
            f"{name} produced shape {out.shape} but joins a stream of shape {stream.shape}; "
            "target hosts whose output matches the adapter (a parallel adapter's output has "
            "the host output's last axis only)."
        )
    strategy = module.adapter_strategy
    if not requires_key(strategy, training):
        strategy_key = None
    return as_strategy_output(strategy(stream, out, key=strategy_key, training=training))


def apply_adapter(
    module: Any,
    variables: Any,
    x: jax.Array,
    *,
    stream: jax.Array | None = None,
    training: bool = False,
    key: jax.Array | None = None,
    out_features: int | None = None,
) -> StrategyOutput:
    """Runs the adapter ``module`` on ``x`` and joins its output to ``stream`` by its strategy.

    The public form of the runtime's single step, for using an adapter outside a model.

    Args:
      module: a Linen adapter module (e.g. :class:`jadapters.LinearAdapter`).
      variables: its variables, ``{"params": ...}``.
      x: the adapter's input.
      stream: the value its output joins; ``x`` when ``None`` (sequential adapters). A
        parallel adapter is fed the host's input as ``x`` and joins the host's output.
      training: turns on dropout and the strategy's training behaviour.
      key: PRNG key for dropout and stochastic depth; split between them.
      out_features: output width, for adapters whose ``needs_out_features`` is set
        (parallel adapters, LoRA).

    Returns:
      The strategy's :class:`~jadapters.StrategyOutput`.

    >>> import jax, jax.numpy as jnp
    >>> from jadapters import LinearAdapter
    >>> adapter = LinearAdapter(4)
    >>> x = jnp.arange(8.0).reshape(1, 8)
    >>> variables = adapter.init(jax.random.key(0), x)
    >>> bool((apply_adapter(adapter, variables, x).output == x).all())
    True
    """
    return run_adapter(
        module,
        variables["params"],
        x,
        stream=stream,
        training=training,
        key=key,
        out_features=out_features,
    )


def run_routed(
    bank: Any,
    params: Any,
    x: jax.Array,
    ids: jax.Array,
    *,
    stream: jax.Array | None = None,
    training: bool = False,
    key: jax.Array | None = None,
    layout: KernelLayout | None = None,
) -> StrategyOutput:
    """Runs each example of ``x`` through its own slot of adapter bank ``bank``.

    Example ``i`` runs alone through slot ``ids[i]`` (:func:`run_adapter` on the inner
    adapter with that slot's weights, gathered from the stacked ``params``; one ``jax.vmap``
    over the batch, so the cost does not depend on the number of slots). ``ids[i] == -1``
    leaves the example's stream as it is; an id outside ``[-1, slots)`` gives NaN. The
    auxiliary loss, if any, is the mean over the batch of each routed example's loss alone
    (0 for the others).
    """
    stream = x if stream is None else stream
    batch = x.shape[0] if x.ndim else None
    if ids.ndim != 1 or ids.shape[0] != batch or stream.shape[:1] != (batch,):
        raise ValueError(
            f"adapter_ids has shape {ids.shape} but the adapter bank's input has shape "
            f"{x.shape} and its stream {stream.shape}: give one id per example, the examples "
            "along the leading axis of the host's input."
        )
    gathered = gather_slots(params["slots"], ids)
    keys = None if key is None else jax.random.split(key, batch)
    inner = bank.inner

    def one(p, xi, si, ki):
        result = run_adapter(
            inner, p, xi[None], stream=si[None], training=training, key=ki, layout=layout
        )
        return result.output[0], result.aux_loss

    out, losses = jax.vmap(one, in_axes=(0, 0, 0, None if keys is None else 0))(
        gathered, x, stream, keys
    )
    rows = (batch,) + (1,) * (out.ndim - 1)
    routed = ids >= 0
    out = jnp.where(routed.reshape(rows), out, stream)
    bad = (ids < -1) | (ids >= bank.slots)
    out = jnp.where(bad.reshape(rows), jnp.asarray(jnp.nan, out.dtype), out)
    if losses is not None:
        losses = jnp.sum(jnp.where(routed, losses, jnp.zeros_like(losses))) / batch
    return StrategyOutput(out, losses)


def _feed(spec: AdapterSpec, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(adapter input, stream)`` of a non-weight adapter at a host with input x, output y."""
    if spec.insertion == "input":
        return x, x
    if spec.insertion == "parallel":
        return x, y
    return y, y


def _run_one(
    spec: AdapterSpec,
    io: HostIO,
    x: jax.Array,
    y: jax.Array | None,
    layout: list,
    *,
    training: bool,
    losses: dict[str, jax.Array],
) -> jax.Array | None:
    """Runs adapter ``spec`` alone at a host with input ``x`` and output ``y`` (``None`` before
    the host). Returns its new stream (the input for an input adapter, else the output), or
    ``None`` for a disabled adapter, whose weights are only visited. ``layout`` caches the
    host's kernel layout (one item at most)."""
    module = build_adapter(spec.cfg)
    if spec.insertion == "weight":
        if not layout:
            layout.append(io.layout())
        sample = jax.ShapeDtypeStruct((1, layout[0].in_features), x.dtype)
        params = io.weights(spec, module, sample, layout[0].out_features)
        inputs, stream = x, y
    else:
        inputs, stream = _feed(spec, x, y)
        out_features = stream.shape[-1] if getattr(module, "needs_out_features", False) else None
        sample = jax.ShapeDtypeStruct(inputs.shape, inputs.dtype)
        params = io.weights(spec, module, sample, out_features)
    if not spec.enabled:
        return None
    key = io.key(spec) if needs_key(module, training) else None
    if getattr(module, "routed", False):
        result = _run_bank(spec, module, params, io, inputs, stream, layout, training, key)
        if result is None:
            return None
    else:
        result = run_adapter(
            module,
            params,
            inputs,
            stream=stream,
            training=training,
            key=key,
            layout=layout[0] if spec.insertion == "weight" else None,
        )
    return _gated(spec, io, *result, stream, losses)


def _gated(
    spec: AdapterSpec,
    io: HostIO,
    output: jax.Array,
    aux_loss: jax.Array | None,
    stream: jax.Array,
    losses: dict[str, jax.Array],
) -> jax.Array:
    """``output`` where adapter ``spec`` acts; in a layer of a scanned stack that its target
    leaves out, the stream, exactly (and no gradient reaches that layer's slice of its
    weights). Records its auxiliary loss, gated alike."""
    gate = io.gate(spec)
    if gate is not None:
        output = jnp.where(gate, output, stream)
        if aux_loss is not None:
            aux_loss = jnp.where(gate, aux_loss, jnp.zeros_like(aux_loss))
    if aux_loss is not None:
        losses[spec.name] = losses.get(spec.name, 0.0) + aux_loss
    return output


def _run_bank(spec, module, params, io, inputs, stream, layout, training, key):
    """Runs adapter bank ``spec`` under the current :func:`jadapters.route` ids; ``None``
    at ``init`` without ids."""
    routing = current_ids()
    if routing is None:
        if io.creates_weights:
            return None  # init: the weights exist now; no example is routed
        raise ValueError(
            f"adapter bank {spec.qualified_name!r} at host {io.path!r} routes each example "
            "through its own slot, but no ids were given: call the model inside "
            "jadapters.route(adapter_ids) (Linen: apply(..., adapter_ids=ids)), with -1 for "
            "examples that take the base alone, or disable the bank."
        )
    ids, bounds = routing
    check_range(bounds, module.slots)  # concrete ids; traced ones out of range give NaN
    return run_routed(
        module,
        params,
        inputs,
        ids,
        stream=stream,
        training=training,
        key=key,
        layout=layout[0] if spec.insertion == "weight" else None,
    )


def _run_block(
    block: Any,
    members: dict[str, AdapterSpec],
    io: HostIO,
    x: jax.Array,
    y: jax.Array | None,
    layout: list,
    *,
    training: bool,
    losses: dict[str, jax.Array],
) -> jax.Array:
    """Runs composition ``block`` over ``members`` (its adapters at this host, by name) on the
    stream (``y``, or ``x`` before the host); returns the new stream. The formulas are in
    :mod:`jadapters.composition`."""
    is_input = y is None

    def one(name: str, xs: jax.Array, ys: jax.Array | None) -> jax.Array | None:
        spec = members.get(name)
        if spec is None:
            return None
        return _run_one(spec, io, xs, ys, layout, training=training, losses=losses)

    if isinstance(block, Stack):
        for name in block.adapters:
            out = one(name, x, y)
            if out is not None:
                x, y = (out, None) if is_input else (x, out)
        return x if is_input else y
    s = x if is_input else y
    if isinstance(block, BatchSplit):
        block.check_batch(s.shape[0])
        parts, start = [], 0
        for name, size in zip(block.adapters, block.sizes, strict=True):
            rows = slice(start, start + size)
            out = one(name, x[rows], None if is_input else y[rows])
            parts.append(s[rows] if out is None else out)
            start += size
        return jnp.concatenate(parts, axis=0)
    if isinstance(block, Fuse):
        return _run_fuse(block, members, io, x, y, layout, training=training, losses=losses)
    outs = {name: one(name, x, y) for name in block.adapters}
    outs = {name: out for name, out in outs.items() if out is not None}
    if not outs:
        return s
    if isinstance(block, Parallel):
        return s + sum(out - s for out in outs.values())
    if isinstance(block, Average):
        weights = dict(zip(block.adapters, block.normalized_weights(list(outs)), strict=True))
        return sum(jnp.asarray(weights[n], out.dtype) * out for n, out in outs.items())
    raise ValueError(f"unknown composition block {block!r}.")


def _run_fuse(
    block: Fuse,
    members: dict[str, AdapterSpec],
    io: HostIO,
    x: jax.Array,
    y: jax.Array | None,
    layout: list,
    *,
    training: bool,
    losses: dict[str, jax.Array],
) -> jax.Array:
    """Runs a :class:`~jadapters.Fuse` block: the fusion adapter attends over the enabled
    members' deltas, queried by the stream (``y``, or ``x`` before the host). A disabled
    fusion adapter turns the block off: the enabled members run as a chain."""
    is_input = y is None
    s = x if is_input else y
    fusion = members.get(block.fusion)
    module = params = None
    if fusion is not None:  # visited even when disabled, so Linen's init creates its weights
        module = build_adapter(fusion.cfg)
        params = io.weights(fusion, module, jax.ShapeDtypeStruct(s.shape, s.dtype), None)
    fused = [members[n] for n in members if n != block.fusion]  # chain order
    if fusion is None or not fusion.enabled:  # the block is off: its members run as a chain
        if not fused:
            return s
        chain = Stack(adapters=[spec.name for spec in fused])
        return _run_block(chain, members, io, x, y, layout, training=training, losses=losses)
    outs = [_run_one(spec, io, x, y, layout, training=training, losses=losses) for spec in fused]
    deltas = [out - s for out in outs if out is not None]
    if not deltas:
        return s
    delta = module.apply({"params": params}, s, jnp.stack(deltas), deterministic=not training)
    strategy = module.adapter_strategy
    key = io.key(fusion) if requires_key(strategy, training) else None
    result = as_strategy_output(strategy(s, delta, key=key, training=training))
    return _gated(fusion, io, result.output, result.aux_loss, s, losses)


def run_stage(
    insertions: Sequence[str],
    specs: Sequence[AdapterSpec],
    io: HostIO,
    x: jax.Array,
    y: jax.Array | None,
    *,
    training: bool,
    losses: dict[str, jax.Array],
) -> jax.Array:
    """Runs the adapters of ``specs`` whose insertion is in ``insertions``, in chain order.

    ``x`` is the host's input and ``y`` its output (``None`` for the input stage). Returns
    the new stream: the input for the input stage, else the output. Auxiliary losses are
    added to ``losses`` by adapter name. The adapters of a composition block
    (``spec.composition``) run together, as the block says, at the chain position of the
    first of them.
    """
    layout: list = []
    stage = [s for s in specs if s.insertion in insertions and (s.enabled or io.creates_weights)]
    done: set[str] = set()
    for spec in stage:
        if spec.name in done:
            continue
        block = spec.composition
        if block is None:
            out = _run_one(spec, io, x, y, layout, training=training, losses=losses)
        else:
            members = {
                s.name: s for s in stage if s.composition == block and s.name in block.adapters
            }
            done.update(members)
            out = _run_block(block, members, io, x, y, layout, training=training, losses=losses)
        if out is None:
            continue
        if spec.insertion == "input":
            x = out
        else:
            y = out
    return x if y is None else y


def run_host(
    call: Callable[..., Any],
    args: Sequence[Any],
    kwargs: dict[str, Any],
    specs: Sequence[AdapterSpec],
    io: HostIO,
    *,
    training: bool,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Runs the host ``call(*args, **kwargs)`` with the adapters ``specs`` (chain order).

    Args:
      call: the host's original method.
      args, kwargs: its arguments; the first positional argument is the host's input.
      specs: the host's adapters in chain order; disabled ones only get their weights.
      io: where weights, keys and the kernel layout come from.
      training: the adapters' mode (dropout, stochastic depth, auxiliary losses).

    Returns:
      ``(output, {adapter name: auxiliary loss})``.

    Raises:
      ValueError: if the host has no positional input or does not return a single array.
    """
    if not args:
        raise ValueError(
            f"adapters at host {io.path!r} need the host's input as its first positional argument."
        )
    losses: dict[str, jax.Array] = {}
    x = run_stage(("input",), specs, io, args[0], None, training=training, losses=losses)
    y = call(x, *args[1:], **kwargs)
    if not isinstance(y, jax.Array):
        raise ValueError(
            f"host {io.path!r} returns {type(y).__name__}, not an array; target a submodule "
            "whose output is a single array."
        )
    y = run_stage(("weight",), specs, io, x, y, training=training, losses=losses)
    y = run_stage(("output", "parallel"), specs, io, x, y, training=training, losses=losses)
    return y, losses
