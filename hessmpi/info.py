"""``hessmpi info``: the versions and the machine a run would use."""

from __future__ import annotations

import os
import platform


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception as e:  # noqa: BLE001 - report why an optional module is missing
        return f"not available ({type(e).__name__}: {e})"
    return getattr(mod, "__version__", "unknown")


def _gpus() -> str:
    from hessmpi.backend import _cupy_or_reason

    cupy, why = _cupy_or_reason()
    if cupy is None:
        return f"none ({why})"
    props = [cupy.cuda.runtime.getDeviceProperties(i)
             for i in range(cupy.cuda.runtime.getDeviceCount())]
    return "; ".join(f"{i}: {p['name'].decode()} ({p['totalGlobalMem'] / 2**30:.0f} GiB)"
                     for i, p in enumerate(props))


def describe() -> str:
    """Lines: hessmpi, Python, numpy, h5py, mpi4py, the MPI library and whether it is
    CUDA-aware, BLAS, cores, CuPy and the GPUs it sees."""
    import numpy  # noqa: F401 - loads the BLAS that threadpool_info reports
    from mpi4py import MPI
    from threadpoolctl import threadpool_info

    import hessmpi
    from hessmpi.comm import Communicator, cuda_aware_mpi

    blas = "; ".join(f"{p.get('internal_api')} {p.get('version')} "
                     f"({p.get('num_threads')} threads)"
                     for p in threadpool_info() if p.get("user_api") == "blas")
    lines = [
        f"hessmpi   {hessmpi.__version__}",
        f"python    {platform.python_version()} ({platform.machine()})",
        f"numpy     {_version('numpy')}",
        f"h5py      {_version('h5py')}",
        f"mpi4py    {_version('mpi4py')}",
        f"MPI       {Communicator.library_version()} "
        f"(standard {'.'.join(map(str, MPI.Get_version()))}; CUDA-aware: "
        f"{'yes' if cuda_aware_mpi() else 'no'})",
        f"BLAS      {blas or 'not detected'}",
        f"cores     {len(os.sched_getaffinity(0))} available to this process",
        f"cupy      {_version('cupy')}",
        f"GPUs      {_gpus()}",
    ]
    return "\n".join(lines)
