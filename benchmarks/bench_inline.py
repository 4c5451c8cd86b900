"""jadapters against the physical minimum: the same transformer with its adapter written inline.

The minimum is the benchmark transformer (``LinenTransformer`` / ``NNXTransformer`` from
``jadapters.demo.models``: ``mlp_dim = 4 * d_model``, 8 heads, 10 classes, random tokens of 64
features) with the bottleneck adapter written *by hand* after every block's MLP, in plain Flax:
no interception, no wrapper, ``y + up(swish(down(LayerNorm(y))))`` with no biases, LayerNorm
epsilon 1e-5, in the input's dtype, exactly jadapters' ``LinearAdapter`` (``norm_position=
'pre'``, residual add). The inline Linen model takes the adapter weights as an argument; the
inline NNX model keeps them in their own variable type (:class:`InlineAdapterWeight`). Both
load the *same* weights as the jadapters model (base and randomized, non-identity adapters),
and before anything is timed the benchmark asserts that their outputs (``rtol = atol = 1e-5``)
and their adapter gradients agree with jadapters'.

Measured, for Linen and for NNX (``--framework``), each comparison timed interleaved:

1. train step (Adam, jit, donated state): ``jadapters.linen_train_step`` /
   ``jadapters.nnx_train_step`` + ``adapter_optimizer`` vs the inline model's step, a
   ``jax.jit`` over a pure function differentiating the adapter weights only (<= 1.03);
2. forward (evaluation, jitted): jadapters vs inline (<= 1.02);
3. compile (trace + lower + XLA compile of fresh jitted functions): jadapters forward vs
   inline forward (<= 1.15) and vs the unadapted base forward (<= 1.30); jadapters train step
   vs the inline step (info);
4. jadapters adapter step vs a full fine-tuning step, Adam over every base parameter (<= 0.65);
5. disabled adapters: on a small model (d=64, 2 layers, T=16, B=4) with 50 adapters added and
   one enabled, the cached jitted forward call vs the same model with only that adapter added,
   through jadapters' compiled forwards (``linen_forward``, ``nnx_forward``) and training steps
   (<= 1.10); for contrast (no target), forwards jitted the way a user would write them (Linen
   ``jax.jit(adapted.apply)`` on all the variables; NNX ``nnx.jit`` on the model and
   ``jax.jit`` over ``nnx.merge`` of the split state);
6. step economy at (d=64, 2 layers) and (d=256, 4 layers), T=32, B=8: jadapters adapter step
   vs a full fine-tuning step written the functional way, NNX and Linen (info).

Every comparison runs ``--rounds`` rounds of interleaved calls; each round gives one ratio, the
median over its calls of the ratio of two calls run back to back (a paired comparison), and
the table shows the ratio's min / median / max across rounds. A row passes only if
the *max* is inside its target (compile ratios likewise across ``--compile-repeats``).

    python benchmarks/bench_inline.py                    # full sizes, both frameworks
    python benchmarks/bench_inline.py --quick            # smoke test (a minute or two)
    python benchmarks/bench_inline.py --framework nnx --part main --json inline.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import sys
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jadapters

try:
    from benchmarks._common import (
        IN_FEATURES,
        Stepper,
        compare,
        compile_rounds,
        copy_tree,
        cross_entropy,
        full_gradient_step,
        machine_line,
        randomize,
        save_partial,
        time_rounds,
        token_data,
        transformer_kwargs,
    )
except ImportError:  # run as a script: python benchmarks/bench_inline.py
    from _common import (  # type: ignore[no-redef]
        IN_FEATURES,
        Stepper,
        compare,
        compile_rounds,
        copy_tree,
        cross_entropy,
        full_gradient_step,
        machine_line,
        randomize,
        save_partial,
        time_rounds,
        token_data,
        transformer_kwargs,
    )
from jadapters.demo.models import LinenTransformer, NNXTransformer

HEADS = 8
LINEN_MLP = r"blocks_\d+/mlp"
NNX_MLP = r"blocks/\d+/mlp"
LN_EPSILON = 1e-5  # the adapter's norm: LinearAdapter's norm_epsilon default (NeMo's)
RTOL = ATOL = 1e-5
WEIGHT_SCALE = 0.1  # randomized adapter weights: large enough to move the output clearly
PARTS = ("main", "disabled", "economy")
TARGETS = {
    "step_vs_inline": 1.03,
    "forward_vs_inline": 1.02,
    "compile_forward_vs_inline": 1.15,
    "step_vs_full": 0.65,
    "compile_forward_vs_base": 1.30,
    "disabled": 1.10,
}
QUICK = dict(
    d_model=64,
    layers=2,
    seq=16,
    batch=4,
    adapter_dim=16,
    rounds=2,
    steps=3,
    warmup=1,
    compile_repeats=2,
    small_steps=20,
    disabled_steps=20,
    economy_sizes="64x2",
)


@dataclasses.dataclass(frozen=True)
class Size:
    """One model and batch size (the attributes :func:`transformer_kwargs` reads)."""

    d_model: int
    layers: int
    seq: int
    batch: int
    adapter_dim: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; ``--quick`` overrides the sizes and counts with tiny ones."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=("linen", "nnx", "both"), default="both")
    parser.add_argument("--part", action="append", choices=PARTS, help="default: all parts")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--adapter-dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="rounds per timed comparison")
    parser.add_argument("--steps", type=int, default=10, help="timed calls per variant, round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile-repeats", type=int, default=5)
    parser.add_argument(
        "--small-steps", type=int, default=100, help="timed calls per round, small models"
    )
    parser.add_argument(
        "--disabled-steps",
        type=int,
        default=300,
        help="timed calls per round, disabled-adapter part (sub-millisecond calls)",
    )
    parser.add_argument("--disabled-count", type=int, default=50)
    parser.add_argument("--disabled-dim", type=int, default=8)
    parser.add_argument(
        "--economy-sizes", default="64x2,256x4", help="d_model x layers, comma-separated"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--json", type=str, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    args.part = args.part or list(PARTS)
    return args


def _frameworks(args) -> list[str]:
    return ["linen", "nnx"] if args.framework == "both" else [args.framework]


def _main_size(args) -> Size:
    return Size(args.d_model, args.layers, args.seq, args.batch, args.adapter_dim)


# --- the inline adapter ------------------------------------------------------------------------


def inline_adapter(y: jax.Array, w: dict) -> jax.Array:
    """``y + up(swish(down(LayerNorm(y))))``, written out by hand in ``y``'s dtype.

    Args:
      y: the MLP's output, ``(..., features)``.
      w: ``{"scale", "bias"}`` of the LayerNorm (``(features,)``), ``"down"``
        (``(features, dim)``) and ``"up"`` (``(dim, features)``) kernels.

    Returns:
      The adapted stream, like ``y``.
    """
    w = jax.tree.map(lambda a: a.astype(y.dtype), w)
    mean = y.mean(-1, keepdims=True)
    var = jnp.maximum((y * y).mean(-1, keepdims=True) - mean * mean, 0.0)
    h = (y - mean) * (jax.lax.rsqrt(var + LN_EPSILON) * w["scale"]) + w["bias"]
    return y + jax.nn.silu(h @ w["down"]) @ w["up"]


# --- inline Linen transformer (mirrors LinenTransformer, same parameter names) -----------------


class InlineLinenMLP(nn.Module):
    """``Dense(mlp_dim) -> gelu -> Dense(d_model)``, as ``LinenMLP``."""

    mlp_dim: int
    d_model: int

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(self.mlp_dim, name="fc1")(x))
        return nn.Dense(self.d_model, name="fc2")(h)


class InlineLinenBlock(nn.Module):
    """``LinenBlock`` with :func:`inline_adapter` on the MLP's output."""

    d_model: int
    num_heads: int
    mlp_dim: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, adapter: dict, *, train: bool = False):
        h = nn.LayerNorm(name="ln1")(x)
        h = nn.MultiHeadDotProductAttention(
            self.num_heads, dropout_rate=self.dropout, deterministic=not train, name="attn"
        )(h, h)
        x = x + nn.Dropout(self.dropout, deterministic=not train)(h)
        h = InlineLinenMLP(self.mlp_dim, self.d_model, name="mlp")(nn.LayerNorm(name="ln2")(x))
        h = inline_adapter(h, adapter)
        return x + nn.Dropout(self.dropout, deterministic=not train)(h)


