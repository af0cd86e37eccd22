"""The communicator: a ``Dup`` of an mpi4py communicator with the few collectives hessmpi
uses, on preallocated buffers, plus byte and time counters and abort-on-error.

Large data moves with the uppercase buffer calls; small control values (flags, scalars,
strings) with the lowercase pickling calls. Device (GPU) buffers, recognised by their
``__cuda_array_interface__``, go to MPI directly when the library is CUDA-aware
(``device_path = "direct"``), otherwise through preallocated pinned host buffers
(``"staged"``); the CUDA stream is synchronised before every call either way.

The gradient's buffer may live in a shared-memory window of the node's ranks
(:meth:`Communicator.gradient_buffer`, :mod:`hessmpi.nodewindow`): its Allreduce, and its
reduce-scatter on one node, then run through the window instead of MPI's collectives
(``intranode = "window"``; the default ``"mpi"`` leaves every collective to MPI: on the
2-core machine here neither measured ahead in a step, see benchmarks/README.md).
"""

from __future__ import annotations

import ctypes
import gc
import sys
import time
import weakref

import numpy as np
from mpi4py import MPI

from hessmpi.errors import UsageError
from hessmpi.nodewindow import MIN_BYTES, NodeWindow, node_communicators


def cuda_aware_mpi() -> bool:
    """Whether the loaded MPI library can read device memory: ``MPIX_Query_cuda_support()``,
    which MPICH and Open MPI both export; False when the library has no such function."""
    with open("/proc/self/maps") as maps:
        libs = {line.split()[-1] for line in maps if "libmpi" in line.rsplit("/", 1)[-1]}
    for path in sorted(libs):
        try:
            query = getattr(ctypes.CDLL(path), "MPIX_Query_cuda_support", None)
        except OSError:
            continue
        if query is not None:
            return bool(query())
    return False


def _keep():
    """The owner of a window handed out without one: never gone."""
    return True


def _is_device(buf) -> bool:
    return hasattr(buf, "__cuda_array_interface__")


def _synchronize() -> None:
    """Wait for the current CUDA stream, so that MPI reads finished device data."""
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        cupy.cuda.get_current_stream().synchronize()


