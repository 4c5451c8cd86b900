"""LoRA benchmark: training step, merged and unmerged forward, and peers (Flax, qwix).

One process, one model size, every comparison against its baseline in the same run:

1. Linen: LoRA training step (``jadapters.linen_train_step``, rank ``r`` on query and value)
   vs a full fine-tuning step (gradient of every parameter, same loss and optimizer).
2. Linen: merged forward (``merge_adapters``, run by the unwrapped model) vs the base forward.
3. Linen: unmerged LoRA forward vs the base forward.
4. NNX: ours (``adapter_transform`` + ``LoRAConfig``) vs Flax's ``nnx.LoRA`` and vs qwix's
   ``LoraProvider``/``apply_lora_to_model``, same base weights, same modules, same rank, same
   scale, same LoRA weights (checked: the three forwards agree): training step and forward.
   qwix comes from the ``bench`` extra (``pip install -e ".[bench]"``); without it, its rows
   are skipped with a printed note.

Times are medians over ``--steps`` calls after ``--warmup`` calls, each call blocked on its
result; the variants of one comparison are timed in turn within each round (interleaved), so
that load from other processes affects them alike.

    python benchmarks/bench_lora.py --json results.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import sys

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jadapters

try:
    from benchmarks._common import (
        Stepper,
        cross_entropy,
        optional_peer,
        randomize,
        time_interleaved,
        token_data,
        transformer_kwargs,
    )
except ImportError:  # run as a script: python benchmarks/bench_lora.py
    from _common import (  # type: ignore[no-redef]
        Stepper,
        cross_entropy,
        optional_peer,
        randomize,
        time_interleaved,
        token_data,
        transformer_kwargs,
    )
from jadapters.demo.models import LinenTransformer, NNXTransformer

IN_FEATURES = 32
NUM_CLASSES = 10
LINEN_QV = r"blocks_\d+/attn/(query|value)"
NNX_QV = r"blocks/\d+/attn/(query|value)"
NOISE = 1.05  # "no slower than": within 5% (timing noise on a shared CPU)
QWIX_MISSING = 'qwix is not installed: its rows are skipped (pip install -e ".[bench]")'


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=str, default=None, help="write the results here")
    return parser.parse_args(argv)


# --- timing ------------------------------------------------------------------------------------


def _blocking(fn, *args):
    return lambda: jax.block_until_ready(fn(*args))


def _lora_cfg(args):
    return jadapters.LoRAConfig(rank=args.rank, alpha=2.0 * args.rank)


# --- Linen: training step, merged and unmerged forward ----------------------------------------


def bench_linen(args) -> dict:
    x, y = token_data(args.batch, args.seq, IN_FEATURES)
    model = LinenTransformer(**transformer_kwargs(args, args.heads))
    adapted = jadapters.adapter_transform(model, LINEN_QV).add_adapter("lora", _lora_cfg(args))
    variables = adapted.init(jax.random.key(0), x)
    # Nonzero B, so that merged and adapted outputs differ from the base's (a real check).
    variables = {**variables, "adapters": randomize(variables["adapters"], 1)}
    base = {"params": variables["params"]}
    tx = optax.adam(1e-3)

    def full_step(params, opt_state, x, y):
        def loss(p):
            return cross_entropy(model.apply({"params": p}, x), y)

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    full = jax.jit(full_step, donate_argnums=(0, 1))
    full_params = jax.tree.map(jnp.copy, variables["params"])
    lora_step = jadapters.linen_train_step(
        adapted, lambda apply, batch: cross_entropy(apply(batch[0]), batch[1]), tx
    )
    adapters = jax.tree.map(jnp.copy, variables["adapters"])
    key = jax.random.key(0)
    steps = time_interleaved(
        {
            "full": Stepper(full, (full_params, tx.init(full_params)), (x, y)),
            "lora": Stepper(
                lambda a, o, b, batch, k: lora_step(a, o, b, batch, k),
                (adapters, lora_step.init(adapters)),
                (base, (x, y), key),
            ),
        },
        warmup=args.warmup,
        steps=args.steps,
    )

    forward = jax.jit(model.apply)
    adapted_forward = jax.jit(adapted.apply)
    merged = {"params": jadapters.merge_adapters(adapted, variables)}
    merge_error = float(jnp.abs(forward(merged, x) - adapted_forward(variables, x)).max())
    forward(base, x)
    same_executable = forward._cache_size() == 1  # merged and base: one compiled program
    lora_effect = float(jnp.abs(forward(base, x) - adapted_forward(variables, x)).max())
    fwd = time_interleaved(
        {
            "base": _blocking(forward, base, x),
            "merged": _blocking(forward, merged, x),
            "unmerged": _blocking(adapted_forward, variables, x),
        },
        warmup=args.warmup,
        steps=args.steps,
    )
    return {
        "full_step_ms": steps["full"],
        "lora_step_ms": steps["lora"],
        "base_forward_ms": fwd["base"],
        "merged_forward_ms": fwd["merged"],
        "unmerged_forward_ms": fwd["unmerged"],
        "merged_vs_adapted_max_abs_diff": merge_error,
        "merged_same_executable_as_base": same_executable,
        "lora_effect_max_abs": lora_effect,
    }


# --- NNX: ours vs Flax nnx.LoRA vs qwix ---------------------------------------------------------


class FlaxLoRAProjection(nnx.Module):
    """A q/v projection plus Flax's own ``nnx.LoRA`` beside it: ``y + scale * x @ A @ B``.

    ``nnx.LoRA(base_module=...)`` adds its flat ``(..., out)`` result to the base's output,
    which for attention's ``LinearGeneral`` is ``(..., heads, head_dim)``: the shapes do not
    broadcast, so the base runs here and the LoRA output is reshaped to it. Flax's LoRA has no
    ``alpha``; the scale is applied here, as ours and qwix's apply theirs.
    """

    def __init__(self, base: nnx.Module, rank: int, scale: float, *, rngs: nnx.Rngs):
        self.base = base
        out_features = math.prod(base.kernel.shape) // base.kernel.shape[0]
        self.lora = nnx.LoRA(base.kernel.shape[0], rank, out_features, rngs=rngs)
        self.scale = scale

    def __call__(self, x, **kwargs):
        y = self.base(x, **kwargs)
        return y + (self.scale * self.lora(x)).reshape(y.shape)


def _nnx_base(args):
    return NNXTransformer(IN_FEATURES, **transformer_kwargs(args, args.heads), rngs=nnx.Rngs(0))


def _nnx_ours(args):
    model = jadapters.adapter_transform(_nnx_base(args), NNX_QV)
    model.add_adapter("lora", _lora_cfg(args), rngs=nnx.Rngs(1))
    nnx.update(model, randomize(nnx.state(model, jadapters.AdapterParam), 2))
    return model


def _qv_factors(ours, layer, proj):
    """Copies of our LoRA factors (copies: training steps donate the model's buffers)."""
    values = getattr(ours.blocks[layer].attn, proj).adapter_layer["lora"].param_values()
    return {k: jnp.array(v, copy=True) for k, v in values.items()}


def _nnx_flax(args, ours):
    model = _nnx_base(args)
    scale = _lora_cfg(args).build().scale
    for i, block in enumerate(model.blocks):
        for proj in ("query", "value"):
            wrapped = FlaxLoRAProjection(
                getattr(block.attn, proj), args.rank, scale, rngs=nnx.Rngs(1)
            )
            factors = _qv_factors(ours, i, proj)
            wrapped.lora.lora_a[...] = factors["a"]
            wrapped.lora.lora_b[...] = factors["b"]
            setattr(block.attn, proj, wrapped)
    return model


def _nnx_qwix(args, ours, x, qwix):
    provider = qwix.LoraProvider(module_path=NNX_QV, rank=args.rank, alpha=2.0 * args.rank)
    model = qwix.apply_lora_to_model(_nnx_base(args), provider, x, rngs=nnx.Rngs(1))
    for i, block in enumerate(model.blocks):
        for proj in ("query", "value"):
            host, factors = getattr(block.attn, proj), _qv_factors(ours, i, proj)
            if host.kernel_lora_a.shape != factors["a"].shape:
                raise ValueError(f"qwix LoRA A {host.kernel_lora_a.shape} vs {factors['a'].shape}")
            host.kernel_lora_a[...] = factors["a"]
            host.kernel_lora_b[...] = factors["b"]
    return model


def _nnx_lora_step(loss_fn, wrt):
    """The same step as ``jadapters.nnx_train_step``, differentiating ``wrt`` (a filter)."""

    def step(model, optimizer, batch):
        grad_fn = nnx.value_and_grad(lambda m: loss_fn(m, batch), argnums=nnx.DiffState(0, wrt))
        loss, grads = grad_fn(model)
        optimizer.update(model, grads)
        return loss

    return nnx.jit(step, donate_argnums=(0, 1))


def _pure_forward(model):
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    return fn, state


def bench_nnx(args) -> dict:
    x, y = token_data(args.batch, args.seq, IN_FEATURES)
    base = _nnx_base(args)
    ours = _nnx_ours(args)
    flax_model = _nnx_flax(args, ours)
    models = {"base": base, "ours": ours, "flax": flax_model}
    qwix = optional_peer("qwix")
    if qwix is not None:
        models["qwix"] = _nnx_qwix(args, ours, x, qwix)
    peers = [name for name in ("flax", "qwix") if name in models]

    forwards = {name: _pure_forward(m) for name, m in models.items()}
    outs = {name: fn(state, x) for name, (fn, state) in forwards.items()}
    agreement = {name: float(jnp.abs(outs[name] - outs["ours"]).max()) for name in peers}
    lora_effect = float(jnp.abs(outs["ours"] - outs["base"]).max())
    fwd = time_interleaved(
        {name: _blocking(fn, state, x) for name, (fn, state) in forwards.items()},
        warmup=args.warmup,
        steps=args.steps,
    )

    def loss_fn(model, batch):
        return cross_entropy(model(batch[0]), batch[1])

    tx = optax.adam(1e-3)
    ours_step = jadapters.nnx_train_step(loss_fn)
    peer_step = _nnx_lora_step(loss_fn, nnx.LoRAParam)
    trainers = {
        "ours": (ours_step, ours, jadapters.adapter_optimizer(ours, tx)),
        **{
            name: (peer_step, models[name], nnx.Optimizer(models[name], tx, wrt=nnx.LoRAParam))
            for name in peers
        },
    }
    trainable = {
        "ours": nnx.state(ours, ours.unfreeze_enabled_adapters(freeze_batchnorm=False)),
        **{name: nnx.state(models[name], nnx.LoRAParam) for name in peers},
    }
    counts = {k: sum(a.size for a in jax.tree.leaves(s)) for k, s in trainable.items()}
    steps = time_interleaved(
        {
            name: (lambda s=s, m=m, o=o: jax.block_until_ready(s(m, o, (x, y))))
            for name, (s, m, o) in trainers.items()
        },
        warmup=args.warmup,
        steps=args.steps,
    )
    return {
        "forward_ms": fwd,
        "step_ms": steps,
        "trainable_params": counts,
        "max_abs_diff_vs_ours": agreement,
        "lora_effect_max_abs": lora_effect,
        "skipped_peers": [] if qwix is not None else ["qwix"],
    }


# --- report ------------------------------------------------------------------------------------


def _row(what, ours, baseline, target, limit):
    ratio = ours / baseline
    verdict = "" if limit is None else ("pass" if ratio <= limit else "FAIL")
    return f"| {what} | {ours:.2f} | {baseline:.2f} | {ratio:.3f} | {target} | {verdict} |"


def _rows(lin, nx):
    step, fwd, noise = nx["step_ms"], nx["forward_ms"], f"<= {NOISE:.2f}"
    rows = [
        (
            "Linen train step: LoRA (q,v) / full fine-tuning",
            lin["lora_step_ms"],
            lin["full_step_ms"],
            "< 1.00",
            1.0,
        ),
        (
            "Linen forward: merged / base",
            lin["merged_forward_ms"],
            lin["base_forward_ms"],
            "<= 1.01",
            1.01,
        ),
        (
            "Linen forward: unmerged LoRA / base",
            lin["unmerged_forward_ms"],
            lin["base_forward_ms"],
            "<= 1.05",
            1.05,
        ),
    ]
    peers = [p for p in (("flax", "Flax nnx.LoRA"), ("qwix", "qwix LoRA")) if p[0] in step]
    for peer, label in peers:  # a peer that was not installed has no times and no rows
        rows.append((f"NNX train step: ours / {label}", step["ours"], step[peer], noise, NOISE))
    for peer, label in peers:
        rows.append((f"NNX forward: ours / {label}", fwd["ours"], fwd[peer], noise, NOISE))
    rows.append(("NNX forward: ours unmerged / base", fwd["ours"], fwd["base"], "info", None))
    for peer, label in peers:
        rows.append((f"NNX forward: {label} / base", fwd[peer], fwd["base"], "info", None))
    return rows


def table(results: dict) -> str:
    lin, nx = results["linen"], results["nnx"]
    a = results["args"]
    size = (
        f"d_model={a['d_model']}, layers={a['layers']}, heads={a['heads']}, seq={a['seq']}, "
        f"batch={a['batch']}, rank={a['rank']}, steps={a['steps']} (median), warmup={a['warmup']}"
    )
    diffs = ", ".join(f"{k} {v:.2e}" for k, v in nx["max_abs_diff_vs_ours"].items())
    skipped = [QWIX_MISSING] if "qwix" in nx.get("skipped_peers", []) else []
    lines = [
        f"LoRA benchmark ({size}); {results['backend']} ({results['devices']})",
        "",
        "| comparison | ours ms | baseline ms | ratio | target | result |",
        "| --- | ---: | ---: | ---: | --- | --- |",
        *(_row(*row) for row in _rows(lin, nx)),
        "",
        "Notes:",
        *(f"- {note}." for note in skipped),
        f"- Merged vs adapted output, max |diff|: {lin['merged_vs_adapted_max_abs_diff']:.2e} "
        f"(LoRA's effect on the output: {lin['lora_effect_max_abs']:.2e}). The merged forward "
        "runs the unwrapped model's jitted function on the merged params; one compiled "
        f"executable serves base and merged: {lin['merged_same_executable_as_base']}. It is "
        "the base computation, so its ratio measures timing noise only.",
        f"- NNX peers use the same base weights, modules, rank, scale and LoRA weights; max "
        f"|output - ours|: {diffs} (LoRA's effect: "
        f"{nx['lora_effect_max_abs']:.2e}). Trainable parameters: "
        + ", ".join(f"{k} {v}" for k, v in nx["trainable_params"].items())
        + ".",
        "- Flax: `nnx.LoRA(base_module=...)` cannot wrap attention's `LinearGeneral` q/v "
        "directly (its flat `(..., out)` result does not broadcast against the base's "
        "`(..., heads, head_dim)`), and it has no `alpha`; each q/v is a small module running "
        "the original projection plus `scale * nnx.LoRA(x)` reshaped (`FlaxLoRAProjection`).",
        "- qwix: `qwix.apply_lora_to_model(model, qwix.LoraProvider(module_path=..., rank, "
        "alpha), x, rngs=...)` on the same NNX model; it intercepts every `dot_general` of "
        "the model and adds `kernel_lora_a`/`kernel_lora_b` (`nnx.LoRAParam`) to the matched "
        "projections.",
        "- Train steps: ours is `jadapters.nnx_train_step` with `adapter_optimizer`; the peers "
        "run the same `nnx.jit` step differentiating `nnx.LoRAParam` only (adam, donated "
        "model and optimizer). Forwards: `jax.jit` of `nnx.merge(graphdef, state)(x)`. "
        "Linen steps: `jadapters.linen_train_step` vs `jax.jit` full-gradient adam step.",
        f"- 'No slower than' a peer means ratio <= {NOISE:.2f}: variants are timed "
        "interleaved, but on a shared CPU a few percent is noise.",
    ]
    return "\n".join(lines)


def _installed_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run(args: argparse.Namespace) -> dict:
    """Runs every comparison and returns the results (milliseconds, medians)."""
    results = {
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "backend": jax.default_backend(),
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "flax": flax.__version__,
            "optax": optax.__version__,
            "qwix": _installed_version("qwix"),
            "jadapters": jadapters.__version__,
        },
        "cpu_count": os.cpu_count(),
        "linen": bench_linen(args),
        "nnx": bench_nnx(args),
    }
    results["table"] = table(results)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    print(results["table"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
