"""Distributed Hessian-free optimisation (Martens 2010; distributed as in He, Mudigere,
Smelyanskiy & Takac 2016): the Newton step of a damped Gauss-Newton model, solved by
conjugate gradients on curvature products, every product one R-operator pass per rank and
one Allreduce of n.

One step: the averaged gradient g on the step's global batch; CG on (G + lam I) d = -g with
G the Gauss-Newton matrix on a curvature batch (the first ``hf_curvature_batch`` of every
rank's batch), warm-started from ``hf_cg_decay`` times the last step's CG solution, stopped
by Martens' relative-progress rule or ``hf_max_cg`` iterations, optionally preconditioned by
(diag of the empirical Fisher + lam)^0.75; CG backtracking over the iterates saved at
geometric intervals (the earliest whose successor is no better); Levenberg-Marquardt lam
from the reduction ratio rho of the undamped model (rho < 1/4: lam * 3/2, rho > 3/4:
lam * 2/3); a backtracking line search on the chosen direction. Every decision is taken on
reduced values, so every rank takes the same; a NaN in any rank's product ends CG at the
last finite iterate everywhere. If CG yields no descent direction, the step is the searched
SGD step (as the secant method's fallback).
"""

from __future__ import annotations

import math

import numpy as np

from hessmpi.optim.base import StepInfo
from hessmpi.optim.linesearch import FALLBACK_TRIALS

#: Martens' stopping rule: relative progress below EPSILON per iteration over the last
#: max(MIN_WINDOW, WINDOW_FRACTION * i) iterations.
EPSILON, MIN_WINDOW, WINDOW_FRACTION = 5e-4, 10, 0.1
#: The iterations whose CG iterate is saved for backtracking: ceil(1.3^j).
SAVE_GROWTH = 1.3
#: The line search on the chosen direction: t <- LS_SHRINK * t, at most ls_max_trials.
LS_SHRINK = 0.8


def save_schedule(max_iters: int) -> list[int]:
    """CG iterations (1-based) whose iterate is kept for backtracking: ceil(1.3^j), and the
    last."""
    out, j = [], 0
    while (i := math.ceil(SAVE_GROWTH ** j)) <= max_iters:
        if not out or i != out[-1]:
            out.append(i)
        j += 1
    return out


def martens_stop(phis: list[float], i: int) -> bool:
    """Martens' rule after iteration ``i`` (1-based) with model values phis[0..i]: stop when
    phi_i < 0 and (phi_i - phi_{i-k}) / phi_i < k * EPSILON, k = max(10, 0.1 i)."""
    k = max(MIN_WINDOW, math.ceil(WINDOW_FRACTION * i))
    if i <= k or phis[i] >= 0:
        return False
    return (phis[i] - phis[i - k]) / phis[i] < k * EPSILON


