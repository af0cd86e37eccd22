"""hessmpi report: the summary row of a hand-made metrics.h5, and damaged runs."""

from __future__ import annotations

import csv
import math
import os
import struct
import subprocess

import h5py
import numpy as np
import pytest

from hessmpi import config
from hessmpi.errors import UsageError
from hessmpi.metrics import COLUMNS, MetricsFile
from hessmpi.report import (
    ACC_TARGET_COLUMNS,
    HEADER,
    LOSS_TARGET_COLUMNS,
    header,
    report,
    summarize,
)
from hessmpi.rundir import LOCK, RunLock

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


def test_a_grown_batch_shows_where_it_ended(tmp_path):
    """optim.batch_test: the batch column reads FIRST->LAST per rank, LAST the last row's
    global batch over the 4 ranks rounded up; without the test the configured size alone."""
    cols = {**COLS, "batch": [128, 128, 300, 402]}
    run = make_run(tmp_path, "grown", cols, overrides=(
        "optim.lr=0.05", "train.batch_size=32", "optim.batch_test=inner_product",
        "optim.batch_theta=0.5"))
    s = summarize(run)
    assert s["batch"] == "32->101" and s["method"] == "sgd lr=0.05 mom=0.9 batch-test theta=0.5"
    assert summarize(make_run(tmp_path, "fixed", cols))["batch"] == 32


def test_summarize_running_run_without_rows(tmp_path):
    run = make_run(tmp_path, "empty", {}, status="running")
    RunLock(run).take()   # as the run's rank 0 holds it
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


def test_a_run_marked_running_that_no_process_holds_is_killed(tmp_path):
    """Killed by a signal it could not see (SIGKILL, a second Ctrl-C to mpiexec), a run
    stays marked running in its file; its lock tells it is gone."""
    run = make_run(tmp_path, "k", COLS, status="running")
    assert summarize(run)["status"] == "killed"          # no lock at all
    lock = RunLock(run).take()
    assert summarize(run)["status"] == "running"
    lock.release()
    child = subprocess.Popen(["true"])
    child.wait()
    RunLock(run).take()
    text = (run / LOCK).read_text().replace(f'"pid": {os.getpid()}', f'"pid": {child.pid}')
    (run / LOCK).write_text(text)                          # left by a process now gone
    assert summarize(run)["status"] == "killed"
    assert summarize(make_run(tmp_path, "f", COLS))["status"] == "finished"


