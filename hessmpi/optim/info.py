"""What an optimizer step reports to the trainer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepInfo:
    """What one optimizer step reports for the metrics: fallback (0/1) to the SGD step and
    its reason, and the curvature directions kept."""

    fallback: int = 0
    reason: str | None = None
    rank_kept: int = 0
