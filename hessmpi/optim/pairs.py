"""Where the secant pairs come from (``optim.pairs``, ALGORITHM.md s.1): the pair sources
of the quasi-Newton methods.

A source writes pairs (s, y) into the ring of a :class:`~hessmpi.optim.memory.PairMemory`
in three moments of a step: ``before_reduce`` (this rank's gradient of the step is still
its own, in ``objective.grad``), ``after_reduce`` (the averaged gradient is known: finish,
exchange and commit the pairs; returns the slot filled, or None) and ``after_step`` (theta
has moved). ``cost()`` is the gradient evaluations per rank a step that forms pairs adds to
the step's own gradient; the objective counts what is really evaluated.
``reads_own_gradient``: ``before_reduce`` reads this rank's gradient before the
reduction (else the step's gradient may come whole from the objective, e.g. adopted from
the last line search); such a source's ``pieces(step, objective)`` names the pieces of the
batch whose gradients it wants apart (``Objective.local_gradient``'s ``pieces``; most
want none). ``contributors``
and ``k``: the ranks that write rows into one slot and the pairs each writes;
``independent_of_ranks``: the pairs are the same on any rank count (a resume on another
keeps them); ``pending``: a measured pair waits in the next slot (kept in checkpoints).

Layouts (``exchange``, :mod:`hessmpi.optim.exchange`): a worker's own pairs (``probe``,
``local``) are formed whole and moved by the exchange; the global pairs every rank forms
alike (``shared_probe``, ``history``, ``overlap``, ``averaged``) are formed part by part in
the memory's layout, from the parts of the averaged gradient and of the momentum, and
gathered whole only where a model evaluation needs the whole vector (a probe point, a
Gauss-Newton product).
"""

from __future__ import annotations

import math

import numpy as np

from hessmpi.data import overlap_rows
from hessmpi.optim.memory import PairMemory, damp_


class ProbePairs:
    """``pairs = "probe"``: each rank moves to theta + s_r and measures the gradient there on
    its SAME batch, y_r = g_r(theta + s_r) - g_r; s_r = -eta_p g_r (``probe = "sgd"``; with
    k > 1 pairs, the gradients of k sub-batches) or a random direction of length
    probe_sigma * max(||theta||, 1). The probe may read only the first ``probe_batch`` of
    the batch (then its base gradient there too). Every ``probe_every`` steps; the slot is
    shared by the exchange (contributors: the ranks)."""

    independent_of_ranks = False
    pending = False
    reads_own_gradient = True

    def __init__(self, opts, *, n: int, comm, seed: int, xp, dtype, exchange):
        self.o, self.seed, self.xp, self.exchange = opts, seed, xp, exchange
        self.rank = comm.rank
        self.contributors, self.k = comm.size, opts.pairs_per_rank
        self.forming = False
        self._work = xp.zeros(n, dtype=dtype)
        self._noise = np.empty(n) if opts.probe == "random" else None
        self._base = xp.zeros(n, dtype=dtype) if opts.probe_batch < 1 else None

    def pieces(self, step: int, objective) -> tuple:
        return ()

    def cost(self) -> float:
        f, k = self.o.probe_batch, self.k
        cost = k * f + (f if f < 1 else 0.0)
        return cost + (1.0 if self.o.probe == "sgd" and k > 1 else 0.0)

    def before_reduce(self, step: int, theta, objective, lr: float,
                      memory: PairMemory) -> None:
        o, xp = self.o, self.xp
        self.forming = step % o.probe_every == 0
        if not self.forming:
            return
        s_rows, y_rows = memory.own_rows(memory.next_slot)
        if o.probe == "sgd":
            eta_p = o.probe_lr or lr
            if self.k == 1:
                xp.multiply(objective.grad, -eta_p, out=s_rows[0])
            else:
                bounds = np.linspace(0, objective.batch_rows, self.k + 1).astype(int)
                for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
                    objective.local_gradient(theta, s_rows[j], rows=slice(a, b))
                    s_rows[j] *= -eta_p
        else:
            scale = o.probe_sigma * max(float(xp.linalg.norm(theta)), 1.0)
            rng = np.random.default_rng([self.seed, self.rank, step])
            xi = self._noise
            for j in range(self.k):
                rng.standard_normal(out=xi)
                xi *= scale / np.linalg.norm(xi)
                s_rows[j][...] = xp.asarray(xi)
        base, rows = objective.grad, None
        if self._base is not None:   # probe on the first rows of the batch only
            rows = slice(0, max(1, math.ceil(round(o.probe_batch * objective.batch_rows, 9))))
            base = self._base
            objective.local_gradient(theta, base, rows=rows)
        for j in range(self.k):
            xp.add(theta, s_rows[j], out=self._work)
            objective.local_gradient(self._work, y_rows[j], rows=rows)
            y_rows[j] -= base

    def after_reduce(self, theta, grad, memory: PairMemory, damping: float, last_step
                     ) -> int | None:
        if not self.forming:
            return None
        if damping:
            damp_(self.xp, *memory.own_rows(memory.next_slot), damping, self._work)
        self.exchange.share(memory, memory.next_slot)
        return memory.commit()

    def after_step(self, theta, objective, memory, last_step) -> None:
        pass


