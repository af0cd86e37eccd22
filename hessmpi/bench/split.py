"""One training step of SGD or of the secant method, run by the optimizer's public parts in
the order its ``step`` runs them, each part timed: what the micro-benchmarks measure.

The clock ``now()`` returns a float (seconds) or an array of clocks (e.g. wall and CPU time,
:func:`hessmpi.bench.timing.now`); ``sync()`` waits for the device (backend.synchronize);
``before(part)`` runs outside the timed spans just before ``part`` (a cache flush).
"""

from __future__ import annotations

import time

import numpy as np

from hessmpi.optim.quasi_newton import direction
from hessmpi.optim.secant import build_pair_parts


def _none(*_args) -> None:
    return None


def sgd_step(theta, objective, sgd, lr: float, *, now=time.perf_counter, sync=_none) -> dict:
    """One :class:`~hessmpi.optim.SGD` step on the objective's next batch; seconds of:
    batch (the gather), grad (this rank's gradient), allreduce (inside the Communicator's
    collectives), average (the rest of the reduction: /= ranks, the loss), update."""
    comm = objective.comm
    t0 = now()
    objective.next_batch()
    t1 = now()
    loss = objective.local_gradient(theta)
    t2 = now()
    before = comm.seconds
    objective.reduce_gradient(loss)
    t3 = now()
    sgd.update(theta, objective.grad_part, lr)
    sync()
    t4 = now()
    allreduce = comm.seconds - before
    return dict(batch=t1 - t0, grad=t2 - t1, allreduce=allreduce,
                average=t3 - t2 - allreduce, update=t4 - t3)


class SplitSecant:
    """The secant method with probe pairs and no line search (``opts``: the typed options
    of ``optim.name = "secant"``), stepped by its parts: the same pair source, pair memory,
    step rule, clip and momentum as :class:`~hessmpi.optim.Secant`, in the same order, so
    its steps equal Secant's, in the layout of ``opts.exchange``. ``memory``: the
    :class:`PairMemory` (W, gram, ring)."""

    def __init__(self, theta, objective, opts, *, seed: int = 0):
        if opts.pairs != "probe" or opts.line_search != "none":
            raise ValueError("SplitSecant runs probe pairs without a line search")
        self.o, self.xp = opts, objective.xp
        self.exchange, self.source, self.memory = build_pair_parts(theta, objective, opts,
                                                                   seed=seed)
        x = self.exchange
        self.velocity, self.u = x.part(theta) * 0, x.part(theta) * 0
        self.steps = self.fallbacks = 0

    def step(self, theta, objective, lr: float, *, now=time.perf_counter, sync=_none,
             before=_none) -> dict:
        """One step on the objective's current batch; seconds of: grad (the step's
        gradient), probe (the pair's probe gradient), reduce (the gradient's Allreduce),
        pairs (damping, exchange, commit, g into W, the row indices), gram (the Gram
        update), solve (the (2m+1)^2 Gram matrix to the host and the direction), comb (the
        combination over n, the clip, momentum, theta -= v, and with ``sharded`` the
        Allgather of theta); comm: seconds inside collectives; comm_after_reduce,
        comm_cpu_after_reduce: wall and this thread's CPU seconds inside the collectives
        of the parts after the reduction (pairs to comb); fallback: whether it took the
        SGD step."""
        o, memory, source, xp = self.o, self.memory, self.source, self.xp
        comm_before = objective.comm.seconds
        t0 = now()
        loss = objective.local_gradient(theta)
        t1 = now()
        source.before_reduce(self.steps, theta, objective, lr, memory)
        t2 = now()
        before("reduce")
        t2b = now()
        objective.reduce_gradient(loss)
        grad = objective.grad_part
        t3 = now()
        comm_wall, comm_cpu = objective.comm.seconds, objective.comm.cpu_seconds
        slot = source.after_reduce(theta, grad, memory, o.damping, self.velocity)
        memory.set_gradient(grad)
        s_idx, y_idx = memory.pair_indices()   # the ring's rows do not move in the update
        sync()
        t4 = now()
        before("gram")
        t5 = now()
        memory.update_gram(slot)
        sync()
        t6 = now()
        gram = memory.gram_host()
        d = direction(gram, s_idx, y_idx, 0, eta=lr, curvature=o.curvature,
                      curvature_tol=o.curvature_tol, h0=o.h0, lsq_mu=o.lsq_mu,
                      max_step_ratio=o.max_step_ratio, xp=np)
        t7 = now()
        before("comb")
        t8 = now()
        u = self.u
        if d.reason is None:
            coef = np.zeros(memory.active)
            coef[0], coef[s_idx], coef[y_idx] = d.coef_g, d.coef_s, d.coef_y
            coef *= o.newton_lr
            memory.combine(coef, out=u)
            limit = o.newton_lr * o.max_step_ratio * lr * float(gram[0, 0]) ** 0.5
            u_norm = self.exchange.norm(u)
            if u_norm > limit:
                u *= limit / u_norm
        else:
            xp.multiply(grad, lr, out=u)
            self.fallbacks += 1
        v = self.velocity
        v *= o.momentum
        v += u
        self.exchange.move(theta, v)
        self.steps += 1
        sync()
        t9 = now()
        return dict(grad=t1 - t0, probe=t2 - t1, reduce=t3 - t2b, pairs=t4 - t3, gram=t6 - t5,
                    solve=t7 - t6, comb=t9 - t8, comm=objective.comm.seconds - comm_before,
                    comm_after_reduce=objective.comm.seconds - comm_wall,
                    comm_cpu_after_reduce=objective.comm.cpu_seconds - comm_cpu,
                    fallback=d.reason is not None)