class HessianFree:
    """``opts``: the typed options of ``optim.name = "hessian_free"``."""

    needs_curvature = True

    def __init__(self, theta, objective, opts, *, seed: int):
        self.xp = objective.xp
        self.o = opts
        self.lam = opts.hf_damping
        self.schedule = save_schedule(opts.hf_max_cg)
        self.d_prev = theta * 0          # the last CG solution (warm start)
        self._x, self._r, self._z, self._p, self._ap = (theta * 0 for _ in range(5))
        self._saved = [theta * 0 for _ in self.schedule]
        self._trial = theta * 0
        self._precond = theta * 0 if opts.hf_precondition else None
        self.velocity = theta * 0        # the last step taken
        self.steps = 0
        self.counts = {"not_descent": 0, "cg_not_finite": 0, "line_search": 0,
                       "no_decrease": 0}
        self.last_cg_iters = 0

    # ----- state ---------------------------------------------------------------------------
    def state(self) -> dict:
        return {"d_prev": self.d_prev, "velocity": self.velocity,
                "hf": np.array([self.lam, self.steps], dtype=np.float64),
                "counts": np.array(list(self.counts.values()))}

    def load_state(self, state: dict, same_layout: bool) -> None:
        self.d_prev[...] = self.xp.asarray(state["d_prev"])
        self.velocity[...] = self.xp.asarray(state["velocity"])
        self.lam, steps = (float(v) for v in state["hf"])
        self.steps = int(steps)
        self.counts = dict(zip(self.counts, (int(c) for c in state["counts"]), strict=True))

    def counters(self) -> dict[str, int]:
        return dict(self.counts)

    @property
    def last_step_norm(self) -> float:
        return float(self.xp.linalg.norm(self.velocity))

    # ----- the step ------------------------------------------------------------------------
    def _apply(self, objective, theta, v, out, rows) -> None:
        """out <- (G + lam I) v on the curvature batch."""
        objective.curvature_product(theta, v, out, rows=rows)
        out += self.lam * v

    def _precondition(self, r, out) -> None:
        if self._precond is None:
            out[...] = r
        else:
            self.xp.divide(r, self._precond, out=out)

    def cg(self, objective, theta, g, rows) -> tuple[int, list[int]]:
        """Preconditioned CG on (G + lam I) x = -g from x0 = decay * d_prev, into ``_x``;
        the iterates of ``schedule`` are saved (into ``_saved``). Returns (iterations, the
        iterations saved)."""
        xp, o = self.xp, self.o
        x, r, z, p, ap = self._x, self._r, self._z, self._p, self._ap
        xp.multiply(self.d_prev, o.hf_cg_decay, out=x)
        self._apply(objective, theta, x, ap, rows)
        xp.negative(g, out=r)
        r -= ap                                   # r = -g - A x0
        self._precondition(r, z)
        p[...] = z
        rz = float(r @ z)
        phis = [0.5 * float(x @ (g - r))]         # phi(x) = 1/2 x^T A x + g^T x
        saved: list[int] = []
        done = 0
        for i in range(1, o.hf_max_cg + 1):
            self._apply(objective, theta, p, ap, rows)
            pap = float(p @ ap)
            alpha = rz / pap if pap > 0 else math.nan
            if not math.isfinite(alpha):
                if pap <= 0 and math.isfinite(pap):
                    break                          # no curvature left along p: stop here
                self.counts["cg_not_finite"] += 1
                break
            x += alpha * p
            r -= alpha * ap
            done = i
            phis.append(0.5 * float(x @ (g - r)))
            if i in self.schedule:
                self._saved[self.schedule.index(i)][...] = x
                saved.append(i)
            if martens_stop(phis, i):
                break
            self._precondition(r, z)
            rz_new = float(r @ z)
            p *= rz_new / rz
            p += z
            rz = rz_new
        if done and done not in saved:            # the last iterate is always a candidate
            slot = len(saved)
            if slot < len(self._saved):
                self._saved[slot][...] = x
            else:
                self._saved.append(x.copy())
            saved.append(done)
        return done, saved

    def step(self, theta, objective, lr: float) -> StepInfo:
        xp, o = self.xp, self.o
        loss = objective.gradient(theta)
        g = objective.grad
        rows = slice(0, max(1, math.ceil(round(o.hf_curvature_batch * objective.batch_rows,
                                                9))))
        if self._precond is not None:
            objective.fisher_diagonal(theta, self._precond, rows=rows)
            self._precond += self.lam
            self._precond **= 0.75
        iters, saved = self.cg(objective, theta, g, rows)
        self.last_cg_iters = iters
        self.d_prev[...] = self._x
        reason = None
        d = self._trial
        # backtrack over the saved iterates: from the last, go back while F improves
        best, best_f = None, loss
        for k in range(len(saved) - 1, -1, -1):
            xp.add(theta, self._saved[k], out=d)
            f = objective.value(d)
            if not f < best_f:
                if best is not None:
                    break
                continue
            best, best_f = k, f
        if best is None or float(g @ self._saved[best]) >= 0:
            reason = "not_descent"
        else:
            direction = self._saved[best]
            # rho of the undamped model: q(d) = g^T d + 1/2 d^T G d
            objective.curvature_product(theta, direction, self._ap, rows=rows)
            q = float(g @ direction) + 0.5 * float(direction @ self._ap)
            rho = (best_f - loss) / q if q < 0 else -math.inf
            if rho < 0.25:
                self.lam *= 1.5
            elif rho > 0.75:
                self.lam *= 2.0 / 3.0
            slope = float(g @ direction)
            t, accepted = 1.0, best_f <= loss + o.ls_c1 * slope
            for _ in range(o.ls_max_trials - 1):
                if accepted:
                    break
                t *= LS_SHRINK
                xp.multiply(direction, t, out=d)
                d += theta
                accepted = objective.value(d) <= loss + o.ls_c1 * t * slope
            if accepted:
                xp.multiply(direction, t, out=self.velocity)
            else:
                reason = "line_search"
        if reason is not None:
            self.counts[reason] += 1
            self._gradient_step(objective, theta, g, loss, lr)
        theta += self.velocity
        self.steps += 1
        return StepInfo(loss, fallback=int(reason is not None), reason=reason,
                        diagnostics={"cg_iters": iters, "hf_lambda": self.lam})

    def _gradient_step(self, objective, theta, g, loss: float, lr: float) -> None:
        """velocity <- -t g, t from min(lr, ||last step|| / ||g||) halved until F decreases
        sufficiently; 0 (no step) if it never does."""
        xp, c1 = self.xp, self.o.ls_c1
        g_norm, last = float(xp.linalg.norm(g)), self.last_step_norm
        t = min(lr, last / g_norm) if last > 0 and g_norm > 0 else lr
        gg = float(g @ g)
        for _ in range(FALLBACK_TRIALS):
            xp.multiply(g, -t, out=self.velocity)
            xp.add(theta, self.velocity, out=self._trial)
            if objective.value(self._trial) <= loss - c1 * t * gg:
                return
            t *= 0.5
        self.velocity[...] = 0
        self.counts["no_decrease"] += 1
