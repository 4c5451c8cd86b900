"""Adapters inside a scanned layer stack: memory of the adapter step and compile time.

The model is a stack of MLP blocks (``x + W2 gelu(W1 LN(x))``) run with Linen ``nn.scan``
(``variable_axes={"params": 0, jadapters.ADAPTER_COLLECTION: 0}``), with LoRA on ``W1`` of
every layer; the memory rows also build it in NNX (``nnx.vmap``-created blocks run by
``nnx.scan``). Measured from the compiled programs (``jax.jit(...).lower(...).compile()``):

1. ``memory_analysis()`` of the adapter gradient step (loss and gradient of the adapter
   weights only; the base frozen), scanned vs the same model unrolled into a Python loop vs
   the *inline minimum*: the same scan written by hand in plain JAX (``jax.lax.scan`` over the
   stacked base weights with the LoRA update written inline), differentiated with respect to
   the LoRA factors only. Target: scanned temp bytes <= 1.10x the inline minimum (no copy of
   the base stack per adapter).
2. compile time (trace + lower + XLA compile) of the scanned and the unrolled step at 4, 12
   and 24 layers, and of the NNX scanned stack's ``nnx_train_step``: the scanned ones stay
   about flat as layers grow.

    python benchmarks/bench_scan.py            # d=256, 12 layers
    python benchmarks/bench_scan.py --quick    # small sizes, a smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jadapters
from jadapters.demo.models import NNXLayerStack

try:
    from benchmarks._common import machine_line
except ImportError:  # run as a script
    from _common import machine_line  # type: ignore[no-redef]

RANK = 8


class Block(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x, _=None):
        h = nn.LayerNorm(use_bias=False, use_scale=False, name="norm")(x)
        h = nn.gelu(nn.Dense(4 * self.width, use_bias=False, name="up")(h))
        return x + nn.Dense(self.width, use_bias=False, name="down")(h), None


class Scanned(nn.Module):
    width: int
    layers: int

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            Block,
            variable_axes={"params": 0, jadapters.ADAPTER_COLLECTION: 0},
            split_rngs={"params": True},
            length=self.layers,
        )
        return stack(self.width, name="layers")(x, None)[0]


class Unrolled(nn.Module):
    width: int
    layers: int

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x, _ = Block(self.width, name=f"layers_{i}")(x)
        return x


class NNXBlock(nnx.Module):
    """The same block in NNX (the same LayerNorm, GELU and bias-free projections)."""

    def __init__(self, width: int, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(width, use_bias=False, use_scale=False, rngs=rngs)
        self.up = nnx.Linear(width, 4 * width, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(4 * width, width, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return x + self.down(nnx.gelu(self.up(self.norm(x))))


class NNXScanned(NNXLayerStack):
    """The stack built with ``nnx.vmap`` and run with ``nnx.scan`` (MaxText's NNX pattern)."""

    def __init__(self, width: int, layers: int):
        super().__init__(lambda rngs: NNXBlock(width, rngs), layers)


def nnx_adapter_step(model, x):
    """jadapters' NNX adapter step (``nnx_train_step``) with plain SGD, which keeps no
    optimizer state: the loss, the gradient of the adapter weights and their update."""
    optimizer = jadapters.adapter_optimizer(model, optax.sgd(0.1))
    step = jadapters.nnx_train_step(lambda m, x: jnp.mean(m(x) ** 2), donate=False)
    return step.lower(model, optimizer, x).compile()


def adapted(model, pattern):
    return jadapters.adapter_transform(model, pattern).add_adapter(
        "lora", jadapters.LoRAConfig(rank=RANK)
    )


def adapter_step(model, variables, x):
    """The compiled adapter gradient step: loss and d loss / d adapters, base frozen."""

    def step(adapters, base, x):
        loss = lambda a: jnp.mean(model.apply({**base, "adapters": a}, x) ** 2)  # noqa: E731
        return jax.value_and_grad(loss)(adapters)

    base = {k: v for k, v in variables.items() if k != "adapters"}
    return jax.jit(step).lower(variables["adapters"], base, x).compile()


def inline_step(params, lora, x):
    """The minimum: the scan written by hand, LoRA inline, gradient of the factors only."""

    def forward(lora, params, x):
        def body(h, layer):
            p, a, b = layer
            z = (h - h.mean(-1, keepdims=True)) * jax.lax.rsqrt(h.var(-1, keepdims=True) + 1e-6)
            u = z @ p["up"]["kernel"] + (z @ a) @ b
            return h + nn.gelu(u) @ p["down"]["kernel"], None

        return jax.lax.scan(body, x, (params, lora["a"], lora["b"]))[0]

    def step(lora, params, x):
        return jax.value_and_grad(lambda f: jnp.mean(forward(f, params, x) ** 2))(lora)

    return jax.jit(step).lower(lora, params, x).compile()


def memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    temp = int(m.temp_size_in_bytes)
    # arguments + outputs + temporaries: an upper bound of the step's live bytes (the CPU
    # backend's own peak field does not count the temporaries)
    peak = temp + int(m.argument_size_in_bytes) + int(m.output_size_in_bytes)
    return {"temp": temp, "peak": peak}


def compile_seconds(model, pattern, width, layers, x) -> float:
    model = adapted(model(width, layers), pattern)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    start = time.perf_counter()
    adapter_step(model, variables, x)
    return time.perf_counter() - start


def nnx_compile_seconds(width, layers, x) -> float:
    """Seconds to trace, lower and compile ``nnx_adapter_step`` on a fresh NNX scanned stack."""
    model = jadapters.adapter_transform(NNXScanned(width, layers), "layers/up")
    model.add_adapter("lora", jadapters.LoRAConfig(rank=RANK), rngs=nnx.Rngs(1))
    start = time.perf_counter()
    nnx_adapter_step(model, x)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--compile-layers", type=int, nargs="+", default=[4, 12, 24])
    parser.add_argument("--repeats", type=int, default=3, help="compiles per variant and size")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.seq, args.batch, args.compile_layers = 64, 16, 4, [4, 12]
        args.repeats = 1
    x = jax.random.normal(jax.random.key(1), (args.batch, args.seq, args.width))
    print(machine_line())

    scanned = adapted(Scanned(args.width, args.layers), "layers/up")
    sv = scanned.init(jax.random.key(0), x)
    unrolled = adapted(Unrolled(args.width, args.layers), r"layers_\d+/up")
    uv = unrolled.init(jax.random.key(0), x)
    lora = sv["adapters"]["layers"]["up"]["lora"]
    nnx_scanned = jadapters.adapter_transform(NNXScanned(args.width, args.layers), "layers/up")
    nnx_scanned.add_adapter("lora", jadapters.LoRAConfig(rank=RANK), rngs=nnx.Rngs(1))
    rows = {
        "scanned (jadapters)": memory(adapter_step(scanned, sv, x)),
        "scanned, NNX (jadapters)": memory(nnx_adapter_step(nnx_scanned, x)),
        "unrolled (jadapters)": memory(adapter_step(unrolled, uv, x)),
        "inline minimum (hand-written scan)": memory(inline_step(sv["params"]["layers"], lora, x)),
    }
    minimum = rows["inline minimum (hand-written scan)"]["temp"]
    print(f"\nadapter step, {args.layers} layers, d={args.width}, T={args.seq}, B={args.batch}")
    print(f"{'variant':38s} {'temp MiB':>10s} {'peak* MiB':>10s} {'temp / min':>10s}")
    for name, m in rows.items():
        ratio = m["temp"] / minimum if minimum else float("nan")
        print(f"{name:38s} {m['temp'] / 2**20:10.2f} {m['peak'] / 2**20:10.2f} {ratio:10.3f}")
    ok = True
    for name in ("scanned (jadapters)", "scanned, NNX (jadapters)"):
        ratio = rows[name]["temp"] / minimum if minimum else float("nan")
        ok = ok and ratio <= 1.10
        verdict = "PASS" if ratio <= 1.10 else "FAIL"
        print(f"target {name} temp <= 1.10 x minimum: {ratio:.3f} {verdict}")
    ratio = rows["scanned (jadapters)"]["temp"] / minimum if minimum else float("nan")

    print(f"\ncompile seconds (adapter step), min / median / max of {args.repeats} repeats")
    compile_rows = {}
    for layers in args.compile_layers:
        times: dict[str, list[float]] = {"scanned": [], "unrolled": [], "scanned, NNX": []}
        for _ in range(args.repeats):  # interleaved
            times["scanned"].append(compile_seconds(Scanned, "layers/up", args.width, layers, x))
            times["unrolled"].append(
                compile_seconds(Unrolled, r"layers_\d+/up", args.width, layers, x)
            )
            times["scanned, NNX"].append(nnx_compile_seconds(args.width, layers, x))
        compile_rows[layers] = {k: sorted(v) for k, v in times.items()}
        line = "  ".join(
            f"{k} {min(v):5.2f} / {statistics.median(v):5.2f} / {max(v):5.2f}"
            for k, v in times.items()
        )
        print(f"  {layers:3d} layers: {line}")
    first, last = args.compile_layers[0], args.compile_layers[-1]
    for kind in ("scanned", "unrolled", "scanned, NNX"):
        growth = statistics.median(compile_rows[last][kind]) / statistics.median(
            compile_rows[first][kind]
        )
        print(f"  {kind}: median compile at {last} layers / at {first} layers = {growth:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"memory": rows, "ratio": ratio, "compile": compile_rows}, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
