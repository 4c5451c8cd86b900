"""The four ways the demo adapts the pretrained model, what each one saves, and the switch.

Every method starts from the same :class:`Start` (pretrained weights, shifted data, batches)
and returns a result dict (plain values, see :func:`jadapters.demo.main.run_demo`) and a
``replay`` of its compiled step for timing. :func:`second_task` trains a second task adapter
on another domain; :func:`switch` loads both task adapters from their checkpoints into a fresh
model and switches between them; :func:`merged_lora` checks that merging changes nothing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

import jadapters
from jadapters.demo import data, runs

if TYPE_CHECKING:
    from jadapters.demo.config import DemoConfig

# Named target groups: adapters are added as "group:name".
ADAPTER_TARGETS = {"blocks": (r"blocks_\d+/attn", r"blocks_\d+/mlp")}
LORA_TARGETS = {"attn": r"blocks_\d+/attn/(query|value)"}
# The adapter trained for a domain is named after it.
TASK_NAMES = {"rotate": "rotated", "invert": "inverted", "rotate+invert": "rotated_inverted"}


# ------------------------------------------------------------------------- checkpoints


def disk_bytes(path: Path) -> int:
    """Sum of the sizes of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save_tree(path: Path, tree: Any) -> None:
    """Writes ``tree`` with orbax's ``StandardCheckpointer``, replacing what is at ``path``."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path.resolve(), tree, force=True)
    checkpointer.wait_until_finished()
    checkpointer.close()


def _same(a: Any, b: Any) -> bool:
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(jax.tree.leaves(jax.tree.map(lambda u, v: bool(np.array_equal(u, v)), a, b)))


def _reloads_exactly(path: Path, adapted: Any, targets: Any, start: Start, adapters: Any) -> bool:
    """Loads the adapter checkpoint onto a fresh wrap of the pretrained model; True when it
    rebuilds the same adapted model with the same adapter weights, bit for bit."""
    bare = jadapters.adapter_transform(start.model, targets)
    model, variables = jadapters.load_adapters(str(path.resolve()), bare, {"params": start.params})
    return model == adapted and _same(jadapters.split_variables(variables)[1], adapters)


# ---------------------------------------------------------------------------- methods


@dataclasses.dataclass(frozen=True)
class Start:
    """What every method starts from: the pretrained model and the shared batches."""

    config: DemoConfig
    model: Any
    params: dict  # pretrained
    src: data.Split
    tgt: data.Split
    indices: np.ndarray  # (steps, batch) adaptation batches, the same for every method
    total_params: int
    base_logits: np.ndarray  # the pretrained model's logits on the source test set

    def trains(self, name: str) -> str:
        blocks = f"{self.config.layers} block{'s' if self.config.layers > 1 else ''}"
        return {
            "head": "head Dense only",
            "adapter": f"adapters (dim {self.config.adapter_dim}) after attn and mlp, {blocks}",
            "lora": f"LoRA (rank {self.config.lora_rank}) on attn query/value, {blocks}",
            "full": "all parameters",
        }[name]

    def result(
        self, name: str, trainable: int, log: runs.TrainLog, apply: Any, variables: Any
    ) -> dict:
        return {
            "trains": self.trains(name),
            "lr": runs.LEARNING_RATES[name],
            "trainable_params": trainable,
            "trainable_share": trainable / self.total_params,
            # filled in by run_demo, which times all methods together:
            "step_seconds": None,
            "step_seconds_quartiles": None,
            "step_ratio": None,
            "step_ratio_range": None,
            "target_acc": runs.accuracy(apply, variables, self.tgt.x_test, self.tgt.y_test),
            "source_acc": runs.accuracy(apply, variables, self.src.x_test, self.src.y_test),
            "source_acc_disabled": None,
            "disabled_logits_identical": None,
            "losses": log.losses,
            "adapter": None,
            "checkpoint": str(Path(self.config.out_dir) / name),
            "checkpoint_bytes": None,
            "saved_with": None,
            "reloaded_identical": None,
        }


def run_base_method(start: Start, name: str) -> tuple[dict, Any]:
    """``head`` or ``full``: trains (part of) the model's own parameters."""
    tgt, lr, progress = start.tgt, runs.LEARNING_RATES[name], start.config.progress
    if name == "head":
        params, log = runs.train_head(
            start.model,
            start.params,
            tgt.x_train,
            tgt.y_train,
            start.indices,
            lr=lr,
            progress=progress,
        )
        trained = {"head": params["head"]}
    else:
        params, log = runs.train_full(
            start.model,
            start.params,
            tgt.x_train,
            tgt.y_train,
            start.indices,
            lr=lr,
            desc=name,
            progress=progress,
        )
        trained = {"params": params}
    apply = runs.logits_fn(start.model)
    result = start.result(name, runs.count_params(trained), log, apply, {"params": params})
    path = Path(result["checkpoint"])
    save_tree(path, trained)
    result["saved_with"] = "orbax StandardCheckpointer"
    result["checkpoint_bytes"] = disk_bytes(path)
    return result, log.replay


def adapted_model(config: DemoConfig, model: Any, method: str, shift: str) -> Any:
    """The model wrapped with ``method``'s adapter (``adapter`` or ``lora``) for the domain
    ``shift``, named ``"group:<domain>"``."""
    task = TASK_NAMES[shift]
    if method == "adapter":
        wrapped = jadapters.adapter_transform(model, ADAPTER_TARGETS)
        cfg = jadapters.LinearAdapterConfig(dim=config.adapter_dim)
        return wrapped.add_adapter(f"blocks:{task}", cfg)
    rank = config.lora_rank
    wrapped = jadapters.adapter_transform(model, LORA_TARGETS)
    return wrapped.add_adapter(f"attn:{task}", jadapters.LoRAConfig(rank=rank, alpha=2.0 * rank))


