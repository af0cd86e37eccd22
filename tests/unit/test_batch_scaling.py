"""benchmarks/batch_scaling.py: the sweep expands to the right runs, and its tuning never
reads the test split.

Checked against independent quantities: the runs of the quick mode written out by hand, the
full sweep's counts and learning-rate guesses derived by hand from the PROBLEMS / METHODS /
MODES tables (the arithmetic is in the comments), hessmpi's own configuration validator, and,
for the test split, the same tuning unit run in-process on two datasets that share the
training split and differ only in the test split.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import tempfile
import time
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from hessmpi import config, trainer
from hessmpi.data import write_dataset
from hessmpi.importers import synthetic

BS_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "batch_scaling.py"


def load_batch_scaling(monkeypatch, overrides: dict | None = None):
    """A fresh copy of the benchmark module (it is not a package), its tables built with
    HESSMPI_BENCH_OVERRIDES = ``overrides`` (unset when None)."""
    if overrides is None:
        monkeypatch.delenv("HESSMPI_BENCH_OVERRIDES", raising=False)
    else:
        monkeypatch.setenv("HESSMPI_BENCH_OVERRIDES", json.dumps(overrides))
    spec = importlib.util.spec_from_file_location("batch_scaling_under_test", BS_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bs(monkeypatch):
    return load_batch_scaling(monkeypatch)


# ----- the quick mode, run by run -------------------------------------------------------------
# MODES["quick"]: softmax only, batches 1024 and 8000, methods sgd / secant / secant-ls, 3
# learning rates for SGD and 2 for the quasi-Newton methods, secant without its newton_lr
# axis, secant-ls with memory [10] x probe_every [1], budgets 800 (1024) and 600 (8000), no
# headline seeds.
# Learning-rate guess: 3.0 * (B / 8000) ** 0.8, snapped to 3 * 2^k with k = round(log2(.../3)):
#   B = 1024: log2(1024 / 8000) = log2(0.128) = -2.966; x 0.8 = -2.373 -> k = -2 -> 0.75
#   B = 8000: 3.0 * 1 -> k = 0 -> 3.0
# then the guess, half of it, twice it (most promising first): 1024: 0.75, 0.375, 1.5;
# 8000: 3.0, 1.5, 6.0 (the quasi-Newton methods take the first two).
SGD_OPTIM = {"name": "sgd", "momentum": 0.9}
SECANT_OPTIM = {"name": "secant", "momentum": 0.9}
SECANT_LS_OPTIM = {"name": "secant", "line_search": "armijo", "newton_lr": 1.0,
                   "momentum": 0.0, "damping": 0.0, "h0": "bb", "max_step_ratio": 1e4}
QUICK_RUNS = [  # (method, batch, point, optim base), in the order of the sweep
    ("sgd", 1024, {"lr": 0.75}, SGD_OPTIM),
    ("sgd", 1024, {"lr": 0.375}, SGD_OPTIM),
    ("sgd", 1024, {"lr": 1.5}, SGD_OPTIM),
    ("secant", 1024, {"lr": 0.75}, SECANT_OPTIM),
    ("secant", 1024, {"lr": 0.375}, SECANT_OPTIM),
    ("secant-ls", 1024, {"lr": 0.75, "memory": 10, "probe_every": 1}, SECANT_LS_OPTIM),
    ("secant-ls", 1024, {"lr": 0.375, "memory": 10, "probe_every": 1}, SECANT_LS_OPTIM),
    ("sgd", 8000, {"lr": 3.0}, SGD_OPTIM),
    ("sgd", 8000, {"lr": 1.5}, SGD_OPTIM),
    ("sgd", 8000, {"lr": 6.0}, SGD_OPTIM),
    ("secant", 8000, {"lr": 3.0}, SECANT_OPTIM),
    ("secant", 8000, {"lr": 1.5}, SECANT_OPTIM),
    ("secant-ls", 8000, {"lr": 3.0, "memory": 10, "probe_every": 1}, SECANT_LS_OPTIM),
    ("secant-ls", 8000, {"lr": 1.5, "memory": 10, "probe_every": 1}, SECANT_LS_OPTIM),
]
QUICK_BUDGET = {1024: 800, 8000: 600}


def test_quick_mode_expands_to_the_runs_written_out_by_hand(bs):
    expected = [dict(problem="softmax", method=method, batch=batch, ranks=1,
                     batch_per_rank=batch, point=point, optim={**base, **point},
                     model={"name": "softmax", "l2": 1e-4}, seed=0,
                     steps=QUICK_BUDGET[batch], stage="tune")
                for method, batch, point, base in QUICK_RUNS]
    runs = bs.expand_sweep("quick")
    assert runs == expected
    # dict equality ignores key order; the point's keys also name the run in its output
    assert [list(r["point"]) for r in runs] == [list(p) for _, _, p, _ in QUICK_RUNS]


# ----- the full mode, counted -------------------------------------------------------------------
# Points per (problem, batch, method), lr_points 3 for every method, axes from METHODS:
#   sgd 3; secant 3 x newton_lr {0.2, 0.5} = 6; secant-ls 3 x memory {5, 10} x probe_every {1}
#   = 6; secant-history 3 x memory {5, 10} = 6; deflated 3 x probe_every {4, 10} = 6
# -> 3 + 4 x 6 = 27 per (problem, batch); 3 problems x 4 batches x 27 = 324 tune/reference runs.
POINTS_PER_METHOD = {"sgd": 3, "secant": 6, "secant-ls": 6, "secant-history": 6, "deflated": 6}
AXES = {"sgd": {}, "secant": {"newton_lr": [0.2, 0.5]},
        "secant-ls": {"memory": [5, 10], "probe_every": [1]},
        "secant-history": {"memory": [5, 10]}, "deflated": {"probe_every": [4, 10]}}
# Learning-rate guesses anchor * 2^round(exponent * log2(B / 8000)); log2(B / 8000) is
# -4.966 (256), -2.966 (1024), -0.966 (4096), 0 (8000):
#   softmax (3.0, 0.8):    -3.973 -> -4, -2.373 -> -2, -0.773 -> -1, 0 -> 0.1875, 0.75, 1.5, 3.0
#   mlp (0.125, 0.15):     -0.745 -> -1, -0.445 -> 0, -0.145 -> 0, 0  -> 0.0625, 0.125 (x3)
#   autoencoder (3e-3, 0): 3e-3 at every batch
LR_GUESS = {("softmax", 256): 0.1875, ("softmax", 1024): 0.75, ("softmax", 4096): 1.5,
            ("softmax", 8000): 3.0, ("mlp", 256): 0.0625, ("mlp", 1024): 0.125,
            ("mlp", 4096): 0.125, ("mlp", 8000): 0.125, ("autoencoder", 256): 3e-3,
            ("autoencoder", 1024): 3e-3, ("autoencoder", 4096): 3e-3,
            ("autoencoder", 8000): 3e-3}
BUDGET = {"softmax": {256: 20000, 1024: 6000, 4096: 2500, 8000: 1500},
          "mlp": {256: 3000, 1024: 1500, 4096: 1000, 8000: 800},
          "autoencoder": {256: 2500, 1024: 1200, 4096: 800, 8000: 600}}
REFERENCE_STEPS = {"mlp": 400, "autoencoder": 300}
# Headline seeds: softmax and mlp at 8000, headline 3 -> seeds 1 and 2, one run per training
# target and method: softmax 2 targets (rel 0.01, rel 0.001) x 2 seeds x 5 methods = 20,
# mlp 1 training target (train loss; test acc 0.95 never) x 2 seeds x 4 quasi-Newton methods
# = 8; mlp SGD at 8000 is the reference unit: its seeds 1 and 2 re-run the reference (2 runs,
# stage "reference", reference_steps each).
SEED_TARGETS = {"softmax": ["rel 0.01", "rel 0.001"], "mlp": ["train loss"]}
FULL_TOTAL = 324 + 20 + 8 + 2


def test_full_mode_counts_stages_and_learning_rates(bs):
    assert set(bs.METHODS) == set(POINTS_PER_METHOD)   # the counts below assume these
    runs = bs.expand_sweep("full")
    assert len(runs) == FULL_TOTAL
    first = [r for r in runs if r["stage"] != "seeds" and r["seed"] == 0]
    seeds = [r for r in runs if r["stage"] == "seeds"]
    assert len(first) == 324 and len(seeds) == 28

    counts = Counter((r["problem"], r["batch"], r["method"]) for r in first)
    assert counts == {(p, b, m): n for p, b in LR_GUESS for m, n in POINTS_PER_METHOD.items()}

    for r in first:
        problem, batch, method = r["problem"], r["batch"], r["method"]
        reference = method == "sgd" and batch == 8000 and problem in REFERENCE_STEPS
        assert r["stage"] == ("reference" if reference else "tune"), r
        assert r["steps"] == (REFERENCE_STEPS[problem] if reference else BUDGET[problem][batch])
        assert (r["ranks"], r["batch_per_rank"], r["seed"]) == (1, batch, 0)
        assert r["optim"] == {**bs.METHODS[method]["optim"], **r["point"]}

    for (problem, batch), g in LR_GUESS.items():
        for method, axes in AXES.items():
            unit = [r["point"] for r in first
                    if (r["problem"], r["batch"], r["method"]) == (problem, batch, method)]
            assert unit[0]["lr"] == g                        # the guess is run first
            assert [p["lr"] for p in unit] == sorted(        # lr-major: g, g/2, 2g
                [p["lr"] for p in unit], key=[g, g / 2, 2 * g].index)
            expected = [{"lr": lr, **dict(zip(axes, v, strict=True))}
                        for lr in (g, g / 2, 2 * g)
                        for v in itertools.product(*axes.values())]
            assert unit == expected

    expected_seeds = Counter((p, 8000, m, s, t) for p, targets in SEED_TARGETS.items()
                             for m in POINTS_PER_METHOD for s in (1, 2) for t in targets
                             if (p, m) != ("mlp", "sgd"))
    assert Counter((r["problem"], r["batch"], r["method"], r["seed"], r["target"])
                   for r in seeds) == expected_seeds
    for r in seeds:
        assert r["point"] is None and r["optim"] is None
        assert not r["target"].startswith("test")
        assert r["steps"] == BUDGET[r["problem"]][8000]
    # the reference stage exists only where a problem fixes its train target by SGD
    assert {(r["problem"], r["batch"], r["method"]) for r in first
            if r["stage"] == "reference"} == {("mlp", 8000, "sgd"), ("autoencoder", 8000, "sgd")}


def test_reference_unit_seeds_are_listed_as_they_run(bs):
    # Unit.run_unit with reference=True: no headline seeds; spec["seeds"][1:] re-run the
    # point of lowest F after reference_steps, fixed=True (exactly that many steps)
    again = [r for r in bs.expand_sweep("full", problems=["mlp"], batches=[8000],
                                        methods=["sgd"]) if r["seed"] > 0]
    assert [r["seed"] for r in again] == [1, 2]
    assert all(r["steps"] == 400 and r["stage"] == "reference" for r in again)


def test_ranks_split_the_global_batch(bs):
    one = bs.expand_sweep("full")
    two = bs.expand_sweep("full", ranks=2)
    assert len(two) == len(one)
    for a, b in zip(one, two, strict=True):
        assert b["batch"] == a["batch"] and b["ranks"] == 2
        assert b["batch_per_rank"] * 2 == a["batch"]
        assert b["point"] == a["point"]
        assert b["stage"] == a["stage"] and b["steps"] == a["steps"]
        if b["optim"] is None:                            # re-runs decided after tuning
            assert a["optim"] is None
        elif b["method"] == "deflated":                   # 10 pairs in all on 2 ranks
            assert b["optim"] == {**a["optim"], "pairs_per_rank": 5}
        else:
            assert b["optim"] == a["optim"]
    assert {r["batch_per_rank"] for r in two} == {128, 512, 2048, 4000}
    with pytest.raises(ValueError, match="multiple"):
        bs.expand_sweep("full", problems=["softmax"], batches=[1024], ranks=3)  # 1024 % 3 = 1
    with pytest.raises(ValueError, match="multiple"):
        bs.expand_sweep("quick", ranks=5)                                       # 1024 % 5 = 4


@pytest.mark.parametrize("ranks", [1, 2, 5, 10])
def test_deflated_keeps_ten_pairs_in_all(bs, ranks):
    point = {"lr": 0.1, "probe_every": 4}
    optim = bs.point_optim("deflated", point, ranks)
    assert optim["pairs_per_rank"] * ranks == 10
    assert optim["probe_every"] == 4 and optim["lr"] == 0.1
    assert bs.METHODS["deflated"]["optim"]["pairs_per_rank"] == 10   # the table is not mutated


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("mode", ["quick", "full"])
def test_every_run_is_a_valid_hessmpi_configuration(bs, mode, ranks):
    """The [optim] overrides of every run, written as Unit.make_run writes them (JSON values)
    and as the job array writes them (set_value), pass hessmpi's validator unchanged."""
    checked = 0
    for r in bs.expand_sweep(mode, ranks=ranks):
        if r["optim"] is None:
            continue
        base = [f"train.batch_size={r['batch_per_rank']}"]
        base += [f"model.{k}={json.dumps(v)}" for k, v in r["model"].items()]
        for write in (json.dumps, bs.set_value):
            sets = [f"optim.{k}={write(v)}" for k, v in r["optim"].items()]
            cfg = config.load(None, base + sets)      # UsageError if the table is refused
            assert {k: cfg["optim"][k] for k in r["optim"]} == r["optim"], r
        checked += 1
    assert checked == {"quick": 14, "full": 324}[mode]


