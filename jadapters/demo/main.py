"""``python -m jadapters demo``: pretrain a small transformer, then adapt it to a shifted domain.

The data are scikit-learn's bundled 8x8 handwritten digits (nothing is downloaded). A
:class:`~jadapters.demo.models.LinenTransformer` is pretrained on upright digits (the source
domain), then adapted to the same digits rotated by 90 degrees and inverted (the target
domain, see :mod:`jadapters.demo.data`) in up to four ways, each from the same pretrained
weights, with the same batches and batch size:

* ``head``: only the classifier head trains (a linear probe on frozen features).
* ``adapter``: :class:`jadapters.LinearAdapter` bottlenecks after the attention and after the
  MLP of every block (Houlsby et al. 2019), added by :func:`jadapters.adapter_transform`
  without touching the model's code. Only the adapters train; the base *and its head* stay
  frozen, since the classes do not change (training the head as well measured no better).
* ``lora``: ``jadapters.LoRAConfig`` on the attention query and value kernels, where this
  version of jadapters has it; adapters only, as above.
* ``full``: every parameter trains.

It prints a table of test accuracy on both domains, trainable parameters, step time relative
to full fine-tuning and checkpoint size, writes the checkpoints, ``results.json`` and a plot of
the training curves into ``--out-dir``, and returns the exit code.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import Any, TextIO

import jax
import numpy as np

from jadapters.demo import data, methods, report, runs
from jadapters.demo.config import METHODS, DemoConfig

# ------------------------------------------------------------------------------- demo


def run_demo(config: DemoConfig, *, out: TextIO | None = None) -> dict[str, Any]:
    """Runs the demo; returns its results as plain Python values (JSON-serializable).

    Args:
      config: the run's settings.
      out: where to print what the demo is doing and the table; ``None`` prints nothing.

    Returns:
      ``{"config", "data", "model", "pretrained", "methods", "skipped", "plot"}``:
      ``results["methods"][name]`` holds, for each method run, ``target_acc``,
      ``source_acc``, ``source_acc_disabled`` (adapter methods), ``trainable_params``,
      ``step_seconds``, ``step_ratio`` (vs ``full``), ``checkpoint_bytes``, ``losses``, ...
      ``results["skipped"]`` says why a requested method did not run.
    """

    def say(*lines: str) -> None:
        if out is not None:
            print(*lines, sep="\n", file=out, flush=True)

    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = ("init", "pretrain", "adapt", *METHODS)
    # XLA's RngBitGenerator ("rbg") compiles in a fraction of threefry's time on CPU, and
    # compilation is most of this small demo's run time. Same key, same numbers.
    root = jax.random.key(config.seed, impl="rbg")
    keys = dict(zip(names, jax.random.split(root, len(names)), strict=True))

    images, labels = data.load_digits_tokens()
    src = data.train_test_split(images, labels, seed=config.seed)
    shift = functools.partial(data.shift_domain, kind=config.shift)
    tgt = data.Split(shift(src.x_train), src.y_train, shift(src.x_test), src.y_test)
    model = runs.build_model(d_model=config.d_model, layers=config.layers, heads=config.heads)
    params = runs.init_params(model, keys["init"])
    total = runs.count_params(params)
    say(
        "jadapters demo: adapting a pretrained transformer to a shifted domain",
        f"data: {data.SOURCE_DESCRIPTION}",
        f"  {len(src.x_train)} train / {len(src.x_test)} test images (split by seed "
        f"{config.seed}), each 8 tokens (pixel rows) of 8 features in [0, 1]",
        "  source domain: upright digits; target domain: the same digits "
        + data.SHIFT_DESCRIPTIONS[config.shift],
        f"model: LinenTransformer, d_model {config.d_model}, {config.layers} layers, "
        f"{config.heads} heads, mlp {2 * config.d_model}: {total:,} parameters",
    )

    pre_idx = runs.batch_indices(
        keys["pretrain"], len(src.x_train), config.pretrain_steps, config.batch_size
    )
    params, pre_log = runs.train_full(
        model,
        params,
        src.x_train,
        src.y_train,
        pre_idx,
        lr=runs.LEARNING_RATES["pretrain"],
        desc="pretrain",
        progress=config.progress,
    )
    apply = runs.logits_fn(model)
    base_logits = np.asarray(apply({"params": params}, src.x_test))
    pretrained = {
        "source_acc": float((base_logits.argmax(-1) == src.y_test).mean()),
        "target_acc": runs.accuracy(apply, {"params": params}, tgt.x_test, tgt.y_test),
        "losses": pre_log.losses,
    }
    say(
        f"pretrained on the source domain ({config.pretrain_steps} steps): test accuracy "
        f"{100 * pretrained['source_acc']:.1f}% on source, {100 * pretrained['target_acc']:.1f}% "
        "on target (before adapting)",
    )
    base_dir = out_dir / "base"
    methods.save_tree(base_dir, {"params": params})

    indices = runs.batch_indices(keys["adapt"], len(tgt.x_train), config.steps, config.batch_size)
    start = methods.Start(config, model, params, src, tgt, indices, total, base_logits)
    done: dict[str, dict] = {}
    replays: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name in config.methods:
        if name in ("head", "full"):
            done[name], replays[name] = methods.run_base_method(start, name)
            continue
        adapted = methods.adapted_model(start, name)
        if adapted is None:
            skipped[name] = "jadapters.LoRAConfig is not in this version of jadapters"
            continue
        done[name], replays[name] = methods.run_adapter_method(start, name, adapted, keys[name])
    step_seconds = runs.time_interleaved(replays) if replays else {}
    for name, seconds in step_seconds.items():
        done[name]["step_seconds"] = seconds
        if "full" in step_seconds:
            done[name]["step_ratio"] = seconds / step_seconds["full"]

    results = {
        "config": dataclasses.asdict(config),
        "data": {
            "source": data.SOURCE_DESCRIPTION,
            "shift": config.shift,
            "train": len(src.x_train),
            "test": len(src.x_test),
        },
        "model": {
            "params": total,
            "checkpoint": str(base_dir),
            "checkpoint_bytes": methods.disk_bytes(base_dir),
        },
        "pretrained": pretrained,
        "methods": done,
        "skipped": skipped,
        "plot": None,
    }
    if config.plot and done:
        results["plot"] = str(out_dir / "curves.png")
        report.plot_curves(results, results["plot"])
    with open(out_dir / "results.json", "w") as f:
        json.dump(results, f, indent=1)
    say(
        "",
        f"adapting to the target domain: {config.steps} steps of Adam, batch "
        f"{config.batch_size}, the same batches for every method, each from the pretrained "
        "weights",
        report.format_table(results),
        *report.notes(results),
    )
    return results


# -------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str]) -> DemoConfig:
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="python -m jadapters demo",
        description=(
            "Fine-tunes a pretrained transformer with adapters on real data that ships with "
            "scikit-learn: the 8x8 handwritten digits of sklearn.datasets.load_digits (no "
            "download). A small Linen transformer is pretrained on upright digits, then "
            "adapted to the same digits rotated by 90 degrees and inverted, four ways: "
            "training the head only, jadapters' LinearAdapter and LoRA (where jadapters has "
            "it) on a frozen base, and full fine-tuning. It reports test accuracy on both "
            "domains, trainable parameters, step time and checkpoint size, and writes the "
            "checkpoints, results.json and curves.png to --out-dir."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--seed", type=int, default=defaults.seed, help="seeds the split, init and batches")
    add("--steps", type=int, default=defaults.steps, help="adaptation steps per method")
    add(
        "--pretrain-steps",
        type=int,
        default=defaults.pretrain_steps,
        help="full-training steps on the source domain",
    )
    add("--d-model", type=int, default=defaults.d_model, help="transformer width")
    add("--layers", type=int, default=defaults.layers, help="transformer blocks")
    add("--heads", type=int, default=defaults.heads, help="attention heads")
    add("--adapter-dim", type=int, default=defaults.adapter_dim, help="adapter bottleneck")
    add("--lora-rank", type=int, default=defaults.lora_rank, help="LoRA rank (alpha = 2 x rank)")
    add(
        "--methods",
        default=",".join(defaults.methods),
        help=f"comma-separated, from {','.join(METHODS)}",
    )
    add("--batch-size", type=int, default=defaults.batch_size, help="for every method")
    add("--shift", choices=data.SHIFTS, default=defaults.shift, help="the target domain")
    add("--out-dir", default=defaults.out_dir, help="checkpoints, results.json, curves.png")
    add("--no-plot", action="store_true", help="do not write curves.png")
    add("--no-progress", action="store_true", help="no progress bars (they go to stderr)")
    args = parser.parse_args(argv)
    try:
        return DemoConfig(
            seed=args.seed,
            steps=args.steps,
            pretrain_steps=args.pretrain_steps,
            d_model=args.d_model,
            layers=args.layers,
            heads=args.heads,
            adapter_dim=args.adapter_dim,
            lora_rank=args.lora_rank,
            methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
            batch_size=args.batch_size,
            shift=args.shift,
            out_dir=args.out_dir,
            plot=not args.no_plot,
            progress=not args.no_progress,
        )
    except ValueError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits


def main(argv: list[str] | None = None) -> int:
    """Runs the demo from command-line arguments; returns the exit code."""
    config = parse_args(list(sys.argv[1:] if argv is None else argv))
    run_demo(config, out=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
