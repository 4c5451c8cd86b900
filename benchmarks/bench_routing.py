"""Per-example routing: a mixed batch through an adapter bank vs one adapter, and hot swap.

The model is the benchmark transformer (``LinenTransformer`` from ``jadapters.demo.models``:
``mlp_dim = 4 * d_model``, 8 heads, 10 classes, random tokens of 64 features), Linen, with
LoRA (rank 8, alpha 16) on every block's attention query and value projections and one
bottleneck adapter (``LinearAdapter(dim)``) after every block's MLP. Routed, each of the two is
an adapter bank (``AdapterBankConfig(adapter=..., slots=N)``) and every example of the batch
runs through its own slot (``apply(..., adapter_ids=ids)``, the ids a random mix over the
``N`` adapters); the baseline is the same model with one ordinary LoRA and one ordinary
bottleneck adapter, enabled for the whole batch. Every adapter has random, non-identity
weights, and before anything is timed the benchmark asserts that each routed example equals
that example run alone through the baseline model holding its adapter's weights
(``rtol = atol = 1e-5``).

Measured, each comparison timed interleaved:

1. forward (jitted) of a mixed batch over 8 adapters / forward with one adapter (<= 1.06);
2. the same over 64 adapters (<= 1.10): the bank's cost must not grow with the number of
   adapters;
3. for contrast (info), the PEFT-style loop over the unique adapters in the batch: the batch
   split on the host by adapter, each part (padded to a power of two, to bound compiles) run
   through the baseline model holding that adapter's weights, the outputs put back in order;
   PEFT loops over the unique adapters inside every layer (peft#2283), the same growth in N;
4. hot swap: ``load_slot`` of one adapter from a checkpoint into a slot of the compiled model
   (and ``put_slot`` from weights in memory) vs a full compile (trace + lower + XLA compile)
   of the routed forward; the jit cache is asserted not to grow;
5. training: one mixed Adam step over 8 adapters (``linen_train_step``, a sum of per-example
   losses) / 8 single-adapter steps, one per adapter on its own examples (info); the first
   mixed step is asserted to move every adapter as its own step does;
6. NNX (``NNXTransformer``, the same adapters): the forward of a mixed batch over 8 and 64
   adapters / one adapter (<= 1.06, <= 1.10), both through ``jadapters.nnx_forward``, after
   asserting each routed example equals it alone through the one-adapter model holding its
   slot's weights; the hot swap of 4. into the NNX model in place, under an ``nnx_forward``
   that must not trace again; and the training of 5. through ``nnx_train_step``, checked the
   same way. ``--framework linen`` or ``nnx`` runs one
   front-end's part.

Every comparison runs ``--rounds`` rounds of interleaved calls; each round gives one ratio, the
median over its calls of the ratio of two calls run back to back (a paired comparison), and
the table shows the ratio's min / median / max across rounds. A row passes only if
the *max* is inside its target.

    python benchmarks/bench_routing.py                 # full sizes
    python benchmarks/bench_routing.py --quick         # smoke test
    python benchmarks/bench_routing.py --json routing.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jadapters

try:
    from benchmarks._common import (
        IN_FEATURES,
        NUM_CLASSES,
        Stepper,
        compare,
        compile_rounds,
        copy_tree,
        machine_line,
        save_partial,
        spread,
        time_rounds,
        token_data,
        transformer_kwargs,
    )
except ImportError:  # run as a script: python benchmarks/bench_routing.py
    from _common import (  # type: ignore[no-redef]
        IN_FEATURES,
        NUM_CLASSES,
        Stepper,
        compare,
        compile_rounds,
        copy_tree,
        machine_line,
        save_partial,
        spread,
        time_rounds,
        token_data,
        transformer_kwargs,
    )
from jadapters.demo.models import LinenTransformer, NNXTransformer

HEADS = 8
TARGETS_RE = {"attn": r"blocks_\d+/attn/(query|value)", "mlp": r"blocks_\d+/mlp"}
NNX_TARGETS_RE = {"attn": r"blocks/\d+/attn/(query|value)", "mlp": r"blocks/\d+/mlp"}
RTOL = ATOL = 1e-5
WEIGHT_SCALE = 0.05  # random adapter weights: large enough to move the output clearly
TARGETS = {"bank_8": 1.06, "bank_64": 1.10}
QUICK = dict(
    d_model=64, layers=1, seq=16, batch=16, adapter_dim=16, rounds=2, steps=3, warmup=1, swaps=2
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; ``--quick`` overrides the sizes and counts with tiny ones."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--adapter-dim", type=int, default=64, help="bottleneck width")
    parser.add_argument("--adapters", default="8,64", help="bank sizes, comma-separated")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per timed comparison")
    parser.add_argument("--steps", type=int, default=10, help="timed calls per variant, round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--swaps", type=int, default=5, help="hot swaps and compiles timed")
    parser.add_argument(
        "--framework",
        choices=("linen", "nnx", "both"),
        default="both",
        help="nnx: the routed forward only (jadapters.nnx_forward)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--json", type=str, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    args.sizes = [int(n) for n in args.adapters.split(",")]
    return args


# --- models ------------------------------------------------------------------------------------


def _configs(args) -> dict[str, Any]:
    return {
        "attn:lora": jadapters.LoRAConfig(rank=args.rank, alpha=2.0 * args.rank),
        "mlp:bottleneck": jadapters.LinearAdapterConfig(dim=args.adapter_dim),
    }


def _randomize(tree, seed: int):
    """Random weights around the init (a LoRA B of zeros would make every adapter a no-op)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: a + jnp.asarray(WEIGHT_SCALE * rng.standard_normal(a.shape), a.dtype), tree
    )


