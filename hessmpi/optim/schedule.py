"""Learning-rate schedules: the learning rate as a pure function of the step number."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """The learning rate of step ``step`` (0-based) of ``total_steps``: ``schedule(step)``.

    Warm-up: steps 0..warmup_steps-1 ramp linearly, lr*(step+1)/warmup_steps. After it,
    "constant" keeps lr; "step" multiplies by decay_factor every decay_every steps (counted
    from the end of warm-up); "cosine" goes from lr to min_lr over the remaining steps.
    """

    lr: float
    schedule: str = "constant"
    warmup_steps: int = 0
    decay_every: int = 1000
    decay_factor: float = 0.1
    min_lr: float = 0.0
    total_steps: int = 1

    def __post_init__(self):
        if self.schedule not in ("constant", "step", "cosine"):
            raise ValueError(f"unknown schedule {self.schedule!r}")

    @classmethod
    def from_config(cls, cfg: dict) -> Schedule:
        """The schedule of a configuration's [optim] keys over its train.steps."""
        o = cfg["optim"]
        return cls(lr=o["lr"], schedule=o["schedule"], warmup_steps=o["warmup_steps"],
                   decay_every=o["decay_every"], decay_factor=o["decay_factor"],
                   min_lr=o["min_lr"], total_steps=cfg["train"]["steps"])

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        t = step - self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        if self.schedule == "step":
            return self.lr * self.decay_factor ** (t // self.decay_every)
        span = max(1, self.total_steps - self.warmup_steps - 1)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (
            1 + math.cos(math.pi * min(t, span) / span))
