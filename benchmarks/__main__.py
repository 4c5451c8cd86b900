"""Runs the benchmarks and prints their result tables.

``python -m benchmarks`` (full sizes, several minutes on a 2-core CPU) or
``python -m benchmarks --quick`` (small sizes, a smoke test). ``--only bench_lora`` runs one,
``--list`` names them. Nothing is written unless asked: ``--json PATH`` saves the results,
``--write-readme`` replaces the results section of ``benchmarks/README.md`` with these tables.
A comparison peer that is not installed (qwix, from the ``bench`` extra) is skipped with a
printed note.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import pathlib
import platform
import re
import sys

import jax

BENCHMARKS = {
    "bench_transform": "Adapter training step, forward and compile time (adapter_transform)",
    "bench_lora": "LoRA: training step, merged and unmerged forward, vs Flax nnx.LoRA and qwix",
    "bench_checkpoint": "Adapter-only checkpoints: bytes and save/load time",
    "bench_inline": "jadapters vs the same model with the adapter written inline by hand",
    "bench_robustness": "Checkpoints under kills, damaged files and concurrent readers (counts)",
    "bench_sharding": "Sharded adapter step on 8 (fake) devices vs one device",
    "bench_scan": "Adapters in a scanned layer stack: step memory vs inline, compile vs unrolled",
    "bench_routing": "Per-example routing: mixed batches through adapter banks, hot swap",
}
QUICK = {
    "bench_transform": ["--d-model", "64", "--layers", "2", "--seq", "16", "--steps", "3"],
    "bench_lora": ["--d-model", "64", "--layers", "2", "--seq", "16", "--steps", "3"],
    "bench_checkpoint": ["--d-model", "64", "--layers", "2", "--repeats", "1"],
    "bench_inline": ["--quick"],
    "bench_robustness": ["--kills", "2", "--flips", "1", "--read-seconds", "2"],
    "bench_sharding": ["--quick"],
    "bench_scan": ["--quick"],
    "bench_routing": ["--quick"],
}
README = pathlib.Path(__file__).with_name("README.md")
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _args(module, argv: list[str]) -> argparse.Namespace:
    if hasattr(module, "parse_args"):
        return module.parse_args(argv)
    return module.parser().parse_args(argv)


def machine() -> str:
    """One line naming the machine the figures come from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = jax.devices()[0]
    return (
        f"{cpu}, {os.cpu_count()} cores; JAX {jax.__version__} on {device.platform} "
        f"({device.device_kind}); Python {platform.python_version()}"
    )


def rewrite_readme(sections: list[tuple[str, str]], quick: bool) -> None:
    stamp = datetime.date.today().isoformat()
    body = [f"Machine: {machine()}. Run {stamp}{' (--quick sizes)' if quick else ''}.", ""]
    for title, table in sections:
        body += [f"### {title}", "", table.strip(), ""]
    text = README.read_text() if README.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    new = "\n".join(body)
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), flags=re.S)
    README.write_text(pattern.sub(lambda _: f"{START}\n{new}\n{END}", text))


def load(name: str):
    """The benchmark module ``name`` (a key of ``BENCHMARKS``)."""
    return importlib.import_module(f"benchmarks.{name}")  # from the fixed table above


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    result.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    result.add_argument(
        "--only", action="append", choices=sorted(BENCHMARKS), help="run this one (repeatable)"
    )
    result.add_argument("--list", action="store_true", help="name the benchmarks and exit")
    result.add_argument("--json", metavar="PATH", help="write every benchmark's results here")
    result.add_argument(
        "--write-readme",
        action="store_true",
        help=f"replace the results section of {README.name} with this run's tables",
    )
    # Before --write-readme existed, writing was the default and --no-write turned it off.
    result.add_argument("--no-write", action="store_true", help=argparse.SUPPRESS)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.write_readme and args.no_write:
        parser().error("--write-readme and --no-write contradict each other")
    if args.list:
        for name, title in BENCHMARKS.items():
            print(f"{name:<18}{title}")
        return 0
    sections, everything = [], {}
    for name in args.only or BENCHMARKS:
        module = load(name)
        results = module.run(_args(module, QUICK[name] if args.quick else []))
        table = module.table(results)
        print(f"## {BENCHMARKS[name]}\n\n{table}\n", flush=True)
        sections.append((BENCHMARKS[name], table))
        everything[name] = results
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(everything, indent=2, default=str) + "\n")
        print(f"results written to {args.json}")
    if args.write_readme:
        rewrite_readme(sections, args.quick)
        print(f"results section of {README} rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