def one_slot(tree, slot: int):
    """Adapter ``slot`` of a bank model's adapters, as the one-adapter model's adapters: the
    bank's ``{"slots": stacked}`` at each host becomes slice ``slot`` of every array."""
    if isinstance(tree, dict):
        if set(tree) == {"slots"}:
            return jax.tree.map(lambda p: p[slot], tree["slots"])
        return {k: one_slot(v, slot) for k, v in tree.items()}
    return tree


def setup(args) -> dict[str, Any]:
    """The base, the one-adapter model, and one bank model per size, with random weights."""
    x, y = token_data(args.batch, args.seq)
    model = LinenTransformer(**transformer_kwargs(args, HEADS))
    key = jax.random.key(0)
    base = {"params": jax.jit(model.init)(key, x[:1])["params"]}
    one = jadapters.adapter_transform(model, TARGETS_RE)
    for name, cfg in _configs(args).items():
        one = one.add_adapter(name, cfg)
    banks = {}
    for n in args.sizes:
        banked = jadapters.adapter_transform(model, TARGETS_RE)
        for name, cfg in _configs(args).items():
            banked = banked.add_adapter(name, jadapters.AdapterBankConfig(adapter=cfg, slots=n))
        _, adapters = jadapters.split_variables(banked.init_adapters(key, base, x[:1]))
        ids = np.random.default_rng(n).integers(0, n, args.batch).astype(np.int32)
        banks[n] = {"model": banked, "adapters": _randomize(adapters, n), "ids": ids}
    return {"model": model, "one": one, "base": base, "x": x, "y": y, "banks": banks}


# --- forward ------------------------------------------------------------------------------------


def _blocking(fn, *args):
    return lambda: jax.block_until_ready(fn(*args))


def _bucket(n: int) -> int:
    return 1 << (n - 1).bit_length()


def peft_loop(one_fwd, base, tenants, x, ids):
    """The batch split on the host by adapter, each part through the one-adapter model with
    that adapter's weights (rows padded to a power of two), the outputs put back in order."""
    parts = []
    for k in np.unique(ids):
        rows = np.flatnonzero(ids == k)
        padded = np.resize(rows, _bucket(len(rows)))
        parts.append((rows, one_fwd(base, tenants[int(k)], x, padded)))
    out = np.empty((len(ids), NUM_CLASSES), np.float32)
    for rows, logits in parts:
        out[rows] = np.asarray(logits)[: len(rows)]
    return out


