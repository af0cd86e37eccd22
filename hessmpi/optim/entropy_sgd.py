"""Entropy-SGD (Chaudhari et al. 2017, "Entropy-SGD: biasing gradient descent into wide
valleys"), data-parallel: the gradient of the local entropy, gamma (x - mu), estimated by an
inner Langevin (SGLD) loop, then a Nesterov-momentum step on x.

One step of the outer loop at x: x' = mu = x; ``entropy_steps`` L times, on a fresh
minibatch each (one Allreduce each): dx' = grad f(x') - gamma (x - x'),
x' <- x' - eta' dx' + sqrt(eta') * eps * N(0, I), mu <- (1 - alpha) mu + alpha x'; then
v <- momentum v + gamma (x - mu), x <- x - lr (gamma (x - mu) + momentum v) (Nesterov), and
gamma <- gamma (1 + gamma_1) (scoping). The noise comes from a generator seeded by
(seed, step, inner step), the same on every rank, so the ranks stay identical.
Defaults from the paper's code: L = 20, eta' = 0.1, eps = 1e-4, alpha = 0.25.
"""

from __future__ import annotations

import numpy as np

from hessmpi.optim.base import StepInfo


class EntropySGD:
    """``opts``: the typed options of ``optim.name = "entropy_sgd"``; ``seed`` seeds the
    Langevin noise."""

    def __init__(self, theta, objective, opts, *, seed: int):
        self.xp, self.o, self.seed = objective.xp, opts, seed
        self.gamma = opts.entropy_gamma
        self.velocity = theta * 0
        self._inner = theta * 0           # x'
        self._mu = theta * 0
        self._grad = theta * 0            # gamma (x - mu), the local-entropy gradient
        self._step = theta * 0
        self._noise = np.empty(theta.shape[0]) if opts.entropy_noise else None
        self.steps = 0

    def state(self) -> dict:
        return {"velocity": self.velocity,
                "entropy": np.array([self.gamma, self.steps], dtype=np.float64)}

    def load_state(self, state: dict, same_layout: bool) -> None:
        self.velocity[...] = self.xp.asarray(state["velocity"])
        gamma, steps = (float(v) for v in state["entropy"])
        self.gamma, self.steps = gamma, int(steps)

    def counters(self) -> dict[str, int]:
        return {}

    @property
    def last_step_norm(self) -> float:
        return float(self.xp.linalg.norm(self._step))

    def step(self, theta, objective, lr: float) -> StepInfo:
        """The inner loop on ``entropy_steps`` minibatches (the step's own first, then fresh
        ones), then the outer Nesterov step; the loss reported is the first minibatch's at
        x."""
        xp, o = self.xp, self.o
        inner, mu = self._inner, self._mu
        inner[...] = theta
        mu[...] = theta
        loss = None
        rng = np.random.default_rng([self.seed, self.steps])
        for l in range(o.entropy_steps):
            if l:
                objective.next_batch()
            value = objective.gradient(inner)
            loss = value if loss is None else loss
            g = objective.grad                    # dx' = grad f(x') - gamma (x - x')
            xp.subtract(theta, inner, out=self._grad)
            g -= self.gamma * self._grad
            g *= o.entropy_lr
            inner -= g
            if self._noise is not None:
                rng.standard_normal(out=self._noise)
                self._noise *= np.sqrt(o.entropy_lr) * o.entropy_noise
                inner += xp.asarray(self._noise, dtype=inner.dtype)
            mu *= 1.0 - o.entropy_alpha
            mu += o.entropy_alpha * inner
        xp.subtract(theta, mu, out=self._grad)
        self._grad *= self.gamma
        v = self.velocity
        v *= o.momentum
        v += self._grad
        xp.multiply(v, o.momentum, out=self._step)
        self._step += self._grad
        self._step *= lr
        theta -= self._step
        self.gamma *= 1.0 + o.entropy_scoping
        self.steps += 1
        return StepInfo(loss)