def test_a_damaged_sealed_results_file_is_refused_by_name(tmp_path):
    run = tmp_path / "sealed"
    run.mkdir()
    m = MetricsFile(run / "metrics.h5", {"config": config.to_toml(config.load(None))})
    m.append([], status="finished")
    assert summarize(run)["status"] == "finished"
    data = bytearray((run / "metrics.h5").read_bytes())
    data[len(data) // 2] ^= 1
    (run / "metrics.h5").write_bytes(bytes(data))
    with pytest.raises(UsageError, match=f"{run / 'metrics.h5'} is damaged"):
        summarize(run)


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


# ----- key options, targets, runs being written, the plot ----------------------------------

@pytest.mark.parametrize("overrides, label", [
    (("optim.lr=0.05", "optim.momentum=0.5"), "sgd lr=0.05 mom=0.5"),
    (("optim.nesterov=true", "optim.weight_decay=0.001", "optim.schedule=cosine"),
     "sgd lr=0.1 mom=0.9 nesterov wd=0.001 cosine"),
    (("optim.name=secant", "optim.lr=0.05", "optim.memory=4", "optim.curvature=lsq",
      "optim.newton_lr=0.5"), "secant lr=0.05 mom=0.9 K=4 lsq probe-sgd a=0.5"),
    (("optim.name=secant", "optim.pairs=local"), "secant lr=0.1 mom=0.9 K=1 bfgs local a=0.2"),
    (("optim.name=secant", "optim.probe_every=4", "optim.pairs_per_rank=2",
      "optim.line_search=armijo"),
     "secant lr=0.1 mom=0.9 K=1 bfgs probe-sgd k=2 T=4 ls=armijo a=0.2"),
    (("optim.name=deflated", "optim.pairs_per_rank=3"),
     "deflated lr=0.1 mom=0.9 k=3 a=0.2"),
    (("optim.name=hessian_free", "optim.hf_damping=0.01", "optim.hf_precondition=true"),
     "hessian_free lr=0.1 lambda0=0.01 cg<=50 precond"),
    (("optim.name=entropy_sgd", "optim.entropy_steps=5"),
     "entropy_sgd lr=0.1 mom=0.9 L=5 gamma=0.03"),
    (("optim.name=adam", "optim.lr=0.001"), "adam lr=0.001 mom=0.9"),
    (("optim.name=secant", "optim.pairs=averaged", "optim.curvature=lbfgs"),
     "secant lr=0.1 mom=0.9 K=1 lbfgs averaged a=0.2"),
])
def test_method_names_the_key_options(tmp_path, overrides, label):
    assert summarize(make_run(tmp_path, "m", COLS, overrides=overrides))["method"] == label


def test_time_to_target(tmp_path):
    run = make_run(tmp_path, "a", COLS)
    s = summarize(run, target_loss=1.0, target_acc=0.82)
    assert set(s) == set(HEADER + LOSS_TARGET_COLUMNS + ACC_TARGET_COLUMNS)
    assert (s["to_loss_steps"], s["to_loss_s"]) == (20, 2.0)   # first row with loss <= 1.0
    assert (s["to_acc_steps"], s["to_acc_s"]) == (30, 3.0)     # first evaluation >= 0.82
    assert summarize(run, target_loss=0.75)["to_loss_steps"] == 20   # reached exactly
    never = summarize(run, target_loss=0.1, target_acc=0.99)
    for key in LOSS_TARGET_COLUMNS + ACC_TARGET_COLUMNS:
        assert math.isnan(never[key]), key
    assert set(summarize(run, target_acc=0.5)) == set(HEADER + ACC_TARGET_COLUMNS)


def test_report_with_targets_adds_columns_to_table_and_csv(tmp_path):
    a = make_run(tmp_path, "a", COLS)
    out = tmp_path / "t.csv"
    text = report([a], csv_path=out, target_loss=1.0, target_acc=0.99)
    head, row = text.splitlines()
    assert head.split() == list(header(1.0, 0.99))
    assert head.split()[-4:] == ["to_loss_steps", "to_loss_s", "to_acc_steps", "to_acc_s"]
    assert row.split()[-4:] == ["20", "2", "-", "-"]
    with open(out, newline="") as f:
        (record,) = list(csv.DictReader(f))
    assert record["to_loss_steps"] == "20" and record["to_acc_steps"] == "nan"


@pytest.mark.parametrize("loss, acc", [(-0.5, None), (math.inf, None), (None, 0.0),
                                       (None, 1.5), (None, 95.0)])
def test_targets_out_of_range_are_usage_errors(tmp_path, loss, acc):
    with pytest.raises(UsageError, match="--target"):
        report([make_run(tmp_path, "a", COLS)], target_loss=loss, target_acc=acc)


def test_run_caught_between_two_column_writes(tmp_path):
    # a reader may see a row in some columns and not yet in others: rows all columns have
    cols = {**COLS, "step": [10, 20, 30, 40, 50], "train_loss": [2.0, 0.75, NAN, 1.25, 0.1]}
    run = make_run(tmp_path, "mid-write", cols, status="running")
    RunLock(run).take()
    s = summarize(run)
    assert s["status"] == "running" and s["steps"] == 40 and s["final_loss"] == 1.25
    assert s["best_loss"] == 0.75


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_of_finished_running_and_empty_runs(tmp_path):
    runs = [make_run(tmp_path, "a", COLS),
            make_run(tmp_path, "b", {**COLS, "test_acc": [NAN] * 4}, status="stopped"),
            make_run(tmp_path, "empty", {}, status="running")]
    png = tmp_path / "p.png"
    text = report(runs, plot_path=png, target_loss=1.0, target_acc=0.8)
    assert len(text.splitlines()) == 4
    assert png_size(png) == (1760, 572) and png.stat().st_size > 10_000


def test_plot_labels_axes_and_runs(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [make_run(tmp_path, "a", COLS), make_run(tmp_path, "b", COLS, status="stopped")]
    seen = {}
    real_savefig = plt.Figure.savefig

    def keep(fig, *args, **kwargs):      # look at the figure as it is written, then write it
        seen["axes"] = [(ax.get_title(), ax.get_xlabel(), ax.get_ylabel(),
                         [line.get_label() for line in ax.get_lines()]) for ax in fig.axes]
        seen["legend"] = [t.get_text() for t in fig.legends[0].get_texts()]
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", keep)
    report(runs, plot_path=tmp_path / "p.png")
    assert png_size(tmp_path / "p.png") == (1760, 572)
    titles = [a[0] for a in seen["axes"]]
    assert titles == ["training loss against steps", "training loss against wall time",
                      "test accuracy"]
    assert [a[1] for a in seen["axes"]] == ["optimizer steps", "wall time (s)",
                                            "optimizer steps"]
    assert all(a[2] for a in seen["axes"])
    assert seen["legend"] == ["a: sgd lr=0.05 mom=0.5, 4 ranks",
                              "b: sgd lr=0.05 mom=0.5, 4 ranks (stopped)"]
    assert all(len(a[3]) == 2 for a in seen["axes"])       # one line per run in each panel


def test_plot_to_an_unwritable_place_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="cannot write"):
        report([make_run(tmp_path, "a", COLS)], plot_path=tmp_path / "no-dir" / "p.png")


def test_baseline_gives_ratios_to_its_final_loss(tmp_path):
    """The baseline's final training loss (1.0 at step 40, 8 s) is the target: the other
    run reaches it at step 20 (3 s), i.e. 0.5x the steps and 0.375x the wall time; a run
    that never reaches it gets '-'; a baseline not listed is added first."""
    base = make_run(tmp_path, "base", COLS | {"train_loss": [3.0, 2.0, 1.5, 1.0],
                                              "wall_time": [2.0, 4.0, 6.0, 8.0]})
    fast = make_run(tmp_path, "fast", COLS | {"train_loss": [2.0, 0.9, 0.5, 0.4],
                                              "wall_time": [1.5, 3.0, 4.5, 6.0]})
    slow = make_run(tmp_path, "slow", COLS | {"train_loss": [3.0, 2.5, 2.0, 1.5]})
    table = tmp_path / "table.csv"
    text = report([fast, slow], table, baseline=base)
    with open(table) as f:
        rows = {row["run"]: row for row in csv.DictReader(f)}
    assert list(rows) == [str(base), str(fast), str(slow)]
    assert float(rows[str(base)]["x_steps"]) == float(rows[str(base)]["x_wall"]) == 1.0
    assert float(rows[str(fast)]["x_steps"]) == 0.5
    assert float(rows[str(fast)]["x_wall"]) == 0.375
    assert math.isnan(float(rows[str(slow)]["x_steps"]))
    assert f"{fast} reached the training loss 1 of {base} in 0.50x its steps (20 against " \
        "40) and 0.38x its wall time" in text
    assert f"{slow} reached the training loss 1 of {base} not within its steps" in text


@pytest.mark.parametrize("name", config.SCHEMA["optim"]["name"].choices)
def test_every_method_has_a_label_of_its_own_options(name):
    """The label reads the typed options of the method, only those that apply to it (an
    option it does not have would raise)."""
    from hessmpi.report import method_label

    assert method_label(config.load(None, [f"optim.name={name}"])).startswith(f"{name} lr=")