def bench_forward(args, s) -> dict:
    """Mixed batch through a bank of N vs one adapter, and the PEFT-style loop (per N)."""
    one, base, x = s["one"], s["base"], s["x"]
    one_fwd = jax.jit(lambda b, a, x, rows: one.apply({**b, "adapters": a}, jnp.take(x, rows, 0)))
    everything = np.arange(args.batch)
    checks, comparisons = {}, []
    for n, bank in s["banks"].items():
        model, adapters, ids = bank["model"], bank["adapters"], bank["ids"]
        fwd = jax.jit(lambda v, x, ids, m=model: m.apply(v, x, adapter_ids=ids))
        variables = {**base, "adapters": adapters}
        tenants = {int(k): one_slot(adapters, int(k)) for k in np.unique(ids)}
        routed = np.asarray(fwd(variables, x, ids))
        alone = np.stack(
            [
                np.asarray(one_fwd(base, tenants[int(k)], x, np.array([i])))[0]
                for i, k in enumerate(ids)
            ]
        )
        np.testing.assert_allclose(routed, alone, rtol=RTOL, atol=ATOL)
        first = tenants[int(ids[0])]
        effect = float(
            np.abs(
                np.asarray(one_fwd(base, first, x, everything))
                - one.apply({**base, "adapters": jax.tree.map(jnp.zeros_like, first)}, x)
            ).max()
        )
        looped = peft_loop(one_fwd, base, tenants, x, ids)
        np.testing.assert_allclose(looped, routed, rtol=RTOL, atol=ATOL)
        checks[n] = {
            "routed_vs_alone_max_abs_diff": float(np.abs(routed - alone).max()),
            "adapter_effect": effect,
            "unique_adapters_in_batch": len(tenants),
        }
        rounds = time_rounds(
            {
                "bank": _blocking(fwd, variables, x, ids),
                "one": _blocking(one_fwd, base, first, x, everything),
                "loop": lambda t=tenants, ids=ids: peft_loop(one_fwd, base, t, x, ids),
            },
            rounds=args.rounds,
            warmup=args.warmup,
            steps=args.steps,
        )
        comparisons += [
            compare(
                f"forward, mixed batch over {n} adapters (bank) / one adapter",
                rounds,
                "bank",
                "one",
                TARGETS.get(f"bank_{n}"),
            ),
            compare(
                f"forward, PEFT-style loop over the {len(tenants)} unique adapters of {n} / "
                "one adapter",
                rounds,
                "loop",
                "one",
                None,
            ),
        ]
    return {"checks": checks, "comparisons": comparisons}


def _nnx_model(args, configs: dict[str, Any]):
    """The NNX benchmark transformer (the same base weights every time) with ``configs``."""
    model = NNXTransformer(IN_FEATURES, rngs=nnx.Rngs(0), **transformer_kwargs(args, HEADS))
    jadapters.adapter_transform(model, NNX_TARGETS_RE)
    for i, (name, cfg) in enumerate(configs.items()):
        model.add_adapter(name, cfg, rngs=nnx.Rngs(params=i + 1, dropout=i + 100))
    model.eval()
    return model


def _routed(model, x, ids):
    with jadapters.route(ids):
        return model(x)


def _banks(args, n: int) -> dict[str, Any]:
    """The adapters of ``_configs`` as banks of ``n`` slots."""
    return {
        name: jadapters.AdapterBankConfig(adapter=cfg, slots=n)
        for name, cfg in _configs(args).items()
    }


def _weights(model) -> dict:
    """An NNX model's adapter weights as a pure dict."""
    return nnx.to_pure_dict(nnx.state(model, jadapters.AdapterParam))


def _set_weights(model, pure: dict) -> None:
    """Sets an NNX model's adapter weights from a pure dict (as :func:`_weights` gives)."""
    state = nnx.state(model, jadapters.AdapterParam)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)


