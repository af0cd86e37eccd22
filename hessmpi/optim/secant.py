"""The secant optimizer (ALGORITHM.md s.1-2, 8): a pair source fills the pair memory, the
pure step rule of :mod:`quasi_newton` turns its Gram matrix into a direction, an optional
line search chooses the step length, and momentum carries the step.

One step: this rank's gradient; the source's pairs before the reduction (probes and drifts
need this rank's own gradient); the averaged gradient (one Allreduce); the pairs finished,
exchanged and committed; the Gram rows of g and of the new slot; the direction from the
(2m+1)^2 Gram matrix on the host; d combined over n (one matrix-vector product), clipped,
line-searched; v <- beta v + u, theta -= v; then, for history pairs below full batch, the
pair of the step just taken. On failure (no pairs, no curvature, not finite, not a descent
direction, a failed solve or line search) the step is the SGD step u = eta g, counted by
reason; with a line search that step is searched too (momentum dropped, from the length of
the last step taken), and if no trial decreases F no step is taken ("no_decrease"), so at
full batch F never rises.

The step is written once for both layouts of ``optim.exchange``: the momentum, W and the
step u are this rank's parts (all of n with ``allgather``); the exchange completes the Gram
rows, gathers what a line search reads whole, and moves theta (theta -= v on the parts, then
one Allgather of the parameters with ``sharded``).
"""

from __future__ import annotations

import numpy as np

from hessmpi.optim.base import StepInfo
from hessmpi.optim.exchange import exchange_for
from hessmpi.optim.linesearch import Armijo, StrongWolfe
from hessmpi.optim.memory import PairMemory
from hessmpi.optim.pairs import build_pair_source
from hessmpi.optim.quasi_newton import FALLBACK_REASONS, direction


def fallback_counts() -> dict[str, int]:
    """Zero counts of the SGD fallbacks by reason, of clipped steps, and of steps not taken
    because no trial of the searched fallback decreased F."""
    return dict.fromkeys((*FALLBACK_REASONS, "clipped", "no_decrease"), 0)


def load_common(opt, state: dict) -> list[int]:
    """Restore what every quasi-Newton method keeps alike: the velocity, the step count and
    the counts (counters added since an older checkpoint start at 0); returns the ring
    (filled, next slot, steps, pending)."""
    opt.velocity[...] = opt.xp.asarray(opt.exchange.part(state["velocity"]))
    ring = [int(v) for v in state["ring"]]
    opt.steps = ring[2]
    saved = [int(c) for c in state["counts"]]
    opt.counts = dict(zip(opt.counts, saved + [0] * (len(opt.counts) - len(saved)),
                          strict=True))
    return ring


def build_line_search(opts, like):
    """The line search of ``opts.line_search``, or None."""
    if opts.line_search == "armijo":
        return Armijo(c1=opts.ls_c1, max_trials=opts.ls_max_trials, like=like)
    if opts.line_search == "wolfe":
        return StrongWolfe(c1=opts.ls_c1, c2=opts.ls_c2, max_trials=opts.ls_max_trials,
                           like=like)
    return None


def build_pair_parts(theta, objective, opts, *, seed: int):
    """The exchange, the pair source and the :class:`PairMemory` (W, gram, ring) that
    ``opts`` name, for ``theta`` (n,) on ``objective``'s communicator."""
    n, comm = theta.shape[0], objective.comm
    exchange = exchange_for(opts, objective, n)
    source = build_pair_source(opts, n=n, comm=comm, seed=seed,
                               full_batch=objective.full_batch, xp=objective.xp,
                               dtype=theta.dtype, exchange=exchange)
    own = comm.rank if source.contributors > 1 else 0
    memory = PairMemory(n, contributors=source.contributors, k=source.k, slots=opts.memory,
                        own=own, xp=objective.xp, dtype=theta.dtype, exchange=exchange)
    return exchange, source, memory