class SharedProbePairs:
    """``pairs = "shared_probe"``: the workers' probe made consistent with the global
    objective: every rank probes the same point theta + s, s = -eta_p g_bar (the averaged
    gradient), on its own part of the batch, and one Allreduce gives
    y = g_B(theta + s) - g_bar on the whole global batch. One pair per ``probe_every``
    steps, the same on any rank count (on one rank it is ``probe``'s pair); cost one
    gradient and one Allreduce of n."""

    independent_of_ranks = True
    pending = False
    reads_own_gradient = False

    def __init__(self, opts, *, n: int, xp, dtype, exchange):
        self.o, self.xp, self.exchange = opts, xp, exchange
        self.contributors, self.k = 1, 1
        self.forming = False
        self._work = xp.zeros(n, dtype=dtype)
        self._s = exchange.whole_buffer(self._work)      # s whole (sharded)
        self._lr = 0.0

    def cost(self) -> float:
        return 1.0

    def before_reduce(self, step: int, theta, objective, lr: float,
                      memory: PairMemory) -> None:
        self.forming = step % self.o.probe_every == 0
        self._objective, self._lr = objective, lr

    def after_reduce(self, theta, grad, memory: PairMemory, damping: float, last_step
                     ) -> int | None:
        if not self.forming:
            return None
        s_rows, y_rows = memory.own_rows(memory.next_slot)
        self.xp.multiply(grad, -(self.o.probe_lr or self._lr), out=s_rows[0])
        self.xp.add(theta, self.exchange.whole(s_rows[0], self._s), out=self._work)
        self._objective.mean_gradient_at(self._work, y_rows[0])
        y_rows[0] -= grad
        if damping:
            damp_(self.xp, s_rows, y_rows, damping, self._work[:s_rows.shape[-1]])
        return memory.commit()

    def after_step(self, theta, objective, memory, last_step) -> None:
        pass


