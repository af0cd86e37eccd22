"""The job scripts on a real SLURM: the one-host cluster of jobs/slurm-local/ (munge,
slurmctld, two emulated nodes node1 and node2), real srun, real MPI (the mpich wheel over
PMI2), real HDF5.

Each script is submitted as a user would, ``sbatch --wait`` from the repository root, with
its limits shortened on the command line (options there override the #SBATCH lines), and
checked through what the job left: its log (named by job and array index), its run
directory, the slurmd logs of the emulated nodes. Skipped, with the reason, where the
cluster cannot run.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import threading
import uuid
from pathlib import Path

import pytest
from slurmkit import (
    HESSMPI,
    REPO,
    Result,
    env,
    local_job,
    read,
    run,
    sbatch,
    script,
    small_run,
    step_nodes,
    wait_for,
)
from test_job_scripts import assert_complete, final_state, same_rows

from hessmpi.checkpoint import checkpoint_path, list_checkpoints
from hessmpi.metrics import read_metrics

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("cluster"), pytest.mark.timeout(240)]

SHORT = ["--time=2"]     # minutes: a test job that hangs ends soon


def job_log(workdir: Path, name: str, job: int | str) -> str:
    return read(workdir / f"hessmpi-{name}-{job}.out")


def assert_job_ok(result: Result, log: str) -> None:
    assert result.rc == 0, f"{result}\n--- job log\n{log}"
    assert "Traceback" not in log and "exit 0" in log, log


@pytest.fixture(scope="module")
def reference(data, workdir):
    """A run of 40 steps of the scripts' default config in test mode (mpiexec -n 2, not
    SLURM): the SLURM runs of the same arguments must end with the same parameters."""
    out = workdir / "reference-40"
    result = local_job("cpu", [*small_run(data, 40), "--out", out], workdir)
    assert result.rc == 0, str(result)
    return out


def test_cpu_job(data, workdir, reference):
    job, result = sbatch("cpu", [*SHORT, "--ntasks=2"], small_run(data, 40), workdir)
    log = job_log(workdir, "cpu", job)
    assert_job_ok(result, log)
    assert f"job {job} 'hessmpi-cpu' restart 0: 2 task(s) on 1 node(s)" in log, log
    assert "srun --mpi=pmi2" in log, log
    out = workdir / "runs" / f"hessmpi-cpu-{job}"
    assert_complete(out, 40, ranks=2)
    # srun with PMI2 connects the ranks exactly as mpiexec does: the same run, bit for bit
    assert final_state(out, 40) == final_state(reference, 40)
    same_rows(out, reference)


@pytest.mark.parametrize("launcher, per_node", [("srun", 2), ("mpiexec", 1)])
def test_multinode_job_spans_both_nodes(launcher, per_node, data, workdir):
    ranks = 2 * per_node
    job, result = sbatch("multinode", [*SHORT, "--nodes=2", f"--ntasks-per-node={per_node}"],
                         small_run(data, 20), workdir,
                         extra_env={"HESSMPI_LAUNCHER": launcher})
    log = job_log(workdir, "multinode", job)
    assert_job_ok(result, log)
    assert f"{ranks} task(s) on 2 node(s) node[1-2]" in log, log
    assert f"on {ranks} rank(s)" in log, log               # hessmpi's own line: MPI's size
    cmd = "srun --mpi=pmi2" if launcher == "srun" else f"mpiexec -n {ranks}"
    assert cmd in log, log
    assert step_nodes(job) == {"node1", "node2"}, "the step did not start on both nodes"
    assert_complete(workdir / "runs" / f"hessmpi-multinode-{job}", 20, ranks=ranks)


def test_srun_without_pmi_is_refused_by_the_size_check(data, workdir):
    result = run(["srun", "--mpi=none", "-n", "2", "--time=1", HESSMPI, "train",
                  *small_run(data, 5), "--out", workdir / "singletons"], cwd=workdir)
    assert result.rc == 2, str(result)
    assert "MPI sees 1 rank(s) but SLURM started 2 tasks" in result.stderr, str(result)
    assert "--mpi=pmi2" in result.stderr
    assert not (workdir / "singletons" / "metrics.h5").exists()


def test_array_sweep_gives_one_run_per_task(data, workdir):
    grid = {"HESSMPI_SWEEP_OPTIMIZERS": "sgd secant", "HESSMPI_SWEEP_LRS": "0.1 0.03"}
    job, result = sbatch("sweep", [*SHORT, "--ntasks=2", "--array=0-3"], small_run(data, 10),
                         workdir, extra_env=grid)
    logs = {i: job_log(workdir, "sweep", f"{job}_{i}") for i in range(4)}
    assert result.rc == 0, f"{result}\n" + "\n".join(logs.values())
    expected = list(itertools.product(["sgd", "secant"], [0.1, 0.03]))
    runs = sorted((workdir / "runs").glob(f"hessmpi-sweep-{job}_*"))
    assert [r.name for r in runs] == [f"hessmpi-sweep-{job}_{i}" for i in range(4)]
    for i, (opt, lr) in enumerate(expected):
        assert f"(array {job}_{i})" in logs[i] and "exit 0" in logs[i], logs[i]
        assert f"optim.name={opt} optim.lr={lr}" in logs[i], logs[i]
        cfg = assert_complete(runs[i], 10, ranks=2)
        assert (cfg["optim"]["name"], cfg["optim"]["lr"]) == (opt, lr)


def test_array_index_outside_the_grid_fails_the_task(data, workdir):
    job, result = sbatch("sweep", [*SHORT, "--ntasks=1", "--array=8"], small_run(data, 5),
                         workdir)
    assert result.rc == 2, str(result)
    assert "outside the grid of 8 runs" in job_log(workdir, "sweep", f"{job}_8")


# ----- the preemptible job ----------------------------------------------------------------

class Submitted:
    """``sbatch --wait`` of the preemptible script running in a thread."""

    def __init__(self, options: list[str], args: list, workdir: Path):
        self.job: int | None = None
        self.result: Result | None = None
        self.workdir = workdir
        self.token = f"hessmpi-test-{uuid.uuid4().hex[:12]}"   # finds this job in squeue
        options = [*options, f"--comment={self.token}"]

        def submit():
            self.job, self.result = sbatch("preemptible", options, args, workdir, timeout=200)

        self.thread = threading.Thread(target=submit, daemon=True)
        self.thread.start()

    def job_id(self) -> int:
        def find():
            # sbatch --wait prints the ID only when it returns: take it from the queue, by
            # the comment given to this job alone
            q = subprocess.run(["squeue", "-h", "-o", "%i %k"], env=env(), capture_output=True,
                               text=True).stdout.splitlines()
            ids = [int(line.split()[0]) for line in q if line.split()[1:] == [self.token]]
            return ids[0] if ids else None
        return wait_for("the job in the queue", find, 30, poll=0.2)

    def log(self, job: int) -> str:
        return job_log(self.workdir, "preempt", job)

    def wait(self, timeout: float) -> Result:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "sbatch --wait still waiting"
        return self.result


def signal_count(log: str) -> int:
    return log.count("SIGUSR1 (time limit near")


def test_preemptible_job_on_the_time_limit_signal_checkpoints_requeues_resumes(data,
                                                                               workdir):
    """The header's --signal=B:USR1@N, shortened to --time=1 --signal=B:USR1@50: SLURM's own
    timer sends USR1; the job checkpoints, requeues itself and the rerun resumes from that
    checkpoint. The run is endless; the test cancels it once the rerun has trained on."""
    args = small_run(data, 10**7, "train.log_every=200", "train.eval_every=0")
    sub = Submitted(["--time=1", "--signal=B:USR1@50", "--ntasks=2"], args, workdir)
    job = sub.job_id()
    out = workdir / "runs" / f"hessmpi-preempt-{job}"
    try:
        def resumed() -> str | None:
            text = sub.log(job)
            return text if "restart 1:" in text and "hessmpi: resuming" in text else None

        log = wait_for("a rerun resuming from the checkpoint of the signal", resumed, 120,
                       poll=0.5, detail=lambda: sub.log(job))
        stop = int(re.search(r"stopped by a signal after step (\d+)", log).group(1))
        assert "exit 75" in log and f"requeueing job {job}" in log, log
        assert f"from {checkpoint_path(out, stop).name} (step {stop})" in log, log
        # the rerun trains past the stop
        wait_for("rows after the stop", lambda: read_metrics(out / "metrics.h5")[1]["step"]
                 .max(initial=0) > stop + 200, 60, poll=0.5, detail=lambda: sub.log(job))
        attrs, _ = read_metrics(out / "metrics.h5")
        assert list(attrs["resumed_at"])[0] == stop
        assert attrs["status"] == "running"
    finally:
        run(["scancel", job])
    result = sub.wait(60)
    log = sub.log(job)
    assert result.rc != 0, "a cancelled job"
    print(f"SLURM's timer signalled the job {signal_count(log)} time(s); first stop at "
          f"step {stop}")


def test_preemptible_job_resumes_to_the_same_parameters_as_an_uninterrupted_run(data,
                                                                                workdir):
    """USR1 to the batch shell (scancel --signal=USR1 --batch: what --signal=B: does) once
    the run is under way: checkpoint, exit 75, requeue, resume, finish; the final
    parameters, optimizer and sampler state and metrics rows equal those of the same run
    never stopped (here in test mode, started alongside)."""
    steps = 3000
    args = small_run(data, steps, "checkpoint.every=100", "train.log_every=50")
    sub = Submitted(["--time=5", "--ntasks=2"], args, workdir)
    reference = workdir / "preempt-reference"
    ref: list[Result] = []
    ref_thread = threading.Thread(target=lambda: ref.append(local_job(
        "preemptible", [*args, "--out", reference], workdir, timeout=200)), daemon=True)
    ref_thread.start()
    job = sub.job_id()
    out = workdir / "runs" / f"hessmpi-preempt-{job}"
    try:
        wait_for("the first checkpoint", lambda: list_checkpoints(out), 60, poll=0.05,
                 detail=lambda: sub.log(job))
        signalled = run(["scancel", "--signal=USR1", "--batch", job])
        assert signalled.rc == 0, str(signalled)
        result = sub.wait(180)
    except BaseException:
        run(["scancel", job])
        raise
    log = sub.log(job)
    assert result.rc == 0, f"{result}\n--- job log\n{log}"
    assert signal_count(log) == 1, log
    stop = int(re.search(r"stopped by a signal after step (\d+)", log).group(1))
    assert 100 <= stop < steps, log
    for line in ("exit 75", f"requeueing job {job}", "restart 1:",
                 f"from {checkpoint_path(out, stop).name} (step {stop})",
                 f"finished {steps} steps", "exit 0"):
        assert line in log, f"{line!r} missing from the log\n{log}"
    attrs, _ = read_metrics(out / "metrics.h5")
    assert list(attrs["resumed_at"]) == [stop]
    assert_complete(out, steps, ranks=2)

    ref_thread.join(200)
    assert ref and ref[0].rc == 0, str(ref[0]) if ref else "the reference run hangs"
    assert final_state(out, steps) == final_state(reference, steps)
    same_rows(out, reference)
    print(f"stopped at step {stop} of {steps}, requeued, resumed: identical to the "
          f"uninterrupted run")


def test_gpu_script_header_is_accepted_by_sbatch(workdir):
    """No GPUs here (no GRES): sbatch --test-only parses the header's options without running
    anything; the only complaint may be the missing GPUs, never an option."""
    result = run(["sbatch", "--test-only", f"--chdir={workdir}", script("gpu")], cwd=REPO)
    text = result.stdout + result.stderr
    assert "unrecognized option" not in text and "invalid" not in text.replace(
        "Invalid generic resource", ""), text
    if result.rc != 0:
        assert re.search(r"generic resource|gres", text, re.I), text
