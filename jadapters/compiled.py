"""Compiled calls on an adapted model that pass only what runs.

A compiled call's cost per call grows with its arguments: JAX flattens and checks every
array it is given, and ``nnx.jit`` walks every variable of the model's graph. A disabled
adapter runs nowhere, so here it is no argument at all. One mechanism per front-end, shared
by the training steps (:mod:`jadapters.training`) and the compiled forwards below:

- **Linen** (:class:`DisabledWeights`): the disabled adapters' weights are set aside before
  the ``jax.jit`` call and the very same arrays are put back after.
- **NNX** (:class:`SplitOnce`): the graph of (model, *others) is split once into the frozen
  base (``nnx.Param``), the disabled adapters, the rest of the model and the others' state.
  Each call reads the live variables' arrays, runs one ``jax.jit``-compiled pure function and
  writes back the others' state and those variables of the rest that the function changed.
  The base is an input only (never copied), and the disabled adapters are shapes inside the
  trace.

The forwards, :func:`linen_forward` and :func:`nnx_forward`, serve a model with many adapters
added and a few enabled at the cost of the enabled ones::

    forward = jadapters.linen_forward(adapted)      # Linen
    logits = forward(variables, x, train=False)

    forward = jadapters.nnx_forward()               # NNX
    logits = forward(model, x)
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from jadapters._trees import get_in, path_keys, set_in
from jadapters.storage import ADAPTER_COLLECTION, NNX_ADAPTER_ATTR
from jadapters.view import view_of

# --- keyword arguments: Python values are static, arrays are traced ---------------------------

_SCALARS = (bool, int, float, complex, str, bytes, type(None))


def _is_static(value: Any) -> bool:
    """Plain Python values (and tuples or lists of them) and callables configure a call;
    everything else (arrays, pytrees of arrays) is data."""
    if isinstance(value, _SCALARS) or callable(value):
        return True
    if isinstance(value, (tuple, list)):
        return all(_is_static(v) for v in value)
    return False


def _frozen(value: Any) -> Any:
    return tuple(_frozen(v) for v in value) if isinstance(value, (tuple, list)) else value


def split_kwargs(kwargs: Mapping[str, Any]) -> tuple[tuple, dict]:
    """``(static, dynamic)``: the static keywords as a sorted, hashable tuple of pairs (lists
    become tuples), and the rest, which the compiled call traces."""
    if not kwargs:  # the common call, on every call: nothing to sort
        return (), {}
    static = tuple(sorted((k, _frozen(v)) for k, v in kwargs.items() if _is_static(v)))
    dynamic = {k: v for k, v in kwargs.items() if not _is_static(v)}
    return static, dynamic


# --- Linen: set the disabled adapters' weights aside ------------------------------------------


@dataclasses.dataclass
class DisabledWeights:
    """Takes a Linen adapted model's disabled adapters' weights out of an adapter tree and
    puts them back. Which hosts hold which disabled adapters is read once, from the first tree
    given (a Linen adapted model is immutable: enabling an adapter makes a new model), as a
    nested plan that follows the tree: each dict on a path to a host is copied once per call,
    however many hosts lie under it."""

    adapted: Any
    # {key: plan below it}, and at a host the disabled adapters' names there
    _plan: dict[str, Any] | None = None

    def park(self, adapters: Any, *, keep: bool = True) -> tuple[Any, list]:
        """``adapters`` without the disabled adapters' weights, and what was taken out (with
        ``keep=False``, nothing: for a call that never puts them back)."""
        if self._plan is None:
            self._plan = _nested(_disabled_hosts(self.adapted, adapters))
        parked: list = []
        if not self._plan or not isinstance(adapters, Mapping):
            return adapters, parked
        return _drop(adapters, self._plan, (), parked if keep else None), parked

    @staticmethod
    def unpark(adapters: Any, parked: list) -> Any:
        """``adapters`` with the weights :meth:`park` took out put back (the same arrays)."""
        for keys, node in parked:
            # the host's dict as given, its enabled adapters' weights replaced by the new ones
            adapters = set_in(adapters, keys, {**node, **get_in(adapters, keys)})
        return adapters


class _Host:
    """The disabled adapters' names at one host, and the keys left at it in the last dict
    seen there: a dict of the same size that holds every one of those keys has the same keys
    left (up to keys that name no adapter of the model, which a forward ignores), so the
    per-call filter touches the few enabled adapters' keys, not every adapter's."""

    __slots__ = ("names", "size", "left")

    def __init__(self, names: frozenset[str]):
        self.names, self.size, self.left = names, -1, ()

    def kept(self, node: Mapping) -> dict:
        if len(node) == self.size and all(k in node for k in self.left):
            return {k: node[k] for k in self.left}
        kept = {k: v for k, v in node.items() if k not in self.names}
        self.size, self.left = len(node), tuple(kept)
        return kept


def _nested(hosts: Mapping[str, frozenset[str]]) -> dict[str, Any]:
    """``{"a/b": names}`` as ``{"a": {"b": _Host(names)}}``."""
    plan: dict[str, Any] = {}
    for host, names in hosts.items():
        *path, last = path_keys(host)
        node = plan
        for key in path:
            node = node.setdefault(key, {})
        node[last] = _Host(names)
    return plan


def _drop(tree: Mapping, plan: Mapping[str, Any], keys: tuple, parked: list | None) -> dict:
    """A copy of ``tree`` without the names ``plan`` lists at its hosts; each host's dict as
    given goes into ``parked`` (unless ``None``) with its keys."""
    out = dict(tree)
    for key, below in plan.items():
        node = out.get(key)
        if not isinstance(node, Mapping):
            continue
        if isinstance(below, _Host):
            kept = below.kept(node)
            if len(kept) < len(node):
                out[key] = kept
                if parked is not None:
                    parked.append(((*keys, key), node))
        else:
            out[key] = _drop(node, below, (*keys, key), parked)
    return out


def _disabled_hosts(adapted: Any, adapters: Any) -> dict[str, frozenset[str]]:
    """``{host path: names}`` of the disabled adapters' weights in a Linen adapter tree."""
    off = [spec for spec in adapted.adapters.specs if not spec.enabled]
    if not off:
        return {}
    view = view_of(adapted, {"params": {}, ADAPTER_COLLECTION: adapters})
    hosts: dict[str, list[str]] = {}
    for spec in off:
        try:
            (weights,) = view.weights([spec])
        except ValueError:  # no weights yet: nothing to set aside
            continue
        for host in weights.hosts:
            hosts.setdefault(host, []).append(spec.name)
    return {host: frozenset(names) for host, names in hosts.items()}


