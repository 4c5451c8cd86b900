"""What the benchmarks share: interleaved timing, state-threading steps, synthetic data."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

IN_FEATURES = 64
NUM_CLASSES = 10


def time_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int, steps: int):
    """Median milliseconds per call of each ``fn`` (which must block on its result).

    The variants are timed in turn within each round, alternating the order, so load from
    other processes falls on all of them alike and none always runs first.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for i in range(steps):
        for name in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


class Stepper:
    """Calls ``step(*state, *consts)``, keeps the first ``len(state)`` outputs as the new
    state, and blocks on the result."""

    def __init__(self, step, state, consts):
        self.step, self.state, self.consts = step, tuple(state), tuple(consts)

    def __call__(self):
        out = self.step(*self.state, *self.consts)
        self.state = tuple(out[: len(self.state)])
        jax.block_until_ready(out)


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
