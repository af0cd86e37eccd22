"""The array backend: which array module (numpy now, cupy through the same seam later),
which dtype, and how many BLAS threads each rank may use.

Numerical code receives ``backend.xp`` and ``backend.dtype`` and never branches on the device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from hessmpi.errors import UsageError


@dataclass
class Backend:
    """xp: the array module; dtype: the floating type of parameters and data;
    name: "numpy" or "cupy"; device: "cpu" or "gpu"; threads: BLAS threads of this rank."""

    xp: Any
    dtype: Any
    name: str
    device: str
    threads: int

    def to_host(self, a) -> np.ndarray:
        """A NumPy copy (or view) of an array of this backend."""
        return np.asarray(a)


def node_blas_threads(comm) -> int:
    """BLAS threads for this rank: the cores its node offers this job, shared evenly by the
    ranks on that node (never oversubscribed). ``comm`` is an mpi4py communicator.

    The cores counted are the union of the ranks' CPU affinity sets, so a launcher that binds
    each rank to its own cores gives each rank about its own set.
    """
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        mine = sorted(os.sched_getaffinity(0))
        union = set().union(*node.allgather(mine))
        return max(1, min(len(mine), len(union) // node.size))
    finally:
        node.Free()


def make_backend(device: str, dtype: str, threads: int) -> Backend:
    """The backend for ``backend.device`` / ``backend.dtype``; ``threads`` BLAS threads (>= 1)."""
    if device == "gpu":
        raise UsageError("backend.device = 'gpu': the CuPy backend is not built yet; "
                         "use 'cpu' or 'auto'")
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads, user_api="blas")
    return Backend(xp=np, dtype=np.dtype(dtype), name="numpy", device="cpu", threads=threads)