# ----- selection on hand-made records -----------------------------------------------------------

def record(curve, status="budget"):
    """A run record: curve rows (step, grad_evals, forward_evals, wall, F)."""
    return dict(curve=[list(row) for row in curve], status=status)


def grid(*entries):
    """{point_key: {point, records}} from (point, curve[, status]) entries."""
    out = {}
    for point, curve, *status in entries:
        out[json.dumps(point, sort_keys=True)] = dict(point=point,
                                                      records=[record(curve, *status)])
    return out


def key(point):
    return json.dumps(point, sort_keys=True)


def test_best_point_is_the_fewest_steps_to_the_threshold(bs):
    points = grid(
        ({"lr": 0.1}, [(0, 0, 0, 0, 2.0), (10, 10, 0, 1, 1.5), (20, 20, 0, 2, 0.9),
                       (30, 30, 0, 3, 0.2)]),
        ({"lr": 0.2}, [(0, 0, 0, 0, 2.0), (10, 10, 0, 1, 0.95), (20, 20, 0, 2, 0.7)]),
        ({"lr": 0.4}, [(0, 0, 0, 0, 2.0), (10, 10, 0, 1, 1.2), (20, 20, 0, 2, 1.1)]),
    )
    assert bs.best_point(points, 1.0) == key({"lr": 0.2})     # 10 steps against 20, never
    assert bs.best_point(points, 0.5) == key({"lr": 0.1})     # only lr 0.1 gets there (30)
    assert bs.best_point(points, 0.1) is None                 # nobody does
    assert bs.best_point(points, None) == key({"lr": 0.1})    # lowest final F: 0.2
    # a later seed's record does not count: selection is on seed 0
    points[key({"lr": 0.4})]["records"].append(record([(0, 0, 0, 0, 2.0), (5, 5, 0, 1, 0.0)]))
    assert bs.best_point(points, 1.0) == key({"lr": 0.2})


