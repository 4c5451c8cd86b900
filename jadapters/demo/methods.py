"""The four ways the demo adapts the pretrained model, and what each one saves.

Every method starts from the same :class:`Start` (pretrained weights, shifted data, batches)
and returns a result dict (plain values, see :func:`jadapters.demo.main.run_demo`) and a
``replay`` of its compiled step for timing.
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

ADAPTER_TARGETS = (r"blocks_\d+/attn", r"blocks_\d+/mlp")
LORA_TARGETS = r"blocks_\d+/attn/(query|value)"


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


def _save_adapters(path: Path, adapted: Any, variables: dict) -> str:
    """Saves the adapter partition only; returns how, for the report."""
    if hasattr(jadapters, "save_adapters"):
        jadapters.save_adapters(str(path.resolve()), adapted, variables)
        return "jadapters.save_adapters"
    _, adapters = jadapters.split_variables(variables)
    save_tree(path, {jadapters.ADAPTER_COLLECTION: adapters})
    return "orbax StandardCheckpointer (jadapters.save_adapters is not in this version)"


def _reloads_exactly(path: Path, adapted: Any, targets: Any, start: Start, adapters: Any) -> bool:
    """Loads the adapter checkpoint onto a fresh wrap of the pretrained model; True when it
    rebuilds the same adapted model with the same adapter weights, bit for bit."""
    bare = jadapters.adapter_transform(start.model, targets)
    model, variables = jadapters.load_adapters(str(path.resolve()), bare, {"params": start.params})
    _, loaded = jadapters.split_variables(variables)
    if model != adapted or jax.tree.structure(loaded) != jax.tree.structure(adapters):
        return False
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), loaded, adapters)
    return all(jax.tree.leaves(same))


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
            "step_seconds": None,  # filled in by run_demo, which times all methods together
            "step_ratio": None,
            "target_acc": runs.accuracy(apply, variables, self.tgt.x_test, self.tgt.y_test),
            "source_acc": runs.accuracy(apply, variables, self.src.x_test, self.src.y_test),
            "source_acc_disabled": None,
            "disabled_logits_identical": None,
            "losses": log.losses,
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


def adapted_model(start: Start, name: str) -> jadapters.AdaptedLinen | None:
    """The model wrapped with ``name``'s adapters (``adapter`` or ``lora``), or ``None``
    where this version of jadapters lacks them."""
    if name == "adapter":
        cfg = jadapters.LinearAdapterConfig(dim=start.config.adapter_dim)
        wrapped = jadapters.adapter_transform(start.model, list(ADAPTER_TARGETS))
        return wrapped.add_adapter("digits_shift", cfg)
    if not hasattr(jadapters, "LoRAConfig"):
        return None
    rank = start.config.lora_rank
    cfg = jadapters.LoRAConfig(rank=rank, alpha=2.0 * rank)
    wrapped = jadapters.adapter_transform(start.model, LORA_TARGETS)
    return wrapped.add_adapter("digits_shift_lora", cfg)


def run_adapter_method(
    start: Start, name: str, adapted: jadapters.AdaptedLinen, key: jax.Array
) -> tuple[dict, Any]:
    """``adapter`` or ``lora``: trains the adapters of ``adapted``; the base, head included,
    is a constant."""
    base = {"params": start.params}
    adapters = runs.init_adapters(adapted, base, jax.random.fold_in(key, 0))
    train_key = jax.random.fold_in(key, 1)
    adapters, log = runs.train_adapters(
        adapted,
        base,
        adapters,
        start.tgt.x_train,
        start.tgt.y_train,
        start.indices,
        key=train_key,
        lr=runs.LEARNING_RATES[name],
        desc=name,
        progress=start.config.progress,
    )
    variables = jadapters.merge_variables(base, adapters)
    apply = runs.logits_fn(adapted)
    result = start.result(name, runs.count_params(adapters), log, apply, variables)
    # With its adapters off, the adapted model must be the pretrained one, bit for bit.
    disabled = runs.logits_fn(adapted.set_enabled_adapters(None, enabled=False))
    off_logits = np.asarray(disabled(variables, start.src.x_test))
    result["source_acc_disabled"] = float((off_logits.argmax(-1) == start.src.y_test).mean())
    result["disabled_logits_identical"] = bool(np.array_equal(off_logits, start.base_logits))
    path = Path(result["checkpoint"])
    result["saved_with"] = _save_adapters(path, adapted, variables)
    result["checkpoint_bytes"] = disk_bytes(path)
    if result["saved_with"] == "jadapters.save_adapters" and hasattr(jadapters, "load_adapters"):
        targets = list(ADAPTER_TARGETS) if name == "adapter" else LORA_TARGETS
        result["reloaded_identical"] = _reloads_exactly(path, adapted, targets, start, adapters)
    return result, log.replay