class LinenForward:
    """A compiled forward of a Linen adapted model; see :func:`linen_forward`."""

    def __init__(self, adapted: Any):
        self.adapted = adapted
        self._disabled = DisabledWeights(adapted)
        self._compiled: dict[tuple, Callable[..., Any]] = {}

    def _prepare(self, variables: Any, kwargs: Mapping[str, Any]) -> tuple[Callable, Any, dict]:
        # Runs on every call, before a sub-millisecond compiled call: no work it can skip.
        if type(variables) is not dict and not isinstance(variables, Mapping):
            raise TypeError(
                "a Linen forward is called as forward(variables, *args, **kwargs) with the "
                f"model's variables dict first, got variables={type(variables).__name__}."
            )
        adapters = variables.get(ADAPTER_COLLECTION)
        if adapters is not None:
            active, _ = self._disabled.park(adapters, keep=False)
            if active is not adapters:
                variables = {**variables, ADAPTER_COLLECTION: active}
        static, dynamic = split_kwargs(kwargs)
        compiled = self._compiled.get(static)
        if compiled is None:
            apply, fixed = self.adapted.apply, dict(static)
            compiled = jax.jit(lambda v, *a, **k: apply(v, *a, **fixed, **k))
            self._compiled[static] = compiled
        return compiled, variables, dynamic

    def __call__(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
        compiled, variables, dynamic = self._prepare(variables, kwargs)
        return compiled(variables, *args, **dynamic)

    def lower(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
        """``jax.stages.Lowered`` of the call, for inspecting or timing compilation."""
        compiled, variables, dynamic = self._prepare(variables, kwargs)
        return compiled.lower(variables, *args, **dynamic)


def linen_forward(adapted: Any) -> LinenForward:
    """A compiled forward of ``adapted`` that passes only the enabled adapters' weights.

    ``forward(variables, *args, **kwargs)`` returns what ``adapted.apply(variables, *args,
    **kwargs)`` returns, compiled once per set of static keywords. A disabled adapter runs
    nowhere, so its weights are taken out of ``variables["adapters"]`` before the compiled
    call: fifty adapters added and one enabled cost per call what one adapter costs (a
    ``jax.jit(adapted.apply)`` flattens every array it is given, on every call).

    Keyword arguments that are plain Python values (``bool``, ``int``, ``float``, ``str``,
    ``None``, tuples or lists of them) or callables are static: ``train=False``,
    ``adapter_train=True``, ``method="encode"``, ``mutable=["batch_stats"]``. Each new value
    compiles once. Positional arguments and every other keyword (arrays, ``rngs``,
    ``adapter_ids``) are traced.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jadapters
    >>> model = jadapters.adapter_transform(nn.Sequential([nn.Dense(2)]), "layers_0")
    >>> model = model.add_adapter("on", jadapters.IA3Config()).add_adapter(
    ...     "off", jadapters.IA3Config()).set_enabled_adapters("off", False)
    >>> x = jnp.ones((1, 3))
    >>> variables = model.init(jax.random.key(0), x)
    >>> forward = jadapters.linen_forward(model)
    >>> bool((forward(variables, x) == model.apply(variables, x)).all())
    True
    >>> len(jax.tree.leaves(forward.lower(variables, x).args_info))  # kernel, bias, "on", x
    4
    """
    return LinenForward(adapted)


# --- NNX: split once, jit a pure function, write back -----------------------------------------

_MODE_ATTRS = ("deterministic", "use_running_average", "train", "training")


def disabled_adapters(enabled: Any) -> Callable[[tuple, Any], bool]:
    """An NNX filter: every variable of an adapter that ``enabled`` (the enabled adapters'
    filter) does not select, its weights and its own RNG streams alike."""
    on = set(enabled.prefixes)

    def selects(path: tuple, value: Any) -> bool:
        del value
        if NNX_ADAPTER_ATTR not in path:
            return False
        end = path.index(NNX_ADAPTER_ATTR) + 2
        return len(path) >= end and tuple(path[:end]) not in on

    return selects


def _abstract(x: Any) -> Any:
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype) if hasattr(x, "dtype") else x


def _variables_by_path(node: Any) -> dict[tuple, Any]:
    """The live ``nnx.Variable`` objects of ``node`` by their path (the paths of its splits)."""
    return {path: v for path, v in nnx.iter_graph(node) if isinstance(v, nnx.Variable)}


def _template(state: Any) -> list:
    """Paths and variable types of ``state``, its arrays replaced by their shapes."""
    return [
        (p, v.copy(jax.tree.map(_abstract, v.get_raw_value()))) for p, v in nnx.to_flat_state(state)
    ]


def _state(template: list, arrays: list) -> Any:
    pairs = zip(template, arrays, strict=True)
    return nnx.from_flat_state([(p, v.copy(a)) for (p, v), a in pairs])


class SplitOnce:
    """Runs ``body(model, others, args, static)`` on live NNX objects as one ``jax.jit``
    function of their arrays.

    The first call for a (model, *others) tuple splits their graphs once: the model into its
    frozen base (``nnx.Param``), its disabled adapters and the rest (enabled adapters' weights,
    RNG counters, statistics); each of ``others`` (an optimizer) whole. It keeps the live
    variables of each part. Every call reads their arrays, runs the compiled function and
    writes back the others' state and the variables of the model's rest that it changed (an
    RNG counter that advanced, trained weights; in evaluation mode usually none). The base is
    an input only: nothing copies it. Disabled adapters are not inputs: inside the trace they
    are their shapes.
    The split is redone when the adapters change (the model's adapter revision) or a mode flag
    of what runs changes (``model.train()``/``eval()``); :meth:`reset` forgets it.

    ``validate(model, others)``, if given, runs whenever the split is (re)done, before
    anything is traced or changed. ``what`` names the call in errors.
    """

    def __init__(
        self,
        body: Callable[..., Any],
        *,
        what: str,
        donate_others: bool = False,
        validate: Callable[[Any, tuple], None] | None = None,
    ):
        self.body = body
        self.what = what
        self.donate_others = donate_others
        self.validate = validate
        self._compiled: dict[Any, Callable[..., Any]] = {}  # per graph structure and statics
        # (token, live variables, compiled functions by statics, (key, templates, filter))
        self._bound: tuple | None = None

    def _bound_to(self, model: Any, others: tuple) -> bool:
        """Whether the cached split is of these very objects, with the same adapters and the
        same mode flags. The objects are held weakly: an id alone can be reused by a new
        object once the old one is gone. The revision changes whenever any adapter is added,
        removed, enabled or disabled (O(1))."""
        if self._bound is None:
            return False
        refs, revision, modes, flags = self._bound[0]
        return (
            len(refs) == 1 + len(others)
            and all(r() is o for r, o in zip(refs, (model, *others), strict=False))
            and model._adapter_revision() == revision
            and tuple(getattr(m, a) for m, a in modes) == flags
        )

    def _forget(self, ref: Any) -> None:
        """A bound object is gone: drop the split, so that its arrays are not kept alive."""
        if self._bound is not None and any(r is ref for r in self._bound[0][0]):
            self._bound = None

    def _split(self, model: Any, others: tuple) -> tuple:
        """``(structure key, live variables, templates, disabled filter)``."""
        off = disabled_adapters(model.unfreeze_enabled_adapters(False))
        graphdef, base, disabled, rest = nnx.split(model, nnx.Param, off, ...)
        splits = [nnx.split(o) for o in others]
        parts = [(model, base), (model, rest)]
        parts += [(o, state) for o, (_, state) in zip(others, splits, strict=True)]
        by_path = {id(node): _variables_by_path(node) for node in (model, *others)}
        live = [
            [by_path[id(node)][path] for path, _ in nnx.to_flat_state(state)]
            for node, state in parts
        ]
        key = (
            graphdef,
            tuple(g for g, _ in splits),
            tuple(p for p, _ in nnx.to_flat_state(disabled)),
        )
        # paths and variable types only: no arrays are kept alive by a compiled function
        templates = [_template(s) for _, s in parts] + [_template(disabled)]
        return key, live, templates, off

    def _bind(self, model: Any, others: tuple) -> tuple:
        if not self._bound_to(model, others):
            if self.validate is not None:
                self.validate(model, others)
            key, live, templates, off = self._split(model, others)
            modes = [  # the flags of what runs: a disabled adapter's are never read
                (node, attr)
                for path, node in nnx.iter_graph(model)
                for attr in _MODE_ATTRS
                if isinstance(node, nnx.Module) and attr in vars(node) and not off(path, node)
            ]
            # the compiled functions of this split, by statics: looking one up in
            # ``_compiled`` hashes the graph's structure, which costs per call what the split
            # saves
            functions: dict[tuple, Callable[..., Any]] = {}
            flags = tuple(getattr(m, a) for m, a in modes)
            refs = tuple(weakref.ref(o, self._forget) for o in (model, *others))
            token = (refs, model._adapter_revision(), modes, flags)
            self._bound = (token, live, functions, (key, templates, off))
        return self._bound[1:]

    def _function(self, key: Any, templates: list, off: Any, static: tuple) -> Callable:
        if (key, static) in self._compiled:
            return self._compiled[key, static]
        graphdef, other_graphdefs, _ = key
        base_t, rest_t, *other_t, off_t = templates

        def leaves(template: list, now: Any, whose: str) -> list:
            flat = list(nnx.to_flat_state(now))
            if [p for p, _ in flat] != [p for p, _ in template]:
                raise ValueError(_changed(self.what, whose, template, flat))
            return [v.get_raw_value() for _, v in flat]

        def pure(base: list, rest: list, others: list, args: Any):
            # A disabled adapter runs nowhere, so its weights are no arguments at all: in the
            # trace they are their shapes (the template's values), and they cost no call time.
            disabled = nnx.from_flat_state([(p, v.copy()) for p, v in off_t])
            model = nnx.merge(graphdef, _state(base_t, base), disabled, _state(rest_t, rest))
            live = [
                nnx.merge(g, _state(t, a))
                for g, t, a in zip(other_graphdefs, other_t, others, strict=True)
            ]
            out = self.body(model, tuple(live), args, static)
            *_, new_rest = nnx.split(model, nnx.Param, off, ...)
            new_others = [
                leaves(t, nnx.state(o), type(o).__name__)
                for t, o in zip(other_t, live, strict=True)
            ]
            # Only the variables the function changed come out, by index: what it left alone
            # (a frozen adapter's weights, an RNG stream nothing drew from, every variable of
            # a forward in evaluation mode) is still its input tracer, and writing it back
            # would cost a Python call per variable per call. The indices are the output's
            # structure, so every cached trace carries its own.
            new = leaves(rest_t, new_rest, "model")
            changed = {i: a for i, (a, b) in enumerate(zip(new, rest, strict=True)) if a is not b}
            return changed, new_others, out

        # Only the others' state may be donated: the model's arrays may be held elsewhere too
        # (an unmerge snapshot, a clone).
        function = jax.jit(pure, donate_argnums=(2,) if self.donate_others else ())
        self._compiled[key, static] = function
        return function

    def _arrays(self, live: list) -> tuple:
        base, rest, *others = ([v.get_raw_value() for v in part] for part in live)
        return base, rest, others

    def __call__(self, model: Any, others: tuple, args: Any, static: tuple = ()) -> Any:
        live, functions, split = self._bind(model, others)
        function = functions.get(static)
        if function is None:
            function = functions[static] = self._function(*split, static)
        changed, new_others, out = function(*self._arrays(live), args)
        rest = live[1]
        for i, a in changed.items():
            rest[i].set_raw_value(a)
        for variables, arrays in zip(live[2:], new_others, strict=True):
            for v, a in zip(variables, arrays, strict=True):
                v.set_raw_value(a)
        return out

    def lower(self, model: Any, others: tuple, args: Any, static: tuple = ()) -> Any:
        """``jax.stages.Lowered`` of the call (nothing runs, nothing is written)."""
        if self.validate is not None:
            self.validate(model, others)
        key, live, templates, off = self._split(model, others)
        return self._function(key, templates, off, static).lower(*self._arrays(live), args)

    def reset(self) -> None:
        """Forgets the cached split, so the next call reads the graphs afresh."""
        self._bound = None


def _changed(what: str, whose: str, template: list, flat: list) -> str:
    """The error for a call that added or removed variables: which ones, and the fix."""
    before = {tuple(p) for p, _ in template}
    added = [(p, type(v).__name__) for p, v in flat if tuple(p) not in before]
    after = {tuple(p) for p, _ in flat}
    removed = [p for p, _ in template if tuple(p) not in after]
    shown = "; ".join(
        [f"added {'/'.join(map(str, p))} ({kind})" for p, kind in added[:3]]
        + [f"removed {'/'.join(map(str, p))}" for p in removed[:3]]
    )
    more = len(added) + len(removed) - min(len(added), 3) - min(len(removed), 3)
    return (
        f"the {what} changed the {whose}'s structure: {shown}{f' and {more} more' if more else ''}"
        ". A function run by it must leave the model as it found it: pop what it sows (in "
        "training mode, adapters with an l2 strategy sow their auxiliary loss: "
        "nnx.pop(model, jadapters.AdapterLoss)), or call model.eval() to serve."
    )


class NNXForward:
    """A compiled forward of an adapted NNX model; see :func:`nnx_forward`."""

    def __init__(self, fn: Callable[..., Any] | None = None):
        self.fn = fn
        self._split = SplitOnce(self._body, what="forward")

    def _body(self, model: Any, others: tuple, args: Any, static: tuple) -> Any:
        del others
        positional, dynamic = args
        kwargs = {**dict(static), **dynamic}
        if self.fn is None:
            return model(*positional, **kwargs)
        return self.fn(model, *positional, **kwargs)

    def __call__(self, model: Any, *args: Any, **kwargs: Any) -> Any:
        static, dynamic = split_kwargs(kwargs)
        return self._split(model, (), (args, dynamic), static)

    def lower(self, model: Any, *args: Any, **kwargs: Any) -> Any:
        """``jax.stages.Lowered`` of the call, for inspecting or timing compilation."""
        static, dynamic = split_kwargs(kwargs)
        return self._split.lower(model, (), (args, dynamic), static)

    def reset(self) -> None:
        """Forgets the cached split (after replacing a submodule, or setting a Python
        attribute a module branches on)."""
        self._split.reset()


def nnx_forward(fn: Callable[..., Any] | None = None) -> NNXForward:
    """A compiled forward for adapted NNX models that passes only what runs.

    ``forward(model, *args, **kwargs)`` returns ``model(*args, **kwargs)`` (or
    ``fn(model, *args, **kwargs)``), compiled. The first call splits the model's graph once
    and keeps its live variables; every call then reads their arrays into one ``jax.jit``
    function and writes back what it changed (RNG counters, batch statistics). The frozen base
    is an input only, and a disabled adapter is no input at all: fifty adapters added and one
    enabled cost per call what one adapter costs. (``nnx.jit`` walks every variable of the
    graph on every call and returns every one, the base included.)

    The split is redone when adapters are added, removed, enabled or disabled, or when a mode
    flag changes (``model.eval()``). After any other change to what the call computes
    (replacing a submodule, setting a Python attribute a module branches on), call
    ``forward.reset()``.
    Keyword arguments that are plain Python values (``bool``, ``int``, ``float``, ``str``,
    ``None``, tuples or lists of them) or callables are static (each new value compiles once);
    positional arguments and other keywords are traced.

    >>> import jax.numpy as jnp, jadapters
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    >>> model = jadapters.adapter_transform(model, "layers/0")
    >>> model.add_adapter("on", jadapters.IA3Config(), rngs=nnx.Rngs(1))
    >>> model.add_adapter("off", jadapters.IA3Config(), rngs=nnx.Rngs(2))
    >>> model.set_enabled_adapters("off", enabled=False)
    >>> forward = jadapters.nnx_forward()
    >>> x = jnp.ones((1, 3))
    >>> bool((forward(model, x) == model(x)).all())
    True
    >>> len(jax.tree.leaves(forward.lower(model, x).args_info))  # kernel, bias, "on", x
    4
    """
    return NNXForward(fn)