def test_best_point_ties_and_divergence(bs):
    same = [(0, 0, 0, 0, 2.0), (10, 10, 0, 1, 0.5)]
    points = grid(({"lr": 0.4}, same), ({"lr": 0.2}, same),
                  ({"lr": 0.1}, [(0, 0, 0, 0, 2.0), (10, 8, 0, 1, 0.5)]))
    assert bs.best_point(points, 1.0) == key({"lr": 0.1})     # fewer gradient evaluations
    del points[key({"lr": 0.1})]
    assert bs.best_point(points, 1.0) == key({"lr": 0.2})     # then the smaller rate
    diverged = grid(({"lr": 0.1}, [(0, 0, 0, 0, 2.0), (10, 10, 0, 1, 1.0)]),
                    ({"lr": 0.2}, [(0, 0, 0, 0, 2.0), (10, 10, 0, 1, 0.1)], "diverged"))
    assert bs.best_point(diverged, None) == key({"lr": 0.1})  # a diverged run is never best


def test_placement_interior_bound_edge_fixed(bs):
    curve = [(0, 0, 0, 0, 1.0)]
    lrs = grid(({"lr": 0.1}, curve), ({"lr": 0.2}, curve), ({"lr": 0.4}, curve))
    assert bs.placement(lrs, key({"lr": 0.2})) == {"lr": "interior"}
    assert bs.placement(lrs, key({"lr": 0.4})) == {"lr": "EDGE"}
    assert bs.placement(lrs, key({"lr": 0.1})) == {"lr": "EDGE"}
    # memory's lattice is 1 .. 40: at its low end with the value above evaluated: bound
    mem = grid(({"lr": 0.2, "memory": 1}, curve), ({"lr": 0.2, "memory": 2}, curve),
               ({"lr": 0.1, "memory": 1}, curve), ({"lr": 0.4, "memory": 1}, curve),
               ({"lr": 0.4, "memory": 5}, curve))
    assert bs.placement(mem, key({"lr": 0.2, "memory": 1})) == {"lr": "interior",
                                                                "memory": "bound"}
    # memory 5 at lr 0.4: 1 is below it at the same lr, nothing above (10 is not the end)
    assert bs.placement(mem, key({"lr": 0.4, "memory": 5})) == {"lr": "EDGE",
                                                                "memory": "EDGE"}
    top = grid(({"lr": 0.2, "memory": 40}, curve), ({"lr": 0.2, "memory": 20}, curve))
    assert bs.placement(top, key({"lr": 0.2, "memory": 40}))["memory"] == "bound"
    # an option the mode does not widen and that has one value is fixed; the rate never is
    one = grid(({"lr": 0.2, "memory": 10}, curve))
    assert bs.placement(one, key({"lr": 0.2, "memory": 10}), widen_axes=False) == {
        "lr": "EDGE", "memory": "fixed"}
    assert bs.placement(one, key({"lr": 0.2, "memory": 10}))["memory"] == "EDGE"


