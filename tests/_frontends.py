"""One test interface over both front-ends, for the shared suite (``tests/test_frontends.py``).

Each front-end is a :class:`Frontend` that builds the same small models (:meth:`Frontend.base`
wraps an unadapted one as a :class:`Base`, the reference) and adapts them
(:meth:`Frontend.adapt`, an :class:`Adapted` handle). The handles hide only *where* things
live, never *what* is computed:

* Linen: the model is immutable and the weights are ``variables``; adding an adapter to an
  initialized model goes through ``init_adapters``, enabling returns a new module.
* NNX: the model changes in place and holds its weights; adapters get ``rngs=`` and the
  adapter partition is ``nnx.state(model, jadapters.AdapterParam)``.

Weights are read from and written to each front-end's own structures (the ``"adapters"``
collection; the ``adapter_layer`` shells), not through the library's view, so the shared tests
also check the view against them. Every tree a handle returns is a plain nested dict; paths are
``/``-joined, and NNX list indices are written as digits (``blocks/0/mlp``).

Paths and patterns are written once for both front-ends with ``#`` where Linen writes ``_``
and NNX ``/`` between a list's name and its index: ``fe.path(r"blocks#\\d+/mlp")``.
"""

from __future__ import annotations

import collections
import copy
from collections.abc import Callable, Mapping
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jadapters
from jadapters.demo.models import (
    LinenConvNet,
    LinenTransformer,
    NNXConvNet,
    NNXLayerStack,
    NNXTransformer,
)
from jadapters.losses import AUX_LOSS_COLLECTION, AdapterLoss
from jadapters.storage import ADAPTER_COLLECTION
from jadapters.view import view_of

TRANSFORMER = dict(num_classes=10, d_model=16, num_layers=2, num_heads=2, mlp_dim=32, max_len=8)

# --- plain nested dicts -----------------------------------------------------------------------


def assert_trees_equal(a: Any, b: Any) -> None:
    """Same structure and exactly equal leaves (``chex.assert_trees_all_equal``)."""
    chex.assert_trees_all_equal(a, b)


def merge_noise(tree: Any, seed: int = 1) -> Any:
    """LoRA factors as noise; IA3 scales as ``1 + noise`` (so far from 0)."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        noise = 0.3 * rng.standard_normal(np.shape(x))
        if getattr(path[-1], "key", None) == "scale":
            noise = 1.0 + noise
        return jnp.asarray(noise, jnp.result_type(x))

    return jax.tree_util.tree_map_with_path(leaf, tree)


def f64(tree: Any) -> Any:
    """Every leaf as a float64 NumPy array: the formulas below compute in float64."""
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def np_adapter(params: Any, z: Any, eps: float = 1e-5) -> np.ndarray:
    """The LinearAdapter's raw output (norm 'pre', swish): LN(z) @ down -> swish -> @ up, with
    the LayerNorm's epsilon ``eps`` (the adapter's ``norm_epsilon``, ``1e-5`` by default)."""
    p, z = f64(params), np.asarray(z, np.float64)
    mean = z.mean(-1, keepdims=True)
    var = ((z - mean) ** 2).mean(-1, keepdims=True)
    h = (z - mean) / np.sqrt(var + eps) * p["norm"]["scale"] + p["norm"]["bias"]
    h = h @ p["down"]["kernel"]
    h = h / (1.0 + np.exp(-h))
    return h @ p["up"]["kernel"]


def np_dense(params: Any, z: Any) -> np.ndarray:
    """A Dense layer's output in float64."""
    p = f64(params)
    return np.asarray(z, np.float64) @ p["kernel"] + p["bias"]


def _key(node: Mapping, part: str) -> Any:
    if part in node:
        return part
    if part.isdigit() and int(part) in node:
        return int(part)
    raise KeyError(f"{part!r} not in {sorted(map(str, node))}")


def get_at(tree: Mapping, path: str) -> Any:
    """The subtree of ``tree`` at ``/``-joined ``path`` (digits also find int keys)."""
    node = tree
    for part in path.split("/") if path else ():
        node = node[_key(node, part)]
    return node


def set_at(tree: Mapping, path: str, value: Any) -> dict:
    """A copy of ``tree`` with ``value`` at ``path``; only the dicts on the path are copied."""
    parts = path.split("/")

    def go(node: Mapping, i: int) -> dict:
        out = dict(node)
        key = _key(node, parts[i])
        out[key] = value if i == len(parts) - 1 else go(node[key], i + 1)
        return out

    return go(tree, 0)


