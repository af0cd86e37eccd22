"""Adam (Kingma & Ba 2015), data-parallel: the averaged gradient of the step's global batch
(one Allreduce), then the same elementwise update on every rank.

    m <- beta1 m + (1 - beta1) g;  v <- beta2 v + (1 - beta2) g^2
    theta <- theta - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)

beta1 is ``optim.momentum``; the baseline many users pick instead of SGD+momentum.
"""

from __future__ import annotations

import numpy as np

from hessmpi.optim.base import StepInfo


class Adam:
    """State: ``m``, ``v`` (n,) and the step count t. ``last_step_norm``: ||theta change||."""

    def __init__(self, theta, *, beta1: float, beta2: float, eps: float):
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.m, self.v = theta * 0, theta * 0
        self._step = theta * 0
        self.t = 0

    def state(self) -> dict:
        return {"m": self.m, "v": self.v, "t": np.array([self.t])}

    def load_state(self, state: dict, same_layout: bool) -> None:
        self.m[...] = state["m"]
        self.v[...] = state["v"]
        self.t = int(state["t"][0])

    def counters(self) -> dict[str, int]:
        return {}

    @property
    def last_step_norm(self) -> float:
        u = self._step
        return float((u @ u) ** 0.5)

    def step(self, theta, objective, lr: float) -> StepInfo:
        loss = objective.gradient(theta)
        g, m, v, u = objective.grad, self.m, self.v, self._step
        self.t += 1
        m *= self.beta1
        m += (1.0 - self.beta1) * g
        v *= self.beta2
        v += (1.0 - self.beta2) * (g * g)
        np.sqrt(v / (1.0 - self.beta2 ** self.t), out=u)
        u += self.eps
        np.divide(m, u, out=u)
        u *= lr / (1.0 - self.beta1 ** self.t)
        theta -= u
        return StepInfo(loss)