class DriftPairs:
    """``pairs = "local"``: each rank takes local_steps - 1 SGD steps from theta on its own
    next minibatches; at the synchronisation theta becomes the average of the drifted points
    theta_r, the averaged gradient is that of the g_r(theta_r), and the pairs are
    s_r = theta_r - theta_avg, y_r = g_r(theta_r) - g_avg. Every step; no extra gradient
    beyond the drift's own, but y carries minibatch noise. y_r = g_r(theta_r) moves as it
    is, and every rank subtracts (its part of) g_avg from every y row it receives."""

    independent_of_ranks = False
    pending = False
    reads_own_gradient = True

    def __init__(self, opts, *, n: int, comm, xp, dtype, exchange):
        self.o, self.comm, self.xp, self.exchange = opts, comm, xp, exchange
        self.contributors, self.k = comm.size, 1
        self.forming = True
        self._work = xp.zeros(n, dtype=dtype)

    def pieces(self, step: int, objective) -> tuple:
        return ()

    def cost(self) -> float:
        return self.o.local_steps - 1.0

    def before_reduce(self, step: int, theta, objective, lr: float,
                      memory: PairMemory) -> None:
        s_rows, y_rows = memory.own_rows(memory.next_slot)
        point, grad = s_rows[0], objective.grad
        point[...] = theta
        for _ in range(self.o.local_steps - 1):
            self.xp.multiply(grad, lr, out=self._work)
            point -= self._work
            objective.next_batch()
            objective.local_gradient(point)
        y_rows[0] = grad

    def after_reduce(self, theta, grad, memory: PairMemory, damping: float, last_step
                     ) -> int:
        s_rows, y_rows = memory.own_rows(memory.next_slot)
        average = self._work
        self.xp.copyto(average, s_rows[0])
        self.comm.allreduce_sum_(average)
        average /= self.comm.size
        s_rows[0] -= average
        theta[...] = average
        self.exchange.share(memory, memory.next_slot)
        pairs = memory.slot_pairs(memory.next_slot)
        for _, y in pairs:
            y -= grad
        if damping:
            work = self._work[:grad.shape[-1]]
            for s, y in pairs:
                damp_(self.xp, [s], [y], damping, work)
        return memory.commit()

    def after_step(self, theta, objective, memory, last_step) -> None:
        pass


class HistoryPairs:
    """``pairs = "history"``: one global pair per slot (contributors 1), the step taken,
    s = theta_{t+1} - theta_t, and the change of the averaged gradient on the same global
    batch, y = g_B(theta_{t+1}) - g_B(theta_t) (the pairs of multi-batch L-BFGS, Berahas
    et al. 2016); independent of the rank count. At full batch y is the difference of
    consecutive steps' averaged gradients and costs nothing; otherwise one extra gradient on
    the step's batch at the new point and one Allreduce of n, measured after the step
    (``pending``) and committed at the next one. Pairs of every ``probe_every``-th step."""

    independent_of_ranks = True
    reads_own_gradient = False

    def __init__(self, opts, *, n: int, full_batch: bool, xp, dtype, exchange):
        self.o, self.full_batch, self.xp = opts, full_batch, xp
        self.contributors, self.k = 1, 1
        self.forming = False
        self.pending = False     # the next slot holds a measured pair not yet committed
        self._steps = 0
        self._work = xp.zeros(exchange.part_size, dtype=dtype) if opts.damping else None

    def cost(self) -> float:
        return 0.0 if self.full_batch else 1.0

    def before_reduce(self, step: int, theta, objective, lr: float,
                      memory: PairMemory) -> None:
        self._steps = step
        self.forming = step % self.o.probe_every == 0

    def after_reduce(self, theta, grad, memory: PairMemory, damping: float, last_step
                     ) -> int | None:
        """Commit the pair of the last step before W[0] becomes ``grad``: at full batch
        formed here, y = grad - (the last step's averaged gradient, still in W[0]),
        s = ``last_step``; below it, the pair measured at the end of the last step."""
        step = self._steps
        s_rows, y_rows = memory.own_rows(memory.next_slot)
        if self.full_batch:
            if step == 0 or (step - 1) % self.o.probe_every:
                return None
            self.xp.negative(last_step, out=s_rows[0])
            self.xp.subtract(grad, memory.W[0], out=y_rows[0])
        elif not self.pending:
            return None
        if damping:
            damp_(self.xp, s_rows, y_rows, damping, self._work)
        self.pending = False
        return memory.commit()

    def after_step(self, theta, objective, memory: PairMemory, last_step) -> None:
        """Below full batch, on a pair step: measure the pair of the step just taken."""
        if self.full_batch or not self.forming:
            return
        s_rows, y_rows = memory.own_rows(memory.next_slot)
        objective.mean_gradient_at(theta, y_rows[0])
        y_rows[0] -= objective.grad_part
        self.xp.negative(last_step, out=s_rows[0])
        self.pending = True