class InlineLinenTransformer(nn.Module):
    """``LinenTransformer`` with the adapter inline; its weights are the ``adapters`` argument.

    ``adapters`` is a sequence of one :func:`inline_adapter` weight dict per block. The
    ``params`` collection is exactly ``LinenTransformer``'s, so its parameters load as they are.
    """

    num_classes: int
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_dim: int = 128
    max_len: int = 512
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, adapters, *, train: bool = False):
        x = nn.Dense(self.d_model, name="embed")(x)
        pos = self.param(
            "pos", nn.initializers.normal(0.02), (self.max_len, self.d_model), jnp.float32
        )
        x = x + pos[None, : x.shape[1]].astype(x.dtype)
        for i in range(self.num_layers):
            x = InlineLinenBlock(
                self.d_model, self.num_heads, self.mlp_dim, self.dropout, name=f"blocks_{i}"
            )(x, adapters[i], train=train)
        x = nn.LayerNorm(name="ln_f")(x).mean(axis=1)
        return nn.Dense(self.num_classes, name="head")(x)


# --- inline NNX transformer (mirrors NNXTransformer, same nnx.Param paths) ---------------------


class InlineAdapterWeight(nnx.Variable):
    """The inline NNX model's adapter weights: their own type, not an ``nnx.Param``."""


class InlineNNXAdapter(nnx.Module):
    """The bottleneck adapter's weights; the math is :func:`inline_adapter`."""

    def __init__(self, features: int, dim: int, *, rngs: nnx.Rngs):
        self.scale = InlineAdapterWeight(jnp.ones((features,)))
        self.bias = InlineAdapterWeight(jnp.zeros((features,)))
        self.down = InlineAdapterWeight(
            nnx.initializers.lecun_normal()(rngs.params(), (features, dim))
        )
        self.up = InlineAdapterWeight(jnp.zeros((dim, features)))

    def __call__(self, y):
        weights = {"scale": self.scale, "bias": self.bias, "down": self.down, "up": self.up}
        return inline_adapter(y, {k: v[...] for k, v in weights.items()})


class InlineNNXMLP(nnx.Module):
    """As ``NNXMLP``."""

    def __init__(self, d_model: int, mlp_dim: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(d_model, mlp_dim, rngs=rngs)
        self.fc2 = nnx.Linear(mlp_dim, d_model, rngs=rngs)
        self.out_features = d_model

    def __call__(self, x):
        return self.fc2(nnx.gelu(self.fc1(x)))


class InlineNNXBlock(nnx.Module):
    """``NNXBlock`` with an :class:`InlineNNXAdapter` on the MLP's output."""

    def __init__(self, d_model, num_heads, mlp_dim, adapter_dim, dropout=0.0, *, rngs):
        self.ln1 = nnx.LayerNorm(d_model, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads, d_model, dropout_rate=dropout, decode=False, rngs=rngs
        )
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d_model, rngs=rngs)
        self.mlp = InlineNNXMLP(d_model, mlp_dim, rngs=rngs)
        self.adapter = InlineNNXAdapter(d_model, adapter_dim, rngs=rngs)

    def __call__(self, x):
        h = self.ln1(x)
        x = x + self.drop(self.attn(h, h, h))
        return x + self.drop(self.adapter(self.mlp(self.ln2(x))))


class InlineNNXTransformer(nnx.Module):
    """``NNXTransformer`` with the adapter inline in every block (``blocks/i/adapter``)."""

    def __init__(
        self,
        in_features: int,
        *,
        num_classes: int,
        adapter_dim: int,
        d_model: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        mlp_dim: int = 128,
        max_len: int = 512,
        dropout: float = 0.0,
        rngs: nnx.Rngs,
    ):
        self.embed = nnx.Linear(in_features, d_model, rngs=rngs)
        self.pos = nnx.Param(jax.random.normal(rngs.params(), (max_len, d_model)) * 0.02)
        self.blocks = nnx.List(
            [
                InlineNNXBlock(d_model, num_heads, mlp_dim, adapter_dim, dropout, rngs=rngs)
                for _ in range(num_layers)
            ]
        )
        self.ln_f = nnx.LayerNorm(d_model, rngs=rngs)
        self.head = nnx.Linear(d_model, num_classes, rngs=rngs)

    def __call__(self, x):
        x = self.embed(x)
        x = x + self.pos[None, : x.shape[1]].astype(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x).mean(axis=1))


# --- moving weights between jadapters' trees and the inline models -----------------------------

_ADAPTER_LEAF = re.compile(
    r"blocks[_/](\d+)/mlp/(?:.+/)?(down/kernel|up/kernel|norm/scale|norm/bias)$"
)
_INLINE_NAME = {
    "down/kernel": "down",
    "up/kernel": "up",
    "norm/scale": "scale",
    "norm/bias": "bias",
}