def bench_forward_nnx(args, s) -> dict:
    """NNX: a mixed batch through a bank of N vs one adapter, each through
    ``jadapters.nnx_forward`` (split once; the ids are traced data)."""
    x = s["x"]
    one = _nnx_model(args, _configs(args))
    one_fwd = jadapters.nnx_forward()
    checks, comparisons = {}, []
    for n in args.sizes:
        model = _nnx_model(args, _banks(args, n))
        adapters = _randomize(_weights(model), n)
        _set_weights(model, adapters)
        ids = s["banks"][n]["ids"]
        fwd = jadapters.nnx_forward(_routed)
        routed = np.asarray(fwd(model, x, ids))

        def use(slot: int, adapters=adapters) -> None:
            _set_weights(one, one_slot(adapters, slot))

        alone = []
        for slot in np.unique(ids):  # each slot's examples, through the one-adapter model
            use(int(slot))
            out = np.asarray(one_fwd(one, x))
            alone += [(i, out[i]) for i in np.flatnonzero(ids == slot)]
        alone = np.stack([row for _, row in sorted(alone, key=lambda item: item[0])])
        np.testing.assert_allclose(routed, alone, rtol=RTOL, atol=ATOL)
        use(int(ids[0]))
        checks[n] = {"routed_vs_alone_max_abs_diff": float(np.abs(routed - alone).max())}
        rounds = time_rounds(
            {"bank": _blocking(fwd, model, x, ids), "one": _blocking(one_fwd, one, x)},
            rounds=args.rounds,
            warmup=args.warmup,
            steps=args.steps,
        )
        comparisons.append(
            compare(
                f"NNX forward (nnx_forward), mixed batch over {n} adapters (bank) / one adapter",
                rounds,
                "bank",
                "one",
                TARGETS.get(f"bank_{n}"),
            )
        )
    return {"checks": checks, "comparisons": comparisons}


# --- hot swap -----------------------------------------------------------------------------------


