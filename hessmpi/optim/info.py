"""What an optimizer step reports to the trainer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepInfo:
    """What one optimizer step reports for the metrics: fallback (0/1) to the SGD step and
    its reason, the curvature directions kept, forward-only passes (line search), and the
    seconds of gradient evaluations inside the step (history pairs below full batch)."""

    fallback: int = 0
    reason: str | None = None
    rank_kept: int = 0
    forward_evals: int = 0
    grad_seconds: float = 0.0
