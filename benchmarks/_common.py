"""What the benchmarks share: interleaved timing, state-threading steps, synthetic data."""

from __future__ import annotations

import gc
import importlib
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
import jax.numpy as jnp
import numpy as np
import optax

IN_FEATURES = 64
NUM_CLASSES = 10


_START = time.perf_counter()


def progress(what: str) -> None:
    """A line on stderr with the seconds since the start: a run stopped by a time limit (a
    lent GPU machine's) shows how far it got, and a log shows where the time went."""
    print(f"[{time.perf_counter() - _START:7.1f} s] {what}", file=sys.stderr, flush=True)


def save_partial(path: str | None, results: dict) -> None:
    """Writes the results so far to ``path`` (if given) after each part, so that a run stopped
    by a time limit keeps the parts it finished; the finished run writes them again."""
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
        progress(f"results so far written to {path}")


def optional_peer(name: str, extra: str = "bench"):
    """The module ``name`` of a comparison peer, or ``None`` with a printed note when it is not
    installed: the benchmark then skips that peer's rows instead of failing."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        print(
            f"note: {name} is not installed ({err}); its comparisons are skipped. "
            f'Install the peers with: pip install -e ".[{extra}]"',
            file=sys.stderr,
            flush=True,
        )
        return None


class Round(dict):
    """One round of interleaved timing: each variant's median milliseconds per call (the dict
    itself) and every call's milliseconds (``calls``, variant name -> list). The ``i``-th calls
    of all the variants ran one right after another."""

    def __init__(self, calls: dict[str, list[float]]):
        super().__init__({name: statistics.median(t) for name, t in calls.items()})
        self.calls = calls


def paired_ratio(round_: dict[str, float], ours: str, baseline: str) -> float:
    """The round's ratio of ``ours`` to ``baseline``: the median over the round's calls of the
    ratio of the two variants' ``i``-th calls, which ran back to back (a paired comparison:
    a slowdown of the machine that lasts longer than one call falls on both sides of each
    ratio and cancels out). For a plain dict of medians, the ratio of the medians."""
    calls = getattr(round_, "calls", None)
    if calls is None:
        return round_[ours] / round_[baseline]
    pairs = zip(calls[ours], calls[baseline], strict=True)
    return statistics.median(a / b for a, b in pairs)


def compare(
    what: str, rounds: list[dict[str, float]], ours: str, baseline: str, target: float | None
) -> dict:
    """One table row: per-round milliseconds of ``ours`` and ``baseline`` (medians) and their
    per-round ratios (:func:`paired_ratio`); it passes if the largest ratio is inside
    ``target`` (``None``: no target, for information)."""
    ratios = [paired_ratio(r, ours, baseline) for r in rounds]
    result = {
        "what": what,
        "ours_ms": [r[ours] for r in rounds],
        "baseline_ms": [r[baseline] for r in rounds],
        "ratios": ratios,
        "ratio": spread(ratios),
        "target": target,
    }
    result["pass"] = None if target is None else result["ratio"]["max"] <= target
    return result


def time_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int, steps: int) -> Round:
    """Median milliseconds per call of each ``fn`` (which must block on its result), with
    every call's time (a :class:`Round`).

    The variants are timed in turn within each round, alternating the order, so load from
    other processes falls on all of them alike and none always runs first. As ``timeit``
    does, the timed calls run with Python's garbage collector off (after a collection): a
    collection's cost grows with every object in the process, not with the code timed, and
    would otherwise fall on whichever call it interrupts.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    gc.collect()
    gc.disable()
    try:
        for i in range(steps):
            for name in order if i % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                fns[name]()
                times[name].append((time.perf_counter() - start) * 1e3)
    finally:
        gc.enable()
    return Round(times)


class Stepper:
    """Calls ``step(*state, *consts)``, keeps the first ``len(state)`` outputs as the new
    state, and blocks on the outputs after them (the metrics; the state where there are none).

    A compiled program's outputs are all ready when it ends, so the metrics say when the
    step is done, as in a training loop that reads its loss. Blocking on the whole state
    would also time JAX's readiness check of every array in it, arrays the step never
    touched included: about 1 us per array on a GPU, 0.1 us on a CPU (the Linen step
    returns the disabled adapters' weights that it set aside, untouched)."""

    def __init__(self, step, state, consts):
        self.step, self.state, self.consts = step, tuple(state), tuple(consts)

    def __call__(self):
        out = self.step(*self.state, *self.consts)
        self.state = tuple(out[: len(self.state)])
        jax.block_until_ready(out[len(self.state) :] or out)


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def token_data(batch: int, seq: int, features: int = IN_FEATURES):
    """Random ``(batch, seq, features)`` tokens and labels of 10 classes (fixed seed)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, seq, features)), jnp.float32)
    y = jnp.asarray(rng.integers(0, NUM_CLASSES, batch), jnp.int32)
    return x, y


def transformer_kwargs(args, heads: int) -> dict:
    """The benchmark transformer: ``mlp_dim = 4 * d_model``, 10 classes."""
    return dict(
        num_classes=NUM_CLASSES,
        d_model=args.d_model,
        num_layers=args.layers,
        num_heads=heads,
        mlp_dim=4 * args.d_model,
        max_len=args.seq,
    )


def randomize(tree, seed: int, scale: float = 0.02):
    """Small non-zero weights of the same shapes and dtypes (no all-zero up-projection)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: jnp.asarray(scale * rng.standard_normal(np.shape(a)), jnp.result_type(a)), tree
    )


