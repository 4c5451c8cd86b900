"""Runs every benchmark and rewrites the results in ``benchmarks/README.md``.

``python -m benchmarks`` (full sizes, several minutes on a 2-core CPU) or
``python -m benchmarks --quick`` (small sizes, a smoke test). ``--only bench_lora`` runs one.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
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
}
QUICK = {
    "bench_transform": ["--d-model", "64", "--layers", "2", "--seq", "16", "--steps", "3"],
    "bench_lora": ["--d-model", "64", "--layers", "2", "--seq", "16", "--steps", "3"],
    "bench_checkpoint": ["--d-model", "64", "--layers", "2", "--repeats", "1"],
    "bench_inline": ["--quick"],
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    parser.add_argument("--only", action="append", choices=sorted(BENCHMARKS))
    parser.add_argument("--no-write", action="store_true", help="print, don't edit README.md")
    args = parser.parse_args(argv)
    sections = []
    for name in args.only or BENCHMARKS:
        module = importlib.import_module(f"benchmarks.{name}")  # from the fixed table above
        results = module.run(_args(module, QUICK[name] if args.quick else []))
        table = module.table(results)
        print(f"## {BENCHMARKS[name]}\n\n{table}\n", flush=True)
        sections.append((BENCHMARKS[name], table))
    if not args.no_write:
        rewrite_readme(sections, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