class Communicator:
    """rank, size: of the wrapped communicator. bytes_sent: payload bytes this rank has handed
    to buffer collectives (0 on one rank). seconds: wall time spent inside them (staging
    copies included); cpu_seconds: this thread's CPU time inside them. device_path:
    "direct" or "staged", for device buffers. intranode: "mpi" (MPI's collectives) or
    "window" (gradient buffers in a shared-memory window where it applies).
    nodes: a communicator of the ranks that share memory with this one (default: MPI's
    shared-memory split; a test may emulate nodes with any split)."""

    def __init__(self, comm: MPI.Comm = MPI.COMM_WORLD, *, device_path: str = "staged",
                 intranode: str = "mpi", nodes: MPI.Comm | None = None):
        if device_path not in ("direct", "staged"):
            raise ValueError(f"device_path must be 'direct' or 'staged', not {device_path!r}")
        if intranode not in ("mpi", "window"):
            raise ValueError(f"intranode must be 'mpi' or 'window', not {intranode!r}")
        self.comm = comm.Dup()
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.device_path = device_path
        self.intranode = intranode
        self.bytes_sent = 0
        self.seconds = 0.0
        self.cpu_seconds = 0.0    # CPU time of this thread inside them (no descheduled time)
        self._pinned: dict[tuple, np.ndarray] = {}
        self._nodes = nodes
        self._layout = None       # (node, cross, equal node sizes), made on first use
        self._windows: dict[tuple, list[NodeWindow]] = {}   # by (count, dtype)
        self._window_failed = False
        self.window_note = ""     # why no window serves the gradient, if none does

    # ----- the intra-node fast path ----------------------------------------------------------
    def gradient_buffer(self, count: int, dtype, xp, owner=None):
        """A zeroed buffer (count,) for a gradient and the scalars reduced with it: this
        rank's segment of a shared-memory window of the node's ranks where the fast path
        applies (``intranode = "window"``, more than one rank, a host array of at least
        nodewindow.MIN_BYTES, the window available), else a plain array of ``xp``. A
        collective: every rank calls it alike. The window is ``owner``'s while ``owner``
        lives (without one, for good); a window whose owner is gone on every rank serves
        the next request of its size, so windows are allocated only for buffers alive at
        once."""
        nbytes = count * np.dtype(dtype).itemsize
        if (self.size == 1 or self.intranode != "window" or xp.__name__ != "numpy"
                or nbytes < MIN_BYTES):
            return xp.zeros(count, dtype=dtype)
        win = self._free_window(count, dtype)
        if win is None:
            return xp.zeros(count, dtype=dtype)
        win.owner = _keep if owner is None else weakref.ref(owner)
        win.mine[...] = 0
        return win.mine

    def _free_window(self, count: int, dtype) -> NodeWindow | None:
        """A window of ``count`` entries of ``dtype`` per rank whose owner is gone on every
        rank, else a new one (made collectively); None where none can be made
        (``window_note`` says why). Every rank takes the same decision."""
        key = (count, np.dtype(dtype).str)
        pool = self._windows.setdefault(key, [])
        if pool:
            gc.collect()        # an owner in a reference cycle is gone only after this
            free = np.array([w.owner() is None for w in pool], dtype=np.int32)
            self.comm.Allreduce(MPI.IN_PLACE, free, op=MPI.MIN)
            for win, ok in zip(pool, free, strict=True):
                if ok:
                    return win
        if self._layout is None:
            self._layout = node_communicators(self.comm, self._nodes)
        node, cross, equal = self._layout
        win, reason = None, ""
        if not equal:
            reason = "nodes with different numbers of ranks"
        elif self._window_failed:
            reason = self.window_note
        else:
            try:
                win = NodeWindow(node, cross, count, dtype)
            except MPI.Exception as e:
                reason = f"MPI_Win_allocate_shared failed: {e.Get_error_string()}"
        if not self.comm.allreduce(win is not None, op=MPI.LAND):
            if win is not None:
                win.free()
            win = None
            reason = reason or "unavailable on another rank"
            self._window_failed = True
        self.window_note = reason
        if win is not None:
            pool.append(win)
        return win

    def _window_of(self, buf) -> NodeWindow | None:
        for pool in self._windows.values():
            for win in pool:
                if win.contains(buf):
                    return win
        return None

    def gradient_path(self, buf, sharded: bool = False) -> str:
        """How the gradient in ``buf`` is reduced, in words (for the results file)."""
        op = "Reduce_scatter" if sharded else "Allreduce"
        win = self._window_of(buf) if self.size > 1 else None
        if self.size == 1:
            return "none (one rank)"
        if win is None:
            note = f"; no shared-memory window: {self.window_note}" if self.window_note else ""
            return f"MPI_{op}{note}"
        if sharded and (win.cross is not None or win.node.size != self.size):
            return "MPI_Reduce_scatter (shared-memory window only on one node)"
        nodes = self.size // win.node.size
        return (f"shared-memory window ({win.node.size} ranks per node)" +
                (f", MPI_Allreduce of 1/{win.node.size} between {nodes} nodes" if nodes > 1
                 else ""))

    def _host_buffer(self, buf, role: str = "") -> np.ndarray:
        """A pinned host array shaped like device array ``buf``, allocated once per shape
        (and ``role``: the send and receive buffers of one call are apart)."""
        key = (buf.shape, buf.dtype.str, role)
        if key not in self._pinned:
            import cupy

            mem = cupy.cuda.alloc_pinned_memory(buf.nbytes)
            self._pinned[key] = np.frombuffer(mem, buf.dtype, buf.size).reshape(buf.shape)
        return self._pinned[key]

    def _on_buffer(self, op, buf) -> None:
        """Apply MPI operation ``op(buffer)`` to ``buf`` in place, on the host or device.
        On one rank every collective used here is the identity and is skipped."""
        if self.size == 1:
            return
        if not _is_device(buf):
            op(buf)
            return
        _synchronize()
        if self.device_path == "direct":
            op(buf)
            return
        host = self._host_buffer(buf)
        buf.get(out=host)
        op(host)
        buf.set(host)

    def _on_buffers(self, op, send, recv) -> None:
        """Apply MPI operation ``op(send, recv)`` to two buffers (device buffers staged
        through pinned host copies unless the path is direct); on more than one rank."""
        if not (_is_device(send) or _is_device(recv)):
            op(send, recv)
            return
        _synchronize()
        if self.device_path == "direct":
            op(send, recv)
            return
        host_send, host_recv = self._host_buffer(send, "send"), self._host_buffer(recv, "recv")
        send.get(out=host_send)
        op(host_send, host_recv)
        recv.set(host_recv)

    @staticmethod
    def _clock() -> tuple[float, float]:
        return time.perf_counter(), time.thread_time()

    def _count(self, nbytes: int, started: tuple[float, float]) -> None:
        if self.size > 1:
            self.bytes_sent += nbytes
        self.seconds += time.perf_counter() - started[0]
        self.cpu_seconds += time.thread_time() - started[1]

    def allreduce_sum_(self, buf) -> None:
        """Sum ``buf`` (a contiguous array) over all ranks, in place (through the node's
        shared-memory window if ``buf`` is a gradient buffer there)."""
        t = self._clock()
        win = self._window_of(buf) if self._windows and self.size > 1 else None
        if win is not None:
            win.allreduce_(buf.size)
        else:
            self._on_buffer(lambda b: self.comm.Allreduce(MPI.IN_PLACE, b, op=MPI.SUM), buf)
        self._count(buf.nbytes, t)

    def allgather_(self, buf) -> None:
        """In place: ``buf`` (P*b, ...) contiguous, this rank's block is rows
        [rank*b, (rank+1)*b); afterwards every rank holds every rank's block."""
        t = self._clock()
        self._on_buffer(lambda b: self.comm.Allgather(MPI.IN_PLACE, b), buf)
        self._count(buf.nbytes // self.size, t)

    def reduce_scatter_(self, send, recv, counts, tail=None) -> None:
        """Sum ``send`` (n,) over the ranks; this rank receives its block of the sum into
        ``recv`` (counts[rank],): the blocks are consecutive, in rank order, of counts[r]
        entries each (MPI_Reduce_scatter). ``tail``: a few entries right after ``send`` in
        its buffer (scalars such as a loss), summed whole on every rank in place: in the
        same pass through the shared-memory window, else by one Allreduce."""
        t = self._clock()
        win = self._window_of(send) if self._windows and self.size > 1 else None
        n = send.shape[0]
        if self.size == 1:
            if recv is not send:
                recv[...] = send
        elif (win is not None and win.cross is None and win.node.size == self.size
              and (tail is None or win.contains_at(tail, n))):
            lo = sum(counts[:self.rank])
            span = (n, n + (0 if tail is None else tail.size))
            win.reduce_scatter_(lo, lo + counts[self.rank], recv, tail=span)
            tail = None
        else:
            self._on_buffers(lambda s, r: self.comm.Reduce_scatter(s, r, list(counts),
                                                                   op=MPI.SUM), send, recv)
        self._count(send.nbytes, t)
        if tail is not None and tail.size:
            self.allreduce_sum_(tail)

    def allgatherv_(self, buf, counts, displs) -> None:
        """In place: ``buf`` (n,) contiguous; this rank's block is the counts[rank] entries
        from displs[rank]; afterwards every rank holds every rank's block."""
        t = self._clock()
        self._on_buffer(lambda b: self.comm.Allgatherv(
            MPI.IN_PLACE, [b, (list(counts), list(displs))]), buf)
        self._count(counts[self.rank] * buf.dtype.itemsize, t)

    def alltoallv_(self, send, send_counts, send_displs, recv, recv_counts, recv_displs
                   ) -> None:
        """Every rank sends ``send``'s send_counts[j] entries from send_displs[j] to rank j
        and receives rank j's into ``recv`` at recv_displs[j] (recv_counts[j] entries); both
        one-dimensional and contiguous (MPI_Alltoallv)."""
        t = self._clock()
        if self.size == 1:
            a, b = send_displs[0], recv_displs[0]
            recv[b:b + recv_counts[0]] = send[a:a + send_counts[0]]
        else:
            self._on_buffers(lambda s, r: self.comm.Alltoallv(
                [s, (list(send_counts), list(send_displs))],
                [r, (list(recv_counts), list(recv_displs))]), send, recv)
        mine = send_counts[self.rank] if self.size > 1 else send_counts[0]
        self._count((sum(send_counts) - mine) * send.dtype.itemsize, t)

    def alltoall_blocks_(self, send, send_blocks, recv, recv_blocks) -> None:
        """One Alltoall of strided blocks (MPI_Alltoallw with vector datatypes, no packing
        copy): to rank j goes the block send_blocks[j] of ``send``, from rank j comes the
        block recv_blocks[j] of ``recv``; a block is (offset, rows, cols, stride) in
        entries: ``rows`` runs of ``cols`` entries, ``stride`` apart, from ``offset``. Both
        buffers contiguous, of one floating type."""
        t = self._clock()
        if self.size == 1:
            (a, rows, cols, s1), (b, _, _, s2) = send_blocks[0], recv_blocks[0]
            src = send.reshape(-1)[a:a + (rows - 1) * s1 + cols] if rows else send[:0]
            dst = recv.reshape(-1)[b:b + (rows - 1) * s2 + cols] if rows else recv[:0]
            for i in range(rows):
                dst[i * s2:i * s2 + cols] = src[i * s1:i * s1 + cols]
        else:
            from mpi4py.util.dtlib import from_numpy_dtype

            base = from_numpy_dtype(np.dtype(send.dtype))
            size = np.dtype(send.dtype).itemsize

            def spec(blocks):
                types = [base.Create_vector(rows, cols, stride).Commit()
                         for _, rows, cols, stride in blocks]
                return types, [1] * len(blocks), [off * size for off, *_ in blocks]

            (st, sc, sd), (rt, rc, rd) = spec(send_blocks), spec(recv_blocks)
            try:
                self._on_buffers(lambda s, r: self.comm.Alltoallw(
                    [s, (sc, sd), st], [r, (rc, rd), rt]), send, recv)
            finally:
                for dt in (*st, *rt):
                    dt.Free()
        sent = sum(rows * cols for j, (_, rows, cols, _) in enumerate(send_blocks)
                   if j != self.rank)
        self._count(sent * np.dtype(send.dtype).itemsize, t)

    def gatherv_root(self, send: np.ndarray, counts, root: int = 0) -> np.ndarray | None:
        """Host array ``send`` (counts[rank] entries) of every rank, concatenated in rank
        order on ``root`` (a new array); None elsewhere."""
        t = self._clock()
        send = np.ascontiguousarray(send).reshape(-1)
        out = np.empty(sum(counts), dtype=send.dtype) if self.rank == root else None
        if self.size == 1:
            out[...] = send
        else:
            displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
            self.comm.Gatherv(send, [out, (list(counts), displs)] if out is not None
                              else None, root=root)
        self._count(send.nbytes if self.rank != root else 0, t)
        return out

    def bcast_(self, buf, root: int = 0) -> None:
        """Overwrite ``buf`` on every rank with root's ``buf``."""
        t = self._clock()
        self._on_buffer(lambda b: self.comm.Bcast(b, root=root), buf)
        self._count(buf.nbytes if self.rank == root else 0, t)

    # ----- point to point: the asynchronous parameter server (host byte buffers) ---------
    def isend(self, buf: np.ndarray, dest: int, tag: int, count: int | None = None):
        """Start sending the first ``count`` bytes (default all) of the contiguous host
        array ``buf`` to rank ``dest``; returns the request. Counted in ``bytes_sent``."""
        count = buf.nbytes if count is None else count
        self.bytes_sent += count
        return self.comm.Isend([buf, count, MPI.BYTE], dest=dest, tag=tag)

    def irecv(self, buf: np.ndarray, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG):
        """Start receiving at most ``buf.nbytes`` bytes into the contiguous host array
        ``buf`` from ``source`` (default: any); returns the request."""
        return self.comm.Irecv([buf, buf.nbytes, MPI.BYTE], source=source, tag=tag)

    def iprobe(self, source: int, tag: int) -> bool:
        """Whether a message from ``source`` with ``tag`` is waiting to be received."""
        return bool(self.comm.Iprobe(source=source, tag=tag))

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
        return " ".join(MPI.Get_library_version().replace("\0", "").splitlines()[0].split())
