"""The demo's report: plain-text tables of the results and one PNG figure."""

from __future__ import annotations

import math
from typing import Any


def pct(value: float | None) -> str:
    """``0.9778`` as ``"97.8%"``; ``None`` as ``"-"``."""
    return "-" if value is None else f"{100.0 * value:.1f}%"


def size(n: int | None) -> str:
    """Bytes, in KiB or MiB above 1 KiB."""
    if n is None:
        return "-"
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _grid(rows: list[tuple[str, ...]], left: int = 1) -> list[str]:
    """Rows as aligned text: the first ``left`` columns left-aligned, numbers right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(row):
        cells = [
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "-" * len(line(rows[0]))
    return [line(rows[0]), rule, *(line(row) for row in rows[1:]), rule]


def format_table(results: dict[str, Any]) -> str:
    """The methods of :func:`jadapters.demo.main.run_demo` as a plain-text table, the
    pretrained base first."""
    shift = results["data"]["shift"]
    pre, model = results["pretrained"], results["model"]
    rows = [
        (
            "method",
            "trains",
            "trainable",
            "step (IQR)",
            "vs full (range)",
            "upright acc",
            f"{shift} acc",
            "checkpoint",
        ),
        (
            "base",
            "(before adapting)",
            f"{model['params']:,}",
            "-",
            "-",
            pct(pre["source_acc"]),
            pct(pre["target_acc"]),
            size(model["checkpoint_bytes"]),
        ),
    ]
    for name, r in results["methods"].items():
        step = "-"
        if r["step_seconds"] is not None:
            lo, hi = (1e3 * q for q in r["step_seconds_quartiles"])
            step = f"{1e3 * r['step_seconds']:.2f} ms ({lo:.2f}-{hi:.2f})"
        ratio = "-"
        if r["step_ratio"] is not None:
            lo, hi = r["step_ratio_range"]
            ratio = f"{r['step_ratio']:.2f}x ({lo:.2f}-{hi:.2f})"
        rows.append(
            (
                name,
                r["trains"],
                f"{r['trainable_params']:,} ({100.0 * r['trainable_share']:.1f}%)",
                step,
                ratio,
                pct(r["source_acc"]),
                pct(r["target_acc"]),
                size(r["checkpoint_bytes"]),
            )
        )
    return "\n".join(_grid(rows, left=2))


def switch_table(results: dict[str, Any]) -> list[str]:
    """The accuracies of the two task adapters loaded into one fresh model, one row per
    adapter enabled."""
    switched = results["switch"]
    domains = list(next(iter(switched["accuracy"].values())))
    rows = [("adapter enabled", *(f"{d} acc" for d in domains))]
    for enabled, accs in switched["accuracy"].items():
        label = "none (the base)" if enabled == "none" else enabled
        rows.append((label, *(pct(accs[d]) for d in domains)))
    return _grid(rows)


def notes(results: dict[str, Any]) -> list[str]:
    """The lines under the table: what the run showed, and what the columns mean."""
    methods, pre = results["methods"], results["pretrained"]
    shift = results["data"]["shift"]
    lines = [
        "trains: what the gradient is taken with respect to; everything else is a constant "
        "(adapter, lora: the base, head included, stays frozen). step: median wall time of one "
        "compiled training step, interquartile range in brackets (10 rounds x 10 steps, the "
        "methods timed in turns in one process); vs full: per round over full fine-tuning's, "
        "median and range of the rounds.",
        "",
        f"forgetting: the base scores {pct(pre['source_acc'])} on the upright test digits. "
        "After adapting to "
        f"{shift}, "
        + ", ".join(f"{name} scores {pct(r['source_acc'])}" for name, r in methods.items())
        + " there.",
    ]
    for name, r in methods.items():
        if r["source_acc_disabled"] is None:
            continue
        same = "bitwise identical" if r["disabled_logits_identical"] else "NOT identical"
        lines.append(
            f"  {name}: disable the adapter ({r['adapter']}) and the base is back: "
            f"{pct(r['source_acc_disabled'])} upright, logits {same} to the pretrained model's."
        )
    model = results["model"]
    lines += [
        "",
        f"checkpoints: bytes on disk of what each method must store; the whole model "
        f"({model['params']:,} parameters) takes {size(model['checkpoint_bytes'])}.",
    ]
    for name, r in methods.items():
        share = r["checkpoint_bytes"] / model["checkpoint_bytes"]
        line = (
            f"  {name}: {r['checkpoint']}, {r['checkpoint_bytes']:,} bytes "
            f"({100 * share:.1f}% of the whole model), {r['saved_with']}"
        )
        if r["reloaded_identical"] is not None:
            same = "the same" if r["reloaded_identical"] else "NOT the same"
            line += f"; loaded back onto a fresh wrap of the base: {same} weights"
        lines.append(line)
    second = results["second_task"]
    if second is not None:
        lines += [
            f"  second task adapter ({second['adapter']}, trained on {second['shift']}): "
            f"{second['checkpoint']}, {second['checkpoint_bytes']:,} bytes",
            "",
            "two task adapters, one base: both checkpoints loaded into a fresh model "
            "(jadapters.load_adapters), then switched by name (set_enabled_adapters):",
            *(f"  {line}" for line in switch_table(results)),
        ]
    merged = results["merged"]
    if merged is not None:
        same = "the same predictions" if merged["same_predictions"] else "DIFFERENT predictions"
        lines += [
            "",
            f"merged LoRA (jadapters.merge_adapters, then the unwrapped model): {shift} "
            f"accuracy {pct(merged['target_acc_merged'])}, unmerged "
            f"{pct(merged['target_acc_unmerged'])}; {same}, largest logit difference "
            f"{merged['max_abs_logit_diff']:.1e} (float32 rounding). The merged model is the "
            "base model's computation: no adapter cost at inference.",
        ]
    if results["figure"]:
        lines += [
            "",
            f"figure (learning curves, accuracy vs trainable parameters): {results['figure']}",
        ]
    return lines


def plot(results: dict[str, Any], path: str) -> None:
    """Writes the figure: training loss per method (left), and accuracy after adapting against
    trainable parameters (right), to ``path`` (PNG)."""
    # A bare Figure renders with the Agg canvas, without pyplot's global backend and state.
    from matplotlib.figure import Figure

    methods, pre, shift = results["methods"], results["pretrained"], results["data"]["shift"]
    fig = Figure(figsize=(12, 5), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2, width_ratios=(1, 1.15))
    for name, r in methods.items():
        losses = r["losses"]
        ax_loss.plot(range(1, len(losses) + 1), _smooth(losses), label=name)
    ax_loss.set_xlabel(f"adaptation step (batches of {results['config']['batch_size']})")
    ax_loss.set_ylabel("training cross-entropy (moving average, log scale)")
    ax_loss.set_yscale("log")
    ax_loss.set_title(f"learning curves: adapting to the {shift} digits")
    ax_loss.legend(title="method")

    names = sorted(methods, key=lambda n: methods[n]["trainable_params"])
    xs = list(range(len(names)))
    width = 0.38
    for offset, key, label in (
        (-width / 2, "target_acc", f"{shift} test (the new domain)"),
        (width / 2, "source_acc", "upright test (the old domain)"),
    ):
        heights = [100.0 * methods[n][key] for n in names]
        bars = ax_acc.bar([x + offset for x in xs], heights, width, label=label)
        ax_acc.bar_label(bars, fmt="%.0f", fontsize="small", padding=2)
    off = [
        (x + width / 2, 100.0 * methods[n]["source_acc_disabled"])
        for x, n in zip(xs, names, strict=True)
        if methods[n]["source_acc_disabled"] is not None
    ]
    if off:
        ax_acc.scatter(
            *zip(*off, strict=True),
            marker="D",
            color="black",
            zorder=3,
            label="upright, adapter disabled",
        )
    ax_acc.axhline(100.0 * pre["source_acc"], color="black", ls="--", lw=0.8, label="base, upright")
    ax_acc.axhline(100.0 * pre["target_acc"], color="grey", ls=":", label=f"base, {shift}")
    ticks = [
        f"{n}\n{methods[n]['trainable_params']:,} params\n"
        f"({100.0 * methods[n]['trainable_share']:.1f}%)"
        for n in names
    ]
    ax_acc.set_xticks(xs, ticks)
    ax_acc.set_xlabel("method, by trainable parameters (share of the model)")
    ax_acc.set_ylim(0.0, 128.0)
    ax_acc.set_yticks(range(0, 101, 20))
    ax_acc.set_ylabel("test accuracy after adapting (%)")
    ax_acc.set_title("accuracy against trainable parameters")
    ax_acc.legend(loc="upper center", fontsize="small", ncol=2)
    fig.savefig(path, dpi=90)


def _smooth(values: list[float]) -> list[float]:
    window = max(1, math.ceil(len(values) / 30))
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