def test_outward_widens_to_the_nearest_lattice_values_also_off_the_lattice(bs):
    """memory's lattice is 1, 2, 5, 10, 20, 40 and newton_lr's 0.05 ... 2 (hand-copied): a
    lone point widens to the lattice neighbours on both sides, from on or off the lattice
    (a mode may start a grid at 3 or 0.25), and never past the ends."""
    curve = [(0, 0, 0, 0, 1.0)]

    def widened(point, axis):
        return [q[axis] for q in bs.outward(grid((point, curve)), key(point), axis, True)]

    assert widened({"lr": 1.0, "memory": 5}, "memory") == [2, 10]
    assert widened({"lr": 1.0, "memory": 3}, "memory") == [2, 5]
    assert widened({"lr": 1.0, "memory": 40}, "memory") == [20]
    assert widened({"lr": 1.0, "newton_lr": 0.25}, "newton_lr") == [0.2, 0.5]
    assert widened({"lr": 1.0, "memory": 3}, "lr") == [0.5, 2.0]
    assert bs.outward(grid(({"lr": 1.0, "memory": 3}, curve)), key({"lr": 1.0, "memory": 3}),
                      "memory", False) == []


def test_planner_thresholds_come_from_fstar_and_the_reference(bs):
    planner = bs.Planner.__new__(bs.Planner)       # only what thresholds() reads
    planner.mode, planner.fstar, planner.results = bs.MODES["full"], 2.0, {}
    assert planner.thresholds("softmax", 8000) == pytest.approx(
        {"rel 0.01": 2.02, "rel 0.001": 2.002})
    assert planner.thresholds("softmax", 4096) == pytest.approx({"rel 0.01": 2.02})
    assert planner.thresholds("mlp", 1024) == {"train loss": None, "test acc 0.95": 0.95}
    planner.results["mlp-b8000-sgd"] = dict(thresholds={"train loss": 0.123},
                                            reference={"value": 0.123})
    assert planner.thresholds("mlp", 1024) == {"train loss": 0.123, "test acc 0.95": 0.95}


