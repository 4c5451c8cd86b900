"""NeMo's adapter mixins for NNX modules: named adapters, enable/disable, a trainable filter.

:class:`AdapterModuleMixin` gives one module NeMo's adapter methods; :class:`AdapterModelMixin`
routes ``"module:name"`` to groups of such modules. Both mutate the module in place, as NNX
modules do. Enabled state and configs are static structure (part of the NNX graph
definition), so ``nnx.jit`` retraces when they change and a disabled adapter leaves no trace
in the compiled computation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import flax.core.meta
import jax
import jax.numpy as jnp
from flax import nnx

from jadapters._adapter_set import (
    AdapterSet,
    AdapterSpec,
    check_accepted,
    check_insertion,
    check_name,
    split_qualified_name,
)
from jadapters._walks import bump, iter_graph, revision
from jadapters.adapters.base import apply_rule, derive_weight_names
from jadapters.kernels import kernel_layout
from jadapters.nnx.shell import NNXAdapter, stacked_shell
from jadapters.nnx.view import NNXView
from jadapters.registry import build_adapter, config_of
from jadapters.runtime import run_host, run_stage
from jadapters.storage import NNX_ADAPTER_ATTR, AdapterParam
from jadapters.targets import layer_gate, path_str


@dataclasses.dataclass(frozen=True, eq=False)
class AdapterFilter:
    """NNX filter selecting the :class:`AdapterParam` variables under given path prefixes.

    Returned by ``unfreeze_enabled_adapters``; use it wherever NNX takes a filter
    (``nnx.state``, ``nnx.split``, ``nnx.DiffState``, ``nnx.Optimizer(wrt=...)``).

    Two filters are equal when they select the same adapters (in any order) and those
    adapters' weights had the same shapes and dtypes when the filters were made, so an
    optimizer's ``wrt`` tells whether its state still fits the enabled adapters.

    >>> import jax, jadapters
    >>> from flax import nnx
    >>> rngs = nnx.Rngs(0)
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs))
    >>> model = jadapters.adapter_transform(model, "layers/[01]")
    >>> model.add_adapter("a", jadapters.IA3Config(), rngs=nnx.Rngs(2))
    >>> model.add_adapter("b", jadapters.IA3Config(), rngs=nnx.Rngs(3))
    >>> model.set_enabled_adapters("a", enabled=False)
    >>> only_b = model.unfreeze_enabled_adapters()
    >>> only_b.names, [x.shape for x in jax.tree.leaves(nnx.state(model, only_b))]
    (['b'], [(4,), (2,)])
    >>> only_b == model.unfreeze_enabled_adapters()
    True
    """

    prefixes: tuple[tuple[Any, ...], ...]
    # (prefix, parameter path, shape, dtype) of every selected weight, when the filter was made
    leaves: tuple[tuple[Any, ...], ...] = dataclasses.field(default=(), repr=False)

    def __call__(self, path: tuple[Any, ...], value: Any) -> bool:
        if not isinstance(value, AdapterParam):
            return False
        return any(tuple(path[: len(p)]) == p for p in self.prefixes)

    @property
    def names(self) -> list[str]:
        """The names of the selected adapters."""
        return list(dict.fromkeys(str(p[-1]) for p in self.prefixes))

    def __eq__(self, other: Any) -> bool:
        if not isinstance(other, AdapterFilter):
            return NotImplemented
        return set(self.prefixes) == set(other.prefixes) and set(self.leaves) == set(other.leaves)

    def __hash__(self) -> int:
        return hash(frozenset(self.prefixes))


def _enabled_filter(root: nnx.Module) -> AdapterFilter:
    prefixes, leaves = [], []
    for path, node in nnx.iter_graph(root):
        if isinstance(node, AdapterModuleMixin):
            for name in node.get_enabled_adapters():
                prefix = (*path, NNX_ADAPTER_ATTR, name)
                prefixes.append(prefix)
                weights = node.adapter_layer[name].param_values()
                for where, x in jax.tree_util.tree_flatten_with_path(weights)[0]:
                    where = jax.tree_util.keystr(where)
                    leaves.append((prefix, where, tuple(x.shape), str(x.dtype)))
    return AdapterFilter(tuple(prefixes), tuple(leaves))


def freeze_batchnorm(root: nnx.Module) -> int:
    """Puts every ``nnx.BatchNorm`` in ``root`` on its running statistics (NeMo's
    ``freeze_batchnorm``): they normalize with, and no longer update, the base's statistics.

    Call it after ``model.train()``, which turns batch statistics back on. Returns how many
    BatchNorm modules were frozen.

    >>> from flax import nnx
    >>> rngs = nnx.Rngs(0)
    >>> model = nnx.Sequential(nnx.Linear(2, 2, rngs=rngs), nnx.BatchNorm(2, rngs=rngs))
    >>> freeze_batchnorm(model), model.layers[1].use_running_average
    (1, True)
    """
    count = 0
    for _, node in nnx.iter_graph(root):
        if isinstance(node, nnx.BatchNorm):
            node.use_running_average = True
            count += 1
    return count


_freeze_batchnorm = freeze_batchnorm


def _stack_size(host: Any) -> int | None:
    """The layer count of a host inside an ``nnx.vmap``-built layer stack (its weights carry a
    leading layer axis), or ``None`` for an ordinary host.

    Raises:
      ValueError: for weights stacked twice (a stack of stacks).
    """
    for _, node in nnx.iter_graph(host):
        if isinstance(node, nnx.Linear):
            shape, natural = node.kernel[...].shape, 2
        elif isinstance(node, nnx.LinearGeneral):
            shape = node.kernel[...].shape
            natural = len(node.in_features) + len(node.out_features)
        elif isinstance(node, nnx.LayerNorm) and node.scale is not None:
            shape, natural = node.scale[...].shape, 1
        else:
            continue
        if len(shape) == natural:
            return None
        if len(shape) == natural + 1:
            return int(shape[0])
        raise ValueError(
            f"{getattr(type(host), '_jadapters_host_of', type(host)).__name__} holds weights "
            f"of shape {tuple(shape)}, stacked over more than one axis (nested nnx.vmap); "
            "adapters support one layer axis (an nnx.vmap-built stack run with nnx.scan). "
            "Target the modules of a stack with one layer axis."
        )
    return None


class _NNXHostIO:
    """The runtime's view of one NNX host: weights in its ``adapter_layer`` shells, keys from
    each shell's ``dropout`` stream, the mode from ``model.train()``/``eval()``."""

    creates_weights = False

    def __init__(self, host: Any):
        self.host = host
        self.path = type(host).__name__

    def _shell(self, spec: AdapterSpec) -> NNXAdapter:
        return getattr(self.host, NNX_ADAPTER_ATTR)[spec.name]

    def weights(self, spec, adapter, sample, out_features):
        return self._shell(spec).param_values()

    def gate(self, spec):
        """Whether this layer of a scanned stack is selected (``Target.layers``), or None."""
        gate = getattr(self._shell(spec), "layer_gate", None)
        return None if gate is None else gate[...]

    def key(self, spec):
        return self._shell(spec).next_key()

    def layout(self):
        return kernel_layout(self.host)

    def training(self, specs) -> bool:
        return any(not self._shell(s).deterministic for s in specs)

    def record(self, losses) -> None:
        for name, loss in losses.items():
            self.host_shell(name).record_loss(loss)

    def host_shell(self, name: str) -> NNXAdapter:
        return getattr(self.host, NNX_ADAPTER_ATTR)[name]


