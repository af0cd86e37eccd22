"""What every optimizer is: the protocol the trainer drives, and what a step reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class StepInfo:
    """What one optimizer step reports for the metrics: the global minibatch objective at
    the parameters the step started from, whether it fell back to the SGD step (0/1) and
    why, the curvature directions kept, and method-specific values for the metrics columns
    of :data:`hessmpi.metrics.DIAGNOSTICS` (e.g. CG iterations)."""

    loss: float
    fallback: int = 0
    reason: str | None = None
    rank_kept: int = 0
    diagnostics: dict = field(default_factory=dict)


class Optimizer(Protocol):
    """One method. It owns its state (arrays of the backend's module, allocated once);
    ``step`` evaluates the objective as it needs (its gradient's Allreduce included) and
    updates ``theta`` (n,) in place, identically on every rank. ``needs_curvature``: the
    method calls ``objective.curvature_product`` (a model without it is refused)."""

    needs_curvature: bool = False

    def step(self, theta, objective, lr: float) -> StepInfo:
        """One step at learning rate ``lr`` on the objective's current batch."""

    def state(self) -> dict:
        """The arrays a checkpoint must keep, by name."""

    def load_state(self, state: dict, same_layout: bool) -> None:
        """Restore ``state()``; ``same_layout``: saved on as many ranks as run now."""

    def counters(self) -> dict[str, int]:
        """Counts for the results file (fallbacks by reason); empty if none."""

    @property
    def last_step_norm(self) -> float:
        """||theta_new - theta_old|| of the last step."""
