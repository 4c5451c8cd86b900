"""The demo's report: a plain-text table of the results and a PNG of the training curves."""

from __future__ import annotations

import math
from typing import Any


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.1f}%"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def format_table(results: dict[str, Any]) -> str:
    """The results of :func:`jadapters.demo.main.run_demo` as a plain-text table."""
    rows = [
        (
            "method",
            "trains",
            "lr",
            "trainable",
            "share",
            "step",
            "vs full",
            "target acc",
            "source acc",
            "checkpoint",
        )
    ]
    for name, r in results["methods"].items():
        ratio = "-" if r["step_ratio"] is None else f"{r['step_ratio']:.2f}x"
        rows.append(
            (
                name,
                r["trains"],
                f"{r['lr']:g}",
                f"{r['trainable_params']:,}",
                f"{100.0 * r['trainable_share']:.2f}%",
                f"{1e3 * r['step_seconds']:.2f} ms",
                ratio,
                _pct(r["target_acc"]),
                _pct(r["source_acc"]),
                _bytes(r["checkpoint_bytes"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    left = {0, 1}  # text columns; numbers are right-aligned

    def line(row):
        cells = [
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "-" * len(line(rows[0]))
    out = [line(rows[0]), rule, *(line(row) for row in rows[1:]), rule]
    for name, reason in results["skipped"].items():
        out.append(f"{name}: skipped, {reason}")
    return "\n".join(out)


def notes(results: dict[str, Any]) -> list[str]:
    """The lines under the table: what the columns mean and what the run showed."""
    methods = results["methods"]
    model = results["model"]
    lines = [
        "trains: what the gradient is taken with respect to; everything else enters the step "
        "as a constant.",
        "  adapter, lora: only the adapter weights train (jadapters.linen_train_step); the "
        "base, head included, stays frozen: the classes are the same in both domains, and "
        "training the head as well measured no better.",
        "step: median wall time of one compiled training step (same batch size, same "
        "process; the methods timed in turns, 10 x 10 steps each); vs full: over full "
        "fine-tuning's.",
        "source acc: the adapted model on the upright test digits; target acc: on the shifted "
        "ones.",
    ]
    for name, r in methods.items():
        if r["source_acc_disabled"] is None:
            continue
        same = "bitwise identical" if r["disabled_logits_identical"] else "NOT identical"
        lines.append(
            f"base intact ({name}): with the adapters disabled, source accuracy is "
            f"{_pct(r['source_acc_disabled'])} (pretrained: "
            f"{_pct(results['pretrained']['source_acc'])}); logits {same} to the pretrained "
            "model's."
        )
    lines.append(
        f"checkpoint: bytes on disk (sum of file sizes) of what each method must store; the "
        f"whole model ({model['params']:,} parameters) takes {_bytes(model['checkpoint_bytes'])}"
        f" ({model['checkpoint']})."
    )
    for name, r in methods.items():
        share = r["checkpoint_bytes"] / model["checkpoint_bytes"]
        line = (
            f"  {name}: {r['checkpoint']}, {r['checkpoint_bytes']:,} bytes "
            f"({100 * share:.1f}% of the whole model), saved with {r['saved_with']}"
        )
        if r["reloaded_identical"] is not None:
            same = "the same" if r["reloaded_identical"] else "NOT the same"
            line += f"; loaded back onto the base (jadapters.load_adapters): {same} weights"
        lines.append(line)
    if results["plot"]:
        lines.append(f"training curves and accuracies: {results['plot']}")
    return lines


def plot_curves(results: dict[str, Any], path: str) -> None:
    """Writes loss vs step per method (left) and accuracy bars (right) to ``path`` (PNG)."""
    # A bare Figure renders with the Agg canvas, without pyplot's global backend and state.
    from matplotlib.figure import Figure

    methods = results["methods"]
    fig = Figure(figsize=(12, 5))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for name, r in methods.items():
        losses = r["losses"]
        ax_loss.plot(range(len(losses)), _smooth(losses), label=name)
    ax_loss.set_xlabel("adaptation step")
    ax_loss.set_ylabel("training loss (moving average)")
    ax_loss.set_yscale("log")
    ax_loss.set_title("adapting to the shifted digits")
    ax_loss.legend()

    names = list(methods)
    xs = range(len(names))
    width = 0.38
    target = [methods[n]["target_acc"] for n in names]
    source = [methods[n]["source_acc"] for n in names]
    bars = ax_acc.bar([x - width / 2 for x in xs], target, width, label="target (shifted) test")
    ax_acc.bar_label(bars, fmt="%.2f", fontsize="small")
    bars = ax_acc.bar([x + width / 2 for x in xs], source, width, label="source (upright) test")
    ax_acc.bar_label(bars, fmt="%.2f", fontsize="small")
    off = [
        (x + width / 2, methods[n]["source_acc_disabled"]) for x, n in zip(xs, names, strict=True)
    ]
    off = [(x, acc) for x, acc in off if acc is not None]
    if off:
        ax_acc.scatter(
            *zip(*off, strict=True),
            marker="D",
            color="black",
            zorder=3,
            label="source, adapters disabled",
        )
    pre = results["pretrained"]
    ax_acc.axhline(pre["source_acc"], color="black", ls="--", lw=0.8, label="pretrained, source")
    ax_acc.axhline(pre["target_acc"], color="grey", ls=":", label="pretrained, target")
    ax_acc.set_xticks(list(xs), names)
    ax_acc.set_ylim(0.0, 1.05)
    ax_acc.set_ylabel("test accuracy")
    ax_acc.set_title("accuracy after adapting (adapters enabled)")
    ax_acc.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _smooth(values: list[float]) -> list[float]:
    window = max(1, math.ceil(len(values) / 30))
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