def bench_swap(args, s) -> dict:
    """``load_slot`` / ``put_slot`` into the compiled model vs a full compile of its forward."""
    n = min(s["banks"])
    bank = s["banks"][n]
    model, ids, base, x = bank["model"], bank["ids"], s["base"], s["x"]
    variables = {**base, "adapters": bank["adapters"]}
    fwd = jax.jit(lambda v, x, ids: model.apply(v, x, adapter_ids=ids))
    before = np.asarray(fwd(variables, x, ids))
    # a new adapter, trained elsewhere as an ordinary adapter and saved: stand-in weights
    one = s["one"]
    fresh = one_slot(_randomize(bank["adapters"], 1234), 0)
    path = os.path.join(tempfile.mkdtemp(), "new")
    jadapters.save_adapters(path, one, {**base, "adapters": fresh}, name=["lora", "bottleneck"])
    slot = int(ids[0])
    load_ms, put_ms = [], []
    for _ in range(args.swaps):
        start = time.perf_counter()
        swapped = jadapters.load_slot(path, model, variables, bank="lora", slot=slot, name="lora")
        swapped = jadapters.load_slot(
            path, model, swapped, bank="bottleneck", slot=slot, name="bottleneck"
        )
        jax.block_until_ready(swapped)
        load_ms.append(1e3 * (time.perf_counter() - start))
    weights = {
        name: jadapters.slot_weights(model, swapped, bank=name, slot=slot)
        for name in ("lora", "bottleneck")
    }
    for _ in range(args.swaps):
        start = time.perf_counter()
        put = variables
        for name, w in weights.items():
            put = jadapters.put_slot(model, put, bank=name, slot=slot, weights=w)
        jax.block_until_ready(put)
        put_ms.append(1e3 * (time.perf_counter() - start))
    after = np.asarray(fwd(swapped, x, ids))
    if fwd._cache_size() != 1:
        raise AssertionError(f"a hot swap recompiled: jit cache size {fwd._cache_size()}")
    rows = ids == slot
    expected = np.asarray(one.apply({**base, "adapters": fresh}, x))[rows]
    np.testing.assert_allclose(after[rows], expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(after[~rows], before[~rows], rtol=RTOL, atol=ATOL)
    compiles = compile_rounds(
        {"compile": lambda: jax.jit(lambda v, x, ids: model.apply(v, x, adapter_ids=ids))},
        {"compile": (variables, x, ids)},
        args.swaps,
    )
    compile_ms = [1e3 * r["compile"]["total"] for r in compiles]
    return {
        "slots": n,
        "load_slot_ms": spread(load_ms),
        "put_slot_ms": spread(put_ms),
        "compile_ms": spread(compile_ms),
        "jit_cache_size_after_swaps": fwd._cache_size(),
    }


def bench_swap_nnx(args, s) -> dict:
    """NNX: ``load_slot`` / ``put_slot`` into the model (in place) that an ``nnx_forward``
    has compiled vs a full compile of that forward; the forward must not trace again."""
    n = min(args.sizes)
    x, ids = s["x"], s["banks"][n]["ids"]
    model = _nnx_model(args, _banks(args, n))
    _set_weights(model, _randomize(_weights(model), n))
    traces = []

    def routed(model, x, ids):
        traces.append(len(traces))
        return _routed(model, x, ids)

    fwd = jadapters.nnx_forward(routed)
    before = np.asarray(fwd(model, x, ids))
    # a new adapter, trained elsewhere as an ordinary adapter and saved: stand-in weights
    one = _nnx_model(args, _configs(args))
    _set_weights(one, _randomize(_weights(one), 1234))
    path = os.path.join(tempfile.mkdtemp(), "new")
    jadapters.save_adapters(path, one, name=["lora", "bottleneck"])
    slot = int(ids[0])
    load_ms, put_ms = [], []
    for _ in range(args.swaps):
        start = time.perf_counter()
        for name in ("lora", "bottleneck"):
            jadapters.load_slot(path, model, bank=name, slot=slot, name=name)
        jax.block_until_ready(nnx.state(model, jadapters.AdapterParam))
        load_ms.append(1e3 * (time.perf_counter() - start))
    weights = {
        name: jadapters.slot_weights(model, bank=name, slot=slot) for name in ("lora", "bottleneck")
    }
    for _ in range(args.swaps):
        start = time.perf_counter()
        for name, w in weights.items():
            jadapters.put_slot(model, bank=name, slot=slot, weights=w)
        jax.block_until_ready(nnx.state(model, jadapters.AdapterParam))
        put_ms.append(1e3 * (time.perf_counter() - start))
    after = np.asarray(fwd(model, x, ids))
    if len(traces) != 1:
        raise AssertionError(f"a hot swap traced the forward again: {len(traces)} traces")
    rows = ids == slot
    np.testing.assert_allclose(after[rows], np.asarray(one(x))[rows], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(after[~rows], before[~rows], rtol=RTOL, atol=ATOL)
    compiles = compile_rounds(
        {"compile": lambda: jadapters.nnx_forward(_routed)},
        {"compile": (model, x, ids)},
        args.swaps,
    )
    return {
        "slots": n,
        "load_slot_ms": spread(load_ms),
        "put_slot_ms": spread(put_ms),
        "compile_ms": spread([1e3 * r["compile"]["total"] for r in compiles]),
        "traces_after_swaps": len(traces),
    }


# --- training -----------------------------------------------------------------------------------


def _sum_xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()


def bench_train(args, s) -> dict:
    """One mixed step over N adapters vs N single-adapter steps on the same examples."""
    n = min(s["banks"])
    bank = s["banks"][n]
    model, base, x, y = bank["model"], s["base"], s["x"], s["y"]
    ids = (np.arange(args.batch) % n).astype(np.int32)  # every adapter has examples
    tx = optax.adam(1e-3)

    def mixed_loss(apply, batch):
        return _sum_xent(apply(batch[0], adapter_ids=batch[2]), batch[1])

    def single_loss(apply, batch):
        return _sum_xent(apply(batch[0]), batch[1])

    mixed = jadapters.linen_train_step(model, mixed_loss, tx)
    single = jadapters.linen_train_step(s["one"], single_loss, tx)
    key = jax.random.key(0)
    adapters = copy_tree(bank["adapters"])
    rows = [np.flatnonzero(ids == k) for k in range(n)]
    parts = [(x[r], y[r]) for r in rows]
    tenants = [one_slot(adapters, k) for k in range(n)]
    # correctness first: the mixed step moves each adapter as its own step does. Checked with
    # SGD, whose update is the gradient itself: Adam's first step is about lr * sign(g), so
    # summation-order noise in a near-zero gradient entry flips it by up to lr.
    check_tx = optax.sgd(1e-3)
    mixed_sgd = jadapters.linen_train_step(model, mixed_loss, check_tx)
    single_sgd = jadapters.linen_train_step(s["one"], single_loss, check_tx)
    got, _, _ = mixed_sgd(copy_tree(adapters), mixed_sgd.init(adapters), base, (x, y, ids), key)
    for k in range(n):
        own, _, _ = single_sgd(
            copy_tree(tenants[k]), single_sgd.init(tenants[k]), base, parts[k], key
        )
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
            one_slot(got, k),
            own,
        )
    mixed_stepper = Stepper(mixed, (adapters, mixed.init(adapters)), (base, (x, y, ids), key))
    singles = [
        Stepper(single, (copy_tree(t), single.init(t)), (base, part, key))
        for t, part in zip(tenants, parts, strict=True)
    ]

    def all_singles():
        for stepper in singles:
            stepper()

    rounds = time_rounds(
        {"mixed": mixed_stepper, "singles": all_singles},
        rounds=args.rounds,
        warmup=args.warmup,
        steps=args.steps,
    )
    what = f"train step (Adam), one mixed step over {n} adapters / {n} single-adapter steps"
    return {"comparisons": [compare(what, rounds, "mixed", "singles", None)]}


def bench_train_nnx(args, s) -> dict:
    """NNX: one mixed ``nnx_train_step`` over N adapters vs N single-adapter steps, each on
    its own model and optimizer, on the same examples."""
    n = min(args.sizes)
    x, y = s["x"], s["y"]
    ids = jnp.asarray(np.arange(args.batch) % n, jnp.int32)  # every adapter has examples

    def models():
        """The bank model (random slots) and one ordinary model per slot, holding its weights."""
        bank = _nnx_model(args, _banks(args, n))
        _set_weights(bank, _randomize(_weights(bank), n))
        tenants = [_nnx_model(args, _configs(args)) for _ in range(n)]
        for k, tenant in enumerate(tenants):
            _set_weights(tenant, one_slot(_weights(bank), k))
        return bank, tenants

    def mixed_loss(model, batch):
        with jadapters.route(batch[2]):
            return _sum_xent(model(batch[0]), batch[1])

    def single_loss(model, batch):
        return _sum_xent(model(batch[0]), batch[1])

    parts = [(x[r], y[r]) for r in (np.flatnonzero(np.asarray(ids) == k) for k in range(n))]
    # correctness first, with SGD (see bench_train): one mixed step moves each slot as the
    # slot's own step on its own examples moves that adapter
    sgd = optax.sgd(1e-3)
    bank, tenants = models()
    jadapters.nnx_train_step(mixed_loss)(bank, jadapters.adapter_optimizer(bank, sgd), (x, y, ids))
    for k, (tenant, part) in enumerate(zip(tenants, parts, strict=True)):
        jadapters.nnx_train_step(single_loss)(
            tenant, jadapters.adapter_optimizer(tenant, sgd), part
        )
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
            one_slot(_weights(bank), k),
            _weights(tenant),
        )
    adam = optax.adam(1e-3)
    bank, tenants = models()
    mixed = (
        jadapters.nnx_train_step(mixed_loss),
        bank,
        jadapters.adapter_optimizer(bank, adam),
        (x, y, ids),
    )
    singles = [  # one step per tenant: a compiled step keeps the split of its last model
        (jadapters.nnx_train_step(single_loss), t, jadapters.adapter_optimizer(t, adam), part)
        for t, part in zip(tenants, parts, strict=True)
    ]

    def run(*calls):
        for step, model, optimizer, batch in calls:
            jax.block_until_ready(step(model, optimizer, batch))

    rounds = time_rounds(
        {"mixed": lambda: run(mixed), "singles": lambda: run(*singles)},
        rounds=args.rounds,
        warmup=args.warmup,
        steps=args.steps,
    )
    what = (
        f"NNX train step (Adam, nnx_train_step), one mixed step over {n} adapters / "
        f"{n} single-adapter steps"
    )
    return {"comparisons": [compare(what, rounds, "mixed", "singles", None)]}


