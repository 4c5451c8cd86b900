"""The design's two "vs the unadapted model" ratios, for several checkouts of jadapters at once.

Adapter training step / full fine-tuning step, and forward compile time / the base forward's,
measured for each checkout by this checkout's harness (:mod:`benchmarks._common`: interleaved
rounds, fastest-of-3 compiles, steps blocked on their loss), on ``bench_inline``'s model
(d=512, 6 layers, T=128, B=8, ``LinearAdapter(64)`` after every block MLP, Adam). Each checkout
runs in its own process, one round at a time, the checkouts taking turns and alternating their
order, so that a slow minute of the machine falls on all of them alike.

It answers "did a change move these ratios?" with the same measurement on both sides, which a
figure recorded on another day cannot: the machine's speed (and with it the balance of
compute and memory traffic that sets these ratios) changes between days. It uses only the API
every jadapters release has had (``adapter_transform``, ``add_adapter``, ``init_adapters``,
``linen_train_step``). For example, against the first release::

    git worktree add ../jadapters-first 571d10c
    python benchmarks/bench_revisions.py ../jadapters-first . --rounds 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
MARK = "bench_revisions: "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkouts", nargs="*", help="jadapters checkouts (repository roots)")
    parser.add_argument("--rounds", type=int, default=4, help="processes per checkout")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def measure(steps: int) -> dict[str, float]:
    """One round in this process: the two ratios for the ``jadapters`` on ``sys.path``."""
    import jax
    import optax
    from _common import (
        Stepper,
        compile_rounds,
        copy_tree,
        cross_entropy,
        full_gradient_step,
        paired_ratio,
        randomize,
        time_rounds,
        token_data,
    )

    import jadapters
    from jadapters.demo.models import LinenTransformer

    x, y = token_data(8, 128)
    model = LinenTransformer(
        num_classes=10, d_model=512, num_layers=6, num_heads=8, mlp_dim=2048, max_len=128
    )
    cfg = jadapters.LinearAdapterConfig(dim=64)
    adapted = jadapters.adapter_transform(model, r"blocks_\d+/mlp").add_adapter("task", cfg)
    key = jax.random.key(0)
    params = jax.jit(model.init)(key, x[:1])["params"]
    adapters = adapted.init_adapters(key, {"params": params}, x[:1])["adapters"]
    adapters = randomize(adapters, 1, 0.1)
    variables = {"params": params, "adapters": adapters}

    compiles = compile_rounds(
        {
            "adapted": lambda: jax.jit(lambda v, x: adapted.apply(v, x)),
            "base": lambda: jax.jit(lambda p, x: model.apply({"params": p}, x)),
        },
        {"adapted": (variables, x), "base": (params, x)},
        1,
    )[0]
    adam = optax.adam(1e-4)
    loss = lambda apply, batch: cross_entropy(apply(batch[0]), batch[1])  # noqa: E731
    step = jadapters.linen_train_step(adapted, loss, adam)
    full = copy_tree(params)
    times = time_rounds(
        {
            "adapter": Stepper(
                step,
                (copy_tree(adapters), step.init(adapters)),
                ({"params": params}, (x, y), jax.random.key(1)),
            ),
            "full": Stepper(
                full_gradient_step(
                    lambda p, x, y: cross_entropy(model.apply({"params": p}, x), y), adam
                ),
                (full, adam.init(full)),
                (x, y),
            ),
        },
        rounds=1,
        warmup=3,
        steps=steps,
    )[0]
    return {
        "jadapters": os.path.dirname(os.path.dirname(os.path.abspath(jadapters.__file__))),
        "step_vs_full": paired_ratio(times, "adapter", "full"),
        "compile_vs_base": compiles["adapted"]["total"] / compiles["base"]["total"],
    }


def _worker(checkout: str, steps: int) -> None:
    sys.path[:0] = [checkout, HERE]
    result = measure(steps)
    if os.path.realpath(result["jadapters"]) != os.path.realpath(checkout):
        raise SystemExit(f"imported jadapters from {result['jadapters']}, not {checkout}")
    print(MARK + json.dumps(result), flush=True)


def run(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """``{checkout: {"step_vs_full": [...], "compile_vs_base": [...]}}``, one entry per round."""
    results = {c: {"step_vs_full": [], "compile_vs_base": []} for c in args.checkouts}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for r in range(args.rounds):
        for checkout in args.checkouts if r % 2 == 0 else args.checkouts[::-1]:
            cmd = [sys.executable, __file__, "--worker", checkout, "--steps", str(args.steps)]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            line = next(ln for ln in out.splitlines() if ln.startswith(MARK))
            result = json.loads(line[len(MARK) :])
            for k in ("step_vs_full", "compile_vs_base"):
                results[checkout][k].append(result[k])
            print(f"round {r + 1}, {checkout}: {line[len(MARK) :]}", file=sys.stderr, flush=True)
    return results


def table(results: dict[str, dict[str, list[float]]]) -> str:
    lines = [
        "| checkout | step / full fine-tuning: min / median / max | "
        "compile / base: min / median / max |",
        "| --- | --- | --- |",
    ]
    for checkout, r in results.items():
        cells = [
            " / ".join(f"{f(r[k]):.3f}" for f in (min, statistics.median, max))
            for k in ("step_vs_full", "compile_vs_base")
        ]
        lines.append(f"| {checkout} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        _worker(args.worker, args.steps)
        return 0
    if not args.checkouts:
        raise SystemExit("name at least one jadapters checkout, e.g. `.`")
    print(table(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
