"""The parameter server's update of asynchronous SGD with delay compensation (Zheng et al.
2017, "Asynchronous Stochastic Gradient Descent with Delay Compensation"), and of plain
asynchronous SGD (lambda = 0).

Worker k fetched w_bak[k] and pushes g, its gradient there; meanwhile other pushes moved the
server's w. The first-order Taylor correction of g to w, with the outer product g g^T as a
cheap approximation of the Hessian whose diagonal alone is kept, gives the paper's update

    w <- w - eta (g + lambda g * g * (w - w_bak[k]))          (* elementwise)

with lambda constant (DC-ASGD-c) or adaptive, elementwise (DC-ASGD-a):
MeanSquare_t = m MeanSquare_t-1 + (1 - m) g * g, lambda_t = lambda_0 / sqrt(MeanSquare_t + eps)
(MeanSquare starts at 0 and is updated with the push's g before lambda_t is formed; one
MeanSquare over every push, as the paper writes it). After the update the worker receives
the new w, which becomes its w_bak[k].

:func:`compensated_step` is the rule as a pure function of arrays; :class:`DelayCompensation`
holds the server's state (the backups, the version each worker fetched, MeanSquare) with
``state()``/``load_state()`` for checkpoints.
"""

from __future__ import annotations

import numpy as np


def compensated_step(xp, theta, grad, backup, lr: float, lam, out) -> None:
    """theta <- theta - lr (grad + lam * grad * grad * (theta - backup)), in place.

    theta, grad, backup, out: (n,) arrays of module ``xp``; ``lam``: a number (0: plain SGD,
    the compensation is not formed) or an (n,) array; ``out`` receives the step taken,
    lr (grad + ...), and must not alias the others. ``grad`` and ``backup`` are not modified.
    """
    if isinstance(lam, (int, float)) and lam == 0:
        np.multiply(grad, lr, out=out)   # as SGD does it (CuPy arrays via __array_ufunc__)
    else:
        xp.subtract(theta, backup, out=out)
        out *= grad
        out *= grad
        out *= lam
        out += grad
        out *= lr
    theta -= out


class DelayCompensation:
    """The server's optimizer for ``workers`` workers (numbered 0..workers-1 here; the
    server's caller maps MPI ranks to them) over parameters like ``theta`` (n,) of array
    module ``xp``.

    lam0: lambda (constant) or lambda_0 (adaptive); 0 gives plain ASGD. adaptive, decay,
    eps: DC-ASGD-a's lambda_t and the decay m of MeanSquare.

    State: ``backups`` (workers, n), w_bak of each worker; ``fetched`` (workers,) int64, the
    server's update count when each worker fetched its backup; ``mean_square`` (n,)
    (adaptive only). ``last_step_norm``: ||w_new - w_old|| of the last update.
    """

    def __init__(self, theta, workers: int, *, xp=np, lam0: float, adaptive: bool = False,
                 decay: float = 0.95, eps: float = 1e-7):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, not {workers}")
        self.xp = xp
        self.lam0, self.adaptive, self.decay, self.eps = lam0, adaptive, decay, eps
        n = theta.shape[0]
        self.backups = self.xp.zeros((workers, n), dtype=theta.dtype)
        self.fetched = np.zeros(workers, dtype=np.int64)
        self.mean_square = self.xp.zeros(n, dtype=theta.dtype) if adaptive and lam0 else None
        self._lam = self.xp.zeros(n, dtype=theta.dtype) if self.mean_square is not None else None
        self._step = self.xp.zeros(n, dtype=theta.dtype)

    @property
    def workers(self) -> int:
        return self.backups.shape[0]

    def fetch(self, worker: int, theta, version: int) -> None:
        """Worker ``worker`` receives ``theta``, the parameters after ``version`` updates."""
        self.backups[worker][...] = theta
        self.fetched[worker] = version

    def staleness(self, worker: int, version: int) -> int:
        """Updates applied between the worker's fetch and a push applied after ``version``
        updates."""
        return int(version - self.fetched[worker])

    def lam(self, grad):
        """lambda for this push's gradient (n,): the number lam0, or lambda_t (n,) after
        MeanSquare took in ``grad`` (adaptive; this updates MeanSquare)."""
        if self.mean_square is None:
            return self.lam0
        ms, lam = self.mean_square, self._lam
        ms *= self.decay
        self.xp.multiply(grad, grad, out=lam)
        lam *= 1.0 - self.decay
        ms += lam
        self.xp.add(ms, self.eps, out=lam)
        self.xp.sqrt(lam, out=lam)
        self.xp.divide(self.lam0, lam, out=lam)
        return lam

    def update(self, theta, grad, worker: int, lr: float) -> None:
        """Apply worker ``worker``'s gradient ``grad`` (n,), computed at its backup, to
        ``theta`` (n,) in place at learning rate ``lr``."""
        compensated_step(self.xp, theta, grad, self.backups[worker], lr, self.lam(grad),
                         self._step)

    @property
    def last_step_norm(self) -> float:
        return float(self.xp.linalg.norm(self._step))

    def state(self) -> dict:
        state = {"backups": self.backups, "fetched": self.fetched}
        if self.mean_square is not None:
            state["mean_square"] = self.mean_square
        return state

    def load_state(self, state: dict, same_layout: bool) -> None:
        """Restore ``state()``; with another number of workers (``same_layout`` false) only
        MeanSquare is kept (the caller gives every worker a fresh fetch)."""
        if self.mean_square is not None:
            self.mean_square[...] = self.xp.asarray(state["mean_square"])
        if same_layout:
            self.backups[...] = self.xp.asarray(state["backups"])
            self.fetched[...] = state["fetched"]

    def counters(self) -> dict[str, int]:
        return {}