class OverlapPairs:
    """``pairs = "overlap"`` (multi-batch L-BFGS, Berahas, Nocedal & Takac 2016): the
    sampler makes consecutive batches share O rows per rank (``overlap`` of the batch: the
    last O rows of a batch are the first O of the next), and the pair of a step is
    s = theta_{t+1} - theta_t and y = g_O(theta_{t+1}) - g_O(theta_t), the change of the
    averaged gradient on the union of the ranks' shared rows: both terms on the same rows,
    so y carries no sampling noise. The step's gradient is evaluated in pieces (the shared
    rows at both ends apart: :meth:`Objective.local_gradient`), so a pair costs no
    gradient evaluation, only two Allreduces of n: the tail's gradient averaged at theta_t
    (kept until the next step, and in checkpoints: ``pending``) and the head's at
    theta_{t+1}. One global pair per ``probe_every`` steps, formed at the next step; its
    rows depend on how the data are split, so a resume on another rank count starts with
    an empty memory."""

    independent_of_ranks = False
    reads_own_gradient = True

    def __init__(self, opts, *, n: int, xp, dtype, exchange):
        self.o, self.xp, self.exchange = opts, xp, exchange
        self.contributors, self.k = 1, 1
        self.pending = False     # the tail's averaged gradient at the last point is held
        self._want_head = self._want_tail = False
        self._head = xp.zeros(n, dtype=dtype)   # this rank's gradient on the shared rows
        self._tail = xp.zeros(n, dtype=dtype)
        self._tail_mean = xp.zeros(exchange.part_size, dtype=dtype)
        self._work = xp.zeros(exchange.part_size, dtype=dtype)
        self._objective = None

    def cost(self) -> float:
        return 0.0

    def state(self) -> dict:
        return {"pairs_tail": self.exchange.gathered(self._tail_mean)}

    def load_state(self, state: dict) -> None:
        self._tail_mean[...] = self.xp.asarray(self.exchange.part(state["pairs_tail"]))

    def pieces(self, step: int, objective) -> list:
        """The head (the rows shared with the last batch) if a pair is due, the tail (the
        rows shared with the next) if this step's pair is formed."""
        self._objective = objective
        rows = objective.batch_rows
        shared = overlap_rows(self.o.overlap, rows)
        self._want_head = self.pending
        self._want_tail = step % self.o.probe_every == 0
        return ([(slice(0, shared), self._head)] if self._want_head else []) + (
            [(slice(rows - shared, rows), self._tail)] if self._want_tail else [])

    def before_reduce(self, step: int, theta, objective, lr: float,
                      memory: PairMemory) -> None:
        pass

    def after_reduce(self, theta, grad, memory: PairMemory, damping: float, last_step
                     ) -> int | None:
        """The last step's pair from the head's averaged gradient and the tail's kept one;
        then the tail's averaged gradient of this step kept for the next pair."""
        slot = None
        if self._want_head:
            s_rows, y_rows = memory.own_rows(memory.next_slot)
            self._objective.average_(self._head, y_rows[0])
            y_rows[0] -= self._tail_mean
            self.xp.negative(last_step, out=s_rows[0])
            if damping:
                damp_(self.xp, s_rows, y_rows, damping, self._work)
            slot = memory.commit()
        if self._want_tail:
            self._objective.average_(self._tail, self._tail_mean)
        self.pending = self._want_tail
        return slot

    def after_step(self, theta, objective, memory, last_step) -> None:
        pass


