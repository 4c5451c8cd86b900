"""Jit-compiled training steps that differentiate with respect to the adapters only.

The base enters the step as a constant, so XLA never computes a base weight gradient, the
optimizer holds state for adapter leaves only, and the base cannot move: it is not an output.
PRNG keys for dropout and stochastic depth are explicit arguments, and auxiliary losses
(``ResidualAddStrategy(l2_lambda=...)``) are added to the loss.

Linen::

    step = jadapters.linen_train_step(adapted, loss_fn, optax.adam(1e-3))
    opt_state = step.init(adapter_params)
    adapter_params, opt_state, metrics = step(adapter_params, opt_state, base, batch, key)

NNX::

    optimizer = jadapters.adapter_optimizer(model, optax.adam(1e-3))
    step = jadapters.nnx_train_step(loss_fn)
    metrics = step(model, optimizer, batch)
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable, Sequence
from typing import Any

import flax.errors
import jax
import numpy as np
import optax
from flax import nnx

from jadapters._checks import show
from jadapters.compiled import DisabledWeights, SplitOnce
from jadapters.losses import AUX_LOSS_COLLECTION, AdapterLoss, total_auxiliary_loss
from jadapters.storage import ADAPTER_COLLECTION
from jadapters.view import TRAINABLE, view_of


def _split_loss(out: Any) -> tuple[jax.Array, dict]:
    if isinstance(out, tuple):
        loss, metrics = out
        return loss, dict(metrics)
    return out, {}


def _enabled_only(adapted: Any, adapters: Any) -> tuple[Any, Any]:
    """Splits the adapter tree into (enabled leaves, disabled leaves); ``None`` elsewhere."""
    view = view_of(adapted, {"params": {}, ADAPTER_COLLECTION: adapters})
    labels = view.labels()[ADAPTER_COLLECTION]
    trainable = jax.tree.map(lambda lab, x: x if lab == TRAINABLE else None, labels, adapters)
    frozen = jax.tree.map(lambda lab, x: None if lab == TRAINABLE else x, labels, adapters)
    return trainable, frozen


def _merge_enabled(trainable: Any, frozen: Any) -> Any:
    return jax.tree.map(
        lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None
    )


def _trainable_names(specs: Any, trainable: Any) -> tuple[str, ...] | None:
    """The bare names in ``trainable`` (``None``: every enabled adapter), each one of
    ``specs``'s enabled adapters; ``ValueError`` otherwise."""
    if trainable is None:
        return None
    names = [trainable] if isinstance(trainable, str) else trainable
    if (
        not isinstance(names, (list, tuple))
        or not names
        or not all(isinstance(n, str) for n in names)
    ):
        raise ValueError(
            "trainable must be None (every enabled adapter trains) or a non-empty list of "
            f"adapter names, got trainable={show(trainable)}."
        )
    out = []
    for name in names:
        spec = specs.get(name)
        if spec is None:
            raise ValueError(
                f"trainable names unknown adapter {name!r} in trainable={show(trainable)}; the "
                f"adapters are {[s.qualified_name for s in specs]}."
            )
        if not spec.enabled:
            raise ValueError(
                f"trainable names adapter {name!r}, which is disabled: a disabled adapter does "
                f"not run, so it cannot train. Enable it, or leave it out of "
                f"trainable={show(trainable)}."
            )
        out.append(spec.name)
    return tuple(dict.fromkeys(out))


def _linen_labeller(adapted: Any, names: tuple[str, ...] | None) -> Any:
    """``adapted`` with exactly ``names`` enabled (all as they are for ``None``): its view
    labels those adapters' weights trainable and every other weight frozen."""
    if names is None:
        return adapted
    labeller = adapted.set_enabled_adapters(None, False)
    for name in names:
        labeller = labeller.set_enabled_adapters(name, True)
    return labeller


def _nnx_specs(model: Any, trainable: Any) -> Any:
    """The adapters of an NNX model or of one module with adapters (``None`` when
    ``trainable`` is ``None``: nothing to check)."""
    if trainable is None:
        return None
    specs = getattr(model, "get_adapter_specs", None)
    return specs() if specs is not None else model._adapter_set()


