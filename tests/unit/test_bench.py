"""hessmpi.bench, the benchmarks' harness.

Held to independent quantities: evaluation schedules, tuner choices, placements and widening
orders written out by hand; the full training objective recomputed in float64 by a plain
NumPy softmax; runs that differ only in their test split; hessmpi's own Secant and SGD steps;
dataset splits of hand-made IDX files; an optimum found by SciPy's L-BFGS; real mpiexec.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import struct
import sys

import numpy as np
import pytest
from mpi4py import MPI

from hessmpi import config, importers
from hessmpi.bench import datasets, drive, launch, split, tables, tune
from hessmpi.data import write_dataset
from hessmpi.optim import SGD, Secant
from hessmpi.trainer import Training


# ----- helpers -------------------------------------------------------------------------------
def record(hit: float | None, final: float = 0.5, status: str = "budget") -> dict:
    """A run record whose F first falls to 0.1 at step ``hit`` (never if None)."""
    curve = [[0, 0.0, 0, 0.0, 1.0]]
    if hit is not None:
        curve.append([hit, 2.0 * hit, 0, 0.0, 0.1])
    curve.append([1000, 2000.0, 0, 0.0, final])
    return dict(curve=curve, test_curve=None, status=status)


def grid(results: dict) -> dict:
    """points of the tuner from {(lr, memory) or lr: [hit per seed]}."""
    out = {}
    for where, hits in results.items():
        point = {"lr": where[0], "memory": where[1]} if isinstance(where, tuple) else {
            "lr": where}
        out[tune.key(point)] = dict(point=point, records=[record(h) for h in hits])
    return out


@pytest.fixture(scope="module")
def solo():
    comm, backend = launch.context(threads=1, world=MPI.COMM_SELF)
    return comm, backend


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "syn.h5"
    train, test, attrs = importers.synthetic(n_train=300, n_test=80, features=6, classes=3)
    write_dataset(path, train, test, **attrs)
    return path


def training(path, solo, lr=0.5, name="sgd", batch=0, seed=0, **optim):
    comm, backend = solo
    cfg = config.from_dict({"data": {"path": str(path)}, "model": {"name": "softmax"},
                            "optim": {"name": name, "lr": lr, **optim},
                            "train": {"batch_size": batch, "seed": seed},
                            "backend": {"device": "cpu", "threads": 1}})
    return Training(cfg, comm, backend, shards=drive.shards(path, comm))


# ----- the evaluation schedule and the run loop ------------------------------------------------
def test_eval_interval_is_base_for_per_evaluations_then_doubles():
    assert [drive.eval_interval(d, 5) for d in (0, 1, 99, 100, 199, 200, 399, 400)] == \
        [5, 5, 5, 10, 10, 20, 20, 40]
    steps, done = [], 0
    while done < 300:
        done += drive.eval_interval(done, 5)
        steps.append(done)
    assert steps == [*range(5, 101, 5), *range(110, 201, 10), *range(220, 301, 20)]
    assert drive.eval_interval(0, 2, per=40) == 2 and drive.eval_interval(80, 2, per=40) == 4


def softmax_f(path, theta, l2=1e-4) -> float:
    """F over every training row, float64, written out for softmax regression."""
    import h5py

    with h5py.File(path) as f:
        x, y = f["train/x"][()].astype(np.float64), f["train/y"][()]
    w = np.asarray(theta, dtype=np.float64)
    d, c = x.shape[1], len(w) // (x.shape[1] + 1)
    z = x @ w[:d * c].reshape(d, c) + w[d * c:]
    z -= z.max(axis=1, keepdims=True)
    ce = np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]
    return float(ce.mean() + 0.5 * l2 * w @ w)


def test_drive_reaches_a_target_with_the_full_objective_on_its_curve(data, solo):
    tr = training(data, solo)
    f0 = softmax_f(data, tr.theta)
    rec = drive.drive(tr, budget=500, train_targets={"t": 0.98 * f0}, with_test=True)
    assert rec["status"] == "reached"
    assert rec["curve"][0][4] == pytest.approx(f0, rel=1e-6)
    assert rec["curve"][-1][4] == pytest.approx(softmax_f(data, tr.theta), rel=1e-6)
    assert rec["curve"][-1][4] <= 0.98 * f0 < rec["curve"][-2][4]
    assert [row[0] for row in rec["curve"]] == [0, *range(5, rec["steps"] + 1, 5)]
    hit = drive.first_hit(rec, 0.98 * f0)
    assert hit["steps"] == rec["steps"] and hit["grad_evals"] == rec["steps"]
    assert hit["work"] == rec["steps"]                # SGD: one gradient a step, nothing else
    assert drive.first_hit(rec, math.inf)["work"] == 0.0      # F(theta_0), before any step
    assert len(rec["test_curve"]) == len(rec["curve"]) and 0 <= rec["test_curve"][-1][4] <= 1


def test_drive_budget_race_deadline_and_divergence(data, solo):
    never = {"t": 0.0}
    rec = drive.drive(training(data, solo), budget=23, train_targets=never)
    assert (rec["status"], rec["steps"], rec["curve"][-1][0]) == ("budget", 23, 23)
    rec = drive.drive(training(data, solo), budget=100, train_targets=never, limits={"t": 12})
    assert (rec["status"], rec["steps"]) == ("raced", 15)          # evaluations at 5, 10, 15
    rec = drive.drive(training(data, solo), budget=100, train_targets=never, deadline=0.0)
    assert (rec["status"], rec["steps"]) == ("deadline", 5)
    rec = drive.drive(training(data, solo, lr=1e6), budget=100)
    assert rec["status"] == "diverged" and rec["steps"] < 100
    assert drive.final_value(rec) == math.inf


def test_drive_counts_a_budget_of_gradient_evaluations(data, solo):
    rec = drive.drive(training(data, solo, name="secant"), budget=20, unit="grad_evals")
    assert (rec["steps"], rec["grad_evals"]) == (10, 20.0)         # a probe step costs 2


def test_tuning_never_reads_the_test_split(tmp_path, solo):
    train, test, attrs = importers.synthetic(n_train=300, n_test=80, features=6, classes=3)
    other = (np.random.default_rng(5).random(test[0].shape, dtype=np.float32),
             np.roll(test[1], 7))
    paths = [tmp_path / "a.h5", tmp_path / "b.h5"]
    write_dataset(paths[0], train, test, **attrs)
    write_dataset(paths[1], train, other, **attrs)
    target = 0.7 * softmax_f(paths[0], np.zeros(21))

    def tuned(path):
        return tune.tune(lambda p, pts: [drive.drive(
            training(path, solo, lr=p["lr"]), budget=200, train_targets={"t": target},
            with_test=True)], [{"lr": 0.5}, {"lr": 1.0}], {"t": tune.to_target(target)},
            max_points=6)

    def curves(res, which):       # the wall-clock column left out
        return [[row[:3] + row[4:] for row in p["records"][0][which]]
                for p in res["points"].values()]

    a, b = tuned(paths[0]), tuned(paths[1])
    assert a["chosen"] == b["chosen"] and a["placement"] == b["placement"]
    assert len(a["points"]) > 2                      # it widened
    assert curves(a, "curve") == curves(b, "curve")
    assert curves(a, "test_curve") != curves(b, "test_curve")


# ----- the tuner ---------------------------------------------------------------------------------
def test_best_point_by_median_over_seeds_ties_to_the_smaller_rate():
    points = grid({0.5: [100, 300, None], 1.0: [200, 200, 200], 2.0: [200, 200, 200]})
    assert tune.best(points, tune.to_target(0.2)) == '{"lr": 1.0}'
    assert tune.best(points, tune.to_target(0.2, seeds=1)) == '{"lr": 0.5}'
    assert tune.to_target(0.2, "grad_evals")(points['{"lr": 0.5}']["records"]) == (600.0,
                                                                                   math.inf)
    assert tune.best(grid({1.0: [None]}), tune.to_target(0.2)) is None
    assert tune.best(grid({1.0: [None], 2.0: [None]}), tune.final) == '{"lr": 1.0}'


def test_placement_interior_bound_edge_fixed():
    points = grid({(0.5, 10): [300], (1.0, 10): [100], (2.0, 10): [300], (1.0, 5): [200],
                   (1.0, 40): [400], (1.0, 20): [150], (4.0, 40): [500]})
    assert tune.placement(points, tune.key({"lr": 1.0, "memory": 10})) == {
        "lr": "interior", "memory": "interior"}
    assert tune.placement(points, tune.key({"lr": 1.0, "memory": 40})) == {
        "lr": "EDGE", "memory": "bound"}            # 40: the lattice's end, 20 below it
    assert tune.placement(points, tune.key({"lr": 2.0, "memory": 10})) == {
        "lr": "EDGE", "memory": "EDGE"}
    lone = grid({(1.0, 10): [100], (2.0, 10): [50], (4.0, 10): [80]})
    assert tune.placement(lone, tune.key({"lr": 2.0, "memory": 10}), widen_axes=False) == {
        "lr": "interior", "memory": "fixed"}
    k = tune.key({"lr": 2.0, "memory": 10})
    assert tune.outward(points, k, "lr") == [{"lr": 4.0, "memory": 10}]
    assert tune.outward(points, k, "memory") == [{"lr": 2.0, "memory": 5},
                                                 {"lr": 2.0, "memory": 20}]
    assert tune.outward(points, tune.key({"lr": 1.0, "memory": 40}), "memory") == []
    assert tune.outward(lone, k, "memory", widen_axes=False) == []


def steps_at(lr: float) -> float:
    """A made-up response: fewest steps at lr 0.25, 50 more per factor 2 away."""
    return 100 + 50 * abs(math.log2(lr / 0.25))


def test_tune_widens_until_the_best_is_interior():
    ran = []

    def run(point, points):
        ran.append(point["lr"])
        return [record(steps_at(point["lr"]))]

    res = tune.tune(run, [{"lr": 2.0}, {"lr": 1.0}, {"lr": 4.0}],
                    {"t": tune.to_target(0.2)}, max_points=10)
    assert ran == [2.0, 1.0, 4.0, 0.5, 0.25, 0.125]
    assert res["points"][res["chosen"]["t"]]["point"] == {"lr": 0.25}
    assert res["placement"] == {"t": {"lr": "interior"}} and res["notes"] == []
    ran.clear()
    res = tune.tune(run, [{"lr": 2.0}, {"lr": 1.0}, {"lr": 4.0}],
                    {"t": tune.to_target(0.2)}, max_points=4)
    assert ran == [2.0, 1.0, 4.0, 0.5]
    assert res["placement"] == {"t": {"lr": "EDGE"}} and "4 points" in res["notes"][0]


def test_tune_widens_once_toward_the_lowest_final_f_when_nothing_reaches_it():
    ran = []

    def run(point, points):
        ran.append(point["lr"])
        return [record(None, final=1.0 / point["lr"])]

    res = tune.tune(run, [{"lr": 1.0}, {"lr": 2.0}], {"t": tune.to_target(0.2)},
                    max_points=10)
    assert ran == [1.0, 2.0, 4.0] and res["chosen"] == {}
    assert "widens once" in res["notes"][0]


def test_tune_lowers_the_learning_rate_while_every_point_diverges():
    ran = []

    def run(point, points):        # diverges (F inf) above lr 0.01, reaches below it
        ran.append(point["lr"])
        return [record(100, final=0.05) if point["lr"] <= 0.01 else
                record(None, final=math.inf, status="diverged")]

    res = tune.tune(run, [{"lr": 0.1}, {"lr": 0.05}, {"lr": 0.2}], {"t": tune.to_target(0.2)},
                    max_points=10)
    assert ran[:6] == [0.1, 0.05, 0.2, 0.025, 0.0125, 0.00625]
    assert res["points"][res["chosen"]["t"]]["point"]["lr"] <= 0.01
    assert sum("every point diverged" in n for n in res["notes"]) == 1


def test_tune_stops_at_the_deadline_and_upper_median():
    res = tune.tune(lambda p, pts: [record(10)], [{"lr": 1.0}, {"lr": 2.0}],
                    {"t": tune.to_target(0.2)}, max_points=10, late=lambda: True)
    assert res["points"] == {} and "deadline" in res["notes"][0]
    assert tune.upper_median([3.0, 1.0, 2.0, 4.0]) == 3.0 and tune.upper_median([2.0]) == 2.0


# ----- the split steps equal the optimizers' own ------------------------------------------------
def test_split_steps_equal_secant_and_sgd_steps(data, solo):
    comm, _ = solo
    opts = config.options(config.from_dict({"optim": {"name": "secant", "memory": 3,
                                                      "lr": 0.3}}), "optim")
    tr = training(data, solo, batch=32)
    ref, theta = Secant(tr.theta, tr.objective, opts, seed=0), tr.theta.copy()
    mine = split.SplitSecant(theta, tr.objective, opts, seed=0)
    for step in range(6):
        tr.objective.next_batch()
        mine.step(theta, tr.objective, 0.3)
        ref.step(tr.theta, tr.objective, 0.3)
        assert np.array_equal(theta, tr.theta), step
    sgd_ref = SGD(tr.theta, momentum=0.9, weight_decay=0.0, nesterov=False)
    sgd, theta = SGD(tr.theta, momentum=0.9, weight_decay=0.0, nesterov=False), tr.theta.copy()
    for _ in range(3):
        parts = split.sgd_step(theta, tr.objective, sgd, 0.3)
        sgd_ref.step(tr.theta, tr.objective, 0.3)    # the same batch again
        assert np.array_equal(theta, tr.theta)
    assert set(parts) == {"batch", "grad", "allreduce", "average", "update"}


# ----- launching ---------------------------------------------------------------------------------
def test_mpiexec_command_env_beside_python_then_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HESSMPI_MPIEXEC", "srun --mpi=pmi2 -x 'a b'")
    assert launch.mpiexec_command() == ["srun", "--mpi=pmi2", "-x", "a b"]
    monkeypatch.setenv("HESSMPI_MPIEXEC", "  ")
    venv, other = tmp_path / "venv", tmp_path / "bin"
    venv.mkdir()
    other.mkdir()
    monkeypatch.setattr(sys, "executable", str(venv / "python"))
    (other / "mpiexec").write_text("#!/bin/sh\n")
    (other / "mpiexec").chmod(0o755)
    monkeypatch.setenv("PATH", str(other))
    assert launch.mpiexec_command() == [str(other / "mpiexec")]
    (venv / "mpiexec").write_text("")
    assert launch.mpiexec_command() == [str(venv / "mpiexec")]


def test_oversubscription_env(monkeypatch):
    monkeypatch.delenv(launch.HEAVY_YIELD, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert launch.oversubscription_env(2) == {}
    assert launch.oversubscription_env(3) == {launch.HEAVY_YIELD: "1"}
    monkeypatch.setenv(launch.HEAVY_YIELD, "0")
    assert launch.oversubscription_env(3) == {}


def test_a_worker_under_mpiexec_returns_rank_zeros_result(tmp_path):
    script = tmp_path / "echo_worker.py"
    script.write_text(
        "import sys\nfrom hessmpi.bench import launch\n"
        "def worker(spec):\n"
        "    comm, backend = launch.context(threads=1)\n"
        "    return dict(spec, size=comm.size, ranks=comm.allgather(comm.rank),\n"
        "                threads=backend.threads)\n"
        "launch.serve(worker, sys.argv[2:])\n")
    result = launch.launch(script, {"x": [1, 2]}, 2, timeout=60)
    assert result == {"x": [1, 2], "size": 2, "ranks": [0, 1], "threads": 1}
    bad = tmp_path / "fail.py"
    bad.write_text("raise SystemExit(3)\n")
    with pytest.raises(SystemExit, match="exit"):
        launch.launch(bad, {}, 1, timeout=60)


# ----- datasets and F* ---------------------------------------------------------------------------
def write_idx(path, array) -> None:
    magic = 0x803 if array.ndim == 3 else 0x801
    header = struct.pack(">II", magic, len(array)) + (
        struct.pack(">II", *array.shape[1:]) if array.ndim == 3 else b"")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_datasets_from_hand_made_idx_files(tmp_path, monkeypatch):
    monkeypatch.delenv("HESSMPI_SHARED_DATA", raising=False)
    root, shared = tmp_path / "repo", tmp_path / "shared" / "data"
    with pytest.raises(SystemExit, match="t10k-images-idx3-ubyte.gz"):
        datasets.dataset("mnist-t10k", root)
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (10000, 2, 2)), rng.integers(0, 10, 10000)
    write_idx(shared / "mnist-t10k" / "t10k-images-idx3-ubyte.gz", images)
    write_idx(shared / "mnist-t10k" / "t10k-labels-idx1-ubyte.gz", labels)
    ftrain, flabels = rng.integers(0, 256, (8500, 2, 2)), rng.integers(0, 10, 8500)
    ftest, ftlabels = rng.integers(0, 256, (30, 2, 2)), rng.integers(0, 10, 30)
    for name, a in (("train-images-idx3-ubyte.gz", ftrain), ("train-labels-idx1-ubyte.gz",
                                                             flabels),
                    ("t10k-images-idx3-ubyte.gz", ftest), ("t10k-labels-idx1-ubyte.gz",
                                                           ftlabels)):
        write_idx(shared / "fashion-mnist" / name, a)
    import h5py

    def read(name):
        with h5py.File(datasets.dataset(name, root)) as f:
            return f["train/x"][()], f["train/y"][()], f["test/x"][()], f["test/y"][()]

    x, y, xt, yt = read("mnist-t10k")
    assert (len(y), len(yt)) == (8000, 2000)
    assert np.array_equal(np.rint(x * 255), images[:8000].reshape(8000, 4))
    assert np.array_equal(yt, labels[8000:])
    x, y, xt, yt = read("fashion-mnist")
    assert (len(y), len(yt)) == (8500, 30) and np.array_equal(y, flabels)
    x8, y8, xt8, yt8 = read("fashion-mnist-8k")
    assert np.array_equal(x8, x[:8000]) and np.array_equal(y8, y[:8000])
    assert np.array_equal(xt8, xt) and np.array_equal(yt8, ftlabels)
    assert (root / "data" / "fashion-mnist-8k.h5").is_file()


def test_softmax_optimum_against_scipy_and_its_cache(tmp_path, data):
    import h5py
    from scipy.optimize import minimize

    with h5py.File(data) as f:
        x, y = f["train/x"][:200].astype(np.float64), f["train/y"][:200]
    l2, d, c = 1e-2, x.shape[1], 3

    def fg(w):
        z = x @ w[:d * c].reshape(d, c) + w[d * c:]
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        f = -np.log(p[np.arange(len(y)), y]).mean() + 0.5 * l2 * w @ w
        p[np.arange(len(y)), y] -= 1
        g = np.concatenate([(x.T @ p).ravel(), p.sum(0)]) / len(y) + l2 * w
        return f, g

    ref = minimize(fg, np.zeros(d * c + c), jac=True, method="L-BFGS-B",
                   options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 5000})
    got = datasets.softmax_optimum(data, l2, tmp_path, rows=200, log=lambda t: None)
    assert got["fstar"] == pytest.approx(ref.fun, abs=1e-10) and got["grad_norm"] <= 1e-10
    again = datasets.softmax_optimum(data, l2, tmp_path, rows=200,
                                     log=lambda t: pytest.fail("recomputed"))
    assert again == got
    datasets.softmax_optimum(data, l2, tmp_path, rows=100, log=lambda t: None)
    cache = json.loads((tmp_path / "bench-results" / "fstar.json").read_text())
    assert len(cache) == 2 and {v["rows"] for v in cache.values()} == {100, 200}


# ----- tables ----------------------------------------------------------------------------------
def test_cells_and_tables():
    assert tables.spread([300, 100, 200, math.inf]) == "200 [100-300]"
    assert tables.spread([1234.0]) == "1,234" and tables.spread([math.inf]) == "-"
    assert tables.ratio(0.456) == "0.46" and tables.ratio(math.nan) == "-"
    assert tables.fmt_point({"lr": 0.75, "memory": 10}) == "lr=0.75 memory=10"
    assert tables.table(["a", "bb"], [[1, "x"], [22, "yyy"]]).splitlines() == [
        "| a  | bb  |", "| -- | --- |", "| 1  | x   |", "| 22 | yyy |"]
