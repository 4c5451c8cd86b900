"""``python -m jadapters demo``: adapt a pretrained transformer to a shifted domain, four ways.

The data are scikit-learn's bundled 8x8 handwritten digits (nothing is downloaded). The base
is the :class:`~jadapters.demo.models.LinenTransformer` pretrained on upright digits (the
source domain) that ships with jadapters (:func:`jadapters.demo.pretrained_base`). It is
adapted to the same digits rotated by 90 degrees and inverted (the target domain, see
:mod:`jadapters.demo.data`) in four ways, each from the same pretrained weights, with the
same batches and batch size:

* ``head``: only the classifier head trains (a linear probe on frozen features).
* ``adapter``: :class:`jadapters.LinearAdapter` bottlenecks after the attention and after the
  MLP of every block (Houlsby et al. 2019), added by :func:`jadapters.adapter_transform`
  without touching the model's code. Only the adapters train; the base *and its head* stay
  frozen, since the classes do not change (training the head as well measured no better).
* ``lora``: :class:`jadapters.LoRAConfig` on the attention query and value kernels; adapters
  only, as above.
* ``full``: every parameter trains.

Then the story goes on: a second task adapter is trained on another domain (the inverted
digits), both task adapters are loaded from their checkpoints into a fresh model and switched
by name, and the LoRA adapter is merged into the base kernels, where it must classify exactly
as before.

It prints test accuracy on both domains before and after (forgetting shows on the source
domain), trainable parameters, step time relative to full fine-tuning with its spread,
checkpoint sizes, the switching table and the merge check; writes the checkpoints and
``results.json`` into ``--out-dir`` and one figure (learning curves, and accuracy against
trainable parameters) to ``--figure``; and returns the exit code.
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

from jadapters.demo import data, methods, pretrained, report, runs
from jadapters.demo.config import METHODS, DemoConfig

# ------------------------------------------------------------------------------- demo


def run_demo(config: DemoConfig, *, out: TextIO | None = None) -> dict[str, Any]:
    """Runs the demo; returns its results as plain Python values (JSON-serializable).

    Args:
      config: the run's settings.
      out: where to print what the demo is doing and the results; ``None`` prints nothing.

    Returns:
      ``{"config", "data", "model", "pretrained", "methods", "second_task", "switch",
      "merged", "figure"}``: ``results["methods"][name]`` holds, for each method run,
      ``target_acc``, ``source_acc``, ``source_acc_disabled`` (adapter methods),
      ``trainable_params``, ``step_seconds``, ``step_ratio`` (vs ``full``),
      ``checkpoint_bytes``, ``losses``, ...; ``switch`` the accuracies of the two task
      adapters loaded into a fresh model (when ``adapter`` ran); ``merged`` the merged LoRA
      model's accuracy beside the unmerged one's (when ``lora`` ran).
    """

    def say(*lines: str) -> None:
        if out is not None:
            print(*lines, sep="\n", file=out, flush=True)

    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = ("adapt", "second", *METHODS)
    # XLA's RngBitGenerator ("rbg") compiles in a fraction of threefry's time on CPU, and
    # compilation is most of this small demo's run time. Same key, same numbers.
    root = jax.random.key(config.seed, impl="rbg")
    keys = dict(zip(names, jax.random.split(root, len(names)), strict=True))

    images, labels = data.load_digits_tokens()
    src = data.train_test_split(images, labels, seed=config.seed)
    shift = functools.partial(data.shift_domain, kind=config.shift)
    tgt = data.Split(shift(src.x_train), src.y_train, shift(src.x_test), src.y_test)
    base_config = config.base_config()
    model = pretrained.linen_model(base_config)
    say(
        "jadapters demo: adapting a pretrained transformer to a shifted domain",
        f"data: {data.SOURCE_DESCRIPTION}",
        f"  {len(src.x_train)} train / {len(src.x_test)} test images (split by seed "
        f"{config.seed}), each 8 tokens (pixel rows) of 8 features in [0, 1]",
        "  source domain: upright digits; target domain: the same digits "
        + data.SHIFT_DESCRIPTIONS[config.shift],
    )
    if base_config == pretrained.SHIPPED:
        _, variables = pretrained.pretrained_base("linen")
        params = variables["params"]
        where = "shipped with jadapters (jadapters/demo/base_weights.npz)"
    else:
        from jadapters.demo import pretrain

        params, _ = pretrain.pretrain(base_config, progress=config.progress)
        where = f"pretrained now ({config.pretrain_steps} steps; not the shipped base's config)"
    total = runs.count_params(params)
    apply = runs.logits_fn(model)
    base_logits = np.asarray(apply({"params": params}, src.x_test))
    second = config.second_task
    second_x = data.shift_domain(src.x_test, second)
    pretrained_acc = {
        "source_acc": float((base_logits.argmax(-1) == src.y_test).mean()),
        "target_acc": runs.accuracy(apply, {"params": params}, tgt.x_test, tgt.y_test),
        "second_task_acc": runs.accuracy(apply, {"params": params}, second_x, src.y_test),
        "where": where,
    }
    say(
        f"base: LinenTransformer, d_model {config.d_model}, {config.layers} layers, "
        f"{config.heads} heads, mlp {2 * config.d_model}: {total:,} parameters, {where}",
        f"  trained on the upright digits; test accuracy before adapting: "
        f"{report.pct(pretrained_acc['source_acc'])} upright, "
        f"{report.pct(pretrained_acc['target_acc'])} {config.shift}",
    )
    base_dir = out_dir / "base"
    methods.save_tree(base_dir, {"params": params})

    indices = runs.batch_indices(keys["adapt"], len(tgt.x_train), config.steps, config.batch_size)
    start = methods.Start(config, model, params, src, tgt, indices, total, base_logits)
    say(
        "",
        f"adapting to {config.shift}: {config.steps} steps of Adam, batch {config.batch_size}, "
        "the same batches for every method, each from the pretrained weights ...",
    )
    done: dict[str, dict] = {}
    replays: dict[str, Any] = {}
    lora = None
    for name in config.methods:
        if name in ("head", "full"):
            done[name], replays[name] = methods.run_base_method(start, name)
        else:
            done[name], replays[name], trained = methods.run_adapter_method(start, name, keys[name])
            if name == "lora":
                lora = trained
    second_result = switched = merged = None
    if "adapter" in done:
        say(f"training a second task adapter, on {second} ...")
        second_result = methods.second_task(start, second, keys["second"])
        checkpoints = [done["adapter"]["checkpoint"], second_result["checkpoint"]]
        switched = methods.switch(start, checkpoints, ["upright", config.shift, second])
    if lora is not None:
        merged = methods.merged_lora(start, *lora)
    say("timing the training steps ...")
    times = runs.time_interleaved(replays)
    for name, samples in times.items():
        done[name]["step_seconds"] = float(np.median(samples))
        done[name]["step_seconds_quartiles"] = np.quantile(samples, [0.25, 0.75]).tolist()
        if "full" in times:
            # Per round, this method's median step over full fine-tuning's, measured in turn.
            ratios = np.median(samples, axis=1) / np.median(times["full"], axis=1)
            done[name]["step_ratio"] = float(np.median(ratios))
            done[name]["step_ratio_range"] = [float(ratios.min()), float(ratios.max())]

    results = {
        "config": dataclasses.asdict(config),
        "data": {
            "source": data.SOURCE_DESCRIPTION,
            "shift": config.shift,
            "second_shift": second,
            "train": len(src.x_train),
            "test": len(src.x_test),
        },
        "model": {
            "params": total,
            "checkpoint": str(base_dir),
            "checkpoint_bytes": methods.disk_bytes(base_dir),
        },
        "pretrained": pretrained_acc,
        "methods": done,
        "second_task": second_result,
        "switch": switched,
        "merged": merged,
        "figure": None,
    }
    if config.plot:
        results["figure"] = config.figure_path
        Path(config.figure_path).parent.mkdir(parents=True, exist_ok=True)
        report.plot(results, config.figure_path)
    with open(out_dir / "results.json", "w") as f:
        json.dump(results, f, indent=1)
    say("", report.format_table(results), *report.notes(results))
    return results


# -------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str]) -> DemoConfig:
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="python -m jadapters demo",
        description=(
            "Fine-tunes a pretrained transformer with adapters on real data that ships with "
            "scikit-learn: the 8x8 handwritten digits of sklearn.datasets.load_digits (no "
            "download). A small Linen transformer pretrained on upright digits (shipped with "
            "jadapters) is adapted to the same digits rotated by 90 degrees and inverted, four "
            "ways: training the head only, jadapters' LinearAdapter and LoRA on a frozen base, "
            "and full fine-tuning. It reports test accuracy on both domains before and after, "
            "trainable parameters, step time and checkpoint size; trains a second task adapter, "
            "loads both into a fresh model and switches between them; merges the LoRA adapter "
            "and checks the merged model's accuracy. It writes the checkpoints and results.json "
            "to --out-dir and a figure to --figure."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seeds the split and the batches (other than 0: pretrain anew, on that split)",
    )
    add("--steps", type=int, default=defaults.steps, help="adaptation steps per method")
    add(
        "--pretrain-steps",
        type=int,
        default=defaults.pretrain_steps,
        help="pretraining steps on the source domain (other than the default: pretrain anew)",
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
    add(
        "--second-shift",
        choices=data.SHIFTS,
        default=None,
        help="the second task adapter's domain (default: invert, or rotate for --shift invert)",
    )
    add("--out-dir", default=defaults.out_dir, help="checkpoints and results.json")
    add("--figure", default=None, help="the figure's PNG file (default: OUT_DIR/demo.png)")
    add("--no-plot", action="store_true", help="do not write the figure")
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
            second_shift=args.second_shift,
            out_dir=args.out_dir,
            figure=args.figure,
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
