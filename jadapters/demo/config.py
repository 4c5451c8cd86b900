"""The demo's configuration: everything a run depends on."""

from __future__ import annotations

import dataclasses

from jadapters.demo import data

METHODS = ("head", "adapter", "lora", "full")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Everything a demo run depends on; the same config gives the same accuracies."""

    seed: int = 0
    steps: int = 500
    pretrain_steps: int = 400
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    adapter_dim: int = 16
    lora_rank: int = 8
    methods: tuple[str, ...] = METHODS
    batch_size: int = 64
    shift: str = data.DEFAULT_SHIFT
    out_dir: str = "jadapters_demo_out"
    plot: bool = True
    progress: bool = True

    def __post_init__(self):
        sizes = ("steps", "pretrain_steps", "d_model", "layers", "heads", "batch_size")
        for name in (*sizes, "adapter_dim", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.d_model % self.heads:
            raise ValueError(
                f"d_model must be divisible by heads, got d_model={self.d_model}, "
                f"heads={self.heads}."
            )
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(
                f"methods must be distinct names from {METHODS}, got {list(self.methods)}."
            )
        if self.shift not in data.SHIFTS:
            raise ValueError(f"shift must be one of {data.SHIFTS}, got {self.shift!r}.")
