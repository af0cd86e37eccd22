"""The array backend: which array module (numpy on CPU, cupy on GPU), which dtype, which GPU
each rank drives, and how many BLAS threads each rank may use.

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
    name: "numpy" or "cupy"; device: "cpu" or "gpu:N (model)"; threads: BLAS threads;
    gpu_bus_id: the PCI bus id of this rank's GPU ("" on CPU)."""

    xp: Any
    dtype: Any
    name: str
    device: str
    threads: int
    gpu_bus_id: str = ""

    def synchronize(self) -> None:
        """Wait until the device has finished queued work (so timings are true); no-op on CPU."""
        synchronize(self.xp)

    def to_host(self, a) -> np.ndarray:
        """A NumPy copy (or view, on CPU) of an array of this backend."""
        return to_host(self.xp, a)


def to_host(xp, a) -> np.ndarray:
    """A NumPy copy (or view, for numpy) of an array of module ``xp``."""
    return np.asarray(a) if xp is np else xp.asnumpy(a)


def synchronize(xp) -> None:
    """Wait for the current stream of array module ``xp`` (no-op for numpy)."""
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


def node_layout(comm) -> tuple[int, int, list[list[int]]]:
    """(local rank, ranks on this node, every local rank's CPU affinity) of this rank's node;
    ``comm`` is an mpi4py communicator."""
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        affinities = node.allgather(sorted(os.sched_getaffinity(0)))
        return node.Get_rank(), node.Get_size(), affinities
    finally:
        node.Free()


def blas_threads(local_rank: int, affinities: list[list[int]]) -> int:
    """BLAS threads for this rank: the cores its node offers the job (the union of the local
    ranks' affinity sets), shared evenly by the local ranks, never more than its own set; a
    launcher that binds each rank to its own cores thus gives each about its own set."""
    union = set().union(*map(set, affinities))
    return max(1, min(len(affinities[local_rank]), len(union) // len(affinities)))


def _cupy_or_reason() -> tuple[Any, str | None]:
    """(cupy, None) when CuPy imports and sees a GPU, else (None, why not)."""
    try:
        import cupy
    except Exception as e:  # noqa: BLE001 - ImportError, or CUDA libraries failing to load
        return None, f"CuPy is not installed or does not load ({type(e).__name__}: {e}); " \
                     "install it with pip install 'hessmpi[gpu]'"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - cudaErrorNoDevice, driver missing, ...
        return None, f"CuPy finds no usable GPU ({type(e).__name__}: {e})"
    if count == 0:
        return None, "CuPy finds no GPU"
    return cupy, None


def make_backend(device: str, dtype: str, threads: int, *, local_rank: int = 0) -> Backend:
    """The backend for ``backend.device`` ("auto" | "cpu" | "gpu") and ``backend.dtype``.

    On GPU, local rank r takes GPU r % (GPUs this process sees): with every GPU of the node
    visible, one each; bound by the launcher (CUDA_VISIBLE_DEVICES per task), its own.
    Whether two ranks share a GPU is judged by the caller from ``gpu_bus_id``.
    ``threads``: BLAS threads (>= 1)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads, user_api="blas")
    if device != "cpu":
        cupy, why = _cupy_or_reason()
        if cupy is None and device == "gpu":
            raise UsageError(f"backend.device = 'gpu' but {why}")
        if cupy is not None:
            index = local_rank % cupy.cuda.runtime.getDeviceCount()
            gpu = cupy.cuda.Device(index)
            gpu.use()
            name = cupy.cuda.runtime.getDeviceProperties(index)["name"].decode()
            return Backend(xp=cupy, dtype=np.dtype(dtype), name="cupy",
                           device=f"gpu:{index} ({name})", threads=threads,
                           gpu_bus_id=gpu.pci_bus_id)
    return Backend(xp=np, dtype=np.dtype(dtype), name="numpy", device="cpu", threads=threads)
