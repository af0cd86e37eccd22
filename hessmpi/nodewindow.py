"""The intra-node fast path of the gradient's collective: an MPI-3 shared-memory window.

Every rank of a node computes its gradient straight into its own segment of one window
(``MPI_Win_allocate_shared``), so the reduction reads the other ranks' gradients where they
lie, with no copy in or out and no call into MPI's point-to-point machinery:

- Allreduce: rank l of the node's L ranks sums part l of every segment into its own segment
  (a reduce-scatter in place), then copies the other parts from their owners' segments (an
  allgather); three node barriers. Across N nodes it is two-level: between the two phases
  each local rank Allreduces its part with the ranks of the same local rank on the other
  nodes (MPI, one message of n / L per rank).
- Reduce-scatter (the sharded exchange), on one node: each rank sums its part of every
  segment into its own buffer; two barriers. On several nodes MPI's own.

Each part is summed by exactly one rank and copied by the others, so every rank holds the
same bits. With two ranks the sum is the one MPI forms (a + b is commutative); with more,
the order of the terms is this module's (the first term the part's owner's, then the
others in rank order). Measured on the 2-core machine here (benchmarks/README.md):
the 1.08 MB gradient of the MLP in about half MPICH's Allreduce time.

Used when a :class:`~hessmpi.comm.Communicator` hands out a gradient buffer of at least
:data:`MIN_BYTES` on the host, the node has more than one rank (or several nodes have the
same number), and the window can be allocated; otherwise MPI's collectives, unchanged.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

#: Smallest buffer that goes through the window: below it MPI's small-message algorithms
#: are as fast as three barriers.
MIN_BYTES = 64 << 10


class NodeWindow:
    """``count`` entries of ``dtype`` per rank in one shared-memory window over ``node``
    (the ranks of this node); ``cross``: the ranks of the same local rank on every node
    (None or size 1: one node). ``mine`` (count,): this rank's segment. ``owner``: a weak
    reference to what holds ``mine`` now (the window serves one buffer at a time)."""

    def __init__(self, node, cross, count: int, dtype):
        self.node, self.cross = node, cross if cross is not None and cross.size > 1 else None
        self.count, self.dtype = count, np.dtype(dtype)
        itemsize = self.dtype.itemsize
        self.win = MPI.Win.Allocate_shared(count * itemsize, itemsize, comm=node)
        self.win.Lock_all(MPI.MODE_NOCHECK)
        self.segments = []
        for q in range(node.size):
            buf, _ = self.win.Shared_query(q)
            self.segments.append(np.frombuffer(buf, dtype=self.dtype, count=count))
        self.mine = self.segments[node.rank]
        self.mine[...] = 0
        self.address = self.mine.ctypes.data
        self.owner = lambda: None

    def contains(self, buf) -> bool:
        """Whether ``buf`` is the start of this rank's segment (its first entries)."""
        return (isinstance(buf, np.ndarray) and buf.ctypes.data == self.address
                and buf.size <= self.count and buf.dtype == self.dtype)

    def contains_at(self, buf, offset: int) -> bool:
        """Whether ``buf`` is entries [offset, offset + size) of this rank's segment."""
        return (isinstance(buf, np.ndarray) and buf.dtype == self.dtype
                and buf.ctypes.data == self.address + offset * self.dtype.itemsize
                and offset + buf.size <= self.count)

    def _sync(self) -> None:
        """Every rank's stores to the window visible to every rank, and all ranks here."""
        self.win.Sync()
        self.node.Barrier()

    def _sum_part(self, lo: int, hi: int, out=None) -> None:
        """out <- entries [lo, hi) summed over the node's segments: this rank's term first,
        then the others in rank order; out None: in place, into this rank's segment."""
        segs, me = self.segments, self.node.rank
        if out is None:
            out = segs[me][lo:hi]
        else:
            out[...] = segs[me][lo:hi]
        for q in range(len(segs)):
            if q != me:
                out += segs[q][lo:hi]

    def allreduce_(self, size: int) -> None:
        """Sum the first ``size`` entries of every rank's segment, in place: afterwards every
        rank's segment holds the sum over all ranks of every node."""
        L, me = self.node.size, self.node.rank
        bounds = [q * size // L for q in range(L + 1)]
        lo, hi = bounds[me], bounds[me + 1]
        self._sync()
        self._sum_part(lo, hi)
        if self.cross is not None:
            self.cross.Allreduce(MPI.IN_PLACE, self.mine[lo:hi], op=MPI.SUM)
        self._sync()
        for q in range(L):
            if q != me:
                self.mine[bounds[q]:bounds[q + 1]] = self.segments[q][bounds[q]:bounds[q + 1]]
        self._sync()

    def reduce_scatter_(self, lo: int, hi: int, out, tail: tuple[int, int] = (0, 0)
                        ) -> None:
        """``out`` (hi - lo,) <- entries [lo, hi) summed over the node's segments (one
        node: this rank's part of the reduce-scatter); entries [tail[0], tail[1]) (a few
        scalars) summed whole, in rank order on every rank (the same bits everywhere), into
        this rank's segment."""
        a, b = tail
        self._sync()
        self._sum_part(lo, hi, out)
        scalars = self.segments[0][a:b].copy()
        for seg in self.segments[1:]:
            scalars += seg[a:b]
        self._sync()
        self.mine[a:b] = scalars

    def free(self) -> None:
        self.win.Unlock_all()
        self.win.Free()


def node_communicators(comm, nodes=None):
    """(node, cross) communicators of ``comm``: the ranks sharing this rank's memory
    (``nodes`` if given, e.g. a split that emulates nodes in a test) and the ranks of the
    same local rank on every node; cross is None unless every node has as many ranks."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED) if nodes is None else nodes.Dup()
    sizes = comm.allgather(node.size)
    if len(set(sizes)) != 1:
        return node, None, False
    cross = comm.Split(color=node.rank, key=comm.rank)
    return node, cross, True
