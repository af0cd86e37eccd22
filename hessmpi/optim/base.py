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


def state_bytes(optimizer) -> int:
    """Bytes of every array ``optimizer`` holds on this rank: its state and its work buffers,
    those of its parts (pair source, pair memory, line search, exchange) included, each
    buffer counted once (a view by the array it views). Counted from the objects, not from
    what a method declares; the objective's buffers are not the optimizer's."""
    seen: set[int] = set()
    buffers: dict[int, int] = {}

    def visit(value) -> None:
        if isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif _is_array(value):
            base = value
            while _is_array(getattr(base, "base", None)):
                base = base.base
            buffers[id(base)] = int(base.nbytes)
        elif type(value).__module__.startswith("hessmpi.optim") and id(value) not in seen:
            seen.add(id(value))
            visit(vars(value) if hasattr(value, "__dict__") else ())

    visit(optimizer)
    return sum(buffers.values())


def _is_array(value) -> bool:
    kind = type(value)
    return kind.__name__ == "ndarray" and kind.__module__.split(".")[0] in ("numpy", "cupy")