# ----- tuning never reads the test split --------------------------------------------------------
# Datasets with the same training split and different test splits: "real" (the mixture's own
# test rows), "noise" (Gaussian features, permuted labels) and "zeros" (the real test features,
# every label 0, so the accuracy is the share of rows predicted 0). Any use of the test split
# in tuning shows up as a different choice or a different training curve: three unrelated
# test accuracies make a test-driven choice that agrees on all of them by chance unlikely.
SMALL_MLP = {"name": "mlp", "hidden": [16], "activation": "relu", "l2": 1e-4}
TRAIN_LOSS = 0.7      # F of this 20-16-10 MLP starts near 2.5; at batch 100 lr 0.8 reaches
#                       0.7 first (72 steps here), lr 0.4 later (92), lr 1.6 not in 150 steps


@pytest.fixture(scope="module")
def twin_datasets(tmp_path_factory):
    d = tmp_path_factory.mktemp("twins")
    train, test, attrs = synthetic(n_train=400, n_test=200, features=20, classes=10, seed=3)
    rng = np.random.default_rng(7)
    tests = {"real": test,
             "noise": (rng.standard_normal(test[0].shape).astype(np.float32),
                       rng.permutation(test[1])),
             "zeros": (test[0], np.zeros_like(test[1]))}
    paths = {name: d / f"{name}.h5" for name in tests}
    for name, split in tests.items():
        write_dataset(paths[name], train, split, **attrs)
    files = {name: h5py.File(path) for name, path in paths.items()}
    try:
        for name in ("noise", "zeros"):
            for key in ("train/x", "train/y"):
                assert np.array_equal(files["real"][key][()], files[name][key][()])
            assert not np.array_equal(files["real"]["test/y"][()], files[name]["test/y"][()])
    finally:
        for f in files.values():
            f.close()
    return paths


