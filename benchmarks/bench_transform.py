"""adapter_transform benchmark: frozen-base training and adapter inference cost.

One process, one model (``LinenTransformer`` or ``NNXTransformer``: ``mlp_dim = 4 * d_model``,
8 heads, 10 classes, random token inputs of 64 features), a ``LinearAdapter(dim)`` after
every block's MLP, Adam throughout. Measured against baselines in the same run:

a. full fine-tuning step: gradient of every base parameter, Adam, jit, donated state;
b. adapter step: ``jadapters.linen_train_step`` / ``jadapters.nnx_train_step`` (gradient with
   respect to the adapters only, the base a constant);
c. ``optax.masked(adam, trainable_mask)`` over the full gradient (the trap: it also moves the
   base, reported in the table);
d. ``jadapters.freeze_base`` (``multi_transform`` with ``set_to_zero`` on the base) over the
   full gradient;
e. forward of the base model vs forward with adapters (evaluation mode);
f. compile time (lower + compile) of the base forward vs the wrapped forward.

Times are medians over ``--steps`` calls after ``--warmup`` calls, each blocked on its result;
the variants of one comparison are timed in turn within each round (interleaved), so load
from other processes affects them alike. Targets are DESIGN.md's: adapter step <= 0.65x full
fine-tuning, forward <= 1.05x base, compile <= 1.3x base.

    python benchmarks/bench_transform.py --json results.json
    python benchmarks/bench_transform.py --framework nnx --d-model 128 --layers 2 --seq 32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import numpy as np
import optax
from flax import nnx

import jadapters

try:
    from benchmarks._common import (
        IN_FEATURES,
        Stepper,
        cross_entropy,
        full_gradient_step,
        randomize,
        time_interleaved,
        token_data,
        transformer_kwargs,
    )
except ImportError:  # run as a script: python benchmarks/bench_transform.py
    from _common import (  # type: ignore[no-redef]
        IN_FEATURES,
        Stepper,
        cross_entropy,
        full_gradient_step,
        randomize,
        time_interleaved,
        token_data,
        transformer_kwargs,
    )
from jadapters.demo.models import LinenTransformer, NNXTransformer

HEADS = 8
LINEN_MLP = r"blocks_\d+/mlp"
NNX_MLP = r"blocks/\d+/mlp"
TARGETS = {"adapter_step": 0.65, "forward": 1.05, "compile": 1.3}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=("linen", "nnx", "both"), default="linen")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--adapter-dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile-repeats", type=int, default=3)
    parser.add_argument("--json", type=str, default=None, help="write the results here")
    return parser.parse_args(argv)


# --- timing ------------------------------------------------------------------------------------


def compile_seconds(fns: dict[str, Callable[..., Any]], args: dict[str, tuple], repeats: int):
    """Median seconds to trace + lower, and to compile, each of ``fns`` on its ``args``.

    Every repeat wraps the function in a new ``lambda`` and a new ``jax.jit``, so nothing is
    reused from an earlier trace; the functions are measured in turn within each repeat.
    """
    times: dict[str, dict[str, list[float]]] = {
        name: {"lower": [], "compile": [], "total": []} for name in fns
    }
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            lowered = jax.jit(lambda *a, fn=fn: fn(*a)).lower(*args[name])
            mid = time.perf_counter()
            lowered.compile()
            end = time.perf_counter()
            for part, value in (
                ("lower", mid - start),
                ("compile", end - mid),
                ("total", end - start),
            ):
                times[name][part].append(value)
    return {
        name: {part: statistics.median(v) for part, v in parts.items()}
        for name, parts in times.items()
    }


def _adapter_cfg(args):
    return jadapters.LinearAdapterConfig(dim=args.adapter_dim)


def _copy(tree):
    """Own buffers for every leaf (the steps donate theirs); PRNG keys included."""
    return jax.tree.map(lambda a: a.copy(), tree)


def _moved(before, after) -> bool:
    return any(
        not np.array_equal(p, q)
        for p, q in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
    )


def _count(tree) -> int:
    return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


# --- Linen -------------------------------------------------------------------------------------


def bench_linen(args) -> dict:
    x, y = token_data(args.batch, args.seq)
    model = LinenTransformer(**transformer_kwargs(args, HEADS))
    adapted = jadapters.adapter_transform(model, LINEN_MLP).add_adapter("task", _adapter_cfg(args))
    key = jax.random.key(0)

    # (f) compile time first, on fresh functions, before anything else compiled them
    base_params = jax.jit(model.init)(key, x[:1])["params"]
    adapters = randomize(adapted.init_adapters(key, {"params": base_params}, x[:1])["adapters"], 1)
    variables = {"params": base_params, "adapters": adapters}
    compile_s = compile_seconds(
        {
            "base": lambda p, x: model.apply({"params": p}, x),
            "adapted": lambda v, x: adapted.apply(v, x),
        },
        {"base": (base_params, x), "adapted": (variables, x)},
        args.compile_repeats,
    )

    # (e) forward
    base_fwd = jax.jit(lambda p, x: model.apply({"params": p}, x))
    adapted_fwd = jax.jit(lambda v, x: adapted.apply(v, x))
    forward_ms = time_interleaved(
        {
            "base": lambda: jax.block_until_ready(base_fwd(base_params, x)),
            "adapted": lambda: jax.block_until_ready(adapted_fwd(variables, x)),
        },
        warmup=args.warmup,
        steps=args.steps,
    )

    # (a)-(d) training steps
    adam = optax.adam(1e-4)

    def full_loss(params, x, y):
        return cross_entropy(model.apply({"params": params}, x), y)

    def adapted_loss(v, x, y):
        return cross_entropy(adapted.apply(v, x, adapter_train=True), y)

    def loss_fn(apply, batch):
        return cross_entropy(apply(batch[0]), batch[1])

    full_params = _copy(base_params)
    full = Stepper(
        full_gradient_step(full_loss, adam), (full_params, adam.init(full_params)), (x, y)
    )

    step = jadapters.linen_train_step(adapted, loss_fn, adam)
    keys = jax.random.key(1)
    ours = Stepper(
        lambda a, s, base, batch, k: step(a, s, base, batch, k),
        (_copy(adapters), step.init(adapters)),
        ({"params": base_params}, (x, y), keys),
    )

    mask = jadapters.trainable_mask(adapted, variables)
    masked_tx = optax.masked(adam, mask)
    masked_vars = _copy(variables)
    masked = Stepper(
        full_gradient_step(adapted_loss, masked_tx),
        (masked_vars, masked_tx.init(masked_vars)),
        (x, y),
    )

    frozen_tx = jadapters.freeze_base(adam, jadapters.param_labels(adapted, variables))
    frozen_vars = _copy(variables)
    frozen = Stepper(
        full_gradient_step(adapted_loss, frozen_tx),
        (frozen_vars, frozen_tx.init(frozen_vars)),
        (x, y),
    )
    step_ms = time_interleaved(
        {"full": full, "adapter_step": ours, "masked": masked, "freeze_base": frozen},
        warmup=args.warmup,
        steps=args.steps,
    )
    return {
        "step_ms": step_ms,
        "forward_ms": forward_ms,
        "compile_s": compile_s,
        "masked_moved_base": _moved(base_params, masked.state[0]["params"]),
        "freeze_base_moved_base": _moved(base_params, frozen.state[0]["params"]),
        "adapter_params": _count(adapters),
        "base_params": _count(base_params),
        "optimizer_state_params": {
            "full": _count(full.state[1]),
            "adapter_step": _count(ours.state[1]),
            "masked": _count(masked.state[1]),
            "freeze_base": _count(frozen.state[1]),
        },
    }


# --- NNX ---------------------------------------------------------------------------------------


def _nnx_models(args):
    base = NNXTransformer(IN_FEATURES, rngs=nnx.Rngs(0), **transformer_kwargs(args, HEADS))
    graphdef, state = nnx.split(base)
    adapted = nnx.merge(graphdef, _copy(state))
    jadapters.adapter_transform(adapted, NNX_MLP)
    adapted.add_adapter("task", _adapter_cfg(args), rngs=nnx.Rngs(params=1, dropout=2))
    nnx.update(adapted, randomize(nnx.state(adapted, jadapters.AdapterParam), 1))
    return base, adapted


def _pure_forward(model):
    graphdef, state = nnx.split(model)
    return (lambda s, x: nnx.merge(graphdef, s)(x)), state


def _functional(model, wrt):
    """``(loss(params, rest, x, y), params, rest)`` over the ``wrt`` partition of an NNX model.

    ``params`` is a pure dict (so optax masks and labels are plain dicts); ``rest`` (every
    other variable, the PRNG streams included) is an argument too, so that the model is
    rebuilt from traced values only.
    """
    graphdef, params, rest = nnx.split(model, wrt, ...)

    def loss(pure, rest, x, y):
        state = jax.tree.map(lambda v: v, params)  # new variables, inside the trace
        nnx.replace_by_pure_dict(state, pure)
        return cross_entropy(nnx.merge(graphdef, state, rest)(x), y)

    return loss, _copy(nnx.to_pure_dict(params)), rest


def bench_nnx(args) -> dict:
    x, y = token_data(args.batch, args.seq)
    base, adapted = _nnx_models(args)
    base.eval()
    adapted.eval()

    # (f) and (e)
    base_fn, base_state = _pure_forward(base)
    adapted_fn, adapted_state = _pure_forward(adapted)
    compile_s = compile_seconds(
        {"base": base_fn, "adapted": adapted_fn},
        {"base": (base_state, x), "adapted": (adapted_state, x)},
        args.compile_repeats,
    )
    base_fwd, adapted_fwd = jax.jit(base_fn), jax.jit(adapted_fn)
    forward_ms = time_interleaved(
        {
            "base": lambda: jax.block_until_ready(base_fwd(base_state, x)),
            "adapted": lambda: jax.block_until_ready(adapted_fwd(adapted_state, x)),
        },
        warmup=args.warmup,
        steps=args.steps,
    )

    # (a)-(d): the base runs in evaluation mode (no dropout in it anyway), adapters train
    adam = optax.adam(1e-4)
    base_before = nnx.to_pure_dict(_copy(nnx.state(adapted, nnx.Param)))

    full_loss, full_params, base_rest = _functional(base, nnx.Param)
    full = Stepper(
        full_gradient_step(full_loss, adam),
        (full_params, adam.init(full_params)),
        (base_rest, x, y),
    )

    ours_model = nnx.merge(*nnx.split(adapted))
    ours_model.train()
    optimizer = jadapters.adapter_optimizer(ours_model, adam)
    step = jadapters.nnx_train_step(lambda m, b: cross_entropy(m(b[0]), b[1]))

    def ours():
        jax.block_until_ready(step(ours_model, optimizer, (x, y)))

    # evaluation mode: this LinearAdapter has no dropout or stochastic depth, so the math is
    # the same, and a training-mode adapter draws a PRNG key, a stateful update that plain
    # jax.grad over nnx.merge cannot trace
    train_model = nnx.merge(*nnx.split(adapted))
    labels = jadapters.param_labels(train_model)
    both = nnx.Any(nnx.Param, jadapters.AdapterParam)
    adapted_loss, all_params, rest = _functional(train_model, both)

    masked_tx = optax.masked(adam, jax.tree.map(lambda label: label == "adapters", labels))
    masked = Stepper(
        full_gradient_step(adapted_loss, masked_tx),
        (all_params, masked_tx.init(all_params)),
        (rest, x, y),
    )
    frozen_tx = jadapters.freeze_base(adam, labels)
    frozen_params = _copy(all_params)
    frozen = Stepper(
        full_gradient_step(adapted_loss, frozen_tx),
        (frozen_params, frozen_tx.init(frozen_params)),
        (rest, x, y),
    )
    step_ms = time_interleaved(
        {"full": full, "adapter_step": ours, "masked": masked, "freeze_base": frozen},
        warmup=args.warmup,
        steps=args.steps,
    )
    return {
        "step_ms": step_ms,
        "forward_ms": forward_ms,
        "compile_s": compile_s,
        "masked_moved_base": _moved(base_before, _base_part(masked.state[0], base_before)),
        "freeze_base_moved_base": _moved(base_before, _base_part(frozen.state[0], base_before)),
        "adapter_step_moved_base": _moved(
            base_before, nnx.to_pure_dict(nnx.state(ours_model, nnx.Param))
        ),
        "adapter_params": _count(nnx.state(adapted, jadapters.AdapterParam)),
        "base_params": _count(base_before),
        "optimizer_state_params": {
            "full": _count(full.state[1]),
            "adapter_step": _count(nnx.state(optimizer, nnx.OptState)),
            "masked": _count(masked.state[1]),
            "freeze_base": _count(frozen.state[1]),
        },
    }


def _base_part(pure_all: dict, pure_base: dict) -> dict:
    """The entries of ``pure_all`` at the paths of ``pure_base``."""
    if isinstance(pure_base, dict):
        return {k: _base_part(pure_all[k], v) for k, v in pure_base.items()}
    return pure_all


# --- report ------------------------------------------------------------------------------------


def _rows(r: dict) -> list[tuple[str, float, float, str, float | None]]:
    s, f, c = r["step_ms"], r["forward_ms"], r["compile_s"]
    moved = "moved the base" if r["masked_moved_base"] else "base unchanged"
    return [
        ("train step: full fine-tuning (baseline)", s["full"], s["full"], "1.00", None),
        (
            "train step: adapters only (train_step)",
            s["adapter_step"],
            s["full"],
            f"<= {TARGETS['adapter_step']:.2f}",
            TARGETS["adapter_step"],
        ),
        (
            "train step: freeze_base over full gradient",
            s["freeze_base"],
            s["full"],
            "info",
            None,
        ),
        (
            f"train step: optax.masked over full gradient ({moved})",
            s["masked"],
            s["full"],
            "info",
            None,
        ),
        ("forward: base (baseline)", f["base"], f["base"], "1.00", None),
        (
            "forward: with adapters",
            f["adapted"],
            f["base"],
            f"<= {TARGETS['forward']:.2f}",
            TARGETS["forward"],
        ),
        (
            "compile (ms): base forward",
            1e3 * c["base"]["total"],
            1e3 * c["base"]["total"],
            "1.00",
            None,
        ),
        (
            "compile (ms): wrapped forward",
            1e3 * c["adapted"]["total"],
            1e3 * c["base"]["total"],
            f"<= {TARGETS['compile']:.2f}",
            TARGETS["compile"],
        ),
        (
            "compile, wrapped forward: trace + lower part",
            1e3 * c["adapted"]["lower"],
            1e3 * c["base"]["lower"],
            "info",
            None,
        ),
        (
            "compile, wrapped forward: XLA compile part",
            1e3 * c["adapted"]["compile"],
            1e3 * c["base"]["compile"],
            "info",
            None,
        ),
    ]


def _row(what, ms, baseline, target, limit):
    ratio = ms / baseline
    verdict = "" if limit is None else ("pass" if ratio <= limit else "FAIL")
    return f"| {what} | {ms:.2f} | {ratio:.3f} | {target} | {verdict} |"


def table(results: dict) -> str:
    a = results["args"]
    size = (
        f"d_model={a['d_model']}, layers={a['layers']}, heads={HEADS}, seq={a['seq']}, "
        f"batch={a['batch']}, adapter dim={a['adapter_dim']}, steps={a['steps']} (median), "
        f"warmup={a['warmup']}"
    )
    lines = [f"adapter_transform benchmark ({size}); {results['machine']}"]
    for framework in ("linen", "nnx"):
        if framework not in results:
            continue
        r = results[framework]
        lines += [
            "",
            f"{'NNX' if framework == 'nnx' else 'Linen'}: LinearAdapter({a['adapter_dim']}) "
            f"after every block MLP; {r['adapter_params']:,} adapter vs {r['base_params']:,} "
            "base parameters",
            "",
            "| measurement | ms | ratio | target | result |",
            "| --- | ---: | ---: | --- | --- |",
            *(_row(*row) for row in _rows(r)),
            "",
            "Optimizer state (parameters): "
            + ", ".join(f"{k} {v:,}" for k, v in r["optimizer_state_params"].items())
            + f". freeze_base moved the base: {r['freeze_base_moved_base']}; optax.masked "
            f"moved the base: {r['masked_moved_base']}.",
        ]
    lines += [
        "",
        "Ratios: train steps vs full fine-tuning, forwards vs the base forward, compile vs the "
        "base forward's compile (trace + lower + XLA compile, median of "
        f"{a['compile_repeats']} on fresh functions; the two 'part' rows give that part of the "
        "wrapped forward's compile and its ratio to the same part of the base's).",
    ]
    return "\n".join(lines)


def machine() -> str:
    device = jax.devices()[0]
    return (
        f"{platform.machine()} {platform.processor() or platform.system()}, "
        f"{os.cpu_count()} CPUs, jax {jax.__version__} ({device.platform}: {device.device_kind}), "
        f"flax {flax.__version__}, optax {optax.__version__}"
    )


def run(args: argparse.Namespace) -> dict:
    """Runs the benchmark for ``args`` (see :func:`parse_args`) and returns the results."""
    results: dict[str, Any] = {"args": vars(args), "machine": machine()}
    if args.framework in ("linen", "both"):
        results["linen"] = bench_linen(args)
    if args.framework in ("nnx", "both"):
        results["nnx"] = bench_nnx(args)
    results["targets"] = TARGETS
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
