"""One run per directory, and no damaged file read as if whole (issue 16), end to end under
``mpiexec``: concurrent resumes, a directory holding another run's checkpoints, random
bytes flipped in metrics.h5 and in a checkpoint, and the dataset checks made before any rank
starts work.

Each test compares with something the command under test did not produce: a run resumed
alone, the bytes of the files before and after, the checkpoints and results read back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from clirun import HESSMPI, finish, hessmpi, mpiexec, one_error_line, set_args, start, train

from hessmpi.checkpoint import checkpoint_path, list_checkpoints, read_checkpoint
from hessmpi.metrics import read_metrics
from hessmpi.rundir import LOCK

pytestmark = pytest.mark.timeout(180)

SETS = ["model.name=mlp", "model.hidden=[8]", "train.batch_size=8", "train.seed=1",
        "train.log_every=5", "train.eval_every=10", "checkpoint.every=10", "checkpoint.keep=3",
        "backend.device=cpu", "backend.threads=1", "optim.check_every=10"]
STEPS = 40
LONG = 1500      # a resume this long runs for seconds: two started together overlap


def logged(last: int) -> np.ndarray:
    return np.arange(5, last + 1, 5)


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file()}


def flip_random_bytes(path: Path, seed: int, most: int = 200) -> bytes:
    """Change 1 to ``most`` bytes of ``path`` at random offsets; returns the new content."""
    rng = np.random.default_rng(seed)
    data = bytearray(path.read_bytes())
    for offset in rng.integers(0, len(data), rng.integers(1, most + 1)):
        data[offset] ^= int(rng.integers(1, 256))
    path.write_bytes(bytes(data))
    return bytes(data)


def resume_args(out: Path, steps: int) -> list:
    every = 500 if steps == LONG else 10     # fewer fsyncs in the long runs
    return [*mpiexec(2), HESSMPI, "train", "--resume", out,
            *set_args([f"train.steps={steps}", f"checkpoint.every={every}"])]


def resume(out: Path, steps: int):
    return finish(start(resume_args(out, steps)), timeout=120)


def warnings_of(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("hessmpi: warning")]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, dataset) -> Path:
    """A run of STEPS steps with checkpoints at 20, 30, 40."""
    out = tmp_path_factory.mktemp("rundir") / "finished"
    result = train(*set_args([f"data.path={dataset}", *SETS, f"train.steps={STEPS}"]),
                   "--out", out)
    assert result.rc == 0, str(result)
    assert [s for s, _ in list_checkpoints(out)] == [40, 30, 20]
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----- one run at a time ------------------------------------------------------------------

def test_two_resumes_started_together_one_runs_and_the_other_exits_2(finished, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    jobs = [start(resume_args(out, LONG)) for _ in range(2)]
    results = [finish(job, timeout=150) for job in jobs]
    assert sorted(r.rc for r in results) == [0, 2], "\n".join(map(str, results))
    one_error_line(next(r for r in results if r.rc == 2), str(out), "in use by", "pid")
    attrs, cols = read_metrics(out / "metrics.h5")
    np.testing.assert_array_equal(cols["step"], logged(LONG))   # strictly increasing, once
    assert attrs["status"] == "finished" and list(attrs["resumed_at"]) == [STEPS]
    assert not (out / LOCK).exists()


def wait_for_lock(out: Path, job: subprocess.Popen) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            return json.loads((out / LOCK).read_text())
        except (OSError, ValueError):
            if job.poll() is not None:
                pytest.fail(f"the run ended without a lock in {out}: {finish(job)}")
            time.sleep(0.05)
    pytest.fail(f"no lock in {out} after 60 s")


def test_a_directory_in_use_is_refused_naming_the_holder(finished, dataset, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    first = start(resume_args(out, LONG))
    holder = wait_for_lock(out, first)
    second = resume(out, LONG)
    assert second.rc == 2, str(second)
    one_error_line(second, str(out), f"pid {holder['pid']}", holder["host"], "--resume")
    new = train(*set_args([f"data.path={dataset}", *SETS]), "--out", out)
    assert new.rc == 2, str(new)
    one_error_line(new, "in use by")
    report = hessmpi("report", out)              # readers take no lock
    assert report.rc == 0 and "running" in report.stdout, str(report)
    result = finish(first, timeout=150)
    assert result.rc == 0, str(result)
    assert read_metrics(out / "metrics.h5")[0]["status"] == "finished"
    assert not (out / LOCK).exists()


# ----- checkpoints belong to their run ----------------------------------------------------

def test_a_new_run_refuses_a_directory_with_another_runs_checkpoints(finished, dataset,
                                                                      tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished / "checkpoints", out / "checkpoints")
    before = snapshot(out)
    result = train(*set_args([f"data.path={dataset}", *SETS, "train.steps=20"]), "--out", out)
    assert result.rc == 2, str(result)
    one_error_line(result, str(out), "checkpoints of another run", "another --out",
                   f"--resume {out}")
    assert snapshot(out) == before


def test_checkpoints_without_results_resume_and_the_results_are_rebuilt(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished / "checkpoints", out / "checkpoints")
    result = resume(out, 60)
    assert result.rc == 0, str(result)
    said = "\n".join(warnings_of(result))
    assert "no metrics.h5" in said and "8 rows up to step 40" in said, str(result)
    reference = copy_run(finished, tmp_path / "reference")
    assert resume(reference, 60).rc == 0
    attrs, got = read_metrics(out / "metrics.h5")
    want = read_metrics(reference / "metrics.h5")[1]
    np.testing.assert_array_equal(got["step"], logged(60))
    for name in ("train_loss", "grad_norm", "test_acc", "epoch", "grad_evals"):
        assert got[name].tobytes() == want[name].tobytes(), name
    assert attrs["rebuilt_from"] == "ckpt_000000040.h5" and attrs["status"] == "finished"
    ours, _ = read_checkpoint(checkpoint_path(out, 60))
    theirs, _ = read_checkpoint(checkpoint_path(reference, 60))
    assert ours["params"].tobytes() == theirs["params"].tobytes()


# ----- damaged files ----------------------------------------------------------------------

def test_report_of_results_with_flipped_bytes_always_exits_2(finished, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for seed in range(12):
        shutil.copy(finished / "metrics.h5", run / "metrics.h5")
        flip_random_bytes(run / "metrics.h5", seed)
        result = hessmpi("report", run)
        assert result.rc == 2, f"seed {seed}: {result}"
        one_error_line(result, str(run / "metrics.h5"), "damaged")


@pytest.mark.parametrize("seed", [0, 1])
def test_resume_rebuilds_results_with_flipped_bytes(seed, finished, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    damaged = flip_random_bytes(out / "metrics.h5", seed)
    result = resume(out, 50)
    assert result.rc == 0, str(result)
    said = "\n".join(warnings_of(result))
    assert "metrics.h5 is damaged" in said and "metrics.h5.damaged" in said, str(result)
    assert (out / "metrics.h5.damaged").read_bytes() == damaged
    attrs, got = read_metrics(out / "metrics.h5")
    before = read_metrics(finished / "metrics.h5")[1]
    np.testing.assert_array_equal(got["step"], logged(50))
    for name, column in before.items():      # the rows up to step 40, timings included
        assert got[name][:8].tobytes() == column.tobytes(), name
    assert attrs["status"] == "finished"


def test_resume_from_a_checkpoint_with_flipped_bytes_always_exits_2(finished, tmp_path):
    """A few bytes: enough to change attributes or unused space unnoticed by HDF5 itself."""
    for seed in range(8):
        out = copy_run(finished, tmp_path / f"run{seed}")
        for _, path in list_checkpoints(out)[1:]:
            path.unlink()
        newest = checkpoint_path(out, STEPS)
        flip_random_bytes(newest, seed, most=3)
        before = snapshot(out)
        result = resume(out, 60)
        assert result.rc == 2, f"seed {seed}: {result}"
        one_error_line(result, "no usable checkpoint")
        assert any(newest.name in w for w in warnings_of(result)), str(result)
        assert snapshot(out) == before


# ----- checks before any rank starts work -------------------------------------------------

def write_dataset_file(path: Path, train_rows: int = 30, test_rows: int = 10,
                       test_width: int = 4, labels=None) -> Path:
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.attrs["n_classes"] = 3
        f["train/x"] = rng.standard_normal((train_rows, 4)).astype(np.float32)
        f["train/y"] = rng.integers(0, 3, train_rows) if labels is None else labels
        f["test/x"] = rng.standard_normal((test_rows, test_width)).astype(np.float32)
        f["test/y"] = rng.integers(0, 3, test_rows)
    return path


BAD_INPUT = {
    "test split of another width": (dict(test_width=5), [], ["test/x has 5 features"]),
    "empty test split": (dict(test_rows=0), [], ["the test split is empty"]),
    "float labels": (dict(labels=np.linspace(0, 2, 30)), [], ["labels must be class indices"]),
    "fewer training rows than ranks": (dict(train_rows=2), [], ["fewer than the 3 ranks"]),
    "steps beyond the bound": ({}, ["train.steps=1e30"], ["train.steps", "<= 1e+12"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_exits_2_before_any_rank_starts_work(case, tmp_path):
    layout, sets, needles = BAD_INPUT[case]
    data = write_dataset_file(tmp_path / "data.h5", **layout)
    out = tmp_path / "out"
    result = train(*set_args([f"data.path={data}", "train.batch_size=0", "backend.threads=1",
                              *sets]), "--out", out, n=3)
    assert result.rc == 2, str(result)
    one_error_line(result, *needles)
    assert not out.exists()


def test_an_existing_read_only_out_exits_2(dataset, tmp_path):
    out = tmp_path / "read-only"
    out.mkdir()
    out.chmod(0o555)
    immutable = subprocess.run(["chattr", "+i", out], capture_output=True).returncode == 0
    try:
        if os.access(out, os.W_OK) and not immutable:
            pytest.skip("cannot make a directory read-only for this user (root without chattr)")
        result = train("--set", f"data.path={dataset}", "--out", out)
        assert result.rc == 2, str(result)
        one_error_line(result, f"cannot write in {out}")
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", out], check=True)
        out.chmod(0o755)
    assert list(out.iterdir()) == []


def test_a_diverging_run_says_one_line_instead_of_numpy_warnings(dataset, tmp_path):
    result = train(*set_args([f"data.path={dataset}", *SETS, "optim.lr=1e6",
                              "train.max_loss_ratio=0", "train.log_every=1",
                              "train.steps=200"]),
                   "--out", tmp_path / "run")
    assert result.rc == 1, str(result)
    one_error_line(result, "diverged", "lower optim.lr")
    assert "RuntimeWarning" not in result.stderr and ".py:" not in result.stderr, str(result)
    said = warnings_of(result)
    assert len(said) == 1 and "floating-point" in said[0], str(result)
