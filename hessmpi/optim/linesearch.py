"""Line searches on the global minibatch objective (ALGORITHM.md s.8).

Every trial is one forward pass per rank and one Allreduce of a scalar, so every rank takes
the same decision (a NaN on any rank rejects the trial everywhere).
"""

from __future__ import annotations


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
        xp = objective.xp
        slope = float(grad @ u)
        trial = self._trial
        for _ in range(self.max_trials):
            xp.multiply(velocity, momentum, out=trial)
            trial += u
            xp.subtract(theta, trial, out=trial)
            if objective.value(trial) <= loss - self.c1 * slope:
                return True
            u *= 0.5
            slope *= 0.5
        return False