class Secant:
    """``opts``: the typed ``[optim]`` options of ``optim.name = "secant"``; ``objective``:
    the distributed objective (its model, communicator and batches); ``seed`` seeds random
    probes."""

    def __init__(self, theta, objective, opts, *, seed: int):
        self.o, self.xp = opts, objective.xp
        self.exchange, self.source, self.memory = build_pair_parts(theta, objective, opts,
                                                                   seed=seed)
        x = self.exchange
        self.line_search = build_line_search(opts, theta)
        self.velocity = x.part(theta) * 0
        self._u = theta * 0            # the step of this iteration, before momentum (whole)
        self._u_part = x.part(self._u)  # this rank's part of it (a view)
        # the momentum whole for a line search (sharded; None where it is whole)
        self._v_whole = x.whole_buffer(theta) if self.line_search is not None else None
        self.steps = 0
        self.counts = fallback_counts()

    # ----- state -----------------------------------------------------------------------
    def state(self) -> dict:
        memory = self.memory
        ring = [memory.filled, memory.next_slot, self.steps, self.source.pending]
        return {"velocity": self.exchange.gathered(self.velocity), **memory.state(),
                "ring": np.array(ring),
                "counts": np.array(list(self.counts.values())),
                **(self.source.state() if hasattr(self.source, "state") else {})}

    def load_state(self, state: dict, same_layout: bool) -> None:
        """With another rank count (``same_layout`` false) the workers' pairs do not fit the
        ring and the memory starts empty; history pairs do not depend on the rank count and
        are kept."""
        ring = load_common(self, state)
        if same_layout or self.source.independent_of_ranks:
            self.memory.load_state(state, filled=ring[0], next_slot=ring[1])
            self.source.pending = bool(ring[3]) if len(ring) > 3 else False
            if hasattr(self.source, "load_state"):
                self.source.load_state(state)

    def counters(self) -> dict[str, int]:
        return dict(self.counts)

    @property
    def last_step_norm(self) -> float:
        """||theta_new - theta_old|| of the last step (= ||velocity||; sharded: a
        collective)."""
        return self.exchange.norm(self.velocity)

    def _search(self, objective, theta, loss: float) -> bool:
        """The line search on whole vectors: the step u, the averaged gradient and the
        momentum gathered where only parts are held (with allgather they are whole)."""
        x = self.exchange
        x.whole_(self._u)
        return self.line_search.search(objective, theta, objective.whole_gradient(), self._u,
                                       loss, x.whole(self.velocity, self._v_whole),
                                       self.o.momentum)

    def _fallback(self, theta, objective, grad, loss: float, lr: float) -> None:
        """u <- the SGD step eta g (``grad``: this rank's part of g); with a line search,
        searched on whole vectors: momentum dropped, the first trial no longer than the
        last step taken, and no step (u = 0) if none decreases F."""
        if self.line_search is None:
            self.xp.multiply(grad, lr, out=self._u_part)
            return
        grad, u = objective.whole_gradient(), self._u
        g_norm, last = float(self.xp.linalg.norm(grad)), self.last_step_norm
        t = min(lr, last / g_norm) if last > 0 and g_norm > 0 else lr
        self.xp.multiply(grad, t, out=u)
        self.velocity[...] = 0
        if not self.line_search.descend(objective, theta, grad, u, loss):
            u[...] = 0
            self.counts["no_decrease"] += 1

    # ----- the step ------------------------------------------------------------------------
    def step(self, theta, objective, lr: float) -> StepInfo:
        o, memory, source = self.o, self.memory, self.source
        if source.reads_own_gradient:
            loss = objective.local_gradient(theta, pieces=source.pieces(self.steps, objective))
            source.before_reduce(self.steps, theta, objective, lr, memory)
            loss = objective.reduce_gradient(loss)
        else:
            source.before_reduce(self.steps, theta, objective, lr, memory)
            loss = objective.gradient(theta)
        grad = objective.grad_part
        slot = source.after_reduce(theta, grad, memory, o.damping, self.velocity)
        memory.set_gradient(grad)
        memory.update_gram(slot)
        s_idx, y_idx = memory.pair_indices(chronological=o.curvature == "lbfgs")
        gram = memory.gram_host()
        d = direction(gram, s_idx, y_idx, 0, eta=lr, curvature=o.curvature,
                      curvature_tol=o.curvature_tol, h0=o.h0, lsq_mu=o.lsq_mu,
                      max_step_ratio=o.max_step_ratio, xp=np, powell=o.powell)
        reason, u, x = d.reason, self._u_part, self.exchange
        if reason is None:
            coef = np.zeros(memory.active)
            coef[0] = d.coef_g
            coef[s_idx] = d.coef_s
            coef[y_idx] = d.coef_y
            coef *= o.newton_lr
            memory.combine(coef, out=u)
            # ||d|| from the Gram misses what under- or overflowed in it (s.s = 0 for a tiny
            # s): hold the clip on the vector itself (u is identical on every rank).
            limit = o.newton_lr * o.max_step_ratio * lr * float(gram[0, 0]) ** 0.5
            u_norm = x.norm(u)
            clipped = d.clipped
            if u_norm > limit:
                u *= limit / u_norm
                clipped = True
            self.counts["clipped"] += clipped
            if self.line_search is not None and not self._search(objective, theta, loss):
                reason = "line_search"
        if reason is not None:
            self.counts[reason] += 1
            self._fallback(theta, objective, grad, loss, lr)
        v = self.velocity
        v *= o.momentum
        v += u
        x.move(theta, v)
        self.steps += 1
        source.after_step(theta, objective, memory, self.velocity)
        return StepInfo(loss, fallback=int(reason is not None), reason=reason,
                        rank_kept=d.kept)