# --- report -------------------------------------------------------------------------------------


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


def table(results: dict) -> str:
    """The results as markdown."""
    a = results["args"]
    lines = [
        f"Routing benchmark (LinenTransformer / NNXTransformer, d_model={a['d_model']}, "
        f"layers={a['layers']}, heads={HEADS}, seq={a['seq']}, batch={a['batch']}; LoRA rank "
        f"{a['rank']} on attention query/value and LinearAdapter({a['adapter_dim']}) after "
        f"every MLP, as banks of {a['adapters']} slots; {a['rounds']} rounds of {a['steps']} "
        f"timed calls per variant); {results['machine']}",
        "",
        HEADER,
    ]
    if "forward" in results:
        lines += [_row(c) for c in results["forward"]["comparisons"]]
        lines += [_row(c) for c in results["train"]["comparisons"]]
    if "nnx_forward" in results:
        lines += [_row(c) for c in results["nnx_forward"]["comparisons"]]
    if "nnx_train" in results:
        lines += [_row(c) for c in results["nnx_train"]["comparisons"]]
    lines.append("")
    if "forward" in results:
        lines += _linen_notes(results)
    if "nnx_forward" in results:
        checks = results["nnx_forward"]["checks"]
        lines += [
            "",
            "NNX: each routed example equals it alone through the model with one ordinary "
            "adapter holding its slot's weights; max |difference| "
            + ", ".join(
                f"{c['routed_vs_alone_max_abs_diff']:.1e} over {n} adapters"
                for n, c in checks.items()
            )
            + ". Both forwards are `jadapters.nnx_forward` (the ids are traced data).",
        ]
    if "nnx_swap" in results:
        sw = results["nnx_swap"]
        lines += [
            "",
            _swap_line("NNX", sw, a["swaps"])
            + f" The slots change in place under the compiled `nnx_forward`, which traced "
            f"{sw['traces_after_swaps']} time(s) in all; the swapped slot's examples equal the "
            "saved adapter's model, the others are unchanged.",
        ]
    lines += [
        "",
        "Ratios are per round (each the median, over the round's calls, of the ratio of the "
        "two variants' calls run back to back, variants interleaved); a row passes only if "
        "the max is inside the target.",
    ]
    return "\n".join(lines)


