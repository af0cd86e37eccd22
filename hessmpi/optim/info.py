"""What an optimizer step reports to the trainer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepInfo:
    """What one optimizer step reports for the metrics: fallback (0/1) to the SGD step and
    its reason, the curvature directions kept, and forward-only passes (line search)."""

    fallback: int = 0
    reason: str | None = None
    rank_kept: int = 0
    forward_evals: int = 0