def time_rounds(
    fns: dict[str, Callable[[], object]], *, rounds: int, warmup: int, steps: int
) -> list[Round]:
    """Per round, the median milliseconds per call of each ``fn`` (see :func:`time_interleaved`).

    Each round interleaves the variants and starts from the other end of the list than the
    round before, so every round yields one comparable median per variant and one ratio per
    pair of variants (:func:`paired_ratio`), and the spread of those ratios across rounds
    shows how far timing noise reaches. The first round warms up with ``warmup`` calls per
    variant, later ones with one.

    Args:
      fns: variant name -> a callable that blocks on its result.
      rounds: how many rounds.
      warmup: calls per variant before the first round's timed calls.
      steps: timed calls per variant and round.

    Returns:
      One :class:`Round` (``{name: median ms}``, and every call's time) per round.
    """
    names = list(fns)
    progress(f"timing {', '.join(names)}: {rounds} rounds of {steps} calls")
    results = []
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        results.append(
            time_interleaved(
                {name: fns[name] for name in order}, warmup=warmup if r == 0 else 1, steps=steps
            )
        )
    return results


def compile_rounds(
    makers: dict[str, Callable[[], Any]],
    args: dict[str, tuple],
    repeats: int,
    *,
    best_of: int = 3,
) -> list[dict[str, dict[str, float]]]:
    """Seconds to trace + lower, and to XLA-compile, fresh jitted functions, per repeat.

    Every compile calls the variant's maker for a new jitted function (anything with
    ``.lower``, such as ``jax.jit`` or ``nnx.jit`` results), so nothing is reused from an
    earlier trace. A repeat compiles the variants in turn, ``best_of`` times each, interleaved
    and alternating the order, and keeps each variant's fastest compile: compiling is
    deterministic work, and on a shared machine anything else running only adds to it (the
    minimum is what ``timeit`` recommends for such work). The spread across repeats then
    shows how far the noise reaches past that. As ``timeit`` does, each compile starts from a
    collected heap and runs with the garbage collector off, so that no variant pays for a
    collection of another's garbage.

    Args:
      makers: variant name -> a callable returning a fresh, not yet traced jitted function.
      args: variant name -> the arguments to lower it with.
      repeats: how many repeats.
      best_of: compiles per variant and repeat, of which the fastest counts.

    Returns:
      One ``{name: {"lower": s, "compile": s, "total": s}}`` dict per repeat (the fastest
      compile's parts).
    """
    names = list(makers)
    progress(f"compiling {', '.join(names)}: {repeats} repeats, best of {best_of}")
    results = []
    for r in range(repeats):
        times: dict[str, dict[str, float]] = {}
        for k in range(best_of):
            for name in names if (r + k) % 2 == 0 else names[::-1]:
                fn = makers[name]()
                gc.collect()  # as timeit: no variant pays for another's garbage
                gc.disable()
                try:
                    start = time.perf_counter()
                    lowered = fn.lower(*args[name])
                    mid = time.perf_counter()
                    lowered.compile()
                    end = time.perf_counter()
                finally:
                    gc.enable()
                t = {"lower": mid - start, "compile": end - mid, "total": end - start}
                if name not in times or t["total"] < times[name]["total"]:
                    times[name] = t
        results.append(times)
    return results


def spread(values: list[float]) -> dict[str, float]:
    """``{"min", "median", "max"}`` of ``values``."""
    return {
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
    }


def copy_tree(tree):
    """Own buffers for every leaf (steps donate theirs); PRNG keys included."""
    return jax.tree.map(lambda a: a.copy(), tree)


def full_gradient_step(loss, tx):
    """A jit step: gradient of ``loss(params, *consts)`` w.r.t. all ``params``, then ``tx``.

    ``step(params, opt_state, *consts) -> (params, opt_state, loss)``; params and optimizer
    state are donated. It returns its loss, as every step timed here does (see
    :class:`Stepper`).
    """

    def step(params, opt_state, *consts):
        value, grads = jax.value_and_grad(loss)(params, *consts)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return jax.jit(step, donate_argnums=(0, 1))


def machine_line() -> str:
    """Platform, CPU count, jax / flax / optax versions and the JAX backend, in one line."""
    device = jax.devices()[0]
    return (
        f"{platform.machine()} {platform.processor() or platform.system()}, "
        f"{os.cpu_count()} CPUs, jax {jax.__version__} ({device.platform}: {device.device_kind}), "
        f"flax {flax.__version__}, optax {optax.__version__}"
    )
