"""Start the installed ``hessmpi`` command as a subprocess, under ``mpiexec`` for training.

HESSMPI_MPIEXEC names the launcher (the Makefile exports it; it may hold arguments, e.g.
"srun --mpi=pmi2"); by default the ``mpiexec`` next to this Python.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
HESSMPI = str(BIN / "hessmpi")
TIMEOUT = 90  # seconds for one command; a hang fails the test instead of the suite
# The exit of a job one rank ended with MPI_Abort(1): hydra SIGKILLs the other ranks and
# reports whichever exit it collects first, the abort's 1 or a killed rank's 9 (both seen).
ABORTED = (1, 9)


def mpiexec(n: int) -> list[str]:
    launcher = os.environ.get("HESSMPI_MPIEXEC") or str(BIN / "mpiexec")
    return [*shlex.split(launcher), "-n", str(n)]


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    elapsed: float

    def __str__(self) -> str:
        return (f"exit {self.rc} after {self.elapsed:.1f} s\n--- stdout\n{self.stdout}"
                f"\n--- stderr\n{self.stderr}")


def _env() -> dict:
    env = dict(os.environ)
    env.pop("HESSMPI_TRACEBACK", None)
    env.setdefault("MPIEXEC_TIMEOUT", str(TIMEOUT))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start(args: list[str], *, cwd=None) -> subprocess.Popen:
    """Start a command in the background, in its own process group; ``finish`` collects it."""
    proc = subprocess.Popen([str(a) for a in args], cwd=cwd, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    proc.started = time.perf_counter()
    return proc


def finish(proc: subprocess.Popen, *, timeout: float = TIMEOUT) -> Result:
    """Wait for a command ``start`` began; on timeout kill its whole group (mpiexec and its
    ranks) and fail the test."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, proc.args))} still running after {timeout} s\n"
                    f"--- stdout\n{out}\n--- stderr\n{err}")
    return Result(proc.returncode, out, err, time.perf_counter() - proc.started)


def run(args: list[str], *, cwd=None, timeout: float = TIMEOUT) -> Result:
    """Run a command to its end (``start`` then ``finish``)."""
    return finish(start(args, cwd=cwd), timeout=timeout)


def hessmpi(*args, **kwargs) -> Result:
    """``hessmpi ARGS`` without MPI (report, data, info)."""
    return run([HESSMPI, *args], **kwargs)


def synthetic_data(path: Path, n_train: int, n_test: int, features: int, classes: int) -> Path:
    """``hessmpi data synthetic`` into ``path`` (the test fails if it does not exit 0)."""
    result = hessmpi("data", "synthetic", "--n-train", n_train, "--n-test", n_test,
                     "--features", features, "--classes", classes, "--out", path)
    assert result.rc == 0, str(result)
    return path


def train(*args, n: int = 2, **kwargs) -> Result:
    """``mpiexec -n N hessmpi train ARGS``."""
    return run([*mpiexec(n), HESSMPI, "train", *args], **kwargs)


def set_args(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def one_error_line(result: Result, *needles: str) -> str:
    """The one 'hessmpi: error' line of ``result`` (not one per rank), naming every needle;
    no traceback anywhere."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("hessmpi: error")]
    assert len(errors) == 1, f"expected one error line, got {len(errors)}\n{result}"
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}\n{result}"
    assert "Traceback" not in result.stdout + result.stderr, str(result)
    return errors[0]
