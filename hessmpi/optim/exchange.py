"""How the optimizer's n-vectors are laid out over the ranks and how pairs move between them
(``optim.exchange``, ALGORITHM.md s.4): a strategy that the objective, the pair memory, the
pair sources and the optimizers call at fixed points of a step. Each call does nothing
where its layout has nothing to do, so the step is written once.

Vocabulary: a *whole* vector has all n entries; this rank's *part* of it is entries
[lo, hi). An optimizer keeps its state (momentum, the rows of the pair memory W, ...) as
parts; the parameters theta are always whole on every rank.

``allgather`` (:class:`AllgatherExchange`): the part is the whole vector. The averaged
gradient comes from one Allreduce, the workers' pairs from one in-place Allgather of a ring
slot, and every rank does all the work of a step. Memory and traffic grow with P.

``sharded`` (:class:`ShardedExchange`): rank r owns the contiguous part
[floor(r n / P), floor((r+1) n / P)) of every n-vector of the state, so W takes
(2m+1) n / P floats per rank. The averaged gradient arrives by reduce-scatter into this
rank's part; the Gram rows are sums over the ranks of their parts' products (one Allreduce
of the new rows); each rank forms its part of the step, and one Allgather of the
parameters' parts makes theta whole everywhere. A worker's own pairs are formed whole
(they need its whole gradient) in an outbox and move by Alltoall: part j of every row to
rank j. A line search gathers the step (and the gradient and momentum it reads) whole and
then runs as it does in the allgather layout.
"""

from __future__ import annotations

import math

import numpy as np


class Whole:
    """The layout of one process: every vector whole, no communication (what a
    :class:`~hessmpi.optim.memory.PairMemory` built alone uses). ``n``: entries of a whole
    vector; ``lo``, ``hi``: this rank's part; ``part_size``: hi - lo; ``counts``: the parts'
    sizes in rank order; ``sharded``: whether a part is less than the whole on some rank."""

    name = "whole"
    sharded = False

    def __init__(self, n: int):
        self.n, self.lo, self.hi, self.part_size, self.counts = n, 0, n, n, (n,)

    # ----- layout -----------------------------------------------------------------------
    def part(self, a):
        """This rank's part of ``a`` (..., n) along its last axis: a view (here ``a``)."""
        return a

    def part_buffer(self, whole):
        """An array to receive this rank's part of the reduction of ``whole`` (n,): ``whole``
        itself where the part is the whole, else a new array of the part's size."""
        return whole

    def whole_buffer(self, like):
        """Scratch (n,) like ``like`` for :meth:`whole`, or None where parts are whole."""
        return None

    def whole(self, part, out=None):
        """The whole vector whose part on this rank is ``part`` (n / P,): ``part`` itself
        here; sharded, gathered into ``out`` (from :meth:`whole_buffer`) and returned."""
        return part

    def whole_(self, buf) -> None:
        """``buf`` (n,) holds this rank's part in [lo, hi): fill in the other parts."""

    # ----- reductions over n --------------------------------------------------------------
    def complete_(self, partial) -> None:
        """``partial``: sums over this rank's part of n (e.g. Gram rows); make them sums over
        all of n, in place (sharded: one Allreduce)."""

    def norm(self, part) -> float:
        """||v||, v the whole vector of which ``part`` is this rank's part (xp.linalg.norm
        on a whole vector; sharded: an Allreduce of the parts' squared norms)."""
        return float(_array_module(part).linalg.norm(part))

    def dot(self, a, b):
        """a . b of the whole vectors whose parts are ``a`` and ``b``: a @ b (a scalar of
        the arrays' type) when whole, a float summed over the ranks when sharded."""
        return a @ b

    # ----- the step -----------------------------------------------------------------------
    def move(self, theta, *steps) -> None:
        """theta -= step for each step (parts, in order), and theta is whole on every rank."""
        for step in steps:
            theta -= step

    # ----- checkpoints ----------------------------------------------------------------------
    def gathered(self, part):
        """The whole array (..., n) of the parts (..., n / P) of every rank, for a
        checkpoint: ``part`` itself here; sharded, a host array on rank 0 and None elsewhere
        (a collective)."""
        return part


def _array_module(a):
    import sys

    cupy = sys.modules.get("cupy")
    return cupy if cupy is not None and isinstance(a, cupy.ndarray) else np


class AllgatherExchange(Whole):
    """Every rank holds every n-vector whole and ends a step with every rank's pairs: one
    in-place Allgather of a ring slot of the pair memory, whose rows are laid out by
    contributing rank. Memory and traffic grow with the number of ranks."""

    name = "allgather"

    def __init__(self, comm, n: int):
        super().__init__(n)
        self.comm = comm

    def sum_(self, buf, n: int, out) -> None:
        """Sum ``buf`` (n + e,) over the ranks in place: its first n entries are a vector
        whose part goes to ``out`` (here ``buf[:n]`` itself), the e after them scalars every
        rank gets (one Allreduce of the whole buffer)."""
        self.comm.allreduce_sum_(buf)

    def share(self, memory, t: int) -> None:
        """Give every rank the pairs of ring slot ``t`` of ``memory``: each rank's own rows
        are in its block of the slot (2*P*k, n); one in-place Allgather."""
        self.comm.allgather_(memory.slot(t))

    def combine_to_owners(self, memory, coef, out) -> None:
        """``out`` (k, n) <- the k rows ``coef[k*own:k*(own+1)] @ W[:active]`` that this
        rank owns, for host coefficients ``coef`` (P*k, active) of every rank's rows."""
        xp, k, own = memory.xp, out.shape[0], memory.own
        mine = np.ascontiguousarray(coef[k * own:k * (own + 1)])
        xp.matmul(xp.asarray(mine, dtype=memory.W.dtype), memory.W[:memory.active], out=out)


