"""SGD with momentum (heavy ball or Nesterov) and weight decay, in place on theta."""

from __future__ import annotations

import numpy as np

from hessmpi.optim.base import StepInfo
from hessmpi.optim.exchange import Whole


class SGD:
    """With g = grad + weight_decay*theta:  v <- momentum*v + g;  theta <- theta - lr*d,
    where d = v, or d = g + momentum*v for Nesterov (the PyTorch convention).

    State: ``velocity``: this rank's part of v in the layout of ``exchange`` ((n,) whole
    with ``allgather``; sharded: about n / P entries, the update done on them, then one
    Allgather of theta). ``last_step_norm``: ||lr*d|| of the last step.
    """

    def __init__(self, theta, *, momentum: float, weight_decay: float, nesterov: bool,
                 exchange=None):
        self.momentum, self.weight_decay, self.nesterov = momentum, weight_decay, nesterov
        self.exchange = Whole(theta.shape[0]) if exchange is None else exchange
        self.velocity = self.exchange.part(theta) * 0
        self._step = self.exchange.part(theta) * 0

    def state(self) -> dict:
        return {"velocity": self.exchange.gathered(self.velocity)}

    def load_state(self, state: dict, same_layout: bool) -> None:
        self.velocity[...] = self.exchange.part(state["velocity"])

    def counters(self) -> dict[str, int]:
        return {}

    def step(self, theta, objective, lr: float) -> StepInfo:
        """The averaged gradient of the objective's batch, then one step in place."""
        loss = objective.gradient(theta)
        self.update(theta, objective.grad_part, lr)
        return StepInfo(loss)

    def update(self, theta, grad, lr: float) -> None:
        """theta -= lr * d for ``grad``: this rank's part of the averaged gradient ((n,)
        whole with allgather), which is not modified."""
        g = grad + self.weight_decay * self.exchange.part(theta) if self.weight_decay else grad
        v = self.velocity
        v *= self.momentum
        v += g
        u = self._step
        if self.nesterov:
            u[...] = g + self.momentum * v
            u *= lr
        else:
            np.multiply(v, lr, out=u)  # one pass (CuPy arrays too, via __array_ufunc__)
        self.exchange.move(theta, u)

    @property
    def last_step_norm(self) -> float:
        """(sharded: a collective)"""
        return float(self.exchange.dot(self._step, self._step) ** 0.5)