def _only(wrt: Any, names: tuple[str, ...] | None) -> Any:
    """The adapter filter ``wrt`` restricted to the adapters ``names`` (all for ``None``)."""
    if names is None:
        return wrt
    return dataclasses.replace(
        wrt,
        prefixes=tuple(p for p in wrt.prefixes if p[-1] in names),
        leaves=tuple(leaf for leaf in wrt.leaves if leaf[0][-1] in names),
    )


@dataclasses.dataclass(frozen=True)
class LinenTrainStep:
    """A compiled adapter-only training step for an :class:`~jadapters.AdaptedLinen` model.

    Call it as ``step(adapter_params, opt_state, base_variables, batch, key)``; it returns
    ``(adapter_params, opt_state, metrics)`` with ``metrics["loss"]`` (the task loss plus
    auxiliary losses) and ``metrics["aux_loss"]``. ``adapter_params`` and ``opt_state`` are
    donated: do not reuse the arrays you passed in. Only the enabled adapters train; disabled
    ones pass through untouched.

    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn, jadapters
    >>> model = jadapters.adapter_transform(nn.Sequential([nn.Dense(2)]), "layers_0")
    >>> model = model.add_adapter("task", jadapters.IA3Config())
    >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> step = jadapters.linen_train_step(model, lambda apply, x: apply(x).sum(), optax.adam(0.1))
    >>> isinstance(step, LinenTrainStep)
    True
    >>> [x.shape for x in jax.tree.leaves(step.init(variables["adapters"]))]  # count, mu, nu
    [(), (2,), (2,)]
    """

    adapted: Any
    loss_fn: Callable[..., Any]
    tx: optax.GradientTransformation
    compiled: Callable[..., Any]
    # The adapters that train (their bare names); None: every enabled adapter.
    trainable: tuple[str, ...] | None = None
    # sets the disabled adapters' weights aside (which ones: read from the first tree given)
    _disabled: DisabledWeights | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "_disabled", DisabledWeights(self.adapted))

    def init(self, adapter_params: Any) -> Any:
        """Optimizer state for the trainable adapters' weights only."""
        labeller = _linen_labeller(self.adapted, self.trainable)
        trainable, _ = _enabled_only(labeller, self._park(adapter_params)[0])
        return self.tx.init(trainable)

    def _park(self, adapter_params: Any) -> tuple[Any, list]:
        return self._disabled.park(adapter_params)

    def __call__(self, adapter_params, opt_state, base_variables, batch, key):
        # A disabled adapter runs nowhere: its weights skip the compiled step (they are no
        # arguments, so their number costs nothing per call) and come back as they were.
        active, parked = self._park(adapter_params)
        active, opt_state, metrics = self.compiled(active, opt_state, base_variables, batch, key)
        return self._disabled.unpark(active, parked), opt_state, metrics


_FROZEN_BASE = (
    "linen_train_step keeps the base frozen, its batch statistics and other variables "
    "included, but the base tried to update one: {error} Run the base in evaluation mode "
    "through its own flag in loss_fn, e.g. apply(x, train=False), or deterministic=True for "
    "Hugging Face's Flax models; the adapters still train, since the step runs them in "
    "training mode (adapter_train=True) whatever the base's flags."
)


