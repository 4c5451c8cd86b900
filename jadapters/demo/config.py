"""The demo's configuration: everything a run depends on."""

from __future__ import annotations

import dataclasses

from jadapters.demo import data
from jadapters.demo.pretrained import BaseConfig

METHODS = ("head", "adapter", "lora", "full")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Everything a demo run depends on; the same config gives the same accuracies.

    With the default ``seed``, ``pretrain_steps``, ``d_model``, ``layers`` and ``heads`` the
    demo starts from the pretrained base that ships with jadapters
    (:func:`jadapters.demo.pretrained_base`); any other value of those pretrains a base first
    (``seed`` also splits the data, and the base must not have seen the test split).
    """

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
    second_shift: str | None = None  # the second task adapter's domain; None: see below
    out_dir: str = "jadapters_demo_out"
    figure: str | None = None  # where the figure goes; None: ``out_dir/demo.png``
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
        if self.second_shift is not None and (
            self.second_shift not in data.SHIFTS or self.second_shift == self.shift
        ):
            raise ValueError(
                f"second_shift must be one of {data.SHIFTS} other than shift ({self.shift!r}), "
                f"got {self.second_shift!r}."
            )

    @property
    def second_task(self) -> str:
        """The domain of the second task adapter (``"invert"``, or ``"rotate"`` when the first
        task is ``"invert"``), unless ``second_shift`` names one."""
        if self.second_shift is not None:
            return self.second_shift
        return "rotate" if self.shift == "invert" else "invert"

    @property
    def figure_path(self) -> str:
        return self.figure if self.figure is not None else f"{self.out_dir}/demo.png"

    def base_config(self) -> BaseConfig:
        """The pretraining this run's base needs (batch size and learning rate: the shipped
        base's)."""
        return BaseConfig(
            seed=self.seed,
            steps=self.pretrain_steps,
            d_model=self.d_model,
            layers=self.layers,
            heads=self.heads,
            mlp_dim=2 * self.d_model,
        )
