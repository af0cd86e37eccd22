"""``mpiexec -n 2 hessmpi train`` end to end: the results file, reproducibility, exit status
and messages of bad input and of failed runs."""

from __future__ import annotations

import re
import shutil
import sys
import textwrap
import tomllib
from datetime import datetime

import h5py
import numpy as np
import pytest
from clirun import ABORTED, HESSMPI, mpiexec, run, set_args, train

import hessmpi
from hessmpi import config
from hessmpi.metrics import COLUMNS, read_metrics

pytestmark = pytest.mark.timeout(120)

LOGGED = [5, 10, 15, 20, 23]       # log_every 5 of 23 steps, and the last step
EVALUATED = [10, 20, 23]           # eval_every 10, and the last step
N_PARAMS = 8 * 8 + 8 + 8 * 3 + 3   # mlp 8 -> 8 -> 3


def single_error(result, *needles: str) -> None:
    """Exactly one 'hessmpi: error:' line (not one per rank), naming every needle, and no
    traceback anywhere."""
    errors = [line for line in result.stderr.splitlines() if "hessmpi: error" in line]
    assert len(errors) == 1, f"expected one error message, got {len(errors)}\n{result}"
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    assert "Traceback" not in result.stderr + result.stdout, str(result)


# ----- a finished run ---------------------------------------------------------------------