def linen_train_step(
    adapted: Any,
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    *,
    donate: bool = True,
    trainable: str | Sequence[str] | None = None,
) -> LinenTrainStep:
    """Builds a jit-compiled step that trains the enabled adapters of ``adapted``.

    Args:
      adapted: the adapted Linen model.
      loss_fn: ``loss_fn(apply, batch) -> loss`` or ``-> (loss, metrics)``, where
        ``apply(*args, **kwargs)`` runs the adapted model with the current adapter weights,
        adapters in training mode and PRNG keys bound. Keep the *base* in evaluation mode
        through its own flags (e.g. ``train=False``) so its batch statistics stay frozen.
      tx: the optax transformation for the adapters.
      donate: donate the adapter weights' and optimizer state's buffers.
      trainable: the names of the adapters that train, all enabled; ``None`` (the default):
        every enabled adapter. The other enabled adapters still run, frozen: no gradient is
        taken for them and the optimizer holds no state for them. Train a
        :class:`~jadapters.Fuse` block's fusion alone with ``trainable=["<fusion>"]``.

    Returns:
      A :class:`LinenTrainStep`.

    Raises:
      ValueError: for a ``trainable`` name that is unknown or names a disabled adapter; when
        the step runs, for a base that tries to update one of its variables (BatchNorm in
        training mode), naming the fix.

    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn, jadapters
    >>> model = jadapters.adapter_transform(nn.Sequential([nn.Dense(2)]), "layers_0")
    >>> model = model.add_adapter("task", jadapters.IA3Config())
    >>> x, y = jnp.ones((4, 3)), jnp.zeros((4, 2))
    >>> variables = model.init(jax.random.key(0), x)
    >>> def loss_fn(apply, batch):
    ...     return jnp.mean((apply(batch[0]) - batch[1]) ** 2)
    >>> step = linen_train_step(model, loss_fn, optax.sgd(0.1))
    >>> base = {"params": variables["params"]}  # never changes
    >>> adapters, opt_state = variables["adapters"], step.init(variables["adapters"])
    >>> losses, key = [], jax.random.key(1)
    >>> for _ in range(3):
    ...     adapters, opt_state, metrics = step(adapters, opt_state, base, (x, y), key)
    ...     losses.append(float(metrics["loss"]))
    >>> losses[0] > losses[1] > losses[2], float(metrics["aux_loss"])
    (True, 0.0)
    """

    names = _trainable_names(adapted.adapters, trainable)
    labeller = _linen_labeller(adapted, names)

    def step(adapter_params, opt_state, base_variables, batch, key):
        trainable, frozen = _enabled_only(labeller, adapter_params)

        def objective(trainable):
            variables = {
                **base_variables,
                ADAPTER_COLLECTION: _merge_enabled(trainable, frozen),
            }
            aux_losses = []

            def apply(*args, **kwargs):
                try:
                    out, state = adapted.apply(
                        variables,
                        *args,
                        adapter_train=True,
                        rngs={"dropout": key},
                        mutable=[AUX_LOSS_COLLECTION],
                        **kwargs,
                    )
                except flax.errors.ModifyScopeVariableError as e:
                    raise ValueError(_FROZEN_BASE.format(error=e)) from e
                aux_losses.append(state.get(AUX_LOSS_COLLECTION, {}))
                return out

            loss, metrics = _split_loss(loss_fn(apply, batch))
            aux = total_auxiliary_loss(aux_losses)
            return loss + aux, {**metrics, "task_loss": loss, "aux_loss": aux}

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return _merge_enabled(trainable, frozen), opt_state, {**metrics, "loss": loss}

    compiled = jax.jit(step, donate_argnums=(0, 1) if donate else ())
    return LinenTrainStep(adapted, loss_fn, tx, compiled, names)


class _SameCode:
    """A function compared by what it computes: its code, defaults and captured values.

    ``optax.adam(1e-3)`` builds new closures each time, so two equal transformations compare
    unequal and every ``nnx.Optimizer`` holding one (a static part of the NNX graph) forces a
    new trace. Wrapped in this, equal transformations compare equal and share the compiled step.
    """

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _SameCode) and _same(self.fn, other.fn, 0)

    def __hash__(self) -> int:
        return hash(getattr(self.fn, "__code__", None))


def _same(a: Any, b: Any, depth: int) -> bool:
    if a is b:
        return True
    if depth > 32 or type(a) is not type(b):
        return False
    if isinstance(a, _SameCode):
        return _same(a.fn, b.fn, depth + 1)
    if isinstance(a, types.FunctionType):
        cells = (
            [c.cell_contents for c in a.__closure__ or ()],
            [c.cell_contents for c in b.__closure__ or ()],
        )
        return (
            a.__code__ is b.__code__
            and _same(a.__defaults__, b.__defaults__, depth + 1)
            and _same(a.__kwdefaults__, b.__kwdefaults__, depth + 1)
            and _same(*cells, depth + 1)
        )
    if isinstance(a, functools.partial):
        return _same((a.func, a.args, a.keywords), (b.func, b.args, b.keywords), depth + 1)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y, depth + 1) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], depth + 1) for k in a)
    if isinstance(a, (bool, int, float, complex, str, bytes, type(None))):
        return a == b
    if isinstance(a, (np.ndarray, jax.Array)):
        return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b))
    return False  # anything else (objects with state): only identical counts as equal