def _key_name(key) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def flat_paths(tree) -> dict[str, Any]:
    """``{"a/b/0/c": leaf}`` for every leaf of ``tree``, in leaf order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def per_layer_adapters(tree, layers: int) -> tuple[dict, ...]:
    """jadapters' weights of one ``LinearAdapter`` per block MLP as :func:`inline_adapter` dicts.

    Reads the layer from ``blocks_i/mlp`` (Linen) or ``blocks/i/mlp`` (NNX) and the weight
    from the path's tail, whatever jadapters nests in between.

    Raises:
      ValueError: for a leaf that is not such a weight, or a block without exactly one set.
    """
    out: list[dict] = [{} for _ in range(layers)]
    for path, leaf in flat_paths(tree).items():
        match = _ADAPTER_LEAF.search(path)
        if match is None or _INLINE_NAME[match[2]] in out[int(match[1])]:
            raise ValueError(f"unexpected adapter weight {path!r}")
        out[int(match[1])][_INLINE_NAME[match[2]]] = leaf
    for i, weights in enumerate(out):
        if sorted(weights) != sorted(_INLINE_NAME.values()):
            raise ValueError(f"block {i}: adapter weights {sorted(weights)}")
    return tuple(out)


def take_matching(small, big):
    """``small``'s structure filled with ``big``'s leaves at the same paths."""
    flat_big = flat_paths(big)
    leaves = [flat_big[path] for path in flat_paths(small)]
    return jax.tree.unflatten(jax.tree.structure(small), leaves)


def _clone(model: nnx.Module) -> nnx.Module:
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, copy_tree(state))


def _set_pure(model: nnx.Module, wrt, pure: dict) -> None:
    """Sets ``model``'s ``wrt`` variables from a pure dict with exactly their paths."""
    state = nnx.state(model, wrt)
    if set(flat_paths(nnx.to_pure_dict(state))) != set(flat_paths(pure)):
        raise ValueError(f"{wrt}: the paths differ")
    nnx.replace_by_pure_dict(state, copy_tree(pure))
    nnx.update(model, state)


# --- models ------------------------------------------------------------------------------------


@dataclasses.dataclass
class LinenSetup:
    """The jadapters Linen model and its inline twin, with the same weights."""

    model: LinenTransformer
    adapted: Any
    base: dict  # {"params": ...}
    adapters: Any
    inline: InlineLinenTransformer
    inline_adapters: tuple[dict, ...]
    x: jax.Array
    y: jax.Array


def linen_setup(size: Size) -> LinenSetup:
    """``adapter_transform(LinenTransformer)`` + ``LinearAdapter(dim)`` and the inline model."""
    x, y = token_data(size.batch, size.seq)
    kwargs = transformer_kwargs(size, HEADS)
    model = LinenTransformer(**kwargs)
    adapted = jadapters.adapter_transform(model, LINEN_MLP).add_adapter(
        "task", jadapters.LinearAdapterConfig(dim=size.adapter_dim)
    )
    key = jax.random.key(0)
    base = {"params": jax.jit(model.init)(key, x[:1])["params"]}
    _, adapters = jadapters.split_variables(adapted.init_adapters(key, base, x[:1]))
    adapters = randomize(adapters, 1, WEIGHT_SCALE)
    inline = InlineLinenTransformer(**kwargs)
    inline_adapters = per_layer_adapters(adapters, size.layers)
    return LinenSetup(model, adapted, base, adapters, inline, inline_adapters, x, y)


@dataclasses.dataclass
class NNXSetup:
    """The unadapted NNX model, the jadapters-adapted copy and the inline twin."""

    base: NNXTransformer
    adapted: nnx.Module
    inline: InlineNNXTransformer
    x: jax.Array
    y: jax.Array


def nnx_setup(size: Size) -> NNXSetup:
    """``NNXTransformer``, a copy with ``adapter_transform`` + ``add_adapter``, the inline model.

    All three are in evaluation mode; the inline model gets the adapted model's weights.
    """
    x, y = token_data(size.batch, size.seq)
    kwargs = transformer_kwargs(size, HEADS)
    base = NNXTransformer(IN_FEATURES, rngs=nnx.Rngs(0), **kwargs)
    adapted = _clone(base)
    jadapters.adapter_transform(adapted, NNX_MLP)
    adapted.add_adapter(
        "task",
        jadapters.LinearAdapterConfig(dim=size.adapter_dim),
        rngs=nnx.Rngs(params=1, dropout=2),
    )
    nnx.update(adapted, randomize(nnx.state(adapted, jadapters.AdapterParam), 1, WEIGHT_SCALE))
    inline = InlineNNXTransformer(
        IN_FEATURES, adapter_dim=size.adapter_dim, rngs=nnx.Rngs(0), **kwargs
    )
    _set_pure(inline, nnx.Param, nnx.to_pure_dict(nnx.state(adapted, nnx.Param)))
    weights = per_layer_adapters(
        nnx.to_pure_dict(nnx.state(adapted, jadapters.AdapterParam)), size.layers
    )
    _set_pure(
        inline, InlineAdapterWeight, {"blocks": {i: {"adapter": w} for i, w in enumerate(weights)}}
    )
    for model in (base, adapted, inline):
        model.eval()
    return NNXSetup(base, adapted, inline, x, y)


# --- steps and forwards ------------------------------------------------------------------------


def _loss_fn(apply, batch):
    """jadapters' Linen loss: ``loss_fn(apply, batch)``."""
    return cross_entropy(apply(batch[0]), batch[1])


def _nnx_loss(model, batch):
    return cross_entropy(model(batch[0]), batch[1])


def inline_linen_step(inline: InlineLinenTransformer, tx) -> Callable[..., Any]:
    """``step(adapters, opt_state, params, x, y) -> (adapters, opt_state, loss)``, jitted.

    The gradient is taken with respect to the adapter weights only; the base parameters are a
    constant argument. Adapter weights and optimizer state are donated.
    """

    def step(adapters, opt_state, params, x, y):
        def loss(a):
            return cross_entropy(inline.apply({"params": params}, x, a), y)

        value, grads = jax.value_and_grad(loss)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, value

    return jax.jit(step, donate_argnums=(0, 1))


def nnx_functional_loss(model: nnx.Module, wrt):
    """``(loss(pure, rest, x, y), pure, rest)`` over the ``wrt`` weights of an NNX model.

    ``nnx.split`` once: ``pure`` is the ``wrt`` weights as a pure dict (own buffers), ``rest``
    every other variable, a constant argument, so the model is rebuilt from traced values only.
    """
    graphdef, weights, rest = nnx.split(model, wrt, ...)

    def loss(pure, rest, x, y):
        state = jax.tree.map(lambda v: v, weights)  # new variables, inside the trace
        nnx.replace_by_pure_dict(state, pure)
        return cross_entropy(nnx.merge(graphdef, state, rest)(x), y)

    return loss, copy_tree(nnx.to_pure_dict(weights)), rest


