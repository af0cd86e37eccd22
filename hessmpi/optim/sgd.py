"""SGD with momentum (heavy ball or Nesterov) and weight decay, in place on theta."""

from __future__ import annotations

import numpy as np

from hessmpi.optim.info import StepInfo

PLAIN_STEP = StepInfo()


class SGD:
    """With g = grad + weight_decay*theta:  v <- momentum*v + g;  theta <- theta - lr*d,
    where d = v, or d = g + momentum*v for Nesterov (the PyTorch convention).

    State: ``velocity`` (n,). ``last_step_norm``: ||lr*d|| of the last step.
    """

    grad_evals_per_step = 1

    def __init__(self, theta, *, momentum: float, weight_decay: float, nesterov: bool):
        self.momentum, self.weight_decay, self.nesterov = momentum, weight_decay, nesterov
        self.velocity = theta * 0
        self._step = theta * 0

    def state(self) -> dict:
        """The arrays that a checkpoint must keep."""
        return {"velocity": self.velocity}

    def load_state(self, state: dict, same_layout: bool) -> None:
        """Restore ``state()`` as saved in a checkpoint."""
        self.velocity[...] = state["velocity"]

    def observe(self, theta, grad, lr: float, x, y) -> float:
        """Nothing to do before the Allreduce; no gradient evaluations (0 seconds)."""
        return 0.0

    def step(self, theta, grad, lr: float, x=None, y=None, loss=None) -> StepInfo:
        """One step in place; ``grad`` (n,) is the averaged gradient and is not modified;
        the batch (x, y) and the loss are not needed."""
        g = grad + self.weight_decay * theta if self.weight_decay else grad
        v = self.velocity
        v *= self.momentum
        v += g
        u = self._step
        if self.nesterov:
            u[...] = g + self.momentum * v
            u *= lr
        else:
            np.multiply(v, lr, out=u)  # one pass (CuPy arrays too, via __array_ufunc__)
        theta -= u
        return PLAIN_STEP

    @property
    def last_step_norm(self) -> float:
        u = self._step
        return float((u @ u) ** 0.5)
