"""The deflated variant (ALGORITHM.md section 7): the workers jointly track the top
eigenspace of the Hessian by block power iteration over the same probes, exchange and Gram
machinery as the secant method, and step Newton-like there and by SGD with momentum in the
complement.

Every ``probe_every`` steps (a refresh) rank r probes its k columns v of the basis V on its
minibatch, y = (grad(theta + eps v) - grad(theta)) / eps, and the slot's Allgather gives
every rank V and Y ~ H V. Rayleigh-Ritz on sym(V^T Y) gives the Ritz pairs; the next basis
is orth(Y Q) (Cholesky-QR on the Gram matrix). The ring of the secant method holds one
slot: rows [g; per rank: k V-rows, k Y-rows].
"""

from __future__ import annotations

import time

import numpy as np

from hessmpi.backend import synchronize, to_host
from hessmpi.optim.info import StepInfo
from hessmpi.optim.quasi_newton import deflation
from hessmpi.optim.secant import Secant


class Deflated(Secant):
    """Options as Secant's: ``pairs_per_rank`` k columns per rank (m = P k), ``probe_every``
    T (refresh period), ``probe_sigma`` eps relative to max(||theta||, 1), ``lr`` eta_c of
    the complement, ``newton_lr`` alpha, ``momentum`` (complement only)."""

    def __init__(self, theta, *, model, comm, draw_batch, seed: int, opts: dict):
        super().__init__(theta, model=model, comm=comm, draw_batch=draw_batch, seed=seed,
                         opts=opts | {"memory": 1, "pairs": "probe", "probe_batch": 1.0,
                                      "line_search": "none", "damping": 0.0})
        xp, n, k, m = self.xp, theta.shape[0], self.k, self.m
        self._probe_cost = float(k)
        self.newton_step = theta * 0
        self._next_v = xp.zeros((k, n), dtype=theta.dtype)
        # the first basis: m seeded Gaussian columns (the same on every rank), orthonormal by
        # Cholesky-QR; this rank keeps its own k of them
        gauss = np.random.default_rng([seed, 7]).standard_normal((m, n))
        r = np.linalg.cholesky(gauss @ gauss.T).T
        mine = slice(k * comm.rank, k * (comm.rank + 1))
        self._next_v[...] = xp.asarray(np.linalg.solve(r.T, gauss)[mine])
        self._next_basis = None        # (m, m) coefficients over Y of the next basis

    def state(self) -> dict:
        """Secant's state plus the coefficients of the next basis (NaN before the first)."""
        m = self.m
        nxt = np.full((m, m), np.nan) if self._next_basis is None else self._next_basis
        return super().state() | {"next_basis": nxt}

    def load_state(self, state: dict, same_layout: bool) -> None:
        super().load_state(state, same_layout)
        nxt = np.asarray(state["next_basis"])
        self._next_basis = nxt if same_layout and np.isfinite(nxt).all() else None

    @property
    def last_step_norm(self) -> float:
        """||theta_new - theta_old|| of the last step (momentum part + Newton part)."""
        return float(self.xp.linalg.norm(self.velocity + self.newton_step))

    def observe(self, theta, grad, lr: float, x, y) -> float:
        """On a refresh step: this rank's next k basis columns, and their products with the
        minibatch Hessian by finite differences of gradients. Returns gradient seconds."""
        self.probing = self.steps % self.o["probe_every"] == 0
        self.grad_evals_per_step = 1.0 + (self._probe_cost if self.probing else 0.0)
        if not self.probing:
            return 0.0
        xp, k = self.xp, self.k
        v_rows, y_rows = self._my_rows(0)
        if self._next_basis is not None:   # orth(Y Q) from the last refresh's pairs
            active = 1 + self.slot_rows
            coef = np.zeros((k, active))
            mine = slice(k * self.comm.rank, k * (self.comm.rank + 1))
            coef[:, self._y_idx] = self._next_basis[:, mine].T
            xp.matmul(xp.asarray(coef, dtype=self.W.dtype), self.W[:active], out=self._next_v)
        eps = self.o["probe_sigma"] * max(float(xp.linalg.norm(theta)), 1.0)
        seconds = 0.0
        for j in range(k):
            v_rows[j] = self._next_v[j]
            xp.multiply(v_rows[j], eps, out=self.work)
            self.work += theta
            synchronize(xp)
            t = time.perf_counter()
            self.model.loss_grad(self.work, x, y, y_rows[j])
            synchronize(xp)
            seconds += time.perf_counter() - t
            y_rows[j] -= grad
            y_rows[j] /= eps
        return seconds

    @property
    def _y_idx(self) -> np.ndarray:
        rows = np.arange(1, 1 + self.slot_rows).reshape(self.comm.size, 2, self.k)
        return rows[:, 1].ravel()

    @property
    def _v_idx(self) -> np.ndarray:
        rows = np.arange(1, 1 + self.slot_rows).reshape(self.comm.size, 2, self.k)
        return rows[:, 0].ravel()

    def step(self, theta, grad, lr: float, x=None, y=None, loss: float | None = None
             ) -> StepInfo:
        """Refresh (exchange the probes) or only update g's Gram row, then the deflated
        step: theta -= (momentum * v + u_comp) + u_newton, with momentum v on the
        complement part only (ALGORITHM.md s.7)."""
        xp, o, W = self.xp, self.o, self.W
        if self.probing:
            self._exchange(theta, grad)
        else:
            W[0] = grad
            self._update_gram(None)
        active = 1 + self.slot_rows
        d = deflation(to_host(xp, self.gram[:active, :active]), self._v_idx, self._y_idx, 0,
                      eta_c=lr, alpha=o["newton_lr"])
        if self.probing:   # a failed refresh keeps the basis it probed (still in _next_v)
            self._next_basis = d.next_basis if d.reason is None else None
        v, u = self.velocity, self.work
        v *= o["momentum"]
        if d.reason is None:
            coef = np.zeros(active)
            coef[0] = d.coef_g
            coef[self._v_idx] = d.coef_comp
            xp.matmul(xp.asarray(coef, dtype=W.dtype), W[:active], out=u)
            v += u
            coef[:] = 0
            coef[self._v_idx] = d.coef_newton
            xp.matmul(xp.asarray(coef, dtype=W.dtype), W[:active], out=self.newton_step)
            theta -= self.newton_step
        else:
            xp.multiply(grad, lr, out=u)
            v += u
            self.newton_step[...] = 0
            self.counts[d.reason] += 1
        theta -= v
        self.steps += 1
        return StepInfo(fallback=int(d.reason is not None), reason=d.reason, rank_kept=d.kept)