def nnx_functional_step(model: nnx.Module, wrt, tx, x, y):
    """A ``jax.jit`` step over an NNX model's pure state, differentiating ``wrt`` only.

    The ``wrt`` weights (a pure dict) and the optimizer state are donated; see
    :func:`nnx_functional_loss`.

    Returns:
      ``(step, state, consts)`` for :class:`Stepper`: ``step(*state, *consts) -> (weights,
      opt_state, loss)``.
    """
    loss, pure, rest = nnx_functional_loss(model, wrt)

    def step(pure, opt_state, rest, x, y):
        value, grads = jax.value_and_grad(loss)(pure, rest, x, y)
        updates, opt_state = tx.update(grads, opt_state, pure)
        return optax.apply_updates(pure, updates), opt_state, value

    return jax.jit(step, donate_argnums=(0, 1)), (pure, tx.init(pure)), (rest, x, y)


def _pure_forward(model: nnx.Module):
    """``(fn, state)`` with ``fn(state, x)`` the model's forward over its split state."""
    graphdef, state = nnx.split(model)
    return (lambda s, x: nnx.merge(graphdef, s)(x)), state


def _blocking(fn, *args) -> Callable[[], None]:
    return lambda: jax.block_until_ready(fn(*args))


def _nnx_jadapters_step(adapted: nnx.Module, tx, batch):
    """A training copy of ``adapted`` with ``adapter_optimizer`` and ``nnx_train_step``."""
    model = _clone(adapted)
    model.train()
    optimizer = jadapters.adapter_optimizer(model, tx)
    step = jadapters.nnx_train_step(_nnx_loss)
    return model, optimizer, step, _blocking(step, model, optimizer, batch)


def _linen_steppers(s: LinenSetup, tx) -> dict[str, Callable[[], None]]:
    """The three Linen training steps, ready to time: jadapters, inline, full fine-tuning."""
    step = jadapters.linen_train_step(s.adapted, _loss_fn, tx)
    ours = copy_tree(s.adapters)
    inline = copy_tree(s.inline_adapters)
    full = copy_tree(s.base["params"])

    def full_loss(params, x, y):
        return cross_entropy(s.model.apply({"params": params}, x), y)

    return {
        "jadapters": Stepper(
            step, (ours, step.init(ours)), (s.base, (s.x, s.y), jax.random.key(1))
        ),
        "inline": Stepper(
            inline_linen_step(s.inline, tx), (inline, tx.init(inline)), (s.base["params"], s.x, s.y)
        ),
        "full": Stepper(full_gradient_step(full_loss, tx), (full, tx.init(full)), (s.x, s.y)),
    }


def _nnx_steppers(s: NNXSetup, tx) -> dict[str, Callable[[], None]]:
    """The three NNX training steps, ready to time: jadapters, inline, full fine-tuning."""
    *_, ours = _nnx_jadapters_step(s.adapted, tx, (s.x, s.y))
    inline = nnx_functional_step(s.inline, InlineAdapterWeight, tx, s.x, s.y)
    full = nnx_functional_step(s.base, nnx.Param, tx, s.x, s.y)
    return {"jadapters": ours, "inline": Stepper(*inline), "full": Stepper(*full)}


# --- equality checks ---------------------------------------------------------------------------


def _check_outputs(ours, inline, base) -> dict[str, float]:
    """Asserts the inline output equals jadapters' and that the adapter moved the output."""
    ours, inline, base = (np.asarray(a) for a in (ours, inline, base))
    np.testing.assert_allclose(
        inline, ours, rtol=RTOL, atol=ATOL, err_msg="inline model != jadapters model"
    )
    effect = float(np.abs(ours - base).max())
    if effect < 1e3 * ATOL:
        raise AssertionError(f"the adapter barely changes the output ({effect:.2e})")
    return {"output_max_abs_diff": float(np.abs(ours - inline).max()), "adapter_effect": effect}


def _check_gradients(ours: tuple[dict, ...], inline: tuple[dict, ...]) -> dict[str, float]:
    """Asserts equal adapter gradients (to ``RTOL`` and ``ATOL`` times the largest entry)."""
    scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(inline))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(inline), strict=True):
        np.testing.assert_allclose(
            np.asarray(b), np.asarray(a), rtol=RTOL, atol=ATOL * scale, err_msg="gradients"
        )
    diff = max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(inline), strict=True)
    )
    return {"gradient_max_abs_diff": diff, "gradient_max_abs": scale}


def _sgd_gradient(before, after):
    """The gradient a step of ``optax.sgd(1.0)`` applied: ``before - after``."""
    return jax.tree.map(lambda b, a: np.asarray(b) - np.asarray(a), before, after)


def check_linen(s: LinenSetup, layers: int) -> dict[str, float]:
    """The inline Linen model computes jadapters' output and adapter gradient."""
    ours = jax.jit(lambda v, x: s.adapted.apply(v, x))(
        jadapters.merge_variables(s.base, s.adapters), s.x
    )
    inline = jax.jit(lambda p, a, x: s.inline.apply(p, x, a))(s.base, s.inline_adapters, s.x)
    checks = _check_outputs(ours, inline, jax.jit(s.model.apply)(s.base, s.x))

    sgd = optax.sgd(1.0)
    step = jadapters.linen_train_step(s.adapted, _loss_fn, sgd, donate=False)
    after, _, metrics = step(
        s.adapters, step.init(s.adapters), s.base, (s.x, s.y), jax.random.key(1)
    )
    ours_grad = _sgd_gradient(s.inline_adapters, per_layer_adapters(after, layers))

    def inline_loss(a, base, x, y):  # weights and data as arguments: nothing to constant-fold
        return cross_entropy(s.inline.apply(base, x, a), y)

    loss, inline_grad = jax.jit(jax.value_and_grad(inline_loss))(
        s.inline_adapters, s.base, s.x, s.y
    )
    np.testing.assert_allclose(float(loss), float(metrics["loss"]), rtol=RTOL, err_msg="loss")
    return {**checks, **_check_gradients(ours_grad, inline_grad)}