def test_metrics_file_is_complete(finished_run, run_config):
    out, result = finished_run
    attrs, cols = read_metrics(out / "metrics.h5")

    with h5py.File(out / "metrics.h5", "r") as f:  # plain h5py, as a notebook would
        assert set(f["metrics"]) == set(COLUMNS)
        for name, dtype in COLUMNS.items():
            d = f["metrics"][name]
            assert d.ndim == 1 and d.maxshape == (None,), name
            assert d.dtype == np.dtype(dtype), name
    lengths = {name: len(col) for name, col in cols.items()}
    assert set(lengths.values()) == {len(LOGGED)}, lengths

    for key in ("hessmpi_version", "config", "mpi_size", "mpi_library", "backend", "device",
                "started", "status"):
        assert key in attrs, key
    assert attrs["hessmpi_version"] == hessmpi.__version__
    assert attrs["mpi_size"] == 2
    assert attrs["status"] == "finished"
    assert attrs["backend"] == "numpy" and attrs["device"] == "cpu"
    assert attrs["mpi_library"].strip()
    assert datetime.fromisoformat(attrs["started"]).tzinfo is not None
    cfg_file, sets = run_config
    tomllib.loads(attrs["config"])  # TOML text
    assert config.from_toml(attrs["config"]) == config.load(cfg_file, sets)

    np.testing.assert_array_equal(cols["step"], LOGGED)
    np.testing.assert_array_equal(cols["grad_evals"], cols["step"])  # SGD: one per step
    for i, step in enumerate(LOGGED):
        if step in EVALUATED:
            assert np.isfinite(cols["test_loss"][i]) and 0 <= cols["test_acc"][i] <= 1, step
        else:
            assert np.isnan(cols["test_loss"][i]) and np.isnan(cols["test_acc"][i]), step
    # 100 rows per rank, batches of 8: 12 batches an epoch, 4 rows skipped
    epochs = [(s - 1) // 12 + ((s - 1) % 12 + 1) * 8 / 100 for s in LOGGED]
    np.testing.assert_allclose(cols["epoch"], epochs, rtol=1e-12)
    # one Allreduce per step of the float32 gradient and a few scalars (loss, flags)
    assert ((cols["bytes_sent"] > N_PARAMS * 4) & (cols["bytes_sent"] <= (N_PARAMS + 8) * 4)).all()
    for name in ("train_loss", "grad_norm", "step_norm", "wall_time", "t_grad", "t_comm",
                 "t_solve"):
        assert np.isfinite(cols[name]).all(), name
    for name in ("train_loss", "grad_norm", "step_norm", "t_grad"):
        assert (cols[name] > 0).all(), name
    assert (np.diff(cols["wall_time"]) >= 0).all()
    assert (cols["fallback"] == 0).all() and (cols["rank_kept"] == 0).all()

    # the closing line, printed once, agrees with the file
    finished = [ln for ln in result.stdout.splitlines() if ln.startswith("hessmpi: finished")]
    assert len(finished) == 1, str(result)
    assert "finished 23 steps" in finished[0]
    assert f"test accuracy {cols['test_acc'][-1]:.4f}" in finished[0]
    assert f"train loss {cols['train_loss'][-1]:.4g}" in finished[0]


def test_same_run_twice_is_bitwise_identical(finished_run, run_config, workdir):
    out, _ = finished_run
    cfg_file, sets = run_config
    again = workdir / "again"
    result = train("--config", cfg_file, *set_args(sets), "--out", again)
    assert result.rc == 0, str(result)
    _, first = read_metrics(out / "metrics.h5")
    _, second = read_metrics(again / "metrics.h5")
    for name in ("train_loss", "grad_norm", "step_norm", "test_loss", "test_acc"):
        assert first[name].tobytes() == second[name].tobytes(), name


def test_existing_results_are_refused_and_left_untouched(finished_run, tmp_path, run_config):
    out = tmp_path / "earlier"
    out.mkdir()
    shutil.copy(finished_run[0] / "metrics.h5", out / "metrics.h5")
    before = (out / "metrics.h5").read_bytes()
    mtime = (out / "metrics.h5").stat().st_mtime_ns
    cfg_file, sets = run_config
    result = train("--config", cfg_file, *set_args(sets), "--out", out)
    assert result.rc == 2, str(result)
    single_error(result, str(out), "already holds a run")
    assert (out / "metrics.h5").read_bytes() == before
    assert (out / "metrics.h5").stat().st_mtime_ns == mtime


# ----- bad input: exit 2, one message, no traceback, under mpiexec -n 2 -------------------

BAD = {
    "unknown key in file": ("[optim]\nlrate = 0.1\n", [], ["optim.lrate", "lr"]),
    "unknown section in file": ("[optimiser]\nlr = 0.1\n", [], ["[optimiser]", "optim"]),
    "unknown key": (None, ["train.stepz=3"], ["train.stepz", "steps"]),
    "unknown section": (None, ["trian.steps=3"], ["[trian]"]),
    "bad number": (None, ["optim.lr=-1"], ["optim.lr", "-1", "> 0"]),
    "bad type": (None, ["train.steps=many"], ["train.steps", "integer"]),
    "bad choice": (None, ["model.name=resnet"], ["model.name", "resnet", "'softmax'", "'mlp'"]),
    "bad list": (None, ["model.hidden=[8, -1]"], ["model.hidden"]),
    "malformed --set, no =": (None, ["optim.lr"], ["optim.lr", "section.key=value"]),
    "malformed --set, no section": (None, ["lr=0.1"], ["lr=0.1", "section.key=value"]),
    "invalid TOML": ("[optim\nlr = \n", [], ["not valid TOML"]),
    "batch larger than shard": (None, ["train.batch_size=101"], ["train.batch_size = 101"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_configuration_exits_2_with_one_message(case, tmp_path, dataset):
    text, sets, needles = BAD[case]
    args = ["--set", f"data.path={dataset}", *set_args(sets), "--out", tmp_path / "out"]
    if text is not None:
        (tmp_path / "bad.toml").write_text(text)
        args += ["--config", tmp_path / "bad.toml"]
        if "TOML" in case:
            needles = [*needles, str(tmp_path / "bad.toml")]
    result = train(*args)
    assert result.rc == 2, str(result)
    single_error(result, *needles)
    assert not (tmp_path / "out" / "metrics.h5").exists()


def test_missing_config_file_exits_2(tmp_path):
    missing = tmp_path / "nowhere.toml"
    result = train("--config", missing, "--out", tmp_path / "out")
    assert result.rc == 2, str(result)
    single_error(result, str(missing))


def test_missing_data_file_exits_2(tmp_path):
    missing = tmp_path / "no-such-data.h5"
    result = train("--set", f"data.path={missing}", "--out", tmp_path / "out")
    assert result.rc == 2, str(result)
    single_error(result, str(missing), "does not exist")


def test_data_file_that_is_not_a_dataset_exits_2(tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"this is not HDF5\n" * 10)
    result = train("--set", f"data.path={junk}", "--out", tmp_path / "out")
    assert result.rc == 2, str(result)
    single_error(result, str(junk))


def test_out_path_that_is_a_file_exits_2(tmp_path, dataset):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way\n")
    result = train("--set", f"data.path={dataset}", "--out", blocker)
    assert result.rc == 2, str(result)
    single_error(result, str(blocker))
    assert blocker.read_text() == "in the way\n"


def test_unknown_option_under_mpi_exits_2_with_one_message(tmp_path):
    result = train("--stepz", "3", "--out", tmp_path / "out")
    assert result.rc == 2, str(result)
    single_error(result, "--stepz")


# ----- runs that fail: exit 1, every rank ends, the cause named ---------------------------

def test_non_finite_loss_stops_the_run(tmp_path, dataset):
    out = tmp_path / "diverged"
    result = train("--set", f"data.path={dataset}", "--set", "model.name=mlp",
                   "--set", "model.hidden=[16]", "--set", "optim.lr=1e6",
                   "--set", "train.max_loss_ratio=0",     # let it reach a non-finite loss
                   "--set", "train.steps=200", "--set", "train.log_every=1",
                   "--set", "train.batch_size=16", "--out", out)
    assert result.rc == 1, str(result)
    single_error(result, "loss")
    match = re.search(r"training loss is (nan|inf|-inf) at step (\d+)", result.stderr)
    assert match, str(result)
    failed_at = int(match.group(2))
    assert 1 < failed_at < 200
    attrs, cols = read_metrics(out / "metrics.h5")
    assert attrs["status"] == "failed"
    assert "training loss" in attrs["failure"]
    # every step before the bad one was logged, with a finite loss
    np.testing.assert_array_equal(cols["step"], np.arange(1, failed_at))
    assert np.isfinite(cols["train_loss"]).all()


DRIVER = """\
import sys

from mpi4py import MPI

import hessmpi.cli
from hessmpi.models.dense import DenseNet

FAILING_RANK = {rank}
original = DenseNet.loss_grad
calls = [0]


def loss_grad(self, *args, **kwargs):
    calls[0] += 1
    if MPI.COMM_WORLD.rank == FAILING_RANK and calls[0] == 3:
        raise RuntimeError("injected failure in loss_grad")
    return original(self, *args, **kwargs)


DenseNet.loss_grad = loss_grad
sys.exit(hessmpi.cli.main(sys.argv[1:]))
"""


def failing_run(tmp_path, dataset, rank: int):
    """A long run whose ``rank`` raises in its 3rd gradient evaluation."""
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER.format(rank=rank)))
    out = tmp_path / "out"
    result = run([*mpiexec(2), sys.executable, driver, "train", "--set",
                  f"data.path={dataset}", "--set", "train.steps=1000000",
                  "--set", "train.log_every=1", "--out", out], timeout=60)
    return result, out


def test_one_rank_raising_ends_every_rank(tmp_path, dataset):
    result, _ = failing_run(tmp_path, dataset, rank=1)
    assert result.rc in ABORTED, str(result)
    assert result.elapsed < 30, str(result)
    single_error(result, "rank 1", "RuntimeError", "injected failure in loss_grad")


def test_rank_0_raising_marks_the_results_failed(tmp_path, dataset):
    result, out = failing_run(tmp_path, dataset, rank=0)
    assert result.rc in ABORTED and result.elapsed < 30, str(result)
    single_error(result, "rank 0", "injected failure in loss_grad")
    attrs, cols = read_metrics(out / "metrics.h5")
    np.testing.assert_array_equal(cols["step"], [1, 2])
    assert attrs["status"] == "failed"


def test_python_dash_m_is_the_same_entry_point():
    result = run([sys.executable, "-m", "hessmpi", "--version"])
    direct = run([HESSMPI, "--version"])
    assert result.rc == direct.rc == 0
    assert result.stdout == direct.stdout == f"hessmpi {hessmpi.__version__}\n"