def _names_rule(host: Any, adapter: Any, insertion: str, rule: Any = None, where=("", "")):
    """``params -> axis names`` derived from ``host``'s kernel's ``out_sharding`` metadata,
    then overridden by the model's sharding ``rule`` (``where``: the host's path and the
    adapter's name, as the rule gets them); ``None`` when the kernel has none (the adapter's
    weights then carry no sharding).

    At a host inside a layer stack the params carry the layer axis first: the names are
    derived for one layer (the rule sees those) and the layer axis takes the name the
    stacked kernel gives its own (``nnx.vmap(transform_metadata={nnx.PARTITION_NAME: ...})``),
    or ``None``."""
    kernel = getattr(host, "kernel", None)
    if not isinstance(kernel, nnx.Variable):
        return None
    names = kernel.get_metadata().get("out_sharding")
    if names is None or isinstance(names, jax.sharding.NamedSharding):
        return None
    names = tuple(names)
    stacked = _stack_size(host) is not None
    layer: tuple[Any, ...] = ()
    if stacked:
        ndim = kernel[...].ndim
        if len(names) == ndim:
            layer, names = names[:1], names[1:]
        elif len(names) == ndim - 1:
            layer = (None,)
        else:
            return None
    try:
        in_dims = kernel_layout(host, stacked=stacked).in_dims
    except ValueError:  # not a Dense-like host: its input axes are unknown
        in_dims = (0,)

    def derive(params):
        one = jax.tree.map(lambda p: p[0], params) if stacked else params
        per_layer = apply_rule(
            rule, *where, one, derive_weight_names(adapter, one, names, in_dims, insertion)
        )
        return jax.tree.map(
            lambda n: (*layer, *n), per_layer, is_leaf=lambda n: isinstance(n, tuple)
        )

    return derive


