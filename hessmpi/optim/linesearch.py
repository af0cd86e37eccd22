"""Line searches on the global minibatch objective (ALGORITHM.md s.8).

Every trial is one forward pass per rank and one Allreduce of a scalar (Armijo below full
batch), or one gradient per rank and one Allreduce of n + 1 floats (strong Wolfe; Armijo at
full batch), so every rank takes the same decision; a NaN on any rank rejects the trial
everywhere. At full batch the objective is the training objective, every accepted step
decreases it, and the accepted trial's gradient is the next step's (the objective adopts it:
one gradient per step when the first trial is accepted, as in L-BFGS-B).
"""

from __future__ import annotations

import math

#: Halvings of the gradient fallback before it gives up and takes no step: 2^-50 of the
#: first trial is below float64 resolution of any step that could still decrease F.
FALLBACK_TRIALS = 50


class Armijo:
    """Backtracking by halving from the full step, at most ``max_trials`` trials, accepting
    F(theta - (momentum*v + u)) <= F(theta) - c1 * g^T u. ``like``: an array (n,) of the
    backend's module and dtype (the trial point's buffer)."""

    def __init__(self, *, c1: float, max_trials: int, like):
        self.c1, self.max_trials = c1, max_trials
        self._trial = like * 0

    def search(self, objective, theta, grad, u, loss: float, velocity, momentum: float
               ) -> bool:
        """Shrink the step ``u`` (n,) in place until it is accepted; ``loss``: F(theta);
        ``velocity``: the momentum buffer the step adds to. Returns whether a trial was
        accepted (else ``u`` is the last, rejected trial)."""
        return self._backtrack(objective, theta, grad, u, loss, velocity, momentum,
                               self.max_trials)

    def descend(self, objective, theta, grad, u, loss: float) -> bool:
        """The fallback along -g: shrink the gradient step ``u`` (n,) in place until
        F(theta - u) <= F(theta) - c1 g^T u, up to FALLBACK_TRIALS halvings."""
        return self._backtrack(objective, theta, grad, u, loss, None, 0.0, FALLBACK_TRIALS)

    def _backtrack(self, objective, theta, grad, u, loss, velocity, momentum, trials) -> bool:
        xp = objective.xp
        slope = float(grad @ u)
        trial = self._trial
        for _ in range(trials):
            if velocity is None:
                xp.subtract(theta, u, out=trial)
            else:
                xp.multiply(velocity, momentum, out=trial)
                trial += u
                xp.subtract(theta, trial, out=trial)
            if _value(objective, trial) <= loss - self.c1 * slope:
                if objective.full_batch:
                    objective.adopt_trial()
                return True
            u *= 0.5
            slope *= 0.5
        return False


class StrongWolfe(Armijo):
    """The strong Wolfe conditions along -u (Nocedal & Wright, Alg. 3.5-3.6): sufficient
    decrease F(theta - t u) <= F(theta) - c1 t g^T u and |g(theta - t u)^T u| <= c2 g^T u,
    from t = 1, expanding by 2 then zooming by safeguarded cubic interpolation, at most
    ``max_trials`` trials in all. Without momentum (the trial is theta - t u). Its fallback
    along -g backtracks as Armijo's."""

    def __init__(self, *, c1: float, c2: float, max_trials: int, like):
        super().__init__(c1=c1, max_trials=max_trials, like=like)
        self.c2 = c2

    def search(self, objective, theta, grad, u, loss: float, velocity, momentum: float
               ) -> bool:
        """Scale ``u`` (n,) in place to an accepted step; False if none was found within
        the trials (``u`` is then left at the last trial)."""
        xp, trial = objective.xp, self._trial
        slope0 = -float(grad @ u)            # phi'(0) < 0 for a descent direction
        trials, last = [0], [None]

        def phi(t):
            trials[0] += 1
            last[0] = t
            xp.multiply(u, t, out=trial)
            xp.subtract(theta, trial, out=trial)
            value, g_trial = objective.value_and_gradient(trial)
            return value, -float(g_trial @ u)

        def armijo(t, value):
            return value <= loss + self.c1 * t * slope0

        def curvature(d):
            return abs(d) <= -self.c2 * slope0

        def zoom(lo, hi):
            (t_lo, f_lo, d_lo), (t_hi, f_hi, d_hi) = lo, hi
            while trials[0] < self.max_trials:
                t = _cubic_min(t_lo, f_lo, d_lo, t_hi, f_hi, d_hi)
                f, d = phi(t)
                if not armijo(t, f) or f >= f_lo:
                    t_hi, f_hi, d_hi = t, f, d
                else:
                    if curvature(d):
                        return t
                    if d * (t_hi - t_lo) >= 0:
                        t_hi, f_hi, d_hi = t_lo, f_lo, d_lo
                    t_lo, f_lo, d_lo = t, f, d
            return t_lo if t_lo > 0 else None    # sufficient decrease, if no more

        prev, t, accepted = (0.0, loss, slope0), 1.0, None
        while trials[0] < self.max_trials:
            f, d = phi(t)
            if not math.isfinite(f) or not armijo(t, f) or (trials[0] > 1 and f >= prev[1]):
                accepted = zoom(prev, (t, f if math.isfinite(f) else math.inf, d))
                break
            if curvature(d):
                accepted = t
                break
            if d >= 0:
                accepted = zoom((t, f, d), prev)
                break
            prev, t = (t, f, d), 2.0 * t
        if accepted is None:
            return False
        if accepted != last[0]:                   # the gradient at the accepted point
            phi(accepted)
        objective.adopt_trial()
        u *= accepted
        return True


def _value(objective, point) -> float:
    """F at ``point``: with its gradient at full batch (which the next step may adopt),
    else a forward pass."""
    if objective.full_batch:
        return objective.value_and_gradient(point)[0]
    return objective.value(point)


def _cubic_min(t1, f1, d1, t2, f2, d2) -> float:
    """The minimiser of the cubic through (t1, f1, d1), (t2, f2, d2), kept inside the middle
    80 % of the interval (else its midpoint): the safeguarded step of the zoom."""
    lo, hi = min(t1, t2), max(t1, t2)
    try:
        a = d1 + d2 - 3 * (f1 - f2) / (t1 - t2)
        b = math.copysign(math.sqrt(a * a - d1 * d2), t2 - t1)
        t = t2 - (t2 - t1) * (d2 + b - a) / (d2 - d1 + 2 * b)
    except (ValueError, ZeroDivisionError, OverflowError):
        t = math.nan
    margin = 0.1 * (hi - lo)
    return t if lo + margin <= t <= hi - margin else 0.5 * (lo + hi)
