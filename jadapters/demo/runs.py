"""The demo's training: pretraining on the source domain and four ways to adapt.

Every step is jit-compiled once per model and learning rate (``functools.cache`` over
the hashable Linen modules), so a second run in the same process reuses the compiled steps.
What each way of adapting differentiates:

* ``head``: ``params["head"]`` only; the rest of the model enters the step as a constant.
* ``adapter``/``lora``: the adapters collection only, through
  :func:`jadapters.linen_train_step`; the whole base (head included) is a constant.
* ``full``: every parameter (the same compiled step as pretraining).

Each loop leaves a ``replay`` of its compiled step; :func:`time_interleaved` times them in
turns, all at the same batch size, in the same process, so the demo can report each method's
step time relative to full fine-tuning, with its spread, even on a machine shared with other
work.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import jadapters
from jadapters.demo.models import LinenTransformer

TOKENS = 8

# Typical learning rates for each kind of training (Adam): a linear probe and small adapter
# weights take larger steps than the full network.
LEARNING_RATES = {"pretrain": 1e-3, "head": 1e-2, "adapter": 3e-3, "lora": 3e-3, "full": 1e-3}


@dataclasses.dataclass
class TrainLog:
    """What a training loop leaves: per-step losses, and ``replay``, a zero-argument function
    that runs one more (discarded) step from the final state and waits for it, for timing."""

    losses: list[float] = dataclasses.field(default_factory=list)
    replay: Callable[[], None] | None = None


def time_interleaved(
    replays: dict[str, Callable[[], None]], *, rounds: int = 10, steps: int = 10
) -> dict[str, np.ndarray]:
    """Seconds of each step of each compiled step, timed in turns: ``(rounds, steps)`` each.

    Each round times ``steps`` steps of every method in turn, so that the load from other
    processes on a shared machine falls on all methods alike, and ratios between methods can
    be taken round by round.
    """
    times: dict[str, np.ndarray] = {name: np.zeros((rounds, steps)) for name in replays}
    for replay in replays.values():
        replay()  # warm: any first-call work is not a step
    for r in range(rounds):
        for name, replay in replays.items():
            for s in range(steps):
                start = time.perf_counter()
                replay()
                times[name][r, s] = time.perf_counter() - start
    return times


def batch_indices(key: jax.Array, n: int, steps: int, batch_size: int) -> np.ndarray:
    """``(steps, batch_size)`` example indices: shuffled epochs, drawn from ``key``.

    NumPy shuffles, seeded by ``key``'s bits: the same key gives the same batches, and
    there is no permutation kernel to compile.
    """
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    epochs = -(-steps * batch_size // n)
    order = np.concatenate([rng.permutation(n) for _ in range(epochs)])
    return order[: steps * batch_size].reshape(steps, batch_size)


def _xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _adapter_loss(apply: Callable[..., Any], batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    images, labels = batch
    return _xent(apply(images), labels)


def count_params(tree: Any) -> int:
    return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------- compiled functions


@functools.cache
def logits_fn(model: Any) -> Callable[..., jax.Array]:
    """``jit(model.apply)``, one per (hashable) model."""
    return jax.jit(model.apply)


@functools.cache
def _init_fn(model: Any) -> Callable[..., Any]:
    return jax.jit(model.init)


@functools.cache
def _full_step(model: LinenTransformer, lr: float):
    tx = optax.adam(lr)

    def step(params, opt_state, images, labels):
        def loss_fn(params):
            return _xent(model.apply({"params": params}, images), labels)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return tx, jax.jit(step)


@functools.cache
def _head_step(model: LinenTransformer, lr: float):
    tx = optax.adam(lr)

    def step(head, opt_state, frozen, images, labels):
        def loss_fn(head):
            return _xent(model.apply({"params": {**frozen, "head": head}}, images), labels)

        loss, grads = jax.value_and_grad(loss_fn)(head)
        updates, opt_state = tx.update(grads, opt_state, head)
        return optax.apply_updates(head, updates), opt_state, loss

    return tx, jax.jit(step)


@functools.cache
def _adapter_step(adapted: jadapters.AdaptedLinen, lr: float):
    # No donation, like the other steps: the step times compare the same way.
    train_step = jadapters.linen_train_step(adapted, _adapter_loss, optax.adam(lr), donate=False)

    def step(adapters, opt_state, base, batch, key, i):
        # The step's PRNG key (for adapter dropout or stochastic depth, were they on) is
        # derived inside the compiled step: no extra dispatch per step.
        return train_step(adapters, opt_state, base, batch, jax.random.fold_in(key, i))

    return train_step, jax.jit(step)


# ------------------------------------------------------------------------- training


def _loop(
    step: Callable[[Any, np.ndarray, np.ndarray, int], tuple[Any, jax.Array]],
    state: Any,
    images: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    *,
    desc: str,
    progress: bool,
) -> tuple[Any, TrainLog]:
    log = TrainLog()
    for i in tqdm(
        range(len(indices)), desc=desc, disable=not progress, file=sys.stderr, leave=False
    ):
        idx = indices[i]
        state, loss = step(state, images[idx], labels[idx], i)
        log.losses.append(float(loss))
    final, x_last, y_last, i_last = state, images[indices[-1]], labels[indices[-1]], len(indices)

    def replay() -> None:
        jax.block_until_ready(step(final, x_last, y_last, i_last - 1))

    log.replay = replay
    return state, log


def init_params(model: LinenTransformer, key: jax.Array) -> dict:
    return _init_fn(model)(key, jnp.zeros((1, TOKENS, TOKENS), jnp.float32))["params"]


def train_full(
    model: LinenTransformer,
    params: dict,
    images: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    *,
    lr: float,
    desc: str,
    progress: bool,
) -> tuple[dict, TrainLog]:
    """Trains every parameter (pretraining, and full fine-tuning)."""
    tx, compiled = _full_step(model, lr)

    def step(state, x, y, i):
        params, opt_state = state
        params, opt_state, loss = compiled(params, opt_state, x, y)
        return (params, opt_state), loss

    (params, _), log = _loop(
        step, (params, tx.init(params)), images, labels, indices, desc=desc, progress=progress
    )
    return params, log


def train_head(
    model: LinenTransformer,
    params: dict,
    images: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    *,
    lr: float,
    progress: bool,
) -> tuple[dict, TrainLog]:
    """Trains ``params["head"]`` only; returns the full params with the new head."""
    tx, compiled = _head_step(model, lr)
    frozen = {k: v for k, v in params.items() if k != "head"}

    def step(state, x, y, i):
        head, opt_state = state
        head, opt_state, loss = compiled(head, opt_state, frozen, x, y)
        return (head, opt_state), loss

    state = (params["head"], tx.init(params["head"]))
    (head, _), log = _loop(step, state, images, labels, indices, desc="head", progress=progress)
    return {**frozen, "head": head}, log


def train_adapters(
    adapted: jadapters.AdaptedLinen,
    base: dict,
    adapters: Any,
    images: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    *,
    key: jax.Array,
    lr: float,
    desc: str,
    progress: bool,
) -> tuple[Any, TrainLog]:
    """Trains the enabled adapters of ``adapted``; ``base`` (``{"params": ...}``) is frozen."""
    train_step, compiled = _adapter_step(adapted, lr)

    def step(state, x, y, i):
        adapters, opt_state = state
        adapters, opt_state, metrics = compiled(adapters, opt_state, base, (x, y), key, i)
        return (adapters, opt_state), metrics["loss"]

    state = (adapters, train_step.init(adapters))
    (adapters, _), log = _loop(step, state, images, labels, indices, desc=desc, progress=progress)
    return adapters, log


def init_adapters(adapted: jadapters.AdaptedLinen, base: dict, key: jax.Array) -> Any:
    """Fresh weights for the adapters of ``adapted`` on top of ``base`` (``{"params": ...}``).

    Runs :meth:`~jadapters.AdaptedLinen.init_adapters` under ``jit``: only the adapters are
    initialized, so the compiled program is a forward pass, not the whole model's init.
    """
    variables = _init_adapters_fn(adapted)(key, base)
    return jadapters.split_variables(variables)[1]


@functools.cache
def _init_adapters_fn(adapted: jadapters.AdaptedLinen) -> Callable[..., Any]:
    example = jnp.zeros((1, TOKENS, TOKENS), jnp.float32)
    return jax.jit(lambda key, base: adapted.init_adapters(key, base, example))


def accuracy(apply: Callable[..., jax.Array], variables: Any, images, labels) -> float:
    logits = np.asarray(apply(variables, images))
    return float((logits.argmax(-1) == labels).mean())
