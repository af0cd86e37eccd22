"""The communicator: a ``Dup`` of an mpi4py communicator with the few collectives hessmpi
uses, on preallocated buffers, plus byte and time counters and abort-on-error.

Large data moves with the uppercase buffer calls; small control values (flags, scalars,
strings) with the lowercase pickling calls.
"""

from __future__ import annotations

import sys
import time

from mpi4py import MPI

from hessmpi.errors import UsageError


class Communicator:
    """rank, size: of the wrapped communicator. bytes_sent: payload bytes this rank has handed
    to buffer collectives (0 on one rank). seconds: wall time spent inside them."""

    def __init__(self, comm: MPI.Comm = MPI.COMM_WORLD):
        self.comm = comm.Dup()
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.bytes_sent = 0
        self.seconds = 0.0

    def _count(self, nbytes: int, started: float) -> None:
        if self.size > 1:
            self.bytes_sent += nbytes
        self.seconds += time.perf_counter() - started

    def allreduce_sum_(self, buf) -> None:
        """Sum ``buf`` (a contiguous array) over all ranks, in place."""
        t = time.perf_counter()
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        self._count(buf.nbytes, t)

    def allgather_(self, buf) -> None:
        """In place: ``buf`` (P*b, ...) contiguous, this rank's block is rows
        [rank*b, (rank+1)*b); afterwards every rank holds every rank's block."""
        t = time.perf_counter()
        self.comm.Allgather(MPI.IN_PLACE, buf)
        self._count(buf.nbytes // self.size, t)

    def bcast_(self, buf, root: int = 0) -> None:
        """Overwrite ``buf`` on every rank with root's ``buf``."""
        t = time.perf_counter()
        self.comm.Bcast(buf, root=root)
        self._count(buf.nbytes if self.rank == root else 0, t)

    def collectively(self, fn, *args, **kwargs):
        """Run ``fn`` on every rank; if it raises UsageError on any rank, raise it on every
        rank (with the lowest failing rank's message), so that all ranks exit 2 together."""
        try:
            result, message = fn(*args, **kwargs), None
        except UsageError as e:
            result, message = None, str(e)
        failed = [m for m in self.allgather(message) if m is not None]
        if failed:
            raise UsageError(failed[0])
        return result

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        return bool(self.comm.allreduce(bool(flag), op=MPI.LOR))

    def sum(self, value: float) -> float:
        return self.comm.allreduce(value, op=MPI.SUM)

    def min(self, value):
        return self.comm.allreduce(value, op=MPI.MIN)

    def max(self, value):
        return self.comm.allreduce(value, op=MPI.MAX)

    def bcast(self, obj, root: int = 0):
        """A small Python object from ``root`` to every rank."""
        return self.comm.bcast(obj, root=root)

    def allgather(self, obj) -> list:
        """Every rank's small Python object, in rank order, on every rank."""
        return self.comm.allgather(obj)

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, code: int) -> None:
        """End every rank of the job now (MPI_Abort); never returns."""
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)

    @staticmethod
    def library_version() -> str:
        """The MPI library's own first line, e.g. 'MPICH Version: 5.0.2'."""
        return " ".join(MPI.Get_library_version().splitlines()[0].split())
