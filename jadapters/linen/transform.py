"""Adapters on an unmodified Linen model, through ``flax.linen.intercept_methods``.

:class:`AdaptedLinen` wraps the user's module and shares its scope, so the base parameters keep
exactly the unwrapped structure and a base checkpoint loads as is. Adapter weights live in the
``"adapters"`` collection under each host's path. The wrapper is a frozen Linen module:
``add_adapter`` and ``set_enabled_adapters`` return a new one, as everything in Linen does, and
a changed adapter set is a changed static structure, hence a new trace.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jadapters._adapter_set import (
    AdapterSet,
    AdapterSpec,
    check_accepted,
    check_insertion,
    split_qualified_name,
)
from jadapters.adapters.base import (
    AdapterMath,
    apply_rule,
    derive_weight_names,
    is_box,
    stack_size,
    unbox,
)
from jadapters.kernels import kernel_layout
from jadapters.linen.view import LinenView, ambiguous_position
from jadapters.losses import AUX_LOSS_COLLECTION
from jadapters.registry import build_adapter, config_of
from jadapters.routing import route
from jadapters.runtime import run_host
from jadapters.storage import ADAPTER_COLLECTION
from jadapters.targets import Target, has_layer_rules, layer_gate, path_str, unmatched_error

# Set while ``init_adapters`` runs the model: check the targets as ``init`` does.
_CHECK_TARGETS = contextvars.ContextVar("jadapters_check_targets", default=False)

# Under a host's node of the "adapters" collection while the model runs (never stored):
# ``{adapter name: bool[num_layers]}``, the layers of a scanned stack whose adapter acts
# (``Target.layers``). ``nn.scan`` slices it with the adapter weights, one flag per layer.
_GATES = "__layers__"

SCAN_FIX = (
    "add the adapter collection to the nn.scan's variable_axes, next to 'params': "
    "nn.scan(..., variable_axes={'params': 0, jadapters.ADAPTER_COLLECTION: 0}, ...) (that is "
    "'adapters': 0); for nn.vmap the same, in its variable_axes"
)


def _add(a, b):
    return a + b


def _zero():
    return jnp.zeros((), jnp.float32)


@dataclasses.dataclass(frozen=True)
class _Boxed:
    """Holds a Linen module in a field that Flax does not auto-bind as a child."""

    module: nn.Module


class AdaptedLinen(nn.Module):
    """A Linen model with adapters at its target modules. Build it with
    :func:`jadapters.adapter_transform`.

    Call it like the wrapped model. Extra keyword ``adapter_train=True`` turns on the adapters'
    dropout, stochastic depth and auxiliary losses (keys come from the ``"dropout"`` PRNG
    stream) independently of the base model's own training flags, so a frozen base can run in
    evaluation mode while its adapters train.

    Attributes:
      boxed: the wrapped, unmodified Linen module (``.model``), boxed so that Flax does not
        bind it as a named child: its variables and PRNG streams stay exactly the unwrapped
        model's.
      groups: ``((group, (Target, ...)), ...)``, the default group ``''`` first when the
        targets declare one.
      adapters: the adapters, in chain order.
      accepted_types: adapter types allowed; empty means any registered type.
      sharding: ``None``, or a rule ``rule(host_path, adapter_name, param_path, derived) ->
        names`` that overrides the axis names an adapter weight gets from its host's boxed
        kernel (:meth:`with_sharding`).

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jadapters
    >>> base = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
    >>> adapted = jadapters.adapter_transform(base, {"first": "layers_0", "last": "layers_2"})
    >>> adapted = adapted.add_adapter("first:lora", jadapters.LoRAConfig(rank=2))
    >>> adapted = adapted.add_adapter("last:ia3", jadapters.IA3Config())
    >>> x = jnp.ones((1, 3))
    >>> variables = adapted.init(jax.random.key(0), x)
    >>> jax.tree.map(jnp.shape, variables["adapters"])
    {'layers_0': {'lora': {'a': (3, 2), 'b': (2, 4)}}, 'layers_2': {'ia3': {'scale': (2,)}}}
    >>> adapted.apply(variables, x).shape
    (1, 2)
    >>> off = adapted.set_enabled_adapters(enabled=False)  # a new module; adapted is unchanged
    >>> bool((off.apply(variables, x) == base.apply({"params": variables["params"]}, x)).all())
    True
    >>> more = adapted.add_adapter("first:extra", jadapters.IA3Config())
    >>> sorted(more.init_adapters(jax.random.key(1), variables, x)["adapters"]["layers_0"])
    ['extra', 'lora']
    """

    boxed: _Boxed
    groups: tuple[tuple[str, tuple[Target, ...]], ...]
    adapters: AdapterSet = AdapterSet()
    accepted_types: tuple[type, ...] = ()
    sharding: Any = None

    @property
    def model(self) -> nn.Module:
        """The wrapped, unmodified Linen module."""
        return self.boxed.module

    # ---- NeMo's adapter API (functional: each returns a new module) -------------------------

    @property
    def adapter_module_names(self) -> list[str]:
        """The adapter module (group) names, the default ``''`` first (when declared)."""
        return [g for g, _ in self.groups]

    def add_adapter(self, name: str, cfg: Any, *, insertion: str | None = None) -> AdaptedLinen:
        """Returns a new model with adapter ``"group:name"`` (or ``name``) added.

        Its weights are created by ``init`` or, for an already initialized model,
        :meth:`init_adapters`.

        Raises:
          ValueError: for an unknown group (listing the valid ones), a duplicate, reserved or
            malformed name, an unknown insertion, or an adapter type not accepted.
        """
        group, bare = split_qualified_name(name, self.adapter_module_names)
        cfg = config_of(cfg)
        module_cls = type(build_adapter(cfg))
        check_accepted(cfg, module_cls, self.accepted_types)
        insertion = insertion or build_adapter(cfg).default_insertion
        check_insertion(insertion)
        spec = AdapterSpec(name=bare, group=group, cfg=cfg, insertion=insertion)
        return self.clone(adapters=self.adapters.add(spec))

    def set_enabled_adapters(self, name: str | None = None, enabled: bool = True) -> AdaptedLinen:
        """Returns a new model with one adapter (or all, for ``name=None``) (dis)abled."""
        return self.clone(adapters=self.adapters.set_enabled(name, enabled))

    def set_composition(self, group: str, block: Any) -> AdaptedLinen:
        """Returns a new model whose adapters of ``group`` named by ``block`` (a
        :mod:`jadapters.composition` block; ``None``: the plain chain) run as it says."""
        return self.clone(adapters=self.adapters.set_composition(group, block))

    def remove_adapter(self, name: str) -> AdaptedLinen:
        """Returns a new model without adapter ``name`` (drop its weights yourself)."""
        return self.clone(adapters=self.adapters.remove(name))

    def with_sharding(self, rule: Any) -> AdaptedLinen:
        """Returns a new model whose adapter weights take their axis names from ``rule``.

        At a host whose kernel is boxed (``nn.with_partitioning``), each adapter weight is
        created boxed like the kernel, with axis names derived from the kernel's (LoRA ``a``:
        the kernel's input axis and ``None``; ``b``: ``None`` and its output axis; IA3 and
        bottlenecks: the axis they sit on). ``rule(host_path, adapter_name, param_path,
        derived)`` returns the names to use instead (one per axis; ``derived`` to keep them).
        Hosts with plain kernels are unaffected. ``None`` removes the rule.
        """
        return self.clone(sharding=rule)

    def set_accepted_adapter_types(self, types) -> AdaptedLinen:
        """Returns a new model that accepts only adapters of ``types`` (config or module
        classes); an empty list accepts every registered type."""
        return self.clone(accepted_types=tuple(types))

    def get_accepted_adapter_types(self) -> tuple[type, ...]:
        """The adapter types this model accepts; empty means any registered type."""
        return self.accepted_types

    def is_adapter_available(self) -> bool:
        """True when any adapter exists, enabled or not."""
        return len(self.adapters) > 0

    def get_enabled_adapters(self) -> list[str]:
        """Names of the enabled adapters in chain order."""
        return self.adapters.enabled_names()

    def get_adapter_cfg(self, name: str) -> Any:
        """The config of adapter ``name`` (or ``"group:name"``); ``None`` if there is none."""
        spec = self.adapters.get(name)
        return None if spec is None else spec.cfg

    def adapter_view(self, variables: Any) -> LinenView:
        """The :class:`~jadapters.view.AdapterView` of this model with its ``variables``."""
        return LinenView(self, variables)

    # ---- running ------------------------------------------------------------------------------

    def __call__(self, *args, adapter_train: bool = False, adapter_ids: Any = None, **kwargs):
        return self.call(
            "__call__", *args, adapter_train=adapter_train, adapter_ids=adapter_ids, **kwargs
        )

    def call(
        self, method: str, *args, adapter_train: bool = False, adapter_ids: Any = None, **kwargs
    ):
        """Runs the wrapped model's ``method`` with adapters, e.g.
        ``adapted.apply(variables, "encode", x, method="call")``.

        ``adapter_ids`` (one int per example; ``-1`` for the base alone) routes each example
        through its own slot of every :class:`~jadapters.AdapterBank`, as
        :func:`jadapters.route` does."""
        seen: list[tuple[str, Any, str]] = []
        routing = contextlib.nullcontext() if adapter_ids is None else route(adapter_ids)
        with routing, nn.intercept_methods(self._interceptor(adapter_train, seen)):
            # Bound to this module's own scope, the model creates its variables, and derives
            # its PRNG streams, exactly as it does unwrapped.
            model = self._gated_model(method) or self.model.clone(
                parent=self.scope, _deep_clone=True
            )
            out = getattr(model, method)(*args, **kwargs)
        if self.is_initializing() or _CHECK_TARGETS.get():
            self._check_all_matched(seen)
        return out

    def _layer_gates(self, adapters: Any) -> dict[str, dict[str, Any]]:
        """``{host path: {adapter name: bool[num_layers]}}`` for every stacked host whose
        group selects some of its layers only (``Target.layers``).

        Raises:
          ValueError: for a ``layers`` selection at a host whose weights have no layer axis,
            or a layer index outside the stack.
        """
        rules = dict(self.groups)
        layered = {s.name: s for s in self.adapters if has_layer_rules(rules.get(s.group, ()))}
        out: dict[str, dict[str, Any]] = {}
        if not layered:
            return out

        def walk(node: Any, prefix: tuple[str, ...]) -> None:
            host = path_str(prefix)
            for key, value in node.items():
                spec = layered.get(str(key))
                group_rules = () if spec is None else rules[spec.group]
                if spec is not None and host and any(r.matches(host, None) for r in group_rules):
                    size = stack_size(build_adapter(spec.cfg), value)
                    if size is None:
                        raise ValueError(
                            f"targets of adapter module {spec.group!r} select layers (Target("
                            "layers=...)), but the weights of adapter "
                            f"{spec.name!r} at host {host!r} have no layer axis: that host is "
                            "not inside a scanned layer stack (nn.scan). Drop layers=... from "
                            "the rules matching it, or target the layers by path."
                        )
                    gate = layer_gate(group_rules, host, size)
                    if gate is not None:
                        out.setdefault(host, {})[spec.name] = jnp.asarray(gate)
                elif hasattr(value, "items"):
                    walk(value, (*prefix, str(key)))

        walk(adapters, ())
        return out

    def _gated_model(self, method: str) -> nn.Module | None:
        """The model bound to this scope through ``nn.map_variables``, which adds the layer
        gates of :meth:`_layer_gates` to the ``"adapters"`` collection it sees (and drops them
        from what it writes back); ``None`` when no host has a layer selection."""
        if not any(has_layer_rules(rules) for _, rules in self.groups):
            return None  # the common case: nothing to read
        stored = self.variables.get(ADAPTER_COLLECTION)
        if not stored:
            return None
        gates = self._layer_gates(unbox(stored))
        if not gates:
            return None

        def add(tree):
            adapters = dict(tree.get(ADAPTER_COLLECTION, {}))
            for host, flags in gates.items():
                adapters = _with_gates(adapters, host.split("/"), flags)
            return {**tree, ADAPTER_COLLECTION: adapters}

        def drop(tree):
            return {**tree, ADAPTER_COLLECTION: _without_gates(tree.get(ADAPTER_COLLECTION, {}))}

        model = self.model
        mapped = nn.map_variables(
            type(model),
            ADAPTER_COLLECTION,
            trans_in_fn=add,
            trans_out_fn=drop,
            mutable=self.is_mutable_collection(ADAPTER_COLLECTION),
            methods=[method],
        )
        fields = {
            f.name: getattr(model, f.name)
            for f in dataclasses.fields(model)
            if f.init and f.name not in ("parent", "name")
        }
        return mapped(**fields, parent=self.scope)

    def init_adapters(self, rng: jax.Array, variables: Any, *args, **kwargs) -> dict:
        """Creates the weights of adapters that ``variables`` lacks; keeps all others.

        Runs the model once on example ``args``/``kwargs`` (with the base's training flags
        off) and returns ``variables`` with the new adapter weights added.

        Raises:
          ValueError: as ``init`` does, for a target pattern that matches no module (listing
            the paths that exist, closest first) or an adapter whose weights could not be
            told apart from a module's.
        """
        token = _CHECK_TARGETS.set(True)
        try:
            _, new = self.apply(
                variables, *args, rngs={"params": rng}, mutable=[ADAPTER_COLLECTION], **kwargs
            )
        finally:
            _CHECK_TARGETS.reset(token)
        return {**variables, **new}

    def host_paths(self, variables: Any, *args, **kwargs) -> dict[str, list[str]]:
        """``{group: [host path, ...]}`` for one run of the model on example inputs."""
        seen: list[tuple[str, Any]] = []
        with nn.intercept_methods(_recorder(seen)):
            jax.eval_shape(lambda v: self.model.apply(v, *args, **kwargs), variables)
        return self._hosts_by_group(seen)

    def kernel_layouts(self, variables: Any, *args, **kwargs) -> dict[str, Any]:
        """``{host path: KernelLayout}`` of every host of the model's targets with a kernel
        that a layout describes (every host with a weight adapter), read from the real host
        modules during one abstract run (``jax.eval_shape``) on example inputs."""
        layouts: dict[str, Any] = {}

        def record(next_fun, call_args, call_kwargs, context):
            out = next_fun(*call_args, **call_kwargs)
            module = context.module
            if module.scope is not None and module is not self:
                path = _host_path(module)
                groups = self._groups_of(path, module, context.method_name)
                kernel = unbox(module.scope.get_variable("params", "kernel")) if groups else None
                shape = None if kernel is None else tuple(kernel.shape)
                if any(s.insertion == "weight" for s in self._specs_in(groups)):
                    layouts[path] = kernel_layout(module, shape)
                elif shape is not None:  # IA3 scales its kernel's input or output axes
                    try:
                        layouts[path] = kernel_layout(module, shape)
                    except ValueError:
                        pass  # not Dense-like: merging refuses it by its own message
            return out

        with nn.intercept_methods(record):
            jax.eval_shape(lambda v: self.model.apply(v, *args, **kwargs), variables)
        return layouts

    def _hosts_by_group(self, seen) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {group: [] for group, _ in self.groups}
        for path, module, method in seen:
            for group in self._groups_of(path, module, method):
                if path not in out[group]:
                    out[group].append(path)
        return out

    def _groups_of(self, path: str, module: Any, method: str) -> set[str]:
        """The groups whose rules wrap this call (never the root's: it is the model)."""
        if not path:
            return set()
        return {
            g for g, rules in self.groups if any(r.applies(path, module, method) for r in rules)
        }

    def _host_specs(self, path: str, module: Any, method: str) -> list[AdapterSpec]:
        return self._specs_in(self._groups_of(path, module, method))

    def _specs_in(self, groups: set[str]) -> list[AdapterSpec]:
        return [s for s in self.adapters if s.group in groups]

    def _interceptor(self, adapter_train: bool, seen: list):
        wrapper = self
        root = _root_scope(self)

        def intercept(next_fun, args, kwargs, context):
            module = context.module
            if module is wrapper or module.scope is None:
                return next_fun(*args, **kwargs)
            own = _root_scope(module)
            if own is not root and not tuple(own.path) and _is_adapter_own(module):
                return next_fun(*args, **kwargs)  # an adapter's own layers, not the model's
            path = _host_path(module)
            seen.append((path, module, context.method_name))
            specs = wrapper._host_specs(path, module, context.method_name)
            if not specs:
                return next_fun(*args, **kwargs)
            clash = ambiguous_position(path, wrapper.adapters, wrapper.groups)
            if clash is not None:
                raise ValueError(clash)
            return _run_host(
                module, path, specs, next_fun, args, kwargs, adapter_train, wrapper.sharding
            )

        return intercept

    def _check_all_matched(self, seen) -> None:
        paths = [p for p, _, _ in seen if p]
        for group, rules in self.groups:
            for rule in rules:
                if not any(rule.applies(p, m, meth) for p, m, meth in seen if p):
                    raise unmatched_error(rule, group, paths)


def _host_path(module: nn.Module) -> str:
    """Where ``module``'s variables live: its scope names up from the root.

    Walks the scope parents rather than reading ``scope.path``, which keeps the pre-sharing
    path when scopes are re-parented.
    """
    names = []
    scope = module.scope
    while scope is not None and scope.parent is not None:
        names.append(scope.name)
        scope = scope.parent
    # The root of a lifted transform's inner scope tree (nn.remat, nn.scan) keeps its outer
    # path.
    outer = tuple(scope.path) if scope is not None else ()
    return path_str((*outer, *reversed(names)))


def _root_scope(module: nn.Module) -> Any:
    scope = module.scope
    while scope.parent is not None:
        scope = scope.parent
    return scope


def _is_adapter_own(module: nn.Module) -> bool:
    """Whether ``module`` belongs to an adapter's forward (its top module is an adapter)."""
    top = module
    while isinstance(top.parent, nn.Module):
        top = top.parent
    return isinstance(top, AdapterMath)


def _with_gates(tree: Any, keys: list[str], flags: dict) -> dict:
    out = dict(tree)
    if not keys:
        out[_GATES] = flags
        return out
    out[keys[0]] = _with_gates(out.get(keys[0], {}), keys[1:], flags)
    return out


def _without_gates(tree: Any) -> Any:
    if not hasattr(tree, "items"):
        return tree
    return {k: _without_gates(v) for k, v in tree.items() if k != _GATES}


def _in_lifted_transform(module: nn.Module) -> bool:
    return bool(tuple(_root_scope(module).path))


def _recorder(seen):
    def record(next_fun, args, kwargs, context):
        module = context.module
        if module.scope is not None:
            seen.append((_host_path(module), module, context.method_name))
        return next_fun(*args, **kwargs)

    return record


@dataclasses.dataclass
class _LinenIO:
    """The runtime's view of one Linen host call: weights in the host's ``"adapters"``
    collection (created at ``init``), keys from the ``"dropout"`` stream."""

    module: nn.Module
    path: str
    rule: Any = None

    @property
    def creates_weights(self) -> bool:
        return self.module.scope.is_mutable_collection(ADAPTER_COLLECTION)

    def weights(self, spec: AdapterSpec, adapter: Any, sample: Any, out_features) -> Any:
        scope = self.module.scope
        if scope.has_variable(ADAPTER_COLLECTION, spec.name):
            return unbox(scope.get_variable(ADAPTER_COLLECTION, spec.name))
        if not scope.is_mutable_collection(ADAPTER_COLLECTION):
            if _in_lifted_transform(self.module):
                raise ValueError(
                    f"adapter {spec.name!r} has no weights at host {self.path!r}: the host "
                    "runs inside a lifted transform (nn.scan, nn.vmap) that does not carry the "
                    f"{ADAPTER_COLLECTION!r} collection, so each layer cannot hold its own "
                    f"adapter weights. To fix it, {SCAN_FIX}."
                )
            raise ValueError(
                f"adapter {spec.name!r} has no weights at host {self.path!r}: it was added after "
                "the variables were created. Call adapted.init_adapters(rng, variables, "
                "*inputs) first."
            )
        kwargs = {} if out_features is None else {"out_features": out_features}
        zeros = jnp.zeros(sample.shape, sample.dtype)
        params = adapter.init(self.module.make_rng("params"), zeros, **kwargs)["params"]
        scope.put_variable(ADAPTER_COLLECTION, spec.name, self._boxed(spec, adapter, params))
        return params

    def gate(self, spec: AdapterSpec) -> Any:
        """Whether this layer of a scanned stack is selected for ``spec`` (``Target.layers``):
        a boolean scalar, or ``None`` when every layer is."""
        scope = self.module.scope
        if not scope.has_variable(ADAPTER_COLLECTION, _GATES):
            return None
        return scope.get_variable(ADAPTER_COLLECTION, _GATES).get(spec.name)

    def _boxed(self, spec: AdapterSpec, adapter: Any, params: Any) -> Any:
        """``params`` boxed like the host's kernel, with axis names derived from its; as they
        are when the kernel is not boxed with axis names."""
        kernel = self.module.scope.get_variable("params", "kernel")
        names = getattr(kernel, "names", None)
        if not is_box(kernel) or names is None:
            return params
        try:
            in_dims = self.layout().in_dims
        except ValueError:  # not a Dense-like host: its input axes are unknown
            in_dims = (0,)
        derived = derive_weight_names(adapter, params, names, in_dims, spec.insertion)
        derived = apply_rule(self.rule, self.path, spec.name, params, derived)
        return jax.tree.map(lambda v, n: kernel.replace(value=v, names=n), params, derived)

    def key(self, spec: AdapterSpec) -> jax.Array | None:
        return self.module.make_rng("dropout") if self.module.has_rng("dropout") else None

    def layout(self):
        kernel = unbox(self.module.scope.get_variable("params", "kernel"))
        return kernel_layout(self.module, None if kernel is None else tuple(kernel.shape))


def _run_host(module, path, specs, next_fun, args, kwargs, adapter_train, rule=None):
    io = _LinenIO(module, path, rule)
    y, losses = run_host(next_fun, args, kwargs, specs, io, training=adapter_train)
    for name, loss in losses.items():
        module.sow(AUX_LOSS_COLLECTION, name, loss, reduce_fn=_add, init_fn=_zero)
    return y
