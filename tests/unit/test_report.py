"""hessmpi report: the summary row of a hand-made metrics.h5, and damaged runs."""

from __future__ import annotations

import csv
import math

import h5py
import numpy as np
import pytest

from hessmpi import config
from hessmpi.errors import UsageError
from hessmpi.metrics import COLUMNS
from hessmpi.report import HEADER, report, summarize

NAN = math.nan


def make_run(tmp_path, name, columns, *, overrides=("optim.lr=0.05", "optim.momentum=0.5",
                                                    "train.batch_size=32"), **attrs):
    """A run directory with a metrics.h5 written by plain h5py, independent of MetricsFile."""
    run = tmp_path / name
    run.mkdir()
    n = len(next(iter(columns.values()))) if columns else 0
    with h5py.File(run / "metrics.h5", "w") as f:
        f.attrs["config"] = config.to_toml(config.load(None, list(overrides)))
        f.attrs["mpi_size"] = 4
        f.attrs["backend"] = "numpy"
        f.attrs["status"] = "finished"
        f.attrs.update(attrs)
        for col, dtype in COLUMNS.items():
            data = columns.get(col, np.zeros(n))
            f.create_dataset(f"metrics/{col}", data=np.asarray(data, dtype=dtype),
                             maxshape=(None,))
    return run


COLS = {
    "step": [10, 20, 30, 40],
    "epoch": [0.1, 0.2, 0.3, 0.4],
    "wall_time": [1.0, 2.0, 3.0, 4.5],
    "train_loss": [2.0, 0.75, NAN, 1.25],
    "grad_evals": [10, 20, 30, 40],
    "fallback": [0, 1, 1, 0],
    "t_grad": [0.001, 0.003, 0.002, 0.010],
    "t_comm": [0.004, 0.004, 0.004, 0.004],
    "t_solve": [0.0, 0.0, 0.001, 0.001],
    "test_acc": [NAN, 0.80, 0.85, NAN],
    "test_loss": [NAN, 0.5, 0.4, NAN],
}


def test_summarize_hand_made_run(tmp_path):
    run = make_run(tmp_path, "a", COLS)
    s = summarize(run)
    assert set(s) == set(HEADER)
    assert s["run"] == str(run)
    assert s["method"] == "sgd lr=0.05 mom=0.5"
    assert s["ranks"] == 4 and s["batch"] == 32
    assert s["backend"] == "numpy" and s["status"] == "finished"
    assert s["steps"] == 40 and s["grad_evals"] == 40
    assert s["final_loss"] == 1.25
    assert s["best_loss"] == 0.75  # NaN rows ignored
    assert s["test_acc"] == pytest.approx(0.85)  # the last finite value
    assert s["wall_s"] == 4.5
    assert s["fallback_rate"] == pytest.approx(0.5)
    assert s["t_grad_ms"] == pytest.approx(2.5)  # median of 1, 3, 2, 10 ms
    assert s["t_comm_ms"] == pytest.approx(4.0)
    assert s["t_solve_ms"] == pytest.approx(0.5)


def test_summarize_running_run_without_rows(tmp_path):
    run = make_run(tmp_path, "empty", {}, status="running")
    s = summarize(run)
    assert s["status"] == "running" and s["steps"] == 0 and s["grad_evals"] == 0
    for key in ("final_loss", "best_loss", "test_acc", "wall_s", "fallback_rate", "t_grad_ms"):
        assert math.isnan(s[key]), key


def test_summarize_never_evaluated(tmp_path):
    cols = {**COLS, "test_acc": [NAN] * 4, "fallback": [0, 0, 0, 0]}
    s = summarize(make_run(tmp_path, "noeval", cols))
    assert math.isnan(s["test_acc"]) and s["fallback_rate"] == 0.0


def test_report_table_and_csv(tmp_path):
    a = make_run(tmp_path, "a", COLS)
    b = make_run(tmp_path, "b", {**COLS, "train_loss": [3.0, 2.0, 1.0, 0.5]},
                 overrides=("optim.lr=0.2", "optim.momentum=0"))
    out = tmp_path / "table.csv"
    text = report([a, str(b)], csv_path=out)
    lines = text.splitlines()
    assert len(lines) == 3
    assert lines[0].split() == list(HEADER)
    assert str(a) in lines[1] and str(b) in lines[2]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == [str(a), str(b)]
    assert rows[1]["method"] == "sgd lr=0.2 mom=0"
    assert float(rows[0]["best_loss"]) == 0.75 and float(rows[1]["final_loss"]) == 0.5


def expect_usage_error(run):
    with pytest.raises(UsageError) as exc:
        summarize(run)
    assert str(run) in str(exc.value)


def test_missing_run_directory(tmp_path):
    expect_usage_error(tmp_path / "no-such-run")


def test_directory_without_metrics(tmp_path):
    run = tmp_path / "empty-dir"
    run.mkdir()
    expect_usage_error(run)


def test_non_hdf5_metrics(tmp_path):
    run = tmp_path / "garbage"
    run.mkdir()
    (run / "metrics.h5").write_bytes(b"\x89HDF not really\n" * 64)
    expect_usage_error(run)


@pytest.mark.parametrize("keep", [0.0, 0.01, 0.5, 0.99])
def test_truncated_metrics(tmp_path, keep):
    run = make_run(tmp_path, "cut", COLS)
    data = (run / "metrics.h5").read_bytes()
    (run / "metrics.h5").write_bytes(data[:int(len(data) * keep)])
    expect_usage_error(run)


def test_hdf5_without_hessmpi_layout(tmp_path):
    run = tmp_path / "foreign"
    run.mkdir()
    with h5py.File(run / "metrics.h5", "w") as f:
        f["data"] = np.arange(3)
    expect_usage_error(run)


def test_metrics_without_config_attribute(tmp_path):
    run = make_run(tmp_path, "noconf", COLS)
    with h5py.File(run / "metrics.h5", "a") as f:
        del f.attrs["config"]
    expect_usage_error(run)


def test_metrics_with_invalid_config(tmp_path):
    run = make_run(tmp_path, "badconf", COLS)
    with h5py.File(run / "metrics.h5", "a") as f:
        f.attrs["config"] = "[optim]\nlr = -1\n"
    expect_usage_error(run)


def test_metrics_with_missing_column(tmp_path):
    run = make_run(tmp_path, "nocol", COLS)
    with h5py.File(run / "metrics.h5", "a") as f:
        del f["metrics/t_solve"]
    expect_usage_error(run)
