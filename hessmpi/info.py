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
        "exchanges allgather (every rank holds the optimizer state whole), sharded (1/P of "
        "every n-vector per rank): optim.exchange",
        f"intranode gradient through an MPI-3 shared-memory window of each node's ranks "
        f"(backend.intranode = window): "
        f"{'available' if MPI.Get_version() >= (3, 0) else 'not available (MPI < 3)'}; "
        "a run's metrics.h5 says what it used (hessmpi info RUN)",
    ]
    return "\n".join(lines)


def describe_run(out) -> str:
    """Lines: how the run in directory ``out`` was laid out over its ranks, from its
    metrics.h5 (UsageError naming the file if there is none or it is damaged)."""
    from pathlib import Path

    from hessmpi import config
    from hessmpi.errors import UsageError
    from hessmpi.metrics import read_metrics

    path = Path(out) / "metrics.h5"
    try:
        attrs, _ = read_metrics(path)
    except FileNotFoundError:
        raise UsageError(f"{out} holds no run (no metrics.h5)") from None
    cfg = config.from_toml(attrs["config"])
    state = attrs.get("state_bytes_per_rank")
    exchange = attrs.get("exchange", cfg["optim"]["exchange"])
    lines = [
        f"run       {out}: {cfg['optim']['name']} on {attrs.get('mpi_size', '?')} rank(s), "
        f"{attrs.get('n_params', '?')} parameters, {attrs.get('status', '?')}",
        f"exchange  {exchange}",
        "state     " + (f"{int(state):,} bytes per rank ({int(state) / 2**20:.2f} MiB; the "
                        "optimizer's arrays on its largest rank)" if state is not None
                        else "not recorded (a run of an earlier version)"),
        f"gradient  {attrs.get('gradient_collective', 'not recorded')}",
    ]
    return "\n".join(lines)
