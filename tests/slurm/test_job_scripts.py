"""The job scripts without SLURM: syntax, headers, and single-node test mode
(``bash jobs/X.sbatch --set ...`` starts ``mpiexec -n 2`` here), real MPI and real HDF5.

Each run is checked through what it left: the run directory's metrics.h5 and checkpoints,
read with hessmpi's own readers, and the script's log lines.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from slurmkit import (
    JOBS,
    REPO,
    SCRIPTS,
    env,
    local_job,
    run,
    script,
    small_run,
    wait_for,
)

from hessmpi import config
from hessmpi.checkpoint import checkpoint_path, list_checkpoints, read_checkpoint
from hessmpi.metrics import COLUMNS, read_metrics

pytestmark = pytest.mark.timeout(180)

SHELL_FILES = [*(f"jobs/{s}.sbatch" for s in SCRIPTS), "jobs/common.sh",
               "jobs/site.profile.example", "jobs/slurm-local/start.sh",
               "jobs/slurm-local/stop.sh", "tests/slurm/run.sh"]


def sbatch_lines(name: str) -> list[str]:
    return [line for line in script(name).read_text().splitlines()
            if line.startswith("#SBATCH")]


def option(name: str, key: str) -> str | None:
    for line in sbatch_lines(name):
        m = re.match(rf"#SBATCH\s+--{key}(?:=(\S+))?\s*$", line)
        if m:
            return m.group(1) or ""
    return None


def only_run_dir(workdir: Path, prefix: str) -> Path:
    dirs = sorted(p for p in (workdir / "runs").glob(f"{prefix}*") if p.is_dir())
    assert len(dirs) == 1, f"expected one {prefix}* run in {workdir}/runs, found {dirs}"
    return dirs[0]


def assert_complete(out: Path, steps: int, ranks: int) -> dict:
    """A finished run of ``steps`` steps on ``ranks`` ranks: metrics rows up to the last
    step, status finished, and a final checkpoint that verifies. Its configuration."""
    attrs, cols = read_metrics(out / "metrics.h5")
    assert attrs["status"] == "finished", attrs
    assert int(attrs["mpi_size"]) == ranks
    assert cols["step"][-1] == steps and np.isfinite(cols["train_loss"]).all()
    arrays, ck = read_checkpoint(checkpoint_path(out, steps))   # raises if damaged
    assert ck["step"] == steps and np.isfinite(arrays["params"]).all()
    return config.from_toml(attrs["config"])


# ----- the files themselves ---------------------------------------------------------------

@pytest.mark.parametrize("path", SHELL_FILES)
def test_bash_syntax(path):
    result = run(["bash", "-n", REPO / path])
    assert result.rc == 0, str(result)


@pytest.mark.parametrize("name", SCRIPTS)
def test_header_is_documented_and_static(name):
    text = script(name).read_text()
    lines = text.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    first_sbatch = next(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    doc = [line for line in lines[1:first_sbatch] if line.startswith("# ")]
    assert len(doc) >= 8, f"{name}: expected a usage header above the #SBATCH lines"
    assert f"sbatch jobs/{name}.sbatch" in text and f"bash jobs/{name}.sbatch" in text
    for line in sbatch_lines(name):
        # SLURM does not expand variables in #SBATCH lines
        assert "$" not in line and "`" not in line, line
    job_name = "hessmpi-preempt" if name == "preemptible" else f"hessmpi-{name}"
    assert option(name, "job-name") == job_name
    output = option(name, "output")
    assert output == ("%x-%A_%a.out" if name == "sweep" else "%x-%j.out"), output
    assert option(name, "time"), f"{name}: no --time"


def test_gpu_script_asks_one_task_per_gpu_with_cpu_binding():
    assert option("gpu", "gpus-per-task") == "1"
    assert option("gpu", "cpus-per-task") and option("gpu", "ntasks-per-node")
    text = script("gpu").read_text()
    assert "--cpu-bind=cores" in text and "backend.device=gpu" in text


def test_preemptible_script_asks_signal_requeue_append():
    assert option("preemptible", "signal") == "B:USR1@120"
    assert option("preemptible", "requeue") == ""
    assert option("preemptible", "open-mode") == "append"


def test_sweep_header_array_covers_the_default_grid():
    result = local_job("sweep", [], REPO, extra_env={"HESSMPI_DRY_RUN": "1"})
    assert result.rc == 0, str(result)
    tasks = len(re.findall(r"would run:", result.stdout))
    assert option("sweep", "array") == f"0-{tasks - 1}"


def test_site_profile_example_is_only_comments_and_blank_lines():
    # sourced as is by someone who copies it, it must change nothing
    for line in (JOBS / "site.profile.example").read_text().splitlines():
        assert not line.strip() or line.lstrip().startswith("#"), line


# ----- single-node test mode --------------------------------------------------------------

@pytest.mark.parametrize("name", ["cpu", "multinode"])
def test_test_mode_trains_a_few_steps(name, data, tmp_path):
    result = local_job(name, small_run(data, 5), tmp_path)
    assert result.rc == 0, str(result)
    assert "single-node test mode" in result.stdout, str(result)
    assert re.search(r" -n 2 \S*hessmpi train", result.stdout), str(result)
    out = only_run_dir(tmp_path, f"hessmpi-{name}-local-")
    cfg = assert_complete(out, 5, ranks=2)
    assert cfg["data"]["path"] == str(data) and cfg["backend"]["device"] == "cpu"
    assert cfg["optim"]["name"] == "sgd" and cfg["model"]["hidden"] == [64]  # the default config


def test_test_mode_passes_arguments_through(data, tmp_path):
    out = tmp_path / "mine"
    args = [*small_run(data, 6), "--set", "optim.name=secant", "--set", "optim.lr=0.05",
            "--out", out]
    result = local_job("cpu", args, tmp_path, extra_env={"HESSMPI_NP": "3"})
    assert result.rc == 0, str(result)
    cfg = assert_complete(out, 6, ranks=3)
    assert cfg["optim"]["name"] == "secant" and cfg["optim"]["lr"] == 0.05
    assert not (tmp_path / "runs").exists()


def test_test_mode_reports_a_bad_key_with_exit_2(data, tmp_path):
    result = local_job("cpu", [*small_run(data, 5), "--set", "optim.nmae=sgd"], tmp_path)
    assert result.rc == 2, str(result)
    assert "optim.nmae" in result.stderr and "Traceback" not in result.stderr, str(result)


def gpu_available() -> bool:
    probe = run([sys.executable, "-c",
                 "import cupy; assert cupy.cuda.runtime.getDeviceCount() > 0"])
    return probe.rc == 0


def test_gpu_script_without_a_gpu_exits_2_naming_the_cause(data, tmp_path):
    if gpu_available():
        pytest.skip("this machine has a GPU that CuPy sees")
    result = local_job("gpu", small_run(data, 5), tmp_path)
    assert result.rc == 2, str(result)
    assert "backend.device = 'gpu'" in result.stderr, str(result)
    assert re.search(r" -n 1 \S*hessmpi train", result.stdout), "one rank: no GPU seen"


def test_gpu_script_runs_on_cpu_when_told(data, tmp_path):
    result = local_job("gpu", [*small_run(data, 5), "--set", "backend.device=cpu"], tmp_path,
                       extra_env={"HESSMPI_NP": "2"})
    assert result.rc == 0, str(result)
    assert_complete(only_run_dir(tmp_path, "hessmpi-gpu-local-"), 5, ranks=2)


def test_gpu_script_on_the_gpus_of_this_machine(data, tmp_path):
    if not gpu_available():
        pytest.skip("no GPU that CuPy sees (CuPy missing or no device)")
    result = local_job("gpu", small_run(data, 20), tmp_path)
    assert result.rc == 0, str(result)
    out = only_run_dir(tmp_path, "hessmpi-gpu-local-")
    attrs, _ = read_metrics(out / "metrics.h5")
    assert attrs["backend"] == "cupy" and attrs["device"].startswith("gpu:"), attrs
    assert_complete(out, 20, ranks=int(attrs["mpi_size"]))


# ----- the sweep --------------------------------------------------------------------------

def dry_run_tasks(text: str) -> list[tuple[str, float, str]]:
    """(optimizer, lr, --out) of each command a dry run prints, in order."""
    tasks = []
    for line in text.splitlines():
        if "would run:" not in line:
            continue
        names = re.findall(r"--set optim\.name=(\S+)", line)
        lrs = re.findall(r"--set optim\.lr=(\S+)", line)
        out = re.search(r"--out (\S+)", line).group(1)
        tasks.append((names[-1], float(lrs[-1]), out))
    return tasks


def test_sweep_expands_to_optimizers_times_learning_rates(tmp_path):
    result = local_job("sweep", ["--set", "train.steps=5"], tmp_path,
                       extra_env={"HESSMPI_DRY_RUN": "1"})
    assert result.rc == 0, str(result)
    tasks = dry_run_tasks(result.stdout)
    grid = list(itertools.product(["sgd", "secant"], [0.2, 0.1, 0.05, 0.02]))
    assert [(o, lr) for o, lr, _ in tasks] == grid    # index = o * len(LRS) + l
    outs = [out for _, _, out in tasks]
    assert len(set(outs)) == len(grid)
    assert all(out.endswith(f"_{i}") for i, out in enumerate(outs)), outs


def test_sweep_grid_from_the_environment(tmp_path):
    grid_env = {"HESSMPI_DRY_RUN": "1", "HESSMPI_SWEEP_OPTIMIZERS": "secant sgd",
                "HESSMPI_SWEEP_LRS": "0.3 0.01 0.003"}
    tasks = dry_run_tasks(local_job("sweep", [], tmp_path, extra_env=grid_env).stdout)
    assert [(o, lr) for o, lr, _ in tasks] == list(
        itertools.product(["secant", "sgd"], [0.3, 0.01, 0.003]))
    one = local_job("sweep", [], tmp_path, extra_env={**grid_env, "HESSMPI_ARRAY_TASK": "4"})
    assert [(o, lr) for o, lr, _ in dry_run_tasks(one.stdout)] == [("sgd", 0.01)]


@pytest.mark.parametrize("index", ["6", "-1", "x"])
def test_sweep_index_outside_the_grid_exits_2(index, tmp_path):
    result = local_job("sweep", [], tmp_path, extra_env={
        "HESSMPI_SWEEP_LRS": "0.1 0.05 0.02", "HESSMPI_ARRAY_TASK": index})
    assert result.rc == 2, str(result)
    assert "outside the grid of 6 runs" in result.stderr and "--array=0-5" in result.stderr


def test_sweep_trains_every_task_in_its_own_directory(data, tmp_path):
    result = local_job("sweep", small_run(data, 5), tmp_path, extra_env={
        "HESSMPI_SWEEP_OPTIMIZERS": "sgd secant", "HESSMPI_SWEEP_LRS": "0.07"})
    assert result.rc == 0, str(result)
    runs = sorted((tmp_path / "runs").iterdir())
    assert [r.name[-2:] for r in runs] == ["_0", "_1"], runs
    got = [(c["optim"]["name"], c["optim"]["lr"])
           for c in (assert_complete(r, 5, ranks=2) for r in runs)]
    assert got == [("sgd", 0.07), ("secant", 0.07)]


# ----- the preemptible script outside SLURM -----------------------------------------------

def final_state(out: Path, step: int) -> dict[str, bytes]:
    """The state arrays of a checkpoint (its results rows are compared by ``same_rows``)."""
    arrays, attrs = read_checkpoint(checkpoint_path(out, step))
    assert attrs["step"] == step
    return {k: np.ascontiguousarray(v).tobytes() for k, v in arrays.items()
            if not k.startswith("metrics/")}


def same_rows(a: Path, b: Path) -> None:
    """The metrics rows of two runs agree in every column but the timings."""
    got, want = read_metrics(a / "metrics.h5")[1], read_metrics(b / "metrics.h5")[1]
    for col in COLUMNS:
        if col in ("wall_time", "t_grad", "t_comm", "t_solve"):
            continue
        np.testing.assert_array_equal(got[col], want[col], err_msg=col)


def test_preemptible_test_mode_stops_on_usr1_and_resumes_exactly(data, tmp_path):
    out = tmp_path / "pre"
    steps = 600
    args = [*small_run(data, steps, "checkpoint.every=50", "checkpoint.keep=2"), "--out", out]
    log = open(tmp_path / "job.log", "w")
    proc = subprocess.Popen(["bash", script("preemptible"), *map(str, args)], cwd=tmp_path,
                            env=env(), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for("a first checkpoint", lambda: list_checkpoints(out), 60, poll=0.05,
                 detail=lambda: (tmp_path / "job.log").read_text())
        os.kill(proc.pid, signal.SIGUSR1)          # the batch shell, as SLURM's B: signal
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    text = (tmp_path / "job.log").read_text()
    assert rc == 75, text
    stop = int(re.search(r"stopped by a signal after step (\d+)", text).group(1))
    assert 0 < stop < steps, text
    assert "SIGUSR1" in text and f"--resume {out}" in text, text
    assert list_checkpoints(out)[0][0] == stop
    assert read_metrics(out / "metrics.h5")[0]["status"] == "stopped"

    resumed = local_job("preemptible", ["--resume", out], tmp_path)
    assert resumed.rc == 0, str(resumed)
    assert f"from {checkpoint_path(out, stop).name}" in resumed.stdout, str(resumed)
    reference = tmp_path / "reference"
    ref = local_job("preemptible", [*small_run(data, steps), "--out", reference], tmp_path)
    assert ref.rc == 0, str(ref)
    assert final_state(out, steps) == final_state(reference, steps)
    same_rows(out, reference)
    print(f"stopped at step {stop} of {steps}; resumed run identical to the reference")