def name_axes(shell: Any, names: Any) -> None:
    """Gives ``shell``'s weights the axis names ``names(params)`` (metadata; a weight already
    placed on a mesh moves to its new sharding there)."""
    is_var = lambda v: isinstance(v, nnx.Variable)  # noqa: E731
    variables = jax.tree.leaves(shell.params, is_leaf=is_var)
    new = jax.tree.leaves(names(shell.param_values()), is_leaf=lambda v: isinstance(v, tuple))
    for var, axes in zip(variables, new, strict=True):
        var.set_metadata(out_sharding=axes)
        value = var.get_value()
        sharding = getattr(value, "sharding", None)
        mesh = sharding.mesh if isinstance(sharding, jax.sharding.NamedSharding) else None
        if mesh is None or mesh.empty:
            mesh = flax.core.meta.get_global_mesh() if nnx.using_eager_sharding() else None
        if mesh is not None and not mesh.empty:
            placed = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*axes))
            var.set_value(jax.device_put(value, placed))


def _rename_axes(host: Any, path: str, rule: Any) -> None:
    """Gives the weights of ``host``'s adapters the axis names ``rule`` says (metadata; a
    weight already placed on a mesh moves to its new sharding there)."""
    for spec in host._adapter_set():
        shell = host.get_adapter_module(spec.name)
        names = _names_rule(host, shell.module, spec.insertion, rule, (path, spec.name))
        if names is not None:
            name_axes(shell, names)


_MODE_ATTRIBUTES = ("deterministic", "use_running_average")  # what eval() and train() set


def _adapter_mode(root: Any) -> bool | None:
    """``deterministic`` for an adapter joining ``root``: that of the adapters already under
    it; with none, the mode ``eval()`` or ``train()`` last set on the modules under it (the
    boolean ``deterministic`` and ``use_running_average`` attributes of its dropout, batch
    norm and attention layers), when they all agree; else ``None`` (NNX's default:
    training)."""
    modes = set()
    for _, node in iter_graph(root):
        if isinstance(node, NNXAdapter):
            return bool(node.deterministic)
        if isinstance(node, nnx.Module):
            attributes = vars(node)
            modes.update(
                attributes[a] for a in _MODE_ATTRIBUTES if isinstance(attributes.get(a), bool)
            )
    return modes.pop() if len(modes) == 1 else None


def _bare(name: str) -> str:
    """A module-level mixin holds one module's adapters: ``"module:name"`` means ``name``."""
    return name.rpartition(":")[2] if isinstance(name, str) else name


def _infer_in_features(module: Any, insertion: str) -> int | None:
    if insertion in ("output",):
        names = ("out_features", "features", "num_features", "adapter_features")
    else:
        names = ("in_features", "num_features", "adapter_features")
    for attr in names:
        value = getattr(module, attr, None)
        if isinstance(value, tuple) and value and isinstance(value[-1], int):
            value = value[-1]  # LinearGeneral: the adapter acts on the last axis
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


