"""The asynchronous mode (optim.name asgd, dcasgd) through ``mpiexec -n 3 hessmpi train``:
training the digits MLP, refusal of bad layouts, a replayed run resumed bit for bit, signals
(exit 75 everywhere, resume), a worker killed, hung or raising (the job ends, named)."""

from __future__ import annotations

import os
import re
import signal
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from clirun import ABORTED, hessmpi, mpiexec, run, set_args, train
from test_e2e_train import DRIVER, single_error
from test_resume import Job, _cmdline, rank_pids

from hessmpi.checkpoint import checkpoint_path, list_checkpoints, read_checkpoint
from hessmpi.metrics import COLUMNS, read_metrics

pytestmark = pytest.mark.timeout(120)

TIMING = ("wall_time", "t_grad", "t_comm", "t_solve")
SMALL = ["model.name=mlp", "model.hidden=[8]", "train.batch_size=8", "train.seed=2",
         "backend.device=cpu", "backend.threads=1"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("digits") / "digits.h5"
    result = hessmpi("data", "digits", "--out", path)
    assert result.rc == 0, str(result)
    return path


def ok(result):
    assert result.rc == 0, str(result)
    assert "Traceback" not in result.stdout + result.stderr, str(result)
    return result


# ----- training -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["asgd", "dcasgd"])
def test_trains_the_digits_mlp_on_3_ranks(method, digits, tmp_path):
    out, steps = tmp_path / method, 1500
    sets = [f"data.path={digits}", "model.name=mlp", "model.hidden=[64]", "train.batch_size=32",
            f"optim.name={method}", "optim.lr=0.1", f"train.steps={steps}",
            "train.log_every=100", "train.eval_every=500", "checkpoint.every=500",
            "backend.device=cpu", "backend.threads=1"]
    result = ok(train(*set_args(sets), "--out", out, n=3))
    assert "rank 0 serves 2 worker(s)" in result.stdout, str(result)
    attrs, cols = read_metrics(out / "metrics.h5")
    assert attrs["status"] == "finished" and attrs["mpi_size"] == 3 and attrs["workers"] == 2
    np.testing.assert_array_equal(cols["step"], np.arange(100, steps + 1, 100))
    np.testing.assert_array_equal(cols["grad_evals"], cols["step"])
    evaluated = np.isfinite(cols["test_acc"])
    np.testing.assert_array_equal(cols["step"][evaluated], [500, 1000, 1500])
    assert cols["test_acc"][-1] >= 0.95, cols["test_acc"]
    assert cols["train_loss"][-1] < cols["train_loss"][0] / 3, cols["train_loss"]
    assert attrs["staleness_histogram"].sum() == steps
    assert ((cols["staleness_mean"] >= 0) & (cols["staleness_mean"] <= cols["staleness_max"])
            ).all()
    assert np.isnan(cols["cg_iters"]).all() and (cols["fallback"] == 0).all()
    arrays, ck = read_checkpoint(checkpoint_path(out, steps))
    n = arrays["params"].shape[0]
    assert arrays["optim/backups"].shape == (2, n) and arrays["sampler"].shape == (3, 2)
    assert ("optim/mean_square" in arrays) == (method == "dcasgd")
    assert ck["step"] == steps and ck["grad_evals"] == steps
    report = hessmpi("report", out)
    assert report.rc == 0 and method in report.stdout, str(report)


def test_one_rank_is_refused_with_exit_2_before_any_work(dataset, tmp_path):
    out = tmp_path / "out"
    result = train("--set", f"data.path={dataset}", "--set", "optim.name=dcasgd", "--out", out,
                   n=1)
    assert result.rc == 2, str(result)
    single_error(result, "optim.name = 'dcasgd' needs at least 2 ranks")
    assert not out.exists()


@pytest.mark.parametrize(("sets", "needle"), [
    (["optim.async_replay=[1, 5]"], "names rank(s) [5]"),
    (["optim.async_delay=[0, 0, 0]"], "one per worker (2)"),
    (["optim.name=asgd", "optim.momentum=0.5"], "optim.momentum = 0.5 does not apply"),
])
def test_bad_asynchronous_options_exit_2_with_one_message(sets, needle, dataset, tmp_path):
    result = train(*set_args([f"data.path={dataset}", "optim.name=dcasgd", *sets]),
                   "--out", tmp_path / "out", n=3)
    assert result.rc == 2, str(result)
    single_error(result, needle)


# ----- a replayed order: a run resumed is the run that never stopped --------------------------
def test_replayed_run_resumed_is_bit_for_bit_the_straight_run(dataset, tmp_path):
    sets = [f"data.path={dataset}", *SMALL, "optim.name=dcasgd", "optim.lr=0.2",
            "optim.async_replay=[1, 2, 2]", "train.log_every=4", "train.eval_every=8",
            "checkpoint.every=6"]
    straight, half = tmp_path / "straight", tmp_path / "half"
    ok(train(*set_args([*sets, "train.steps=34"]), "--out", straight, n=3))
    ok(train(*set_args([*sets, "train.steps=24"]), "--out", half, n=3))
    ok(train("--resume", half, "--set", "train.steps=34", n=3))
    a, a_attrs = read_checkpoint(checkpoint_path(straight, 34))
    b, b_attrs = read_checkpoint(checkpoint_path(half, 34))
    assert sorted(a) == sorted(b)
    for name in (n for n in a if not n.startswith("metrics/")):   # the rows: below
        assert np.asarray(a[name]).tobytes() == np.asarray(b[name]).tobytes(), name
    assert a_attrs["grad_evals"] == b_attrs["grad_evals"] == 34
    _, want = read_metrics(straight / "metrics.h5")
    attrs, got = read_metrics(half / "metrics.h5")
    assert attrs["status"] == "finished" and list(attrs["resumed_at"]) == [24]
    for name in COLUMNS:     # bytes_sent: the half run's last update was answered "finished"
        if name not in (*TIMING, "bytes_sent"):
            assert got[name].tobytes() == want[name].tobytes(), name


# ----- signals ----------------------------------------------------------------------------------
def long_run(data: Path, out: Path, *extra: str) -> list[str]:
    sets = [f"data.path={data}", *SMALL, "optim.name=dcasgd", "optim.lr=0.1",
            "train.steps=100000000", "train.log_every=100", "train.eval_every=1000",
            "checkpoint.every=500", *extra]
    return [*set_args(sets), "--out", out]


@pytest.mark.parametrize("to", ["mpiexec", "worker"])
def test_signal_stops_every_rank_with_75_and_the_run_resumes(to, dataset, tmp_path, jobs):
    out = tmp_path / "run"
    job = Job(long_run(dataset, out), tmp_path, n=3)
    jobs.append(job)
    ranks = rank_pids(job, n=3)
    job.wait_for_checkpoint(out)
    if to == "mpiexec":
        job.proc.send_signal(signal.SIGUSR1)      # hydra forwards it to every rank
    else:
        os.kill(ranks[2], signal.SIGUSR1)         # one worker alone
    rc = job.wait(30)
    assert rc == 75, f"exit {rc}\n{job.output()}"
    stderr = job.stderr.read_text()
    stop = int(re.search(r"stopped by a signal after step (\d+)", stderr).group(1))
    assert f"--resume {out}" in stderr and "Traceback" not in stderr, job.output()
    assert "differs from a run that never stopped" in stderr
    assert list_checkpoints(out)[0] == (stop, checkpoint_path(out, stop))
    arrays, attrs = read_checkpoint(checkpoint_path(out, stop))
    assert attrs["step"] == stop and arrays["optim/backups"].shape[0] == 2
    m_attrs, rows = read_metrics(out / "metrics.h5")
    assert m_attrs["status"] == "stopped" and rows["step"][-1] <= stop

    result = ok(train("--resume", out, "--set", f"train.steps={stop + 150}", n=3))
    assert f"resuming at update {stop}" in result.stdout
    m_attrs, rows = read_metrics(out / "metrics.h5")
    assert m_attrs["status"] == "finished" and rows["step"][-1] == stop + 150


# ----- a worker lost -------------------------------------------------------------------------
def test_killed_worker_ends_the_job_and_the_checkpoint_stays(dataset, tmp_path, jobs):
    out = tmp_path / "run"
    job = Job(long_run(dataset, out), tmp_path, n=3)
    jobs.append(job)
    ranks = rank_pids(job, n=3)
    job.wait_for_checkpoint(out)
    os.kill(ranks[2], signal.SIGKILL)
    killed = time.monotonic()
    rc = job.wait(30)
    assert rc is not None, "the job still runs 30 s after a worker was killed"
    assert rc != 0, job.output()
    print(f"job ended {time.monotonic() - killed:.2f} s after kill -9 of rank 2, exit {rc}")
    assert not [pid for pid in job.seen if _cmdline(pid) == job.seen[pid]]
    # the launcher names the process, the server's first line says which rank it was
    assert f"2:{ranks[2]}" in job.stdout.read_text(), job.output()
    newest, path = list_checkpoints(out)[0]
    _, attrs = read_checkpoint(path)
    assert attrs["step"] == newest and newest % 500 == 0
    ok(train("--resume", out, "--set", f"train.steps={newest + 100}", n=3))


def test_hung_worker_is_named_and_the_job_ends(dataset, tmp_path, jobs):
    out = tmp_path / "run"
    job = Job(long_run(dataset, out, "optim.async_timeout=2"), tmp_path, n=3)
    jobs.append(job)
    ranks = rank_pids(job, n=3)
    job.wait_for_checkpoint(out)
    os.kill(ranks[1], signal.SIGSTOP)           # alive, but silent
    rc = job.wait(30)
    # the server's MPI_Abort(1); hydra then SIGKILLs the stopped worker
    assert rc in ABORTED, f"exit {rc}\n{job.output()}"
    errors = [line for line in job.stderr.read_text().splitlines()
              if line.startswith("hessmpi: error")]
    assert len(errors) == 1, job.output()
    assert "worker rank 1 sent no gradient" in errors[0]
    assert "optim.async_timeout = 2" in errors[0]
    attrs, _ = read_metrics(out / "metrics.h5")
    assert attrs["status"] == "failed" and "worker rank 1" in attrs["failure"]
    _, path = list_checkpoints(out)[0]
    read_checkpoint(path)                        # whole


def test_worker_raising_ends_every_rank(dataset, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER.format(rank=2)))
    result = run([*mpiexec(3), sys.executable, driver, "train",
                  *set_args([f"data.path={dataset}", *SMALL, "optim.name=asgd",
                             "train.steps=1000000"]), "--out", tmp_path / "out"], timeout=60)
    assert result.rc in ABORTED and result.elapsed < 30, str(result)
    single_error(result, "rank 2", "RuntimeError", "injected failure in loss_grad")
