"""What makes a training run a failure although every number is finite: divergence (the
loss far above where it started) and collapse (the model no better than chance).

Both are judged on reduced values (the global minibatch loss, the test accuracy over every
rank's rows), so every rank reaches the same verdict at the same step.
"""

from __future__ import annotations

import math

from hessmpi.errors import RunFailed

#: At chance: test accuracy at most this multiple of 1/C, and the training loss at least
#: this fraction of ln C (the loss of the uniform prediction).
CHANCE_ACCURACY, CHANCE_LOSS = 1.5, 0.9


class Watch:
    """max_loss_ratio: a step whose loss exceeds this multiple of the first step's loss
    (when that is positive) fails the run (0: never). chance_window: the run fails once
    every test evaluation over this many steps found it at chance (0: never). n_classes: C
    (for a model that does not classify, its accuracy is NaN and it is never at chance).
    ``first_loss``: the first step's loss (kept in checkpoints)."""

    def __init__(self, *, max_loss_ratio: float, chance_window: int, n_classes: int,
                 first_loss: float | None = None):
        self.max_loss_ratio, self.chance_window = max_loss_ratio, chance_window
        self.n_classes = n_classes
        self.first_loss = first_loss
        self._chance_since: int | None = None

    def step(self, done: int, loss: float) -> None:
        """After step ``done`` with global minibatch loss ``loss``: RunFailed if diverged."""
        if self.first_loss is None:
            self.first_loss = loss
        elif (self.max_loss_ratio and self.first_loss > 0
              and loss > self.max_loss_ratio * self.first_loss):
            raise RunFailed(f"the training loss rose to {loss:.6g} at step {done}, more than "
                            f"{self.max_loss_ratio:g} x its first value {self.first_loss:.6g} "
                            "(the run diverged: lower optim.lr; train.max_loss_ratio sets "
                            "the limit)")

    def evaluation(self, done: int, accuracy: float, loss: float) -> None:
        """After a test evaluation at step ``done``: RunFailed once the run has been at
        chance (accuracy near 1/C and training loss ``loss`` near or above ln C) at every
        evaluation for chance_window steps."""
        chance = (accuracy <= CHANCE_ACCURACY / self.n_classes
                  and loss >= CHANCE_LOSS * math.log(self.n_classes))
        if not chance:
            self._chance_since = None
            return
        if self._chance_since is None:
            self._chance_since = done
        if self.chance_window and done - self._chance_since >= self.chance_window:
            raise RunFailed(f"the model has been at chance since step {self._chance_since} "
                            f"(test accuracy {accuracy:.4f} with {self.n_classes} classes, "
                            f"training loss {loss:.6g} against ln C = "
                            f"{math.log(self.n_classes):.4g}): it collapsed or never "
                            "learned (lower optim.lr; train.chance_window sets the window)")