def check_nnx(s: NNXSetup, layers: int) -> dict[str, float]:
    """The inline NNX model computes jadapters' output and adapter gradient."""
    outputs = []
    for model in (s.adapted, s.inline, s.base):
        fn, state = _pure_forward(model)
        outputs.append(jax.jit(fn)(state, s.x))
    checks = _check_outputs(*outputs)

    def weights(model):
        return per_layer_adapters(
            nnx.to_pure_dict(nnx.state(model, jadapters.AdapterParam)), layers
        )

    model, optimizer, step, _ = _nnx_jadapters_step(s.adapted, optax.sgd(1.0), (s.x, s.y))
    before = weights(model)
    metrics = step(model, optimizer, (s.x, s.y))
    ours_grad = _sgd_gradient(before, weights(model))

    inline_loss, pure, rest = nnx_functional_loss(s.inline, InlineAdapterWeight)
    loss, grads = jax.jit(jax.value_and_grad(inline_loss))(pure, rest, s.x, s.y)
    inline_grad = tuple(grads["blocks"][i]["adapter"] for i in range(layers))
    np.testing.assert_allclose(float(loss), float(metrics["loss"]), rtol=RTOL, err_msg="loss")
    return {**checks, **_check_gradients(ours_grad, inline_grad)}


# --- comparisons -------------------------------------------------------------------------------


_OP = re.compile(r"=\s*\S+\s+([a-z\-]+)\(")  # an HLO instruction's operation
_NOT_KERNELS = {"parameter", "constant", "bitcast", "tuple", "get-tuple-element"}


def _ops(text: str) -> list[str]:
    """The operation of every HLO instruction in ``text``, one line each."""
    return [m.group(1) for line in text.splitlines() if (m := _OP.search(line))]


def _costs(compiled: Any) -> dict[str, float]:
    """XLA's cost analysis of a compiled program (flops, bytes accessed, ...)."""
    cost = compiled.cost_analysis()
    return cost[0] if isinstance(cost, list) else cost


def _program(compiled: Any) -> dict[str, Any]:
    """What a compiled program does: its XLA operations by kind, flops and bytes accessed."""
    ops: dict[str, int] = {}
    for op in _ops(compiled.as_text()):
        ops[op] = ops.get(op, 0) + 1
    cost = _costs(compiled)
    return {"ops": ops, "flops": cost.get("flops"), "bytes": cost.get("bytes accessed")}


def _kernels(compiled: Any) -> int:
    """How many operations a compiled program's entry computation launches: its fusions,
    dots and other kernels (parameters, constants, bitcasts and tuples aside). XLA compiles
    each kernel on its own, so its compile time grows with their number."""
    text = compiled.as_text()
    return sum(op not in _NOT_KERNELS for op in _ops(text[text.index("\nENTRY") :]))


def floors(steps: dict[str, Any], forwards: dict[str, Any]) -> dict[str, Any]:
    """What the two "vs full fine-tuning / vs base" targets can reach at best, from the
    compiled programs themselves (XLA's own counts, no timing).

    Args:
      steps: ``jadapters``, ``inline`` and ``full`` compiled training steps.
      forwards: ``jadapters``, ``inline`` and ``base`` compiled forwards.

    Returns:
      Each adapter step's flops and bytes accessed over the full fine-tuning step's (an
      exact adapter step must still compute every activation gradient, and the attention
      products' gradients are all activation gradients), and each forward's kernel count.
    """
    ratios = {
        what: {
            n: _costs(steps[n])[what] / _costs(steps["full"])[what] for n in ("jadapters", "inline")
        }
        for what in ("flops", "bytes accessed")
    }
    return {
        "step_flops_vs_full": ratios["flops"],
        "step_bytes_vs_full": ratios["bytes accessed"],
        "forward_kernels": {n: _kernels(c) for n, c in forwards.items()},
    }


def _same_program(ours: Any, inline: Any) -> dict[str, Any]:
    a, b = _program(ours), _program(inline)
    return {
        "forward_same_program": a == b,
        "forward_ops": sum(a["ops"].values()),
        "forward_flops": a["flops"],
    }


def _compile_ms(repeats: list[dict[str, dict[str, float]]]) -> list[dict[str, float]]:
    return [{name: 1e3 * t["total"] for name, t in r.items()} for r in repeats]


def _lowerable(fn) -> Any:
    """``fn`` itself if it can ``.lower`` (a jitted function), else a jit around it (donated)."""
    if hasattr(fn, "lower"):
        return fn
    return jax.jit(lambda *a: fn(*a), donate_argnums=(0, 1))


def _main_comparisons(forward, compile_fwd, compile_step, steps, step_label: str) -> list[dict]:
    """The main table's rows: (label, per-round ms, ours, baseline, key of the target)."""
    rows = [
        (f"train step: {step_label} / inline", steps, "jadapters", "inline", "step_vs_inline"),
        ("forward: jadapters / inline", forward, "jadapters", "inline", "forward_vs_inline"),
        (
            "compile (ms), forward: jadapters / inline",
            compile_fwd,
            "jadapters",
            "inline",
            "compile_forward_vs_inline",
        ),
        ("compile (ms), train step: jadapters / inline", compile_step, "jadapters", "inline", None),
        ("train step: jadapters / full fine-tuning", steps, "jadapters", "full", "step_vs_full"),
        ("train step: inline / full fine-tuning", steps, "inline", "full", None),
        (
            "compile (ms), forward: jadapters / base (unadapted)",
            compile_fwd,
            "jadapters",
            "base",
            "compile_forward_vs_base",
        ),
    ]
    return [compare(w, r, a, b, TARGETS.get(k)) for w, r, a, b, k in rows]