def _part(key: Any) -> str:
    return str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key))))


def flat(tree: Any) -> dict[str, Any]:
    """``{"a/b/c": leaf}`` of any pytree."""
    return {
        "/".join(_part(k) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def host_copy(tree: Any) -> Any:
    """NumPy copies of every leaf (safe from donation and in-place updates)."""
    return jax.tree.map(np.array, tree)


def noise_like(tree: Any, seed: int = 1, scale: float = 0.5) -> Any:
    """Every leaf replaced by NumPy noise of its shape and dtype (nothing to compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: jnp.asarray(scale * rng.standard_normal(np.shape(a)), jnp.result_type(a)), tree
    )


def primitive_counts(fn: Callable[..., Any], *args: Any) -> collections.Counter:
    """How often each primitive occurs in ``fn``'s jaxpr, nested jaxprs included."""
    counts: collections.Counter = collections.Counter()

    def walk(jaxpr: Any) -> None:
        for eqn in jaxpr.eqns:
            counts[eqn.primitive.name] += 1
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else [param]:
                    if hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        walk(sub.jaxpr)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return counts


# --- small models, hand-written in both front-ends ---------------------------------------------


class LinenCalledThrice(nn.Module):
    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(4, name="dense")
        for _ in range(3):
            x = dense(x)
        return nn.Dense(3, name="out")(x)


class NNXCalledThrice(nnx.Module):
    def __init__(self):
        self.dense = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
        self.out = nnx.Linear(4, 3, rngs=nnx.Rngs(1))

    def __call__(self, x):
        for _ in range(3):
            x = self.dense(x)
        return self.out(x)


class LinenHost(nn.Module):
    def setup(self):
        self.dense = nn.Dense(4)

    def __call__(self, x):
        return self.dense(x)

    def encode(self, x):
        return 2.0 * self.dense(x)


class LinenOuter(nn.Module):
    def setup(self):
        self.host = LinenHost()

    def __call__(self, x):
        return self.host(x)

    def encode(self, x):
        return self.host.encode(x)


class NNXHost(nnx.Module):
    def __init__(self):
        self.dense = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
        self.out_features = 4

    def __call__(self, x):
        return self.dense(x)

    def encode(self, x):
        return 2.0 * self.dense(x)


class NNXOuter(nnx.Module):
    def __init__(self):
        self.host = NNXHost()

    def __call__(self, x):
        return self.host(x)

    def encode(self, x):
        return self.host.encode(x)


class LinenScanLayer(nn.Module):
    """One layer of the stacks below: ``(x, carry) -> (mlp(x), None)``."""

    @nn.compact
    def __call__(self, x, _=None):
        return nn.Dense(4, name="mlp")(x), None


class LinenScanStack(nn.Module):
    """Three layers run with ``nn.scan``; the host's real path is ``layers/mlp``."""

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            LinenScanLayer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )
        return stack(name="layers")(x, None)[0]


class NNXScanBlock(nnx.Module):
    """One block of :class:`NNXScanStack`; its host is ``mlp``."""

    def __init__(self, rngs):
        self.mlp = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        return self.mlp(x)


class NNXScanStack(NNXLayerStack):
    """Three blocks created with ``nnx.vmap`` and run with ``nnx.scan`` (Flax's recipe)."""

    def __init__(self):
        super().__init__(NNXScanBlock, 3)


# --- the reference: an unadapted model ----------------------------------------------------------


class Base:
    """An unadapted model and its parameters."""

    def __init__(self, fe: Frontend, module: Any, variables: Any = None):
        self.fe, self.module, self.variables = fe, module, variables
        self._jit = None

    def __call__(self, x, method: str | None = None):
        if self.fe.name == "linen":
            return self.module.apply(self.variables, x, **({"method": method} if method else {}))
        return (getattr(self.module, method) if method else self.module)(x)

    def params(self) -> dict:
        if self.fe.name == "linen":
            return self.variables["params"]
        return nnx.to_pure_dict(nnx.state(self.module, nnx.Param))

    def run_with(self, params: Mapping, x):
        """The unwrapped model's output with its parameters replaced by ``params``."""
        if self.fe.name == "linen":
            return self.module.apply({**self.variables, "params": params}, x)
        module = nnx.clone(self.module)
        nnx.update(module, params)
        return module(x)

    def collection(self, name: str) -> dict:
        if self.fe.name == "linen":
            return self.variables[name]
        kind = {"params": nnx.Param, "batch_stats": nnx.BatchStat}[name]
        return nnx.to_pure_dict(nnx.state(self.module, kind))

    def jit(self, x):
        if self._jit is None:
            if self.fe.name == "linen":
                self._jit = jax.jit(self.module.apply)
            else:
                self._jit = nnx.jit(lambda m, x: m(x))
        return self._jit(self.variables if self.fe.name == "linen" else self.module, x)

    def counts(self, x) -> collections.Counter:
        if self.fe.name == "linen":
            return primitive_counts(self.module.apply, self.variables, x)
        graphdef, state = nnx.split(self.module)
        return primitive_counts(lambda s, x: nnx.merge(graphdef, s)(x), state, x)


# --- the adapted model ---------------------------------------------------------------------------


class Adapted:
    """An adapted model with the same verbs in both front-ends. Mutating verbs change this
    handle (NNX: its model in place); take a :meth:`copy` of a shared one first."""

    base: Base
    model: Any

    def copy(self) -> Adapted:
        """An independent handle (NNX: a clone of the model)."""

    # forward
    def __call__(self, x, method: str | None = None): ...
    def jit(self, x): ...
    def compiled(self, x, **kwargs):
        """The library's compiled forward (``linen_forward`` / ``nnx_forward``) on ``x``."""

    def compiled_inputs(self, x) -> int:
        """How many arrays the compiled forward takes (its lowered arguments)."""

    def forward_with_losses(self, x, *, train: bool, key=None) -> tuple[Any, dict[str, Any]]:
        """``(output, {"<host>/<name>": auxiliary loss})``, adapters in training or not."""

    # adapters
    def add(self, name: str, cfg: Any, insertion: str | None = None) -> None: ...
    def set_enabled(self, name: str | None = None, enabled: bool = True) -> None: ...
    def adapters(self) -> dict:
        """The adapter partition, in the front-end's own nesting."""

    def set_adapters(self, tree: Any) -> None: ...
    def params_at(self, host: str, name: str) -> dict: ...
    def set_params_at(self, host: str, name: str, params: Any) -> None: ...
    def sites(self) -> set[tuple[str, str]]:
        """``{(host path, adapter name)}`` of every adapter weight."""

    def owners(self) -> dict[str, str | None]:
        """``{flat path: adapter name or None}`` over the tree that ``trainable_mask`` covers."""

    # base
    def base_params(self) -> dict: ...
    def collection(self, name: str) -> dict: ...
    def set_base(self, params: Any) -> None: ...

    # library calls that differ only in their arguments
    def view(self) -> Any: ...
    def summary(self) -> jadapters.AdapterSummary: ...
    def mask(self) -> Any: ...
    def labels(self) -> Any: ...
    def merge(self, **kwargs) -> dict: ...
    def counts(self, x) -> collections.Counter: ...
    def train(self, loss_fn, tx, batches) -> list[dict]:
        """Runs the front-end's compiled training step on each batch (``batch[0]`` is the
        input, ``loss_fn(output, batch)`` the loss); returns the metrics as floats."""

    def specs(self) -> jadapters.AdapterSet:
        """Every adapter's spec, as the model itself holds them."""

    # shared
    def enabled(self) -> list[str]:
        return self.model.get_enabled_adapters()

    def randomize(self, seed: int = 1, scale: float = 0.5) -> Adapted:
        """Gives every adapter weight NumPy noise; returns ``self``."""
        self.set_adapters(noise_like(self.adapters(), seed=seed, scale=scale))
        return self


class LinenAdapted(Adapted):
    def __init__(self, base: Base, model: Any, variables: dict, init_call: tuple):
        self.base, self.model, self.variables = base, model, variables
        self._init_call = init_call  # (args, kwargs) of ``init`` without the key
        self._jit: tuple | None = None
        self._compiled: Any = None

    def __call__(self, x, method=None):
        if method is not None:
            return self.model.apply(self.variables, method, x, method="call")
        return self.model.apply(self.variables, x)

    def jit(self, x):
        if self._jit is None or self._jit[0] is not self.model:
            self._jit = (self.model, jax.jit(self.model.apply))
        return self._jit[1](self.variables, x)

    def _forward(self):
        if self._compiled is None or self._compiled.adapted is not self.model:
            self._compiled = jadapters.linen_forward(self.model)
        return self._compiled

    def compiled(self, x, **kwargs):
        return self._forward()(self.variables, x, **kwargs)

    def compiled_inputs(self, x):
        return len(jax.tree.leaves(self._forward().lower(self.variables, x).args_info))

    def forward_with_losses(self, x, *, train: bool, key=None):
        out, state = self.model.apply(
            self.variables,
            x,
            adapter_train=train,
            rngs={"dropout": key} if key is not None else {},
            mutable=[AUX_LOSS_COLLECTION],
        )
        return out, flat(state.get(AUX_LOSS_COLLECTION, {}))

    def copy(self) -> LinenAdapted:
        new = copy.copy(self)
        new._jit = new._compiled = None
        return new

    def add(self, name, cfg, insertion=None):
        model = self.model.add_adapter(name, cfg, insertion=insertion)
        args, kwargs = self._init_call
        key = jax.random.key(len(model.adapters))
        self.variables = model.init_adapters(key, self.variables, *args, **kwargs)
        self.model = model  # only once the weights exist

    def set_enabled(self, name=None, enabled=True):
        self.model = self.model.set_enabled_adapters(name, enabled)

    def specs(self):
        return self.model.adapters

    def adapters(self):
        return self.variables.get(ADAPTER_COLLECTION, {})

    def set_adapters(self, tree):
        self.variables = {**self.variables, ADAPTER_COLLECTION: tree}

    def params_at(self, host, name):
        return get_at(self.adapters(), host)[name]

    def set_params_at(self, host, name, params):
        self.set_adapters(set_at(self.adapters(), f"{host}/{name}", params))

    def _site(self, keys) -> bool:
        """Whether ``keys`` (host path + name) in the ``"adapters"`` collection is an adapter's
        weights: its last key names an adapter, and no module with parameters sits there
        (an adapter may be named like a module on its host's path)."""
        if keys[-1] not in self.model.adapters.names():
            return False
        node = self.variables["params"]
        for key in keys:
            node = node.get(key) if isinstance(node, Mapping) else None
        return not isinstance(node, Mapping)

    def sites(self):
        found = set()

        def walk(node, prefix):
            for key, value in node.items():
                if self._site((*prefix, key)):
                    found.add(("/".join(prefix), key))
                elif isinstance(value, Mapping):
                    walk(value, (*prefix, key))

        walk(self.adapters(), ())
        return found

    def owners(self):
        out = {}
        for path in flat(self.variables):
            parts = path.split("/")
            ends = range(2, len(parts)) if parts[0] == ADAPTER_COLLECTION else ()
            owner = next((parts[i - 1] for i in ends if self._site(parts[1:i])), None)
            out[path] = owner
        return out

    def base_params(self):
        return self.variables["params"]

    def collection(self, name):
        return self.variables[name]

    def set_base(self, params):
        self.variables = {**self.variables, "params": params}

    def view(self):
        return view_of(self.model, self.variables)

    def summary(self):
        return jadapters.summarize(self.model, self.variables)

    def mask(self):
        return jadapters.trainable_mask(self.model, self.variables)

    def labels(self):
        return jadapters.param_labels(self.model, self.variables)

    def merge(self, **kwargs):
        return jadapters.merge_adapters(self.model, self.variables, **kwargs)

    def counts(self, x):
        return primitive_counts(self.model.apply, self.variables, x)

    def train(self, loss_fn, tx, batches):
        step = jadapters.linen_train_step(
            self.model, lambda apply, batch: loss_fn(apply(batch[0]), batch), tx
        )
        base, adapters = jadapters.split_variables(self.variables)
        adapters = jax.tree.map(jnp.array, adapters)  # a copy: the step donates its input
        opt_state = step.init(adapters)
        metrics = []
        for i, batch in enumerate(batches):
            adapters, opt_state, m = step(adapters, opt_state, base, batch, jax.random.key(i))
            metrics.append({k: float(v) for k, v in m.items()})
        self.set_adapters(adapters)
        return metrics


_NNX_FORWARD = nnx.jit(lambda model, x: model(x))
_NNX_COMPILED = jadapters.nnx_forward()  # one for every model: it follows each one's graph


class NNXAdapted(Adapted):
    def __init__(self, base: Base, model: Any):
        self.base, self.model = base, model

    def __call__(self, x, method=None):
        return (getattr(self.model, method) if method else self.model)(x)

    def jit(self, x):
        return _NNX_FORWARD(self.model, x)

    def compiled(self, x, **kwargs):
        return _NNX_COMPILED(self.model, x, **kwargs)

    def compiled_inputs(self, x):
        return len(jax.tree.leaves(_NNX_COMPILED.lower(self.model, x).args_info))

    def forward_with_losses(self, x, *, train: bool, key=None):
        del key  # NNX adapters draw keys from their own streams
        if train:
            self.model.train()
        try:
            out = self.model(x)
            losses = nnx.to_pure_dict(nnx.pop(self.model, AdapterLoss))
        finally:
            self.model.eval()
        return out, {
            path.replace("/adapter_layer/", "/").removesuffix("/aux_loss"): loss
            for path, loss in flat(losses).items()
        }

    def copy(self) -> NNXAdapted:
        new = copy.copy(self)
        new.model = nnx.clone(self.model)
        return new

    def add(self, name, cfg, insertion=None):
        seed = len(self.model.get_adapter_specs()) + 1
        self.model.add_adapter(name, cfg, rngs=nnx.Rngs(seed, dropout=seed), insertion=insertion)
        self.model.eval()

    def set_enabled(self, name=None, enabled=True):
        self.model.set_enabled_adapters(name, enabled)

    def specs(self):
        return self.model.get_adapter_specs()

    def adapters(self):
        return nnx.to_pure_dict(nnx.state(self.model, jadapters.AdapterParam))

    def set_adapters(self, tree):
        nnx.update(self.model, tree)

    def params_at(self, host, name):
        return get_at(self.adapters(), f"{host}/adapter_layer/{name}/params")

    def set_params_at(self, host, name, params):
        self.set_adapters(set_at(self.adapters(), f"{host}/adapter_layer/{name}/params", params))

    def sites(self):
        found = set()
        for path in flat(self.adapters()):
            host, _, rest = path.partition("/adapter_layer/")
            found.add((host, rest.split("/")[0]))
        return found

    def owners(self):
        state = nnx.state(self.model, nnx.Any(nnx.Param, jadapters.AdapterParam))
        out = {}
        for path in flat(nnx.to_pure_dict(state)):
            _, marker, rest = path.partition("/adapter_layer/")
            out[path] = rest.split("/")[0] if marker else None
        return out

    def base_params(self):
        return nnx.to_pure_dict(nnx.state(self.model, nnx.Param))

    def collection(self, name):
        kind = {"params": nnx.Param, "batch_stats": nnx.BatchStat}[name]
        return nnx.to_pure_dict(nnx.state(self.model, kind))

    def set_base(self, params):
        nnx.update(self.model, params)

    def view(self):
        return view_of(self.model)

    def summary(self):
        return jadapters.summarize(self.model)

    def mask(self):
        return jadapters.trainable_mask(self.model)

    def labels(self):
        return jadapters.param_labels(self.model)

    def merge(self, **kwargs):
        return nnx.to_pure_dict(jadapters.merge_adapters(self.model, **kwargs))

    def counts(self, x):
        graphdef, state = nnx.split(self.model)
        return primitive_counts(lambda s, x: nnx.merge(graphdef, s)(x), state, x)

    def train(self, loss_fn, tx, batches):
        optimizer = jadapters.adapter_optimizer(self.model, tx)
        step = jadapters.nnx_train_step(lambda model, batch: loss_fn(model(batch[0]), batch))
        self.model.train()
        try:
            metrics = [step(self.model, optimizer, batch) for batch in batches]
        finally:
            self.model.eval()
        return [{k: float(v) for k, v in m.items()} for m in metrics]


# --- the front-ends ------------------------------------------------------------------------------


class Frontend:
    """Builds models and adapts them in one front-end."""

    name: str
    index_sep: str

    def __repr__(self) -> str:
        return self.name

    def pick(self, *, linen: Any, nnx: Any) -> Any:
        """``linen`` or ``nnx``; called first if callable (so only one front-end's model is
        built)."""
        value = linen if self.name == "linen" else nnx
        return value() if callable(value) else value

    def path(self, spec: Any) -> Any:
        """``spec`` (a path or pattern, or a list or dict of them) in this front-end's
        spelling: ``#`` between a list's name and its index becomes ``_`` or ``/``."""
        if isinstance(spec, str):
            return spec.replace("#", self.index_sep)
        if isinstance(spec, Mapping):
            return {k: self.path(v) for k, v in spec.items()}
        return [self.path(s) for s in spec]

    # models

    def transformer(self, seed: int = 0, **overrides: Any) -> Any:
        kwargs = {**TRANSFORMER, **overrides}
        return self.pick(
            linen=lambda: LinenTransformer(**kwargs),
            nnx=lambda: NNXTransformer(8, **kwargs, rngs=nnx.Rngs(seed)),
        )

    def conv_net(self) -> Any:
        def make_nnx():
            model = NNXConvNet(1, num_classes=10, features=4, rngs=nnx.Rngs(0))
            model.eval()  # batch norm on its running statistics, as Linen's default
            return model

        return self.pick(linen=lambda: LinenConvNet(num_classes=10, features=4), nnx=make_nnx)

    def sequential(self, *hosts: Callable[[nnx.Rngs], Any]) -> Any:
        """A Sequential of ``host(rngs)`` (Linen hosts ignore ``rngs``); paths ``layers#i``."""
        if self.name == "linen":
            return nn.Sequential([make(None) for make in hosts])
        return nnx.Sequential(*[make(nnx.Rngs(i)) for i, make in enumerate(hosts)])

    def dense(self, features_in: int, features_out: int, **kwargs: Any) -> Callable:
        """A host factory for :meth:`sequential`: ``Dense`` / ``Linear``."""
        if self.name == "linen":
            return lambda rngs: nn.Dense(features_out, **kwargs)
        return lambda rngs: nnx.Linear(features_in, features_out, rngs=rngs, **kwargs)

    def called_thrice(self) -> Any:
        return self.pick(linen=LinenCalledThrice, nnx=NNXCalledThrice)

    def outer(self) -> Any:
        return self.pick(linen=LinenOuter, nnx=NNXOuter)

    def scan_stack(self) -> Any:
        return self.pick(linen=LinenScanStack, nnx=NNXScanStack)

    # wrapping

    def base(self, module: Any, x: Any = None, seed: int = 0) -> Base:
        """The reference model; Linen initializes ``module`` on ``x`` with ``key(seed)``."""
        raise NotImplementedError

    def adapt(
        self,
        base: Base,
        targets: Any,
        adapters: Any = (),
        x: Any = None,
        *,
        method: str | None = None,
        seed: int = 0,
    ) -> Adapted:
        """``adapter_transform`` of (a copy of) ``base.module`` with ``adapters``, a list of
        ``(name, cfg)`` or ``(name, cfg, insertion)``. Linen then runs ``init`` on ``x`` (or
        on ``method`` with ``x``) with ``key(seed)``; NNX puts the model in evaluation mode."""
        raise NotImplementedError


class Linen(Frontend):
    name = "linen"
    index_sep = "_"

    def base(self, module, x=None, seed=0):
        return Base(self, module, module.init(jax.random.key(seed), x))

    def adapt(self, base, targets, adapters=(), x=None, *, method=None, seed=0):
        model = jadapters.adapter_transform(base.module, targets)
        for name, cfg, *insertion in adapters:
            model = model.add_adapter(name, cfg, insertion=insertion[0] if insertion else None)
        call = ((method, x), {"method": "call"}) if method else ((x,), {})
        variables = model.init(jax.random.key(seed), *call[0], **call[1])
        return LinenAdapted(base, model, variables, call)


class NNX(Frontend):
    name = "nnx"
    index_sep = "/"

    def base(self, module, x=None, seed=0):
        del x, seed  # an NNX module is built with its weights
        return Base(self, module)

    def adapt(self, base, targets, adapters=(), x=None, *, method=None, seed=0):
        del x, method, seed
        module = nnx.clone(base.module)
        model = jadapters.adapter_transform(module, targets)
        assert model is module  # NNX adapts in place
        handle = NNXAdapted(base, model)
        for name, cfg, *insertion in adapters:
            handle.add(name, cfg, insertion=insertion[0] if insertion else None)
        model.eval()
        return handle


FRONTENDS = {"linen": Linen(), "nnx": NNX()}