def _keyed(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    return tx._replace(init=_SameCode(tx.init), update=_SameCode(tx.update))


def adapter_optimizer(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    *,
    trainable: str | Sequence[str] | None = None,
) -> nnx.Optimizer:
    """An ``nnx.Optimizer`` over exactly the enabled adapters of an NNX model.

    ``trainable`` names the adapters that train, all enabled (``None``: every enabled
    adapter); pass the same names to :func:`nnx_train_step`, whose step then differentiates
    with respect to those alone while the other enabled adapters run frozen (e.g. a
    :class:`~jadapters.Fuse` block's fusion alone: ``trainable=["<fusion>"]``).

    Optimizer state exists for those weights only, so the optimizer belongs to those
    adapters: when other adapters are enabled (enabled, disabled, added or removed), build a
    new one; :func:`nnx_train_step` refuses a stale one. It also freezes the base's BatchNorm
    statistics (see :func:`jadapters.freeze_batchnorm`). Two optimizers built from equal
    transformations (``optax.adam(1e-3)`` twice) share one compiled
    :func:`nnx_train_step`: the transformation is compared by its code and hyperparameters,
    not by identity.

    >>> import jax, optax, jadapters
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    >>> model = jadapters.adapter_transform(model, "layers/0")
    >>> model.add_adapter("task", jadapters.IA3Config(), rngs=nnx.Rngs(1))
    >>> optimizer = adapter_optimizer(model, optax.adam(1e-3))
    >>> [x.shape for x in jax.tree.leaves(nnx.state(optimizer.opt_state))]  # none for the base
    [(), (2,), (2,)]
    """
    names = _trainable_names(_nnx_specs(model, trainable), trainable)
    return nnx.Optimizer(model, _keyed(tx), wrt=_only(model.unfreeze_enabled_adapters(), names))


class NNXTrainStep:
    """A compiled adapter-only training step for an adapted NNX model; see
    :func:`nnx_train_step`.

    ``step(model, optimizer, batch) -> metrics`` updates ``model`` and ``optimizer`` in
    place. The first call for a (model, optimizer) pair splits their graphs once into the
    frozen base (``nnx.Param``), the disabled adapters' weights, the rest of the model
    (enabled adapters' weights, RNG counters, statistics) and the optimizer's state, and
    keeps the live variables of each part. Every call then reads their arrays, runs one
    ``jax.jit``-compiled pure function and writes back the optimizer's state and what
    changed in the model's rest (the trained weights, RNG counters that advanced). The base
    is an input only, never an output: the compiled step neither copies it nor holds a
    second one in memory. Disabled adapters are not even inputs (they run nowhere), so the
    per-call cost does not grow with the adapters added and left disabled, nor with the
    graph's Python objects. The split is redone when the adapters change (add, remove,
    enable, disable) or a mode flag changes (``model.train()``/``eval()``, BatchNorm's
    ``use_running_average``). After any other change to what the step computes (replacing a
    submodule, setting a Python attribute a module branches on), call :meth:`reset`. (The
    machinery is :class:`jadapters.compiled.SplitOnce`, which :func:`jadapters.nnx_forward`
    shares.)

    The optimizer must be one built for exactly the enabled adapters (same names, same weight
    shapes): its state belongs to them. Otherwise the step raises ``ValueError`` before
    anything runs, and the model and optimizer are unchanged.
    """

    def __init__(
        self,
        loss_fn: Callable[..., Any],
        *,
        donate: bool = True,
        trainable: str | Sequence[str] | None = None,
    ):
        self.loss_fn = loss_fn
        self.trainable = trainable
        self.donate = donate
        self._split = SplitOnce(
            self._step,
            what="training step",
            donate_others=donate,
            validate=lambda model, others: _check_optimizer(model, *others, self._names(model)),
        )

    def _step(self, model: Any, others: tuple, batch: Any, static: tuple) -> dict:
        """The step on live objects (traced inside the pure function)."""
        del static
        (optimizer,) = others
        enabled = model.unfreeze_enabled_adapters(freeze_batchnorm=False)
        trainable = _only(enabled, self._names(model))

        def objective(model):
            loss, metrics = _split_loss(self.loss_fn(model, batch))
            aux = total_auxiliary_loss(nnx.pop(model, AdapterLoss))
            return loss + aux, {**metrics, "task_loss": loss, "aux_loss": aux}

        grad_fn = nnx.value_and_grad(objective, argnums=nnx.DiffState(0, trainable), has_aux=True)
        (loss, metrics), grads = grad_fn(model)
        optimizer.update(model, grads)
        return {**metrics, "loss": loss}

    def _names(self, model: Any) -> tuple[str, ...] | None:
        """The bare names of the adapters that train (``None``: every enabled one)."""
        return _trainable_names(_nnx_specs(model, self.trainable), self.trainable)

    def __call__(self, model: Any, optimizer: nnx.Optimizer, batch: Any) -> dict:
        return self._split(model, (optimizer,), batch)

    def reset(self) -> None:
        """Forgets the cached split, so the next call reads the model's graph afresh."""
        self._split.reset()

    def lower(self, model: Any, optimizer: nnx.Optimizer, batch: Any) -> Any:
        """``jax.stages.Lowered`` of the step, for inspecting or timing compilation."""
        return self._split.lower(model, (optimizer,), batch)


def _selected(model: Any, wrt: Any) -> dict:
    flat = nnx.to_flat_state(nnx.state(model, wrt))
    return {tuple(path): (np.shape(v.get_value()), str(v.get_value().dtype)) for path, v in flat}


def _check_optimizer(model: Any, optimizer: Any, names: tuple[str, ...] | None = None) -> None:
    """Raises ``ValueError`` unless ``optimizer`` holds state for exactly the enabled adapters
    of ``model`` (those of ``names`` only, if given; checked before anything is traced or
    changed)."""
    now = _only(model.unfreeze_enabled_adapters(freeze_batchnorm=False), names)
    what = "enabled adapters" if names is None else "adapters this step trains (its trainable=)"
    built = getattr(optimizer, "wrt", None)
    if type(built) is type(now):  # an adapter filter: it records its adapters' weights
        if built == now:
            return
        if set(built.names) == set(now.names):
            problem = (
                f"the optimizer was built for adapters {built.names}, which are enabled, but "
                "their weights changed shape or dtype since (an adapter was removed and added "
                "again)"
            )
        else:
            problem = (
                f"the optimizer was built for adapters {built.names}, but the {what} are "
                f"now {now.names}"
            )
    else:  # a filter of the user's own: compare what it selects now
        have, want = _selected(model, built), _selected(model, now)
        if have == want:
            return
        problem = (
            f"the optimizer's wrt={built!r} selects {len(have)} arrays, which are not the "
            f"{len(want)} weights of the {what} {now.names}"
        )
    fix = "tx) for the adapters enabled now"
    if names is not None:
        fix = f"tx, trainable={list(names)}) for the adapters that train now"
    raise ValueError(
        f"{problem}. An optimizer's state belongs to the adapters it was built for: rebuild "
        f"it with jadapters.adapter_optimizer(model, {fix}."
    )


def nnx_train_step(
    loss_fn: Callable[..., Any],
    *,
    donate: bool = True,
    trainable: str | Sequence[str] | None = None,
) -> NNXTrainStep:
    """Builds a compiled step ``step(model, optimizer, batch) -> metrics`` for NNX.

    ``loss_fn(model, batch)`` returns a loss or ``(loss, metrics)``. The gradient is taken
    with respect to the enabled adapters only, or to those of them named by ``trainable``
    (the others run frozen; build the optimizer with the same ``trainable``); auxiliary
    losses recorded by the adapters are popped and added to the loss. Dropout and
    stochastic-depth keys come from each adapter's ``dropout`` stream (pass
    ``rngs=nnx.Rngs(params=..., dropout=...)`` to ``add_adapter``).
    The model's graph is split once and reused across calls (see :class:`NNXTrainStep`).

    >>> import jax.numpy as jnp, optax, jadapters
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    >>> model = jadapters.adapter_transform(model, "layers/0")
    >>> model.add_adapter("task", jadapters.IA3Config(), rngs=nnx.Rngs(1))
    >>> optimizer = jadapters.adapter_optimizer(model, optax.sgd(0.1))
    >>> x, y = jnp.ones((4, 3)), jnp.zeros((4, 2))
    >>> step = nnx_train_step(lambda m, batch: jnp.mean((m(batch[0]) - batch[1]) ** 2))
    >>> kernel = model.layers[0].kernel[...]
    >>> losses = [float(step(model, optimizer, (x, y))["loss"]) for _ in range(3)]
    >>> losses[0] > losses[1] > losses[2], bool((model.layers[0].kernel[...] == kernel).all())
    (True, True)
    """
    return NNXTrainStep(loss_fn, donate=donate, trainable=trainable)
