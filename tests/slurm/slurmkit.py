"""Helpers of the job-script tests: run a job script in test mode or submit it to the local
SLURM of jobs/slurm-local/, and read what it left behind.

The local cluster's state directory is HESSMPI_SLURM_DIR (default /tmp/hessmpi-slurm, as in
jobs/slurm-local/start.sh); every SLURM command here uses its slurm.conf, never a system
cluster's.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
JOBS = REPO / "jobs"
BIN = Path(sys.executable).parent
#: the hessmpi command: HESSMPI_BIN (as for the job scripts), else the one beside this Python
HESSMPI = os.environ.get("HESSMPI_BIN") or str(BIN / "hessmpi")
STATE = Path(os.environ.get("HESSMPI_SLURM_DIR", "/tmp/hessmpi-slurm"))
SLURM_CONF = STATE / "slurm.conf"
SCRIPTS = ("cpu", "multinode", "gpu", "sweep", "preemptible")


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    elapsed: float

    def __str__(self) -> str:
        return (f"exit {self.rc} after {self.elapsed:.1f} s\n--- stdout\n{self.stdout[-4000:]}"
                f"\n--- stderr\n{self.stderr[-4000:]}")


def env(**extra: str) -> dict:
    """This process's environment without SLURM job variables (so a job script outside
    sbatch runs in test mode even if pytest itself runs inside an allocation), with the
    local cluster's slurm.conf, the venv first on PATH, and ``extra``."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_",
                                                                     "SRUN_", "SALLOC_"))}
    e.pop("HESSMPI_TRACEBACK", None)
    e["SLURM_CONF"] = str(SLURM_CONF)
    e["PATH"] = f"{BIN}:{e.get('PATH', '/usr/bin:/bin')}"
    e["PYTHONUNBUFFERED"] = "1"
    e.setdefault("MPIEXEC_TIMEOUT", "150")
    e.update(extra)
    return e


def run(args: list, *, cwd=None, timeout: float = 120, extra_env: dict | None = None) -> Result:
    """Run a command in its own session; on timeout kill its process group and fail."""
    started = time.perf_counter()
    proc = subprocess.Popen([str(a) for a in args], cwd=cwd, env=env(**(extra_env or {})),
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, args))} still running after {timeout} s\n"
                    f"--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}")
    return Result(proc.returncode, out, err, time.perf_counter() - started)


def script(name: str) -> Path:
    return JOBS / f"{name}.sbatch"


def sets(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def small_run(data: Path, steps: int, *more: str) -> list[str]:
    """`hessmpi train` arguments of a small run of the scripts' default config on ``data``.
    One BLAS thread per rank everywhere, so that runs under srun and under mpiexec do the
    same arithmetic."""
    return sets(f"data.path={data}", f"train.steps={steps}", "train.log_every=5",
                "train.eval_every=20", "backend.threads=1", *more)


def local_job(name: str, args: list, cwd: Path, *, timeout: float = 120,
              extra_env: dict | None = None) -> Result:
    """``bash jobs/NAME.sbatch ARGS`` outside SLURM (single-node test mode) in ``cwd``."""
    return run(["bash", script(name), *args], cwd=cwd, timeout=timeout, extra_env=extra_env)


def sbatch(name: str, options: list[str], args: list, workdir: Path, *, timeout: float = 120,
           extra_env: dict | None = None) -> tuple[int, Result]:
    """``sbatch --wait OPTIONS --chdir=WORKDIR jobs/NAME.sbatch ARGS`` from the repository
    root (the submit directory, where the script finds jobs/common.sh): (job ID, result)."""
    result = run(["sbatch", "--wait", "--parsable", f"--chdir={workdir}", *options,
                  script(name), *args], cwd=REPO, timeout=timeout, extra_env=extra_env)
    match = re.match(r"(\d+)", result.stdout.strip())
    assert match, f"sbatch printed no job ID\n{result}"
    return int(match.group(1)), result


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"<{path} does not exist>"


def step_nodes(job: int, step: int = 0) -> set[str]:
    """The emulated nodes whose slurmd launched tasks of step JOB.STEP (from their logs)."""
    nodes = set()
    for log in (STATE / "log").glob("slurmd-*.log"):
        if re.search(rf"launch task StepId={job}\.{step} ", log.read_text(errors="replace")):
            nodes.add(log.stem.removeprefix("slurmd-"))
    return nodes


def srun_answers(timeout: float = 20) -> bool:
    """True when the local cluster runs a job step now."""
    if not SLURM_CONF.is_file():
        return False
    try:        # no controller: srun would keep trying to reach it for a while
        pid = int((STATE / "run" / "slurmctld.pid").read_text())
        if Path(f"/proc/{pid}/comm").read_text().strip() != "slurmctld":
            return False
    except (OSError, ValueError):
        return False
    try:
        proc = subprocess.run(["srun", "--immediate=5", "-n", "1", "true"], env=env(),
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def wait_for(what: str, predicate, timeout: float, poll: float = 0.2, detail=lambda: ""):
    """Poll ``predicate`` until it returns a true value (returned) or fail after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout} s\n{detail()}")
        time.sleep(poll)
