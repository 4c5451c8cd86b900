"""A sharded adapter step on 8 (fake) devices against the same step on one device.

The model is a stack of Linen ``Dense`` pairs whose kernels are named with mesh axes
(``("data", "model")`` up, ``("model", "data")`` down), with LoRA on every ``Dense``; the
adapters' partition specs are the ones jadapters derives from the kernels. The step is Adam
over the adapters under ``jax.jit(in_shardings=..., out_shardings=...)`` built with
``nn.get_sharding``, on three meshes of the same axes: FSDP ``(8, 1)``, tensor parallel
``(1, 8)`` and both ``(2, 4)``; the batch is split over ``data``.

Correctness first: before anything is timed, on each mesh the adapter gradient must equal the
one on one device (``rtol = 1e-5``, ``atol = 1e-5`` of the largest entry: Adam's update itself
would magnify summation-order noise in near-zero gradients to the learning rate) and one Adam
step must leave every adapter array on its derived sharding; the benchmark stops otherwise.
Then every mesh is timed interleaved with one device; the table gives the ratio ``mesh / one
device`` (min / median / max across rounds).

On a CPU the 8 devices are *fake* (``--xla_force_host_platform_device_count=8``): they share
the machine's cores (2 on the reference machine), so the ratio measures the cost of
partitioning and of the collectives, not a speed-up. Run without 8 devices, the benchmark
starts itself again in a subprocess with the flag set.

    python benchmarks/bench_sharding.py            # d_model 512, 4 layer pairs
    python benchmarks/bench_sharding.py --quick    # a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import jadapters

try:
    from benchmarks._common import Stepper, machine_line, spread, time_rounds
except ImportError:  # run as a script: python benchmarks/bench_sharding.py
    from _common import Stepper, machine_line, spread, time_rounds  # type: ignore[no-redef]

DEVICES = 8
FLAG = f"--xla_force_host_platform_device_count={DEVICES}"
MESHES = {"FSDP": (8, 1), "TP": (1, 8), "FSDP x TP": (2, 4)}
UP, DOWN = ("data", "model"), ("model", "data")
TOL = 1e-5
QUICK = dict(d_model=64, layers=2, batch=16, rank=4, rounds=2, steps=3, warmup=1)


class Stack(nn.Module):
    d_model: int
    layers: int

    @nn.compact
    def __call__(self, x):
        part, init = nn.with_partitioning, nn.initializers.lecun_normal()
        for i in range(self.layers):
            h = nn.Dense(4 * self.d_model, kernel_init=part(init, UP), name=f"up_{i}")(x)
            x = x + nn.Dense(self.d_model, kernel_init=part(init, DOWN), name=f"down_{i}")(
                nn.gelu(h)
            )
        return x


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4, help="Dense pairs")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--json", type=str, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    return args


def _argv(args: argparse.Namespace) -> list[str]:
    names = ("d_model", "layers", "batch", "rank", "rounds", "steps", "warmup")
    return [x for n in names for x in (f"--{n.replace('_', '-')}", str(getattr(args, n)))]


def _in_subprocess(args: argparse.Namespace) -> dict:
    """Runs this benchmark again with 8 fake devices and returns its results."""
    flags = os.environ.get("XLA_FLAGS", "")
    env = {**os.environ, "XLA_FLAGS": f"{flags} {FLAG}".strip(), "JAX_PLATFORMS": "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        cmd = [sys.executable, os.path.abspath(__file__), *_argv(args), "--json", out]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        with open(out, encoding="utf-8") as f:
            return json.load(f)


def run(args: argparse.Namespace) -> dict:
    """Checks, then times; returns the measurements as a dict."""
    if len(jax.devices()) < DEVICES:
        return _in_subprocess(args)
    adapted = jadapters.adapter_transform(Stack(args.d_model, args.layers), r"(up|down)_\d+")
    adapted = adapted.add_adapter("task", jadapters.LoRAConfig(rank=args.rank))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((args.batch, args.d_model)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((args.batch, args.d_model)), jnp.float32)
    variables = jax.jit(adapted.init)(jax.random.key(0), x)
    base = variables["params"]
    adapters = jax.tree.map(lambda a: a + 0.01, variables["adapters"])  # leave the identity
    tx = optax.adam(1e-3)

    def grad(adapters, base, x, y):
        def loss(a):
            return jnp.mean((adapted.apply({"params": base, "adapters": a}, x) - y) ** 2)

        return jax.grad(loss)(adapters)

    def step(adapters, opt_state, base, x, y):
        updates, opt_state = tx.update(grad(adapters, base, x, y), opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state

    one = jax.devices()[0]
    state = jax.device_put((adapters, tx.init(adapters), base, x, y), one)
    single = jax.jit(step)
    want = nn.unbox(jax.jit(grad)(state[0], *state[2:]))
    steppers = {"one device": Stepper(single, state[:2], state[2:])}
    for name, shape in MESHES.items():
        mesh = jax.make_mesh(shape, ("data", "model"), axis_types=(AxisType.Auto,) * 2)
        a_sh, o_sh, b_sh = (nn.get_sharding(t, mesh) for t in (adapters, state[1], base))
        d_sh = NamedSharding(mesh, PartitionSpec("data"))
        shardings = (a_sh, o_sh, b_sh, d_sh, d_sh)
        placed = jax.device_put(state, shardings)
        sharded = jax.jit(step, in_shardings=shardings, out_shardings=(a_sh, o_sh))
        # correctness first: the same gradient; the step's weights on their derived shardings
        got = jax.jit(grad, in_shardings=(a_sh, b_sh, d_sh, d_sh), out_shardings=a_sh)(
            placed[0], *placed[2:]
        )
        for g, w in zip(jax.tree.leaves(nn.unbox(got)), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, rtol=TOL, atol=TOL * float(np.abs(w).max()))
        new = sharded(*placed)[0]
        specs = jax.tree.leaves(
            nn.get_partition_spec(new), is_leaf=lambda s: isinstance(s, PartitionSpec)
        )
        for leaf, spec in zip(jax.tree.leaves(nn.unbox(new)), specs, strict=True):
            assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim)
        steppers[name] = Stepper(sharded, placed[:2], placed[2:])
    rounds = time_rounds(steppers, rounds=args.rounds, warmup=args.warmup, steps=args.steps)
    results = {
        "machine": machine_line(),
        "cpu_count": os.cpu_count(),
        "devices": len(jax.devices()),
        "d_model": args.d_model,
        "layers": args.layers,
        "batch": args.batch,
        "rank": args.rank,
        "base_params": sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nn.unbox(base))),
        "adapter_params": sum(int(np.prod(a.shape)) for a in jax.tree.leaves(want)),
        "checked": True,
        "ms": {name: spread([r[name] for r in rounds]) for name in steppers},
        "ratio": {name: spread([r[name] / r["one device"] for r in rounds]) for name in MESHES},
    }
    return results


def table(r: dict) -> str:
    """The markdown table of :func:`run`'s result."""
    rows = [
        "| step on | mesh | ms (median) | ratio to one device (min / median / max) |",
        "| --- | --- | ---: | ---: |",
        f"| one device | - | {r['ms']['one device']['median']:.2f} | 1 |",
    ]
    for name, shape in MESHES.items():
        q = r["ratio"][name]
        rows.append(
            f"| {r['devices']} devices | {name} {shape} | {r['ms'][name]['median']:.2f} "
            f"| {q['min']:.2f} / {q['median']:.2f} / {q['max']:.2f} |"
        )
    rows += [
        "",
        f"Adam step over LoRA(rank={r['rank']}) on {2 * r['layers']} Dense layers "
        f"(d_model={r['d_model']}, mlp 4x; base {r['base_params']:,} parameters, adapters "
        f"{r['adapter_params']:,}), batch {r['batch']}; on every mesh the adapter gradient was "
        f"first checked against one device (rtol {TOL:g}, atol {TOL:g} of its largest entry) "
        "and the step's adapters for their derived shardings. The "
        f"{r['devices']} devices are fake CPU devices sharing {r['cpu_count']} cores: the "
        "ratio is the cost of partitioning and collectives, not a speed-up. "
        f"{r['machine']}.",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