class AdapterModuleMixin:
    """NeMo's ``AdapterModuleMixin`` for ``flax.nnx`` modules.

    Mix it into an NNX module and call :meth:`forward_enabled_adapters` on the module's output:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import jadapters
    >>> class Block(nnx.Module, jadapters.AdapterModuleMixin):
    ...     def __init__(self, dim, *, rngs):
    ...         self.linear = nnx.Linear(dim, dim, rngs=rngs)
    ...         self.adapter_features = dim
    ...     def __call__(self, x):
    ...         y = self.linear(x)
    ...         if self.is_adapter_available():
    ...             y = self.forward_enabled_adapters(y)
    ...         return y
    >>> block = Block(4, rngs=nnx.Rngs(0))
    >>> block.add_adapter("first", jadapters.LinearAdapterConfig(dim=2), rngs=nnx.Rngs(1))
    >>> block.get_enabled_adapters()
    ['first']
    >>> x = jnp.ones((2, 4))
    >>> bool((block(x) == block.linear(x)).all())  # identity at init
    True

    The adapter's input width comes from ``cfg.in_features``, the ``in_features`` argument of
    :meth:`add_adapter`, or the module's ``out_features``/``features``/``adapter_features``
    attribute (``in_features`` for input and parallel insertion), in that order.
    """

    __slots__ = ()

    def _adapter_set(self) -> AdapterSet:
        return getattr(self, "_adapters_spec", AdapterSet())

    def _set_adapter_set(self, value: AdapterSet) -> None:
        self._adapters_spec = value
        bump()

    def _adapter_revision(self) -> int:
        """A number that changes whenever any adapter anywhere is added, removed, enabled or
        disabled."""
        return revision()

    def add_adapter(
        self,
        name: str,
        cfg: Any,
        *,
        rngs: nnx.Rngs,
        insertion: str | None = None,
        in_features: int | None = None,
        dtype: Any = jnp.float32,
    ) -> None:
        """Adds an adapter called ``name`` built from ``cfg`` (a config or an adapter module).

        Inside a model with :class:`AdapterModelMixin`, the adapter is one of the model's too,
        named ``"<this module's path>:name"`` there (saved, loaded, trained and listed with the
        model's others), so ``name`` must be unique across the model.

        The adapter starts in the mode of the adapters already under this module, or else in
        the mode ``eval()``/``train()`` last set on the dropout and normalization layers under
        it; with neither, training, as NNX modules start. This module cannot see the rest of
        the model: after ``model.eval()``, add through the model
        (``model.add_adapter("<path>:name", ...)`` reads the whole model's mode) or call
        ``eval()`` again.

        Args:
          name: unique name; ``"module:name"`` is accepted and the module part dropped.
          cfg: an adapter config (e.g. ``LinearAdapterConfig(dim=8)``) or adapter module.
          rngs: PRNG streams: ``params`` to initialize, ``dropout`` for training noise.
          insertion: ``"output"`` (default for most adapters), ``"parallel"`` or ``"input"``.
          in_features: the adapter's input width when it cannot be inferred.
          dtype: dtype of the example input used to initialize.

        Raises:
          ValueError: for a duplicate, reserved or malformed name, an adapter type not
            accepted, an unknown insertion, or an input width that cannot be inferred.
        """
        shell, new_set = self._prepare_adapter(
            name, cfg, rngs=rngs, insertion=insertion, in_features=in_features, dtype=dtype
        )
        self._attach_adapter(shell, new_set)

    def _prepare_adapter(
        self, name, cfg, *, rngs, insertion, in_features, dtype, sharding=(None, ""), rules=()
    ):
        """Checks everything and builds the adapter, without touching the module;
        ``sharding`` is ``(the model's sharding rule, this host's path)``; ``rules`` the target
        rules that put it here (their ``layers`` select layers of a stacked host)."""
        bare = name.rpartition(":")[2] if isinstance(name, str) else name
        cfg = config_of(cfg)
        module_cls = type(build_adapter(cfg))
        check_accepted(cfg, module_cls, self.get_accepted_adapter_types())
        insertion = insertion or build_adapter(cfg).default_insertion
        check_insertion(insertion)
        spec = AdapterSpec(name=bare, group="", cfg=cfg, insertion=insertion)
        new_set = self._adapter_set().add(spec)
        stack = _stack_size(self)
        gate = None
        if any(getattr(r, "layers", None) is not None for r in rules):
            if stack is None:
                raise ValueError(
                    f"targets select layers (Target(layers=...)) of host {sharding[1]!r}, but "
                    "it is not inside a layer stack (nnx.vmap-built, run with nnx.scan). Drop "
                    "layers=... from the rules matching it."
                )
            gate = layer_gate(rules, sharding[1], stack)
        out_features = None
        if insertion == "weight":
            layout = kernel_layout(self, stacked=stack is not None)
            features, out_features = layout.in_features, layout.out_features
        else:
            features = getattr(cfg, "in_features", None) or in_features
            features = features or _infer_in_features(self, insertion)
            if getattr(build_adapter(cfg), "needs_out_features", False):
                out_features = _infer_in_features(self, "output")
        if features is None:
            raise ValueError(
                f"cannot infer the input width of adapter {bare!r} on {type(self).__name__}: "
                "pass in_features=... to add_adapter or set it in the config."
            )
        if stack is not None:
            shell = stacked_shell(
                stack, gate, cfg, (1, features), rngs=rngs, dtype=dtype, out_features=out_features
            )
            names = _names_rule(
                self, build_adapter(cfg), insertion, sharding[0], (sharding[1], bare)
            )
            if names is not None:
                name_axes(shell, names)
            return shell, new_set
        shell = NNXAdapter(
            cfg,
            (1, features),
            rngs=rngs,
            dtype=dtype,
            out_features=out_features,
            names=_names_rule(
                self, build_adapter(cfg), insertion, sharding[0], (sharding[1], bare)
            ),
        )
        return shell, new_set

    def _attach_adapter(self, shell: NNXAdapter, new_set: AdapterSet, mode=None) -> None:
        # A new adapter joins in the mode of those already there, or of the dropout and
        # normalization layers (model.eval() before an add must not leave the new one
        # training); with neither, NNX's default: training.
        mode = _adapter_mode(self) if mode is None else mode
        if mode is not None:
            shell.deterministic = mode
        if getattr(self, "adapter_layer", None) is None:
            self.adapter_layer = nnx.Dict()
        self.adapter_layer[new_set.specs[-1].name] = shell
        self._set_adapter_set(new_set)

    def remove_adapter(self, name: str) -> None:
        """Removes adapter ``name`` and its weights.

        Raises:
          ValueError: if no adapter exists or ``name`` is unknown.
        """
        spec = self._adapter_set()._require(_bare(name))
        new_set = self._adapter_set().remove(spec.name)
        del self.adapter_layer[spec.name]
        self._set_adapter_set(new_set)  # after the graph changed: walks made now are fresh

    def is_adapter_available(self) -> bool:
        """True when any adapter exists, enabled or not (NeMo's module semantics)."""
        return len(self._adapter_set()) > 0

    def set_enabled_adapters(self, name: str | None = None, enabled: bool = True) -> None:
        """Enables or disables one adapter by name, or all of them for ``name=None``.

        Raises:
          ValueError: if no adapter exists or ``name`` is unknown.
        """
        bare = None if name is None else _bare(name)
        new = self._adapter_set().set_enabled(bare, enabled)
        if [s.enabled for s in new] != [s.enabled for s in self._adapter_set()]:
            self._set_adapter_set(new)  # a change: caches of the graph are stale

    def get_enabled_adapters(self) -> list[str]:
        """Names of the enabled adapters, in insertion (chain) order."""
        return self._adapter_set().enabled_names()

    def get_adapter_module(self, name: str) -> NNXAdapter | None:
        """The adapter called ``name``, or ``None`` if there is none."""
        spec = self._adapter_set().get(_bare(name))
        return None if spec is None else self.adapter_layer[spec.name]

    def get_adapter_cfg(self, name: str) -> Any:
        """The config of the adapter called ``name``, or ``None`` if there is none."""
        spec = self._adapter_set().get(_bare(name))
        return None if spec is None else spec.cfg

    def get_adapter_insertion(self, name: str) -> str | None:
        """Where adapter ``name`` goes (``"output"``, ``"parallel"``, ``"input"`` or
        ``"weight"``), or ``None`` if there is no such adapter."""
        spec = self._adapter_set().get(_bare(name))
        return None if spec is None else spec.insertion

    def set_accepted_adapter_types(self, types: Iterable[type]) -> None:
        """Restricts which adapter types (config or module classes) :meth:`add_adapter` takes."""
        types = tuple(types)
        for t in types:
            if not isinstance(t, type):
                raise ValueError(f"types must contain classes, got {t!r}.")
        self._accepted_adapter_types = types

    def get_accepted_adapter_types(self) -> tuple[type, ...]:
        """The accepted adapter types; empty means any registered type."""
        return getattr(self, "_accepted_adapter_types", ())

    def forward_input_adapters(self, x: jax.Array) -> jax.Array:
        """Runs the enabled ``input`` adapters on the host's input, in order."""
        return self._run_stage(("input",), x, None)

    def forward_weight_adapters(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """Joins the enabled ``weight`` adapters' (LoRA) updates, fed the host's input ``x``,
        to the host's output ``y``."""
        return self._run_stage(("weight",), x, y)

    def forward_enabled_adapters(self, x: jax.Array, *, host_input: jax.Array | None = None):
        """Runs the enabled ``output`` and ``parallel`` adapters as a chain (NeMo's forward).

        Each adapter's result, joined by its strategy, is the next one's input. A parallel
        adapter is fed ``host_input`` and joins the stream.

        Raises:
          ValueError: if a parallel adapter is enabled and ``host_input`` is not given.
        """
        if host_input is None:
            for spec in self._adapter_set().enabled():
                if spec.insertion == "parallel":
                    raise ValueError(
                        f"adapter {spec.name!r} is parallel and needs the host's input: call "
                        "forward_enabled_adapters(output, host_input=input)."
                    )
        return self._run_stage(("output", "parallel"), x if host_input is None else host_input, x)

    def _run_stage(self, insertions, x, y):
        specs = self._adapter_set().enabled()
        losses: dict[str, jax.Array] = {}
        io = _NNXHostIO(self)
        out = run_stage(insertions, specs, io, x, y, training=io.training(specs), losses=losses)
        io.record(losses)
        return out

    def _run_host(self, call, args, kwargs):
        """Runs the host method ``call`` with its enabled adapters (the adapted class's hook)."""
        specs = self._adapter_set().enabled()
        if not specs:
            return call(*args, **kwargs)
        io = _NNXHostIO(self)
        y, losses = run_host(call, args, kwargs, specs, io, training=io.training(specs))
        io.record(losses)
        return y

    def unfreeze_enabled_adapters(self, freeze_batchnorm: bool = True) -> AdapterFilter:
        """The trainable filter: exactly the enabled adapters' :class:`AdapterParam` variables.

        JAX has no ``requires_grad``: what trains is what you differentiate. Pass the filter
        to ``nnx.DiffState``/``nnx.Optimizer(wrt=...)``, or use :func:`jadapters.nnx_train_step`.
        With ``freeze_batchnorm`` the base's BatchNorm layers are put on their running
        statistics (see :func:`freeze_batchnorm`).
        """
        if freeze_batchnorm:
            _freeze_batchnorm(self)
        return _enabled_filter(self)


class AdapterModelMixin:
    """NeMo's ``AdapterModelPTMixin`` for NNX models: ``"module:name"`` routing.

    A model names its adapter modules (groups) in ``adapter_module_names``, ``''`` being the
    default, and maps each group to the :class:`AdapterModuleMixin` modules in it with
    :meth:`adapter_group_modules`. :func:`jadapters.adapter_transform` sets both up from target
    patterns; a hand-written model can override them.

    >>> import jax.numpy as jnp, jadapters
    >>> from flax import nnx
    >>> rngs = nnx.Rngs(0)
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs))
    >>> model = jadapters.adapter_transform(model, {"first": "layers/0", "last": "layers/1"})
    >>> isinstance(model, AdapterModelMixin), model.adapter_module_names
    (True, ['first', 'last'])
    >>> model.add_adapter("first:a", jadapters.IA3Config(), rngs=nnx.Rngs(2))
    >>> model.add_adapter("last:b", jadapters.LoRAConfig(rank=1), rngs=nnx.Rngs(3))
    >>> model.adapter_group_modules("last") == [model.layers[1]]
    True
    >>> model.set_enabled_adapters("first:a", enabled=False)
    >>> model.get_enabled_adapters(), model(jnp.ones((1, 3))).shape
    (['b'], (1, 2))
    """

    __slots__ = ()

    @property
    def adapter_module_names(self) -> list[str]:
        """The adapter module (group) names, the default ``''`` first (when declared)."""
        return [group for group, _ in getattr(self, "_adapter_groups", ())]

    def adapter_group_modules(self, group: str) -> list[AdapterModuleMixin]:
        """The host modules of ``group``."""
        paths = dict(getattr(self, "_adapter_groups", ())).get(group, ())
        by_path = {tuple(p): n for p, n in iter_graph(self)}
        return [by_path[tuple(p)] for p in paths]

    def _model_adapter_set(self) -> AdapterSet:
        return getattr(self, "_model_adapters_spec", AdapterSet())

    def _adapter_revision(self) -> int:
        """A number that changes whenever any adapter anywhere is added, removed, enabled or
        disabled."""
        return revision()

    def _adapter_hosts(self) -> dict[str, AdapterModuleMixin]:
        """``{path: module}`` of every adapter-capable module inside the model, in graph order."""
        return {
            path_str(path): node
            for path, node in iter_graph(self)
            if path and isinstance(node, AdapterModuleMixin)
        }

    def _group_modules(self, group: str) -> list[AdapterModuleMixin]:
        """The hosts of adapter module ``group``, or the one module whose path ``group`` is."""
        if group in self.adapter_module_names:
            return self.adapter_group_modules(group)
        host = self._adapter_hosts().get(group)
        return [] if host is None else [host]

    def _host_route(self, name: Any) -> tuple[str, str, AdapterModuleMixin] | None:
        """``(path, name, module)`` when ``name`` is ``"path:name"`` for the path of an
        adapter-capable module that is not an adapter module (group) of the model."""
        if not isinstance(name, str):
            return None
        path, sep, bare = name.rpartition(":")
        if not sep or path in self.adapter_module_names:
            return None
        host = self._adapter_hosts().get(path)
        if host is None:
            return None
        check_name(bare)
        return path, bare, host

    def _host_level_specs(self, model_set: AdapterSet) -> tuple[list[AdapterSpec], set[str]]:
        """The adapters added on a module itself (``module.add_adapter``), each with the
        module's path as its group; and the names of the model's own adapters that are
        enabled at one of their hosts at least."""
        groups = self.adapter_module_names
        group_hosts = {
            group: {id(h) for h in self.adapter_group_modules(group)}
            for group in dict.fromkeys(spec.group for spec in model_set)
        }
        model_hosts = {spec.name: group_hosts[spec.group] for spec in model_set}
        out: list[AdapterSpec] = []
        enabled: set[str] = set()
        seen: dict[str, str] = {s.name: s.qualified_name for s in model_set}
        for path, host in self._adapter_hosts().items():
            for spec in host._adapter_set():
                if id(host) in model_hosts.get(spec.name, ()):
                    if spec.enabled:  # added through the model, to its whole group
                        enabled.add(spec.name)
                    continue
                qualified = f"{path}:{spec.name}"
                if spec.name in seen:
                    raise ValueError(
                        f"adapter name {spec.name!r} is used twice in the model: by "
                        f"{seen[spec.name]!r} and by {qualified!r} (added on that module "
                        "itself); names must be unique across the model. Remove one with "
                        f"remove_adapter({spec.name!r}) on the module at {path!r} and add it "
                        "under another name."
                    )
                if path in groups and self.adapter_group_modules(path) != [host]:
                    raise ValueError(
                        f"adapter {spec.name!r} was added on the module at {path!r}, but "
                        f"{path!r} also names an adapter module (group) of the model with "
                        "other hosts, so the model cannot address it. Remove it from that "
                        "module and add it through the model's add_adapter."
                    )
                seen[spec.name] = qualified
                out.append(dataclasses.replace(spec, group=path))
        return out, enabled

    def add_adapter(
        self,
        name: str,
        cfg: Any,
        *,
        rngs: nnx.Rngs,
        insertion: str | None = None,
        in_features: int | None = None,
        dtype: Any = jnp.float32,
    ) -> None:
        """Adds adapter ``"module:name"`` (or ``name`` for the default module) to every host
        of that module; arguments as :meth:`AdapterModuleMixin.add_adapter`.

        ``module`` may also be the path of one adapter-capable module inside the model
        (``"blocks/0/mlp:name"``): the adapter then goes on that module alone, exactly as
        ``module.add_adapter(name, ...)`` on it would.

        New adapters start in the model's mode: that of its adapters, or else the one
        ``model.eval()``/``model.train()`` last set on its dropout and normalization layers
        (training when they disagree or there are none).

        Raises:
          ValueError: for an unknown module (listing the valid ones), a bare name on a model
            whose targets declare no default module ``''``, a module without hosts, a name
            already used in any module, and every error of
            :meth:`AdapterModuleMixin.add_adapter`.
        """
        routed = self._host_route(name)
        if routed is not None:
            path, bare, host = routed
            cfg = config_of(cfg)
            insertion = insertion or build_adapter(cfg).default_insertion
            self.get_adapter_specs().add(AdapterSpec(bare, path, cfg, insertion))  # unique
            shell, host_set = host._prepare_adapter(
                bare,
                cfg,
                rngs=rngs,
                insertion=insertion,
                in_features=in_features,
                dtype=dtype,
                sharding=(getattr(self, "_sharding_rule", None), path),
            )
            host._attach_adapter(shell, host_set, mode=_adapter_mode(self))
            return
        group, bare = split_qualified_name(name, self.adapter_module_names)
        if not self.adapter_group_modules(group):
            raise ValueError(
                f"adapter module {group!r} of this model has no host modules, so adapter "
                f"{bare!r} would be attached to nothing; make adapter_group_modules({group!r}) "
                "return the modules it adapts, or pick another module."
            )
        cfg = config_of(cfg)
        insertion = insertion or build_adapter(cfg).default_insertion
        spec = AdapterSpec(name=bare, group=group, cfg=cfg, insertion=insertion)
        self.get_adapter_specs().add(spec)  # unique across the model, host-level ones included
        new_set = self._model_adapter_set().add(spec)
        # Build every host's adapter first, attach only when all succeeded: a failure leaves
        # the model as it was.
        rule, paths = getattr(self, "_sharding_rule", None), self._host_paths()
        prepared = [
            (
                host,
                host._prepare_adapter(
                    bare,
                    cfg,
                    rngs=rngs,
                    insertion=insertion,
                    in_features=in_features,
                    dtype=dtype,
                    sharding=(rule, paths.get(id(host), "")),
                    rules=dict(getattr(self, "_adapter_rules", ())).get(group, ()),
                ),
            )
            for host in self.adapter_group_modules(group)
        ]
        mode = _adapter_mode(self)
        for host, (shell, host_set) in prepared:
            host._attach_adapter(shell, host_set, mode=mode)
        self._model_adapters_spec = new_set

    def _host_paths(self) -> dict[int, str]:
        return {id(host): path for path, host in self._adapter_hosts().items()}

    def with_sharding(self, rule: Any) -> AdapterModelMixin:
        """Makes adapter weights take their axis names from ``rule``; changes the model in
        place (as NNX does) and returns it.

        At a host whose kernel has ``out_sharding`` metadata, each adapter weight gets axis
        names derived from the kernel's (LoRA ``a``: the kernel's input axis and ``None``;
        ``b``: ``None`` and its output axis; IA3 and bottlenecks: the axis they sit on), as its
        ``out_sharding`` metadata. ``rule(host_path, adapter_name, param_path, derived)``
        returns the names to use instead (one per axis; ``derived`` to keep them), for the
        adapters already there and those added later through the model. A weight already on
        a mesh moves to its new sharding. Hosts with plain kernels are unaffected. ``None``
        removes the rule (back to the derived names). As ``AdaptedLinen.with_sharding``.
        """
        self._sharding_rule = rule
        for path, host in self._adapter_hosts().items():
            _rename_axes(host, path, rule)
        return self

    def remove_adapter(self, name: str) -> None:
        """Removes adapter ``name`` (or ``"module:name"``) and its weights from every host."""
        if ":" in name and self._host_route(name) is None:
            split_qualified_name(name, self.adapter_module_names)
        spec = self.get_adapter_specs()._require(name)
        if self._model_adapter_set().get(spec.name) is None:  # added on its module itself
            self._group_modules(spec.group)[0].remove_adapter(spec.name)
            return
        for host in self.adapter_group_modules(spec.group):
            host.remove_adapter(spec.name)
        self._model_adapters_spec = self._model_adapter_set().remove(spec.name)

    def is_adapter_available(self) -> bool:
        """True when any adapter exists in any module, enabled or not."""
        return len(self.get_adapter_specs()) > 0

    def set_enabled_adapters(self, name: str | None = None, enabled: bool = True) -> None:
        """Enables or disables one adapter (``name`` or ``"module:name"``) or all of them."""
        if name is not None and ":" in name and self._host_route(name) is None:
            split_qualified_name(name, self.adapter_module_names)
        specs = self.get_adapter_specs().set_enabled(name, enabled)
        model_names = set(self._model_adapter_set().names())
        new_set = AdapterSet(tuple(s for s in specs if s.name in model_names))
        for spec in specs:
            for host in self._group_modules(spec.group):
                host.set_enabled_adapters(spec.name, spec.enabled)
        self._model_adapters_spec = new_set

    def set_composition(self, group: str, block: Any) -> None:
        """Makes the adapters of ``group`` named by ``block`` (a :mod:`jadapters.composition`
        block; ``None``: the plain chain) run as it says, at every host of the group."""
        specs = self.get_adapter_specs().set_composition(group, block)
        for spec in specs:
            if spec.group == group:
                for host in self._group_modules(group):
                    host._set_adapter_set(
                        host._adapter_set().with_composition(spec.name, spec.composition)
                    )
        model_names = set(self._model_adapter_set().names())
        self._model_adapters_spec = AdapterSet(tuple(s for s in specs if s.name in model_names))

    def get_enabled_adapters(self) -> list[str]:
        """Names of the enabled adapters across all modules (those added on a module itself
        included), in the order they were added."""
        return self.get_adapter_specs().enabled_names()

    def adapter_view(self, variables: Any = None) -> NNXView:
        """The :class:`~jadapters.view.AdapterView` of this model (``variables`` must be
        ``None``: the model holds its own weights)."""
        return NNXView(self, variables)

    def get_adapter_specs(self) -> AdapterSet:
        """Every adapter's name, group, config, insertion and enabled state.

        Adapters added through the model come first, in the order they were added; then those
        added on a module inside the model itself (``model.encoder.add_adapter(...)``), whose
        group is that module's path (``"encoder"``, ``"blocks/0/mlp"``), so that the model's
        API addresses them as ``"encoder:name"``.

        An adapter added through the model is enabled when it is enabled at one of its hosts
        at least (NeMo's union over modules): its hosts are what runs, and a host's own
        ``set_enabled_adapters`` changes them one by one.

        Raises:
          ValueError: if an adapter added on a module has the name of another adapter of the
            model.
        """
        model_set = self._model_adapter_set()
        own, enabled = self._host_level_specs(model_set)
        specs = tuple(
            s if s.enabled == (s.name in enabled) else dataclasses.replace(s, enabled=not s.enabled)
            for s in model_set
        )
        return AdapterSet(specs + tuple(own))

    def get_adapter_cfg(self, name: str) -> Any:
        """The config of adapter ``name`` (or ``"group:name"``); ``None`` if there is none."""
        spec = self.get_adapter_specs().get(name)
        return None if spec is None else spec.cfg

    def get_adapter_modules(self, name: str) -> dict[tuple[Any, ...], NNXAdapter]:
        """``{host path: adapter}`` for every host that holds adapter ``name``."""
        out = {}
        for path, node in iter_graph(self):
            if isinstance(node, AdapterModuleMixin) and node.get_adapter_module(name) is not None:
                out[tuple(path)] = node.get_adapter_module(name)
        return out

    def unfreeze_enabled_adapters(self, freeze_batchnorm: bool = True) -> AdapterFilter:
        """The trainable filter over every enabled adapter in the model; see
        :meth:`AdapterModuleMixin.unfreeze_enabled_adapters`."""
        return AdapterModuleMixin.unfreeze_enabled_adapters(self, freeze_batchnorm)