class AveragedPairs:
    """``pairs = "averaged"`` (SQN, Byrd, Hansen, Nocedal & Singer 2016): every
    ``probe_every`` L steps the average of the last L iterates, theta_bar; the pair is
    s = theta_bar_t - theta_bar_{t-1} and y = G(theta_bar_t) s, a Gauss-Newton product on
    the first ``probe_batch`` of the step's global batch (one R-operator pass per rank, one
    Allreduce of n). Averaging removes the iterates' noise from s; y carries no gradient
    noise. One global pair per L steps, the same on any rank count; measured after the
    step (``pending``), committed at the next. Cost: probe_batch / L curvature products per
    step (the objective counts them as curvature_evals)."""

    independent_of_ranks = True
    reads_own_gradient = False

    def __init__(self, opts, *, n: int, xp, dtype, exchange):
        self.o, self.xp, self.exchange = opts, xp, exchange
        self.contributors, self.k = 1, 1
        self.forming, self.pending = False, False
        part = exchange.part_size
        self._sum = xp.zeros(part, dtype=dtype)   # sum of the iterates of this period
        self._last = xp.zeros(part, dtype=dtype)  # theta_bar of the last period
        self._count, self._periods = 0, 0
        self._work = xp.zeros(part, dtype=dtype)
        self._point = exchange.whole_buffer(self._work)   # theta_bar and s whole (sharded)
        self._dir = exchange.whole_buffer(self._work)

    def cost(self) -> float:
        return 0.0

    def state(self) -> dict:
        x = self.exchange
        return {"pairs_sum": x.gathered(self._sum), "pairs_last": x.gathered(self._last),
                "pairs_count": np.array([self._count, self._periods])}

    def load_state(self, state: dict) -> None:
        self._sum[...] = self.xp.asarray(self.exchange.part(state["pairs_sum"]))
        self._last[...] = self.xp.asarray(self.exchange.part(state["pairs_last"]))
        self._count, self._periods = (int(v) for v in state["pairs_count"])

    def before_reduce(self, step: int, theta, objective, lr: float,
                      memory: PairMemory) -> None:
        pass

    def after_reduce(self, theta, grad, memory: PairMemory, damping: float, last_step
                     ) -> int | None:
        if not self.pending:
            return None
        if damping:
            damp_(self.xp, *memory.own_rows(memory.next_slot), damping, self._work)
        self.pending = False
        return memory.commit()

    def after_step(self, theta, objective, memory: PairMemory, last_step) -> None:
        x = self.exchange
        self._sum += x.part(theta)
        self._count += 1
        if self._count < self.o.probe_every:
            return
        average = self._work
        self.xp.multiply(self._sum, 1.0 / self._count, out=average)
        self._sum[...] = 0
        self._count = 0
        self._periods += 1
        if self._periods > 1:
            s_rows, y_rows = memory.own_rows(memory.next_slot)
            self.xp.subtract(average, self._last, out=s_rows[0])
            rows = slice(0, max(1, math.ceil(round(self.o.probe_batch * objective.batch_rows,
                                                      9))))
            objective.curvature_product(x.whole(average, self._point),
                                        x.whole(s_rows[0], self._dir), y_rows[0], rows=rows)
            self.pending = True
        self._last[...] = average


def build_pair_source(opts, *, n: int, comm, seed: int, full_batch: bool, xp, dtype,
                      exchange):
    """The pair source of ``opts.pairs``."""
    if opts.pairs == "probe":
        return ProbePairs(opts, n=n, comm=comm, seed=seed, xp=xp, dtype=dtype,
                          exchange=exchange)
    if opts.pairs == "shared_probe":
        return SharedProbePairs(opts, n=n, xp=xp, dtype=dtype, exchange=exchange)
    if opts.pairs == "overlap":
        return OverlapPairs(opts, n=n, xp=xp, dtype=dtype, exchange=exchange)
    if opts.pairs == "averaged":
        return AveragedPairs(opts, n=n, xp=xp, dtype=dtype, exchange=exchange)
    if opts.pairs == "local":
        return DriftPairs(opts, n=n, comm=comm, xp=xp, dtype=dtype, exchange=exchange)
    return HistoryPairs(opts, n=n, full_batch=full_batch, xp=xp, dtype=dtype,
                        exchange=exchange)