def bench_linen_main(args) -> dict:
    """Linen: jadapters vs the inline model (step, forward, compile) and vs full fine-tuning."""
    size = _main_size(args)
    s = linen_setup(size)
    checks = check_linen(s, size.layers)
    variables = jadapters.merge_variables(s.base, s.adapters)
    adam = optax.adam(1e-4)
    opt_state = adam.init(s.adapters)
    inline_opt_state = adam.init(s.inline_adapters)

    compile_fwd = compile_rounds(
        {
            "jadapters": lambda: jax.jit(lambda v, x: s.adapted.apply(v, x)),
            "inline": lambda: jax.jit(lambda p, a, x: s.inline.apply(p, x, a)),
            "base": lambda: jax.jit(lambda p, x: s.model.apply(p, x)),
        },
        {
            "jadapters": (variables, s.x),
            "inline": (s.base, s.inline_adapters, s.x),
            "base": (s.base, s.x),
        },
        args.compile_repeats,
    )
    compile_step = compile_rounds(
        {
            "jadapters": lambda: _lowerable(jadapters.linen_train_step(s.adapted, _loss_fn, adam)),
            "inline": lambda: inline_linen_step(s.inline, adam),
        },
        {
            "jadapters": (s.adapters, opt_state, s.base, (s.x, s.y), jax.random.key(1)),
            "inline": (s.inline_adapters, inline_opt_state, s.base["params"], s.x, s.y),
        },
        args.compile_repeats,
    )

    ours_fwd = jax.jit(lambda v, x: s.adapted.apply(v, x))
    inline_fwd = jax.jit(lambda p, a, x: s.inline.apply(p, x, a))
    forwards = {
        "jadapters": ours_fwd.lower(variables, s.x).compile(),
        "inline": inline_fwd.lower(s.base, s.inline_adapters, s.x).compile(),
        "base": jax.jit(lambda p, x: s.model.apply(p, x)).lower(s.base, s.x).compile(),
    }
    checks.update(_same_program(forwards["jadapters"], forwards["inline"]))
    steppers = _linen_steppers(s, adam)
    programs = {
        name: _lowerable(st.step).lower(*st.state, *st.consts).compile()
        for name, st in steppers.items()
    }
    checks["floors"] = floors(programs, forwards)
    timing = dict(rounds=args.rounds, warmup=args.warmup, steps=args.steps)
    forward = time_rounds(
        {
            "jadapters": _blocking(ours_fwd, variables, s.x),
            "inline": _blocking(inline_fwd, s.base, s.inline_adapters, s.x),
        },
        **timing,
    )
    steps = time_rounds(steppers, **timing)
    return {
        "checks": checks,
        "comparisons": _main_comparisons(
            forward,
            _compile_ms(compile_fwd),
            _compile_ms(compile_step),
            steps,
            "jadapters linen_train_step",
        ),
    }


def bench_nnx_main(args) -> dict:
    """NNX: jadapters vs the inline model (step, forward, compile) and vs full fine-tuning."""
    size = _main_size(args)
    s = nnx_setup(size)
    checks = check_nnx(s, size.layers)
    adam = optax.adam(1e-4)
    fns, states = {}, {}
    for name, model in (("jadapters", s.adapted), ("inline", s.inline), ("base", s.base)):
        fns[name], states[name] = _pure_forward(model)

    compile_fwd = compile_rounds(
        {name: (lambda fn=fn: jax.jit(lambda st, x: fn(st, x))) for name, fn in fns.items()},
        {name: (state, s.x) for name, state in states.items()},
        args.compile_repeats,
    )
    model, optimizer, _, _ = _nnx_jadapters_step(s.adapted, adam, (s.x, s.y))
    inline_step, inline_state, inline_consts = nnx_functional_step(
        s.inline, InlineAdapterWeight, adam, s.x, s.y
    )
    compile_step = compile_rounds(
        {
            "jadapters": lambda: jadapters.nnx_train_step(_nnx_loss),
            "inline": lambda: nnx_functional_step(s.inline, InlineAdapterWeight, adam, s.x, s.y)[0],
        },
        {
            "jadapters": (model, optimizer, (s.x, s.y)),
            "inline": (*inline_state, *inline_consts),
        },
        args.compile_repeats,
    )

    timing = dict(rounds=args.rounds, warmup=args.warmup, steps=args.steps)
    forwards = {n: jax.jit(fns[n]).lower(states[n], s.x).compile() for n in fns}
    checks.update(_same_program(forwards["jadapters"], forwards["inline"]))
    full_step, full_state, full_consts = nnx_functional_step(s.base, nnx.Param, adam, s.x, s.y)
    programs = {
        "jadapters": jadapters.nnx_train_step(_nnx_loss).lower(model, optimizer, (s.x, s.y)),
        "inline": inline_step.lower(*inline_state, *inline_consts),
        "full": full_step.lower(*full_state, *full_consts),
    }
    checks["floors"] = floors({n: p.compile() for n, p in programs.items()}, forwards)
    forward = time_rounds(
        {
            name: _blocking(jax.jit(fns[name]), states[name], s.x)
            for name in ("jadapters", "inline")
        },
        **timing,
    )
    steps = time_rounds(_nnx_steppers(s, adam), **timing)
    return {
        "checks": checks,
        "comparisons": _main_comparisons(
            forward,
            _compile_ms(compile_fwd),
            _compile_ms(compile_step),
            steps,
            "jadapters nnx_train_step",
        ),
    }


# --- disabled adapters -------------------------------------------------------------------------


def _disabled_size(args) -> Size:
    return Size(64, 2, 16, 4, args.disabled_dim)


def _small_rounds(args, fns: dict, steps: int | None = None) -> list[dict[str, float]]:
    """:func:`time_rounds` at the small models' number of calls per round (or ``steps``)."""
    steps = args.small_steps if steps is None else steps
    return time_rounds(fns, rounds=args.rounds, warmup=args.warmup, steps=steps)


def _adapter_names(count: int) -> list[str]:
    return [f"task{i}" for i in range(count)]