def _linen_notes(results: dict) -> list[str]:
    a = results["args"]
    checks = results["forward"]["checks"]
    effect = next(iter(checks.values()))["adapter_effect"]
    lines = [
        "Asserted before timing: each routed example equals it alone with its adapter; max "
        "|difference| "
        + ", ".join(
            f"{c['routed_vs_alone_max_abs_diff']:.1e} over {n} adapters" for n, c in checks.items()
        )
        + f" (an adapter's effect on the logits: {effect:.1e})."
        " The mixed training step moved each adapter as its own step did."
    ]
    sw = results["swap"]
    lines += [
        "",
        _swap_line("Linen", sw, a["swaps"])
        + f" jit cache size after the swaps: {sw['jit_cache_size_after_swaps']}.",
    ]
    return lines


def _swap_line(framework: str, sw: dict, swaps: int) -> str:
    return (
        f"{framework}: hot swap into a slot of a {sw['slots']}-slot bank (both banks, LoRA and "
        f"bottleneck), median of {swaps} (min-max): `load_slot` from a checkpoint "
        f"{sw['load_slot_ms']['median']:.1f} ms ({sw['load_slot_ms']['min']:.1f}-"
        f"{sw['load_slot_ms']['max']:.1f}), `put_slot` from memory "
        f"{sw['put_slot_ms']['median']:.1f} ms; a full compile of the routed forward "
        f"{sw['compile_ms']['median']:.0f} ms ({sw['compile_ms']['min']:.0f}-"
        f"{sw['compile_ms']['max']:.0f}); swap / compile "
        f"{sw['load_slot_ms']['median'] / sw['compile_ms']['median']:.3f}."
    )


def run(args: argparse.Namespace) -> dict:
    """Runs the benchmark and returns the results."""
    s = setup(args)
    results: dict[str, Any] = {
        "args": {k: v for k, v in vars(args).items() if k != "sizes"},
        "machine": machine_line(),
        "targets": TARGETS,
    }
    parts = {
        "linen": {"forward": bench_forward, "swap": bench_swap, "train": bench_train},
        "nnx": {
            "nnx_forward": bench_forward_nnx,
            "nnx_swap": bench_swap_nnx,
            "nnx_train": bench_train_nnx,
        },
    }
    for framework, benches in parts.items():
        if args.framework in (framework, "both"):
            for key, bench in benches.items():
                results[key] = bench(args, s)
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