def unit_spec(data_path, problem="mlp", thresholds=None, reference=False, budget=150,
              points=({"lr": 0.8}, {"lr": 0.4}, {"lr": 1.6}), seeds=(0, 1)):
    """Every key Unit reads (Planner.spec's), for one rank on CPU."""
    thresholds = dict(thresholds or {"train loss": TRAIN_LOSS, "test acc 0.99": 0.99})
    return dict(kind="unit", problem=problem, batch=100, method="sgd", device="cpu",
                threads=1, data_path=str(data_path), targets=list(thresholds),
                thresholds=thresholds, reference=reference, budget=budget, eval_base=2,
                points=[dict(p) for p in points], widen_axes=False, max_points=3,
                ratio_cap=2.0, sgd_steps=None, seeds=list(seeds),
                deadline=time.time() + 3600)


@pytest.fixture
def run_unit(monkeypatch, tmp_path):
    """Unit(spec).run_unit() in this process, with the module's global side effects undone
    (Unit replaces hessmpi.trainer.read_shard and sets the BLAS thread limit)."""
    bs = load_batch_scaling(monkeypatch, {"problems": {"mlp": {"model": SMALL_MLP}}})
    monkeypatch.setattr(trainer, "read_shard", trainer.read_shard)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def go(spec, on_unit=None):
        with threadpool_limits(limits=None, user_api="blas"):   # restored on exit
            unit = bs.Unit(spec)
            if on_unit is not None:
                on_unit(unit)
            return unit.run_unit()

    go.bs = bs
    return go


WALL = 3   # the wall-time column of a curve row: not reproducible