def bench_disabled_linen(args) -> dict:
    """Linen: 50 adapters added, one enabled, vs only that one added (jitted ``apply``)."""
    size = _disabled_size(args)
    x, _ = token_data(size.batch, size.seq)
    model = LinenTransformer(**transformer_kwargs(size, HEADS))
    cfg = jadapters.LinearAdapterConfig(dim=size.adapter_dim)
    key = jax.random.key(0)
    base = {"params": jax.jit(model.init)(key, x[:1])["params"]}
    names = _adapter_names(args.disabled_count)
    keep = names[-1]

    many = jadapters.adapter_transform(model, LINEN_MLP)
    for name in names:
        many = many.add_adapter(name, cfg)
    _, many_adapters = jadapters.split_variables(many.init_adapters(key, base, x[:1]))
    many_adapters = randomize(many_adapters, 1, WEIGHT_SCALE)
    many = many.set_enabled_adapters(enabled=False).set_enabled_adapters(keep, enabled=True)
    one = jadapters.adapter_transform(model, LINEN_MLP).add_adapter(keep, cfg)
    _, one_adapters = jadapters.split_variables(one.init_adapters(key, base, x[:1]))
    one_adapters = take_matching(one_adapters, many_adapters)

    many_vars = jadapters.merge_variables(base, many_adapters)
    one_vars = jadapters.merge_variables(base, one_adapters)
    f_many = jax.jit(lambda v, x: many.apply(v, x))
    f_one = jax.jit(lambda v, x: one.apply(v, x))
    np.testing.assert_allclose(f_many(many_vars, x), f_one(one_vars, x), rtol=RTOL, atol=ATOL)
    ours_many, ours_one = jadapters.linen_forward(many), jadapters.linen_forward(one)
    np.testing.assert_array_equal(ours_many(many_vars, x), f_one(one_vars, x))
    # Each pair is timed on its own: a sub-millisecond call slows down right after a call
    # that walks hundreds of arrays in Python (most likely the caches it evicts), so a pair
    # interleaved with another pair's calls measures its neighbours.
    rounds = _small_rounds(
        args,
        {"many": _blocking(f_many, many_vars, x), "one": _blocking(f_one, one_vars, x)},
        args.disabled_steps,
    )
    ours_rounds = _small_rounds(
        args,
        {
            "ours many": _blocking(ours_many, many_vars, x),
            "ours one": _blocking(ours_one, one_vars, x),
        },
        args.disabled_steps,
    )
    against_jit = _small_rounds(
        args,
        {"ours one": _blocking(ours_one, one_vars, x), "one": _blocking(f_one, one_vars, x)},
        args.disabled_steps,
    )
    adam = optax.adam(1e-4)
    y = jnp.zeros((size.batch,), jnp.int32)
    steppers = {}
    for label, adapted, adapters in (("many", many, many_adapters), ("one", one, one_adapters)):
        step = jadapters.linen_train_step(adapted, _loss_fn, adam)
        ours = copy_tree(adapters)
        steppers[label] = Stepper(step, (ours, step.init(ours)), (base, (x, y), jax.random.key(1)))
    step_rounds = _small_rounds(args, steppers, args.disabled_steps)
    what = f"{len(names)} added, 1 enabled / 1 added"
    return {
        "comparisons": [
            # for contrast: a jax.jit the user writes over all the variables (no target)
            compare(f"Linen jax.jit(apply), all variables: {what}", rounds, "many", "one", None),
            compare(
                f"Linen jadapters.linen_forward: {what}",
                ours_rounds,
                "ours many",
                "ours one",
                TARGETS["disabled"],
            ),
            compare(
                "Linen jadapters.linen_forward / jax.jit(apply), 1 added",
                against_jit,
                "ours one",
                "one",
                None,
            ),
            compare(
                f"Linen linen_train_step: {what}", step_rounds, "many", "one", TARGETS["disabled"]
            ),
        ],
        "leaves": {"many": len(jax.tree.leaves(many_vars)), "one": len(jax.tree.leaves(one_vars))},
    }


def bench_disabled_nnx(args) -> dict:
    """NNX: 50 adapters added, one enabled, vs only that one added (``nnx.jit`` and split)."""
    size = _disabled_size(args)
    x, _ = token_data(size.batch, size.seq)
    base = NNXTransformer(IN_FEATURES, rngs=nnx.Rngs(0), **transformer_kwargs(size, HEADS))
    cfg = jadapters.LinearAdapterConfig(dim=size.adapter_dim)
    names = _adapter_names(args.disabled_count)
    keep = names[-1]

    many = _clone(base)
    jadapters.adapter_transform(many, NNX_MLP)
    for i, name in enumerate(names):
        many.add_adapter(name, cfg, rngs=nnx.Rngs(params=i, dropout=10_000 + i))
    nnx.update(many, randomize(nnx.state(many, jadapters.AdapterParam), 1, WEIGHT_SCALE))
    many.set_enabled_adapters(enabled=False)
    many.set_enabled_adapters(keep, enabled=True)
    one = _clone(base)
    jadapters.adapter_transform(one, NNX_MLP)
    one.add_adapter(keep, cfg, rngs=nnx.Rngs(params=0, dropout=1))
    _set_pure(
        one,
        jadapters.AdapterParam,
        take_matching(
            nnx.to_pure_dict(nnx.state(one, jadapters.AdapterParam)),
            nnx.to_pure_dict(nnx.state(many, jadapters.AdapterParam)),
        ),
    )
    many.eval()
    one.eval()

    fns, split_fns, ours = {}, {}, {}
    for label, model in (("many", many), ("one", one)):
        jitted = nnx.jit(lambda m, x: m(x))
        fns[f"nnx.jit {label}"] = _blocking(jitted, model, x)
        fn, state = _pure_forward(model)
        split_fns[f"split {label}"] = _blocking(jax.jit(fn), state, x)
        ours[f"ours {label}"] = _blocking(jadapters.nnx_forward(), model, x)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(many, x), one(x), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(jadapters.nnx_forward()(many, x), one(x), rtol=RTOL, atol=ATOL)
    # each pair on its own (see bench_disabled_linen)
    against_split = {"ours one": ours["ours one"], "split one": split_fns["split one"]}
    rounds, split_rounds, ours_rounds, against_split_rounds = (
        _small_rounds(args, group, steps)
        for group, steps in (
            (fns, None),
            (split_fns, args.disabled_steps),
            (ours, args.disabled_steps),
            (against_split, args.disabled_steps),
        )
    )
    adam = optax.adam(1e-4)
    y = jnp.zeros((size.batch,), jnp.int32)
    steps = {}
    for label, model in (("many", many), ("one", one)):
        *_, steps[label] = _nnx_jadapters_step(model, adam, (x, y))
    step_rounds = _small_rounds(args, steps, args.disabled_steps)
    what, target = f"{len(names)} added, 1 enabled / 1 added", TARGETS["disabled"]
    return {
        "comparisons": [
            compare(f"NNX nnx_train_step: {what}", step_rounds, "many", "one", target),
            compare(
                f"NNX jadapters.nnx_forward: {what}", ours_rounds, "ours many", "ours one", target
            ),
            compare(
                "NNX jadapters.nnx_forward / jax.jit(nnx.merge(...)(x)), 1 added",
                against_split_rounds,
                "ours one",
                "split one",
                None,
            ),
            # for contrast: jitted forwards the user writes (no target)
            compare(f"NNX nnx.jit(m(x)): {what}", rounds, "nnx.jit many", "nnx.jit one", None),
            compare(
                f"NNX jax.jit(nnx.merge(graphdef, state)(x)): {what}",
                split_rounds,
                "split many",
                "split one",
                None,
            ),
        ],
        "leaves": {
            "many": len(jax.tree.leaves(nnx.state(many))),
            "one": len(jax.tree.leaves(nnx.state(one))),
        },
    }


# --- step economy ------------------------------------------------------------------------------