class ShardedExchange(Whole):
    """Rank r owns entries [floor(r n / P), floor((r+1) n / P)) of every n-vector of the
    optimizer state (parts differ in size by at most one entry when P does not divide n)."""

    name = "sharded"

    def __init__(self, comm, n: int):
        P = comm.size
        bounds = [r * n // P for r in range(P + 1)]
        super().__init__(n)
        self.comm = comm
        self.bounds = bounds
        self.counts = tuple(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
        self.displs = tuple(bounds[:-1])
        self.lo, self.hi = bounds[comm.rank], bounds[comm.rank + 1]
        self.part_size = self.hi - self.lo
        self.sharded = P > 1

    # ----- layout -----------------------------------------------------------------------
    def part(self, a):
        return a[..., self.lo:self.hi] if self.sharded else a

    def part_buffer(self, whole):
        if not self.sharded:
            return whole
        return _array_module(whole).zeros(self.part_size, dtype=whole.dtype)

    def whole_buffer(self, like):
        return _array_module(like).zeros(self.n, dtype=like.dtype) if self.sharded else None

    def whole(self, part, out=None):
        if not self.sharded:
            return part
        out[self.lo:self.hi] = part
        self.whole_(out)
        return out

    def whole_(self, buf) -> None:
        self.comm.allgatherv_(buf, self.counts, self.displs)

    # ----- reductions ---------------------------------------------------------------------
    def sum_(self, buf, n: int, out) -> None:
        """Reduce-scatter of ``buf[:n]`` into ``out`` (this rank's part) and, if ``buf``
        has entries after n, their sum on every rank (in the window's pass, or one
        Allreduce)."""
        if not self.sharded:
            self.comm.allreduce_sum_(buf)
            return
        self.comm.reduce_scatter_(buf[:n], out, self.counts,
                                  tail=buf[n:] if len(buf) > n else None)

    def complete_(self, partial) -> None:
        self.comm.allreduce_sum_(partial)

    def norm(self, part) -> float:
        return math.sqrt(max(self.dot(part, part), 0.0))

    def dot(self, a, b) -> float:
        if not self.sharded:
            return float(a @ b)
        value = np.array([float(a @ b)])
        self.comm.allreduce_sum_(value)
        return float(value[0])

    # ----- the step -----------------------------------------------------------------------
    def move(self, theta, *steps) -> None:
        mine = self.part(theta)
        for step in steps:
            mine -= step
        self.whole_(theta)

    # ----- pairs ----------------------------------------------------------------------------
    def share(self, memory, t: int) -> None:
        """Move every rank's own rows (its outbox, (2k, n), whole) into the ring slot ``t``
        of every rank (2*P*k, n / P), contributor r's block from rank r: one Alltoall,
        part j of every row to rank j (strided blocks, no packing copy). Nothing to move
        with one contributor (its pairs are formed in place, part by part)."""
        rows = memory.outbox
        if rows is None:
            return
        per, n, b = rows.shape[0], self.n, self.part_size
        self.comm.alltoall_blocks_(
            rows, [(lo, per, c, n) for lo, c in zip(self.displs, self.counts, strict=True)],
            memory.slot(t), [(per * r * b, 1, per * b, per * b)
                             for r in range(self.comm.size)])

    def combine_to_owners(self, memory, coef, out) -> None:
        """Every rank forms its part of all P*k rows ``coef @ W[:active]``; one Alltoall
        gives each rank its k rows whole in ``out`` (k, n)."""
        xp, k = memory.xp, out.shape[0]
        parts = xp.matmul(xp.asarray(coef, dtype=memory.W.dtype), memory.W[:memory.active])
        b, n = self.part_size, self.n
        self.comm.alltoall_blocks_(
            parts, [(k * r * b, 1, k * b, k * b) for r in range(self.comm.size)],
            out, [(lo, k, c, n) for lo, c in zip(self.displs, self.counts, strict=True)])

    # ----- checkpoints ----------------------------------------------------------------------
    def gathered(self, part):
        if not self.sharded:
            return part
        from hessmpi.backend import to_host

        host = np.ascontiguousarray(to_host(_array_module(part), part))
        lead = host.shape[:-1]
        rows = int(np.prod(lead, dtype=np.int64))
        flat = self.comm.gatherv_root(host, [rows * c for c in self.counts])
        if flat is None:
            return None
        whole = np.empty((*lead, self.n), dtype=host.dtype)
        for (a, b), start in zip(zip(self.bounds[:-1], self.bounds[1:], strict=True),
                                 np.cumsum([0, *(rows * c for c in self.counts[:-1])]),
                                 strict=True):
            whole[..., a:b] = flat[start:start + rows * (b - a)].reshape(*lead, b - a)
        return whole


EXCHANGES = {AllgatherExchange.name: AllgatherExchange, ShardedExchange.name: ShardedExchange}


def build_exchange(name: str, comm, n: int):
    """The exchange strategy ``name`` over Communicator ``comm`` for n-vectors."""
    return EXCHANGES[name](comm, n)


def exchange_for(opts, objective, n: int):
    """The exchange of the options ``opts`` (``optim.exchange``; allgather for methods
    without the key), made the objective's reduction mode if it was not already; returns
    it."""
    name = getattr(opts, "exchange", AllgatherExchange.name)
    if objective.exchange.name != name:
        objective.use_exchange(build_exchange(name, objective.comm, n))
    return objective.exchange