def tuning_view(result):
    """Everything of a unit's result that tuning decides or records about training."""
    keep = ("point", "seed", "status", "steps", "grad_evals", "forward_evals", "budget",
            "limits", "fallback_rate", "fallback_reasons", "clipped_rate", "rank_kept_mean")
    return dict(
        chosen=result["chosen"], placement=result["placement"],
        thresholds=result["thresholds"], reference=result["reference"], notes=result["notes"],
        points=[dict(point=p["point"],
                     records=[{**{k: r[k] for k in keep},
                              "curve": [row[:WALL] + row[WALL + 1:] for row in r["curve"]]}
                              for r in p["records"]])
                for p in result["points"]])


def accuracies(result):
    return [row[4] for p in result["points"] for r in p["records"] for row in r["test_curve"]]


CASES = {
    # the test target is out of reach on both datasets: the runs are the same, step for step
    "tune": dict(),
    # the reference stage (the MLP's SGD at the full batch): fixed steps, the target from F
    "reference": dict(thresholds={"train loss": None, "test acc 0.99": 0.99},
                      reference=True, budget=40, seeds=(0, 1, 2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tuning_is_the_same_whatever_the_test_split(run_unit, twin_datasets, case):
    units = []
    results = {name: run_unit(unit_spec(path, **CASES[case]), units.append)
               for name, path in twin_datasets.items()}
    assert all(u.evaluator.with_test for u in units)   # the MLP reports its test accuracy
    real, noise = results["real"], results["noise"]
    assert tuning_view(real) == tuning_view(noise) == tuning_view(results["zeros"])
    # something was tuned: a choice for the train target, with runs behind it
    assert set(real["chosen"]) == {"train loss"}
    assert len(real["points"]) == 3
    if case == "tune":
        assert real["chosen"]["train loss"] == {"lr": 0.8}
        assert real["placement"]["train loss"] == {"lr": "interior"}
        assert len(real["points"][0]["records"]) == 2          # the headline seed
        # lr 1.6, run last, was raced at RACE = 1.5 x the steps of the best so far (lr 0.8)
        best = run_unit.bs.train_hit(real["points"][0]["records"][0], TRAIN_LOSS)["steps"]
        last = real["points"][2]["records"][0]
        assert (last["point"], last["status"]) == ({"lr": 1.6}, "raced")
        limit = math.ceil(1.5 * best)              # stopped at the first evaluation from
        assert limit <= last["steps"] < limit + 4   # there (every 4 steps after step 80)
    else:
        assert real["reference"]["seeds"] == 3
        assert real["thresholds"]["train loss"] == real["reference"]["value"]
    # ... while the test split was read, for the report: the accuracies differ
    acc_real, acc_noise, acc_zeros = (accuracies(results[n]) for n in twin_datasets)
    assert len(acc_real) == len(acc_noise) == len(acc_zeros) > 0
    assert acc_real != acc_noise and acc_real != acc_zeros and acc_noise != acc_zeros
    assert max(acc_real) > 0.35 > max(acc_noise)            # signal against noise (10 classes)
    for p in real["points"]:
        for r in p["records"]:
            assert [row[0] for row in r["test_curve"]] == [row[0] for row in r["curve"]]


def test_a_reachable_test_target_does_not_change_the_choice(run_unit, twin_datasets):
    """With a test target one dataset reaches (real) and the other never (noise), a run on
    the real data stops once it has both targets, one on the noise goes on to its budget;
    the choice, every point's steps to the train target and the curves up to the shorter
    run are still the same."""
    thresholds = {"train loss": TRAIN_LOSS, "test acc 0.3": 0.3}
    real, noise = (run_unit(unit_spec(twin_datasets[n], thresholds=thresholds))
                   for n in ("real", "noise"))
    # the case is the one described: the real runs that reach the train target stop there
    statuses = {n: [r["status"] for p in res["points"] for r in p["records"]]
                for n, res in (("real", real), ("noise", noise))}
    assert "reached" in statuses["real"] and "reached" not in statuses["noise"]
    assert real["chosen"] == noise["chosen"] == {"train loss": {"lr": 0.8}}
    assert real["placement"] == noise["placement"]
    assert [p["point"] for p in real["points"]] == [p["point"] for p in noise["points"]]
    bs = run_unit.bs
    for pr, pn in zip(real["points"], noise["points"], strict=True):
        assert len(pr["records"]) == len(pn["records"])
        for rr, rn in zip(pr["records"], pn["records"], strict=True):
            assert rr["limits"] == rn["limits"]
            hit_r, hit_n = bs.train_hit(rr, TRAIN_LOSS), bs.train_hit(rn, TRAIN_LOSS)
            assert (hit_r is None) == (hit_n is None)
            if hit_r is not None:
                assert (hit_r["steps"], hit_r["grad_evals"]) == (hit_n["steps"],
                                                                 hit_n["grad_evals"])
            n = min(len(rr["curve"]), len(rn["curve"]))
            assert [row[:WALL] + row[WALL + 1:] for row in rr["curve"][:n]] == \
                   [row[:WALL] + row[WALL + 1:] for row in rn["curve"][:n]]


def test_only_a_test_target_makes_the_evaluator_read_the_test_split(run_unit, twin_datasets,
                                                                    monkeypatch):
    import hessmpi.data

    read = hessmpi.data.read_shard
    splits = []

    def recording(path, split, *args, **kwargs):
        splits.append(split)
        return read(path, split, *args, **kwargs)

    def built(unit):   # what the Evaluator read, before any Run
        seen.append((unit.evaluator.with_test, hasattr(unit.evaluator, "xt"), list(splits)))

    seen = []
    monkeypatch.setattr(hessmpi.data, "read_shard", recording)
    specs = {"softmax": unit_spec(twin_datasets["real"], problem="softmax",
                                  thresholds={"rel 0.1": 1.0}, budget=10,
                                  points=[{"lr": 0.5}], seeds=[0]),
             "mlp": unit_spec(twin_datasets["real"], budget=4, points=[{"lr": 0.5}],
                              seeds=[0])}
    results = {}
    for name, spec in specs.items():
        splits.clear()
        results[name] = run_unit(spec, built)
    assert seen == [(False, False, ["train"]),               # softmax: no test target
                    (True, True, ["train", "test"])]          # the MLP: test acc, reported
    result = results["softmax"]
    assert all(r["test_curve"] is None for p in result["points"] for r in p["records"])


def test_reference_unit_reports_its_own_configuration(bs):
    """The reference unit fixes the train target as the upper median over seeds of F after
    its steps, so its seed 0 may never reach it and nothing is 'chosen' by seed 0; the
    report then uses the reference's configuration, the median over its seeds (seed 0 an
    unreached inf), and the test target's hits from the same records."""
    curve_hit = [(0, 0, 0, 0, 1.0), (200, 200, 0, 1, 0.07), (400, 400, 0, 2, 0.05)]
    curve_miss = [(0, 0, 0, 0, 1.0), (200, 200, 0, 1, 0.08), (400, 400, 0, 2, 0.06)]
    test_curve = [(0, 0, 0, 0, 0.1), (200, 200, 0, 1, 0.96), (400, 400, 0, 2, 0.97)]
    point = {"lr": 0.125}
    records = [dict(record(curve_miss), seed=0, steps=400, test_curve=test_curve),
               dict(record(curve_hit), seed=1, steps=400, test_curve=test_curve),
               dict(record(curve_hit), seed=2, steps=400, test_curve=test_curve)]
    u = dict(thresholds={"train loss": 0.055, "test acc 0.95": 0.95}, chosen={},
             reference=dict(point=point), points=[dict(point=point, records=records)])
    train = bs.cell(u, "train loss")
    assert train["point"] == point and (train["reached"], train["seeds"]) == (2, 3)
    assert bs.median_hit(train, "steps") == 400
    test = bs.cell(u, "test acc 0.95")
    assert test["point"] == point and test["reached"] == 3
    assert bs.median_hit(test, "steps") == 200
    # a tuning unit without a choice still reports where it stopped
    assert bs.cell(dict(u, reference=None), "train loss")["point"] is None
