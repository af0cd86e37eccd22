"""Starting benchmark workers under MPI, and what a worker starts with.

A benchmark script is its own worker: the parent calls :func:`start` (or :func:`launch`) with
a JSON-able spec; the worker runs ``SCRIPT --worker SPEC.json RESULT.json`` under
``mpiexec -n RANKS``, and :func:`serve` calls the script's worker function on the spec on
every rank and writes rank 0's return value as the result.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

#: MPICH's switch that makes ranks waiting in a collective sleep instead of spinning.
HEAVY_YIELD = "MPIR_CVAR_ENABLE_HEAVY_YIELD"


def mpiexec_command() -> list[str]:
    """The launcher: ``HESSMPI_MPIEXEC`` split into words (the Makefile exports it; e.g.
    ``"srun --mpi=pmi2"``), else the ``mpiexec`` beside this Python (the mpich wheel's),
    else the one on PATH."""
    launcher = os.environ.get("HESSMPI_MPIEXEC", "").strip()
    if launcher:
        return shlex.split(launcher)
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return [str(beside)]
    return [shutil.which("mpiexec") or "mpiexec"]


def oversubscription_env(ranks: int) -> dict[str, str]:
    """Environment for ``ranks`` ranks on this machine: with more ranks than cores, MPICH's
    busy-wait in a collective burns the time slices the other ranks need (measured at 4
    ranks on 2 cores: 9-13 ms per softmax step, 2 ms with the waiting ranks yielding); at
    ranks <= cores yielding costs latency (0.5 -> 1.3 ms), so it is set only when
    oversubscribed, and never over a value the user set."""
    if ranks > len(os.sched_getaffinity(0)) and HEAVY_YIELD not in os.environ:
        return {HEAVY_YIELD: "1"}
    return {}


class Job:
    """A worker started by :func:`start`: ``poll()`` is None while it runs; ``result()``
    waits and returns its JSON result (SystemExit naming the command if it failed)."""

    def __init__(self, proc: subprocess.Popen, cmd: list[str], result: Path, tmp, log):
        self.proc, self.cmd, self.path, self._tmp, self._log = proc, cmd, result, tmp, log

    def poll(self) -> int | None:
        return self.proc.poll()

    def result(self, timeout: float | None = None) -> dict:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        finally:
            if self._log is not None:
                self._log.close()
        try:
            if code != 0 or not self.path.is_file():
                raise SystemExit(f"the worker failed (exit {code}): {shlex.join(self.cmd)}")
            return json.loads(self.path.read_text())
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()


def start(script: str | Path, spec: dict, ranks: int, *, log: Path | None = None,
          timeout: float | None = None, env: dict | None = None) -> Job:
    """Start ``python SCRIPT --worker SPEC RESULT`` under ``mpiexec -n ranks``; output to
    ``log`` (default: this process's). ``timeout``: seconds after which MPICH's launcher
    ends the job (MPIEXEC_TIMEOUT)."""
    tmp = tempfile.TemporaryDirectory(prefix="hessmpi-bench-")
    spec_path, result = Path(tmp.name) / "spec.json", Path(tmp.name) / "result.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [*mpiexec_command(), "-n", str(ranks), sys.executable, str(script), "--worker",
           str(spec_path), str(result)]
    environ = dict(os.environ, PYTHONUNBUFFERED="1", **oversubscription_env(ranks))
    if timeout:
        environ["MPIEXEC_TIMEOUT"] = str(int(timeout))
    environ.update(env or {})
    out = open(log, "w") if log else None  # noqa: SIM115 - closed by Job.result
    proc = subprocess.Popen(cmd, env=environ, stdout=out, stderr=subprocess.STDOUT if out
                            else None)
    return Job(proc, cmd, result, tmp, out)


def launch(script: str | Path, spec: dict, ranks: int, *, timeout: float | None = None) -> dict:
    """:func:`start`, then wait for the result."""
    return start(script, spec, ranks, timeout=timeout).result(timeout and timeout + 60)


def serve(worker, argv: list[str]) -> None:
    """The worker side of :func:`start`: ``argv`` = [SPEC, RESULT]; ``worker(spec)`` runs on
    every rank; rank 0's return value is written to RESULT."""
    from mpi4py import MPI

    spec = json.loads(Path(argv[0]).read_text())
    result = worker(spec)
    if MPI.COMM_WORLD.Get_rank() == 0:
        Path(argv[1]).write_text(json.dumps(result))
    MPI.COMM_WORLD.Barrier()


def script(worker, main, argv: list[str] | None = None) -> None:
    """A benchmark script's entry point: ``SCRIPT --worker SPEC RESULT`` (as :func:`start`
    runs it under mpiexec) serves ``worker``; anything else runs ``main()`` (the parent)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        serve(worker, argv[1:])
    else:
        main()


def context(device: str = "cpu", dtype: str = "float32", threads: int = 0, *, world=None,
            intranode: str = "mpi"):
    """(Communicator, Backend) of this rank over ``world`` (default COMM_WORLD), chosen as
    ``hessmpi train`` chooses them: BLAS threads = the node's cores shared by its ranks
    unless ``threads`` > 0; the GPU local_rank % GPUs; CUDA-aware MPI used when detected;
    ``intranode``: the gradient's collective, "mpi" or "window" (the shared-memory
    window)."""
    from mpi4py import MPI

    from hessmpi.backend import blas_threads, make_backend, node_layout
    from hessmpi.comm import Communicator, cuda_aware_mpi

    world = MPI.COMM_WORLD if world is None else world
    local_rank, _, affinities = node_layout(world)
    threads = threads or blas_threads(local_rank, affinities)
    comm = Communicator(world, intranode=intranode)
    backend = make_backend(device, dtype, threads, local_rank=local_rank)
    if backend.name == "cupy":
        comm.device_path = "direct" if cuda_aware_mpi() else "staged"
    return comm, backend
