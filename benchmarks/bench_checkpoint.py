"""Adapter-only checkpoints vs a checkpoint of the whole model: bytes on disk, save and load time.

One process, one model: a ``LinenTransformer`` (by default d_model=512, 6 layers) with a
``LinearAdapter(dim=64)`` after each block's MLP. Rows:

* ``save_adapters``/``load_adapters`` (metadata, checksums and base fingerprint included);
* the baseline: orbax's ``StandardCheckpointer`` on all the variables (base + adapters).

Usage::

    python benchmarks/bench_checkpoint.py                      # d=512, 6 layers
    python benchmarks/bench_checkpoint.py --d-model 128 --layers 2 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import jadapters
from jadapters.demo.models import LinenTransformer


def _bytes(tree: Any) -> tuple[int, int]:
    leaves = jax.tree.leaves(tree)
    return sum(x.size for x in leaves), sum(x.size * x.dtype.itemsize for x in leaves)


def _disk(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _timed(fn, repeats: int) -> tuple[float, Any]:
    fn()  # warm-up: imports, orbax and tensorstore setup, first-call compilation
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        jax.block_until_ready(jax.tree.leaves(out) if out is not None else None)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def run(args: argparse.Namespace) -> dict:
    """Runs the benchmark; returns the measurements as a dict (also used by tests)."""
    mlp_dim = args.mlp_dim or 4 * args.d_model
    model = LinenTransformer(
        num_classes=10,
        d_model=args.d_model,
        num_layers=args.layers,
        num_heads=args.heads,
        mlp_dim=mlp_dim,
    )
    adapted = jadapters.adapter_transform(model, r"blocks_\d+/mlp")
    adapted = adapted.add_adapter("task", jadapters.LinearAdapterConfig(dim=args.adapter_dim))
    x = jnp.zeros((1, 8, args.d_model), jnp.float32)
    variables = jax.jit(adapted.init)(jax.random.key(0), x)
    rng = np.random.default_rng(0)
    variables = {
        **variables,
        "adapters": jax.tree.map(
            lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), variables["adapters"]
        ),
    }
    base = {"params": variables["params"]}
    base_params, base_bytes = _bytes(base)
    adapter_params, adapter_bytes = _bytes(variables["adapters"])

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_checkpoint_")
    os.makedirs(workdir, exist_ok=True)
    adapter_path = os.path.join(workdir, "adapters")
    full_path = os.path.join(workdir, "full")
    try:
        save_s, _ = _timed(
            lambda: jadapters.save_adapters(adapter_path, adapted, variables), args.repeats
        )
        fresh = jadapters.adapter_transform(model, r"blocks_\d+/mlp")
        load_s, (_, loaded) = _timed(
            lambda: jadapters.load_adapters(adapter_path, fresh, base), args.repeats
        )
        adapter_disk = _disk(jadapters.read_adapter_metadata(adapter_path)["version_dir"])
        for a, b in zip(
            jax.tree.leaves(loaded["adapters"]), jax.tree.leaves(variables["adapters"]), strict=True
        ):
            np.testing.assert_array_equal(a, b)

        def save_full():
            shutil.rmtree(full_path, ignore_errors=True)
            with ocp.StandardCheckpointer() as checkpointer:
                checkpointer.save(full_path, variables)
                checkpointer.wait_until_finished()

        def load_full():
            with ocp.StandardCheckpointer() as checkpointer:
                return checkpointer.restore(full_path, target)

        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), variables
        )
        full_save_s, _ = _timed(save_full, args.repeats)
        full_load_s, _ = _timed(load_full, args.repeats)
        full_disk = _disk(full_path)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return {
        "d_model": args.d_model,
        "layers": args.layers,
        "mlp_dim": mlp_dim,
        "adapter_dim": args.adapter_dim,
        "repeats": args.repeats,
        "base_params": base_params,
        "base_bytes": base_bytes,
        "adapter_params": adapter_params,
        "adapter_bytes": adapter_bytes,
        "adapter_disk_bytes": adapter_disk,
        "adapter_save_s": save_s,
        "adapter_load_s": load_s,
        "full_disk_bytes": full_disk,
        "full_save_s": full_save_s,
        "full_load_s": full_load_s,
        "device": str(jax.devices()[0].device_kind),
        "cpu_count": os.cpu_count(),
    }


def table(r: dict) -> str:
    """The markdown table of :func:`run`'s result."""
    mib = 1024 * 1024
    rows = [
        "| checkpoint | parameters | parameter MiB | MiB on disk | save s | load s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| adapters (`save_adapters`) | {r['adapter_params']:,} | {r['adapter_bytes'] / mib:.2f} "
        f"| {r['adapter_disk_bytes'] / mib:.2f} | {r['adapter_save_s']:.3f} "
        f"| {r['adapter_load_s']:.3f} |",
        f"| whole model (orbax `StandardCheckpointer`) "
        f"| {r['base_params'] + r['adapter_params']:,} "
        f"| {(r['base_bytes'] + r['adapter_bytes']) / mib:.2f} | {r['full_disk_bytes'] / mib:.2f} "
        f"| {r['full_save_s']:.3f} | {r['full_load_s']:.3f} |",
        "",
        f"LinenTransformer d_model={r['d_model']}, {r['layers']} layers, mlp_dim={r['mlp_dim']}, "
        f"LinearAdapter(dim={r['adapter_dim']}) after each block MLP; base "
        f"{r['base_params']:,} parameters ({r['base_bytes'] / mib:.2f} MiB); adapters are "
        f"{100 * r['adapter_params'] / r['base_params']:.2f}% of the base; adapter checkpoint is "
        f"{r['adapter_disk_bytes'] / max(r['adapter_bytes'], 1):.2f}x its parameter bytes and "
        f"{100 * r['adapter_disk_bytes'] / r['full_disk_bytes']:.2f}% of the whole-model "
        f"checkpoint. Median of {r['repeats']} runs after a warm-up, on "
        f"{r['device']} ({r['cpu_count']} cores).",
    ]
    return "\n".join(rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--mlp-dim", type=int, default=0, help="0 means 4 * d_model")
    p.add_argument("--adapter-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up")
    p.add_argument("--workdir", default="", help="where checkpoints go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    result = run(args)
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