def _train_adapter(
    start: Start, method: str, adapted: Any, split: data.Split, key: jax.Array, desc: str
) -> tuple[Any, runs.TrainLog]:
    base = {"params": start.params}
    adapters = runs.init_adapters(adapted, base, jax.random.fold_in(key, 0))
    return runs.train_adapters(
        adapted,
        base,
        adapters,
        split.x_train,
        split.y_train,
        start.indices,
        key=jax.random.fold_in(key, 1),
        lr=runs.LEARNING_RATES[method],
        desc=desc,
        progress=start.config.progress,
    )


def run_adapter_method(start: Start, name: str, key: jax.Array) -> tuple[dict, Any, Any]:
    """``adapter`` or ``lora``: trains the adapters only; the base, head included, is a
    constant. Returns ``(result, replay, (adapted, variables))``."""
    adapted = adapted_model(start.config, start.model, name, start.config.shift)
    adapters, log = _train_adapter(start, name, adapted, start.tgt, key, name)
    variables = jadapters.merge_variables({"params": start.params}, adapters)
    apply = runs.logits_fn(adapted)
    result = start.result(name, runs.count_params(adapters), log, apply, variables)
    result["adapter"] = adapted.adapters.specs[0].qualified_name
    # With its adapters off, the adapted model must be the pretrained one, bit for bit.
    disabled = runs.logits_fn(adapted.set_enabled_adapters(None, enabled=False))
    off_logits = np.asarray(disabled(variables, start.src.x_test))
    result["source_acc_disabled"] = float((off_logits.argmax(-1) == start.src.y_test).mean())
    result["disabled_logits_identical"] = bool(np.array_equal(off_logits, start.base_logits))
    path = Path(result["checkpoint"])
    jadapters.save_adapters(str(path.resolve()), adapted, variables)
    result["saved_with"] = "jadapters.save_adapters"
    result["checkpoint_bytes"] = disk_bytes(path)
    targets = ADAPTER_TARGETS if name == "adapter" else LORA_TARGETS
    result["reloaded_identical"] = _reloads_exactly(path, adapted, targets, start, adapters)
    return result, log.replay, (adapted, variables)


def second_task(start: Start, shift: str, key: jax.Array) -> dict:
    """Trains a second bottleneck adapter, on the domain ``shift``, from the same base and
    saves it: the second of the two task adapters that :func:`switch` loads."""
    shifted = data.Split(
        data.shift_domain(start.src.x_train, shift),
        start.src.y_train,
        data.shift_domain(start.src.x_test, shift),
        start.src.y_test,
    )
    adapted = adapted_model(start.config, start.model, "adapter", shift)
    adapters, log = _train_adapter(start, "adapter", adapted, shifted, key, TASK_NAMES[shift])
    variables = jadapters.merge_variables({"params": start.params}, adapters)
    path = Path(start.config.out_dir) / f"adapter_{TASK_NAMES[shift]}"
    jadapters.save_adapters(str(path.resolve()), adapted, variables)
    apply = runs.logits_fn(adapted)
    return {
        "shift": shift,
        "adapter": adapted.adapters.specs[0].qualified_name,
        "target_acc": runs.accuracy(apply, variables, shifted.x_test, shifted.y_test),
        "losses": log.losses,
        "checkpoint": str(path),
        "checkpoint_bytes": disk_bytes(path),
    }


def switch(start: Start, checkpoints: list[str], domains: list[str]) -> dict:
    """Loads the task adapters saved at ``checkpoints`` into a fresh wrap of the pretrained
    model and measures test accuracy with each one enabled (and with none) on each domain
    (``"upright"`` or a shift)."""
    model = jadapters.adapter_transform(start.model, ADAPTER_TARGETS)
    variables = {"params": start.params}
    for path in checkpoints:
        model, variables = jadapters.load_adapters(str(Path(path).resolve()), model, variables)
    names = [spec.qualified_name for spec in model.adapters]
    tests = {
        d: start.src.x_test if d == "upright" else data.shift_domain(start.src.x_test, d)
        for d in domains
    }
    accuracy = {}
    for enabled in [None, *names]:
        switched = model.set_enabled_adapters(enabled=False)
        if enabled is not None:
            switched = switched.set_enabled_adapters(enabled, enabled=True)
        apply = runs.logits_fn(switched)
        accuracy[enabled or "none"] = {
            d: runs.accuracy(apply, variables, x, start.src.y_test) for d, x in tests.items()
        }
    return {"checkpoints": list(checkpoints), "adapters": names, "accuracy": accuracy}


def merged_lora(start: Start, adapted: Any, variables: Any) -> dict:
    """Folds the LoRA adapter into the base kernels; the merged *unwrapped* model must
    classify like the unmerged adapted one."""
    merged = jadapters.merge_adapters(adapted, variables)
    x, y = start.tgt.x_test, start.tgt.y_test
    unmerged_logits = np.asarray(runs.logits_fn(adapted)(variables, x))
    merged_logits = np.asarray(runs.logits_fn(start.model)({"params": merged}, x))
    return {
        "target_acc_unmerged": float((unmerged_logits.argmax(-1) == y).mean()),
        "target_acc_merged": float((merged_logits.argmax(-1) == y).mean()),
        "max_abs_logit_diff": float(np.abs(merged_logits - unmerged_logits).max()),
        "same_predictions": bool(
            np.array_equal(merged_logits.argmax(-1), unmerged_logits.argmax(-1))
        ),
    }