def _economy_sizes(args) -> list[Size]:
    sizes = []
    for item in args.economy_sizes.split(","):
        d_model, layers = (int(v) for v in item.lower().split("x"))
        sizes.append(Size(d_model, layers, 32, 8, max(8, d_model // 4)))
    return sizes


def bench_economy(args, framework: str) -> dict:
    """Adapter step vs a functional full fine-tuning step at the small sizes (info rows)."""
    adam = optax.adam(1e-4)
    comparisons = []
    for size in _economy_sizes(args):
        if framework == "nnx":
            steppers = _nnx_steppers(nnx_setup(size), adam)
            fw, label = "NNX", "NNX nnx_train_step"
        else:
            steppers = _linen_steppers(linen_setup(size), adam)
            fw, label = "Linen", "Linen linen_train_step"
        rounds = _small_rounds(args, steppers)
        where = f"d={size.d_model}, {size.layers} layers, dim {size.adapter_dim}"
        comparisons += [
            compare(f"{label} / full ({where})", rounds, "jadapters", "full", None),
            compare(f"{label} / inline ({where})", rounds, "jadapters", "inline", None),
            compare(f"{fw} inline adapter step / full ({where})", rounds, "inline", "full", None),
        ]
    return {"comparisons": comparisons}


# --- report ------------------------------------------------------------------------------------

HEADER = (
    "| measurement | ms | baseline ms | ratio min | ratio median | ratio max | target | result |\n"
    "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"
)


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.2f}"


def _row(c: dict) -> str:
    r = c["ratio"]
    target = "info" if c["target"] is None else f"<= {c['target']:.2f}"
    result = "" if c["pass"] is None else ("pass" if c["pass"] else "FAIL")
    return (
        f"| {c['what']} | {_ms(statistics.median(c['ours_ms']))} | "
        f"{_ms(statistics.median(c['baseline_ms']))} | {r['min']:.3f} | {r['median']:.3f} | "
        f"{r['max']:.3f} | {target} | {result} |"
    )


def _section(title: str, comparisons: list[dict], notes: list[str]) -> list[str]:
    return ["", f"#### {title}", "", HEADER, *(_row(c) for c in comparisons), "", *notes]


def _checks_note(checks: dict) -> str:
    return (
        "Same model, asserted before timing: max |output difference| "
        f"{checks['output_max_abs_diff']:.2e} (adapter's effect on the output "
        f"{checks['adapter_effect']:.2e}); max |adapter gradient difference| "
        f"{checks['gradient_max_abs_diff']:.2e} (largest gradient entry "
        f"{checks['gradient_max_abs']:.2e})."
        + (
            " The two compiled forwards are the same program (the same "
            f"{checks['forward_ops']} XLA operations by kind, {checks['forward_flops']:.4g} "
            "flops and bytes accessed): their timing ratio is 1 up to noise."
            if checks.get("forward_same_program")
            else ""
        )
    )


def _floors_note(checks: dict) -> str:
    f = checks.get("floors")
    if not f:
        return ""
    flops, bytes_, kernels = (
        f["step_flops_vs_full"],
        f["step_bytes_vs_full"],
        f["forward_kernels"],
    )
    return (
        " What the compiled programs must do, by XLA's own counts: a training step over full "
        f"fine-tuning's does {flops['jadapters']:.3f} of its flops and {bytes_['jadapters']:.3f} "
        f"of its memory traffic (jadapters; inline {flops['inline']:.3f} and "
        f"{bytes_['inline']:.3f}); the forward launches {kernels['jadapters']} kernels "
        f"(jadapters), {kernels['inline']} (inline) and {kernels['base']} (base), "
        f"{kernels['jadapters'] / kernels['base']:.2f}x the base's, and XLA compiles each "
        "kernel on its own."
    )


def table(results: dict) -> str:
    """The results as markdown: one table per section."""
    a = results["args"]
    lines = [
        f"Inline-adapter benchmark (d_model={a['d_model']}, layers={a['layers']}, heads={HEADS}, "
        f"seq={a['seq']}, batch={a['batch']}, LinearAdapter({a['adapter_dim']}) after every "
        f"block MLP; {a['rounds']} rounds of {a['steps']} timed calls per variant, "
        f"{a['compile_repeats']} compile repeats, each the fastest of 3 compiles; small models "
        f"{a['small_steps']} calls per round, {a.get('disabled_steps', a['small_steps'])} in "
        f"the disabled-adapter part except nnx.jit); {results['machine']}",
    ]
    names = {"linen": "Linen", "nnx": "NNX"}
    for fw in ("linen", "nnx"):
        if f"{fw}_main" in results:
            r = results[f"{fw}_main"]
            lines += _section(
                f"{names[fw]}: jadapters vs the inline adapter (the physical minimum)",
                r["comparisons"],
                [_checks_note(r["checks"]) + _floors_note(r["checks"])],
            )
    disabled = [results[k] for k in ("linen_disabled", "nnx_disabled") if k in results]
    if disabled:
        leaves = "; ".join(
            f"{k.split('_')[0]}: {results[k]['leaves']['many']} vs "
            f"{results[k]['leaves']['one']} leaves"
            for k in ("linen_disabled", "nnx_disabled")
            if k in results
        )
        lines += _section(
            f"Disabled adapters cost nothing? ({a['disabled_count']} x "
            f"LinearAdapter({a['disabled_dim']}), one enabled; d=64, 2 layers, T=16, B=4)",
            [c for r in disabled for c in r["comparisons"]],
            [
                "Cached compiled calls, each given every adapter's weights (the whole model): "
                f"state {leaves}. Each pair is timed on its own, interleaved."
            ],
        )
    economy = [results[k] for k in ("linen_economy", "nnx_economy") if k in results]
    if economy:
        lines += _section(
            "Step economy at small sizes (T=32, B=8; full = jax.jit full-gradient Adam step)",
            [c for r in economy for c in r["comparisons"]],
            [
                "NNX full and inline steps: `nnx.split` once, `jax.jit` over the pure state; "
                "Linen: `jax.jit` over `apply`."
            ],
        )
    lines += [
        "",
        "Ratios are per round (each the median, over the round's calls, of the ratio of the "
        "two variants' calls run back to back, variants interleaved); a row passes only if "
        "the max is inside the target. Compile: trace + lower + XLA compile of fresh jitted "
        "functions, per repeat (the fastest of three, interleaved).",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    """Runs the parts of the benchmark ``args`` selects and returns the results."""
    results: dict[str, Any] = {"args": vars(args), "machine": machine_line(), "targets": TARGETS}
    for fw in _frameworks(args):
        if "main" in args.part:
            results[f"{fw}_main"] = (bench_linen_main if fw == "linen" else bench_nnx_main)(args)
            save_partial(args.json, results)
        if "disabled" in args.part:
            fn = bench_disabled_linen if fw == "linen" else bench_disabled_nnx
            results[f"{fw}_disabled"] = fn(args)
            save_partial(args.json, results)
        if "economy" in args.part:
            results[f"{fw}_economy"] = bench_economy(args, fw)
            save_partial(args.json, results)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
