"""Learning-rate schedules: a pure function of the step number."""

from __future__ import annotations

import math


def learning_rate(step: int, *, lr: float, schedule: str, warmup_steps: int, decay_every: int,
                  decay_factor: float, min_lr: float, total_steps: int) -> float:
    """The learning rate of step ``step`` (0-based) of ``total_steps``.

    Warm-up: steps 0..warmup_steps-1 ramp linearly, lr*(step+1)/warmup_steps. After it,
    "constant" keeps lr; "step" multiplies by decay_factor every decay_every steps (counted
    from the end of warm-up); "cosine" goes from lr to min_lr over the remaining steps.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    t = step - warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "step":
        return lr * decay_factor ** (t // decay_every)
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps - 1)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(t, span) / span))
    raise ValueError(f"unknown schedule {schedule!r}")
