"""Batch scaling: optimizer steps to a target against the global batch size, each point tuned.

    .venv/bin/python benchmarks/batch_scaling.py --quick     (softmax only, a smoke test)
    python benchmarks/batch_scaling.py --full --problems softmax,mlp --out A.json
    python benchmarks/batch_scaling.py --full --problems autoencoder --out B.json
    python benchmarks/batch_scaling.py --report A.json B.json [--retime]   (merge, tables, plot)
    python benchmarks/batch_scaling.py --jobs-array [--full]  (a SLURM job array of the grids)
    python benchmarks/batch_scaling.py --prepare              (only the dataset and F*)
    python benchmarks/batch_scaling.py --fashion --ranks 2 [--methods sgd,NEW --given OLD.json]
                                       (issue 17: Fashion-MNIST's 60,000 rows; OLD's units
                                       taken, not run again; --problems fashion-autoencoder
                                       --batches 4096: the reduced autoencoder,
                                       fashion-cnn the reduced cnn)

Steps to a target against the global batch (256 ... 8000 = the whole training split of
mnist-t10k), each point tuned on the TRAINING objective, for SGD+momentum, the secant method
with and without the Armijo line search (probe or history pairs) and the deflated variant;
softmax regression (F within 1e-2 / 1e-3 of F*), the MLP and the deep autoencoder (the
train-loss target of SGD at batch 8000 after ``reference_steps``). One worker process per
(problem, batch, method) unit, ``--jobs N`` at a time; every run a hessmpi Training driven by
hessmpi.bench.drive, every grid widened by hessmpi.bench.tune until its best is interior.
Results: bench-results/batch_scaling.json (-quick), tables, and the plot beside it.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hessmpi.bench import datasets, drive, launch, tables, tune

ROOT = Path(__file__).resolve().parent.parent
BATCHES, FULL_BATCH = (256, 1024, 4096, 8000), 8000       # mnist-t10k's (8,000 rows)
FASHION_BATCHES = (1024, 4096, 16384)                     # Fashion-MNIST's (60,000 rows)
RACE, AIM_STEPS, AIM_WALL, LARGE = 1.5, 0.5, 0.65, (4096, 8000, 16384)
REF_ACC, REF_ACC_MARGIN = "test acc ref", 0.005
SUFFIX = {"full": "", "quick": "-quick", "fashion": "-fashion"}     # of the results file
MNIST = dict(data="mnist-t10k", batches=BATCHES, reference_batch=FULL_BATCH)
#: the batches whose chosen points run every headline seed (default: the full batch)
HEADLINE = {"fashion-softmax": (4096, 16384), "fashion-mlp": (4096, 16384),
            "fashion-autoencoder": (4096,), "fashion-cnn": (4096,)}
FASHION = dict(data="fashion-mnist", batches=FASHION_BATCHES, reference_batch=16384)
TIMING_STEPS, TIMING_WARMUP, RETIME_ROUNDS = 60, 5, 3
PROBLEMS = {
    "softmax": dict(MNIST, label="softmax regression, mnist-t10k", model={"name": "softmax",
                                                                   "l2": 1e-4},
                    targets={b: ["rel 0.01"] + (["rel 0.001"] if b == FULL_BATCH else [])
                             for b in BATCHES},
                    lr=(3.0, 0.8), budget={256: 20000, 1024: 6000, 4096: 2500, 8000: 1500}),
    "mlp": dict(MNIST, label="MLP 784-256-256-10 (ReLU), mnist-t10k",
                model={"name": "mlp", "hidden": [256, 256], "activation": "relu", "l2": 1e-4},
                targets={b: ["train loss", "test acc 0.95"] for b in BATCHES},
                reference_steps=400, lr=(0.125, 0.15),
                budget={256: 3000, 1024: 1500, 4096: 1000, 8000: 800}),
    "autoencoder": dict(MNIST,
                        label="deep autoencoder 784-1000-500-250-30 (logistic), mnist-t10k",
                        model={"name": "autoencoder", "encoder": [1000, 500, 250, 30],
                               "l2": 1e-5},
                        targets={b: ["train loss"] for b in BATCHES}, reference_steps=300,
                        lr=(3e-3, 0.0), budget={256: 2500, 1024: 1200, 4096: 800, 8000: 600}),
    # issue 17: where deep learning trains, the batch a fraction of 60,000 rows; the train
    # target is SGD's F after reference_steps at batch 16,384, the test target its best test
    # accuracy less 0.005 (upper medians over the reference seeds)
    "fashion-softmax": dict(FASHION, label="softmax regression, Fashion-MNIST (60,000)",
                            model={"name": "softmax", "l2": 1e-4},
                            targets={b: ["train loss", "test acc ref"]
                                     for b in FASHION_BATCHES},
                            reference_steps=150, lr=(0.5, 0.5),
                            # Adam's best rate from 2e-3 was the 6-point grid's edge, 0.032
                            first_lr={"adam": 0.032},
                            budget={1024: 3000, 4096: 1200, 16384: 600}),
    "fashion-mlp": dict(FASHION, label="MLP 784-256-256-10 (ReLU), Fashion-MNIST (60,000)",
                        model={"name": "mlp", "hidden": [256, 256], "activation": "relu",
                               "l2": 1e-4},
                        targets={b: ["train loss", "test acc ref"] for b in FASHION_BATCHES},
                        reference_steps=150, lr=(0.2, 0.25),
                        budget={1024: 2400, 4096: 1000, 16384: 500}),
    # reduced to fit a 2-core machine (about 0.37 s an SGD step at 4,096 on 2 ranks, and
    # seconds an evaluation of F on 60,000 rows): the reference at 4,096 after 100 steps,
    # F every 10 steps (the comparators': every step)
    "fashion-autoencoder": dict(FASHION, label="deep autoencoder 784-1000-500-250-30 "
                                "(logistic), Fashion-MNIST (60,000), reduced",
                                model={"name": "autoencoder", "encoder": [1000, 500, 250, 30],
                                       "l2": 1e-5},
                                targets={b: ["train loss"] for b in FASHION_BATCHES},
                                reference_batch=4096, reference_steps=100, lr=(0.006, 0.0),
                                eval_every=10, budget={1024: 600, 4096: 200, 16384: 150}),
    # the built-in cnn, reduced as the autoencoder (channels [8, 16], dense [64]: the 2c2d
    # takes seconds a step on these cores); needs the dataset's image_shape
    "fashion-cnn": dict(FASHION, label="cnn (5x5 conv 8, 16; dense 64), Fashion-MNIST "
                        "(60,000), reduced",
                        model={"name": "cnn", "channels": [8, 16], "dense": [64], "l2": 1e-4},
                        targets={b: ["train loss", "test acc ref"] for b in FASHION_BATCHES},
                        reference_batch=4096, reference_steps=100, lr=(0.1, 0.0),
                        eval_every=10, budget={1024: 600, 4096: 200, 16384: 150}),
}
_QN = {"name": "secant", "line_search": "armijo", "newton_lr": 1.0, "momentum": 0.0,
       "damping": 0.0, "h0": "bb", "max_step_ratio": 1e4}
METHODS = {   # optim: what every point sets; axes: the options tuned besides lr
    "sgd": dict(label="SGD+momentum", optim={"name": "sgd", "momentum": 0.9}, axes={}),
    # the baseline with its momentum tuned too (targets stay those of "sgd", momentum 0.9)
    "sgd-momentum": dict(label="SGD+momentum, momentum tuned", optim={"name": "sgd"},
                         axes={"momentum": [0.95, 0.9, 0.98]}),
    "secant": dict(label="secant (no line search)", optim={"name": "secant", "momentum": 0.9},
                   axes={"newton_lr": [0.2, 0.5]}),
    "secant-ls": dict(label="secant, probe pairs + Armijo + memory", optim=_QN,
                      axes={"memory": [5, 10], "probe_every": [1]}),
    "secant-history": dict(label="secant, history pairs + L-BFGS + Armijo",
                           optim={**_QN, "pairs": "history", "curvature": "lbfgs"},
                           axes={"memory": [10, 20]}),
    # multi-batch L-BFGS (Berahas et al. 2016): y on the rows consecutive batches share,
    # no gradient beyond the step's own
    "secant-overlap": dict(label="secant, overlap pairs + L-BFGS + Armijo",
                           optim={**_QN, "pairs": "overlap", "curvature": "lbfgs",
                                  "overlap": 0.25},
                           axes={"memory": [10, 20]}),
    # the same pairs preconditioning momentum SGD, no line search (as averaged pairs do)
    "secant-overlap-momentum": dict(label="secant, overlap pairs + L-BFGS + momentum",
                                    optim={"name": "secant", "pairs": "overlap",
                                           "overlap": 0.25, "curvature": "lbfgs", "h0": "bb",
                                           "memory": 20, "damping": 0.0, "momentum": 0.9,
                                           "max_step_ratio": 10.0},
                                    axes={"newton_lr": [0.1, 0.3]}),
    # ... and with a fixed step length instead of the Armijo search (Berahas et al.'s
    # multi-batch L-BFGS): no forward pass a step
    "secant-overlap-fixed": dict(label="secant, overlap pairs + L-BFGS, fixed step",
                                 optim={"name": "secant", "pairs": "overlap", "overlap": 0.25,
                                        "curvature": "lbfgs", "h0": "bb", "memory": 20,
                                        "damping": 0.0, "momentum": 0.0,
                                        "max_step_ratio": 10.0},
                                 axes={"newton_lr": [0.5, 1.0]}),
    # Adam's step is scale-free (about lr per coordinate): its own first guess, any batch
    "adam": dict(label="Adam", optim={"name": "adam", "momentum": 0.9}, axes={}, lr=2e-3),
    "secant-averaged": dict(label="secant, averaged-iterate pairs + L-BFGS + momentum",
                            optim={"name": "secant", "pairs": "averaged", "probe_every": 10,
                                   "curvature": "lbfgs", "h0": "bb", "memory": 10,
                                   "damping": 0.0, "momentum": 0.9, "max_step_ratio": 10.0},
                            axes={"newton_lr": [0.1]}),
    "deflated": dict(label="deflated (k=10)", optim={"name": "deflated", "pairs_per_rank": 10,
                                                     "newton_lr": 1.0, "momentum": 0.9},
                     axes={"probe_every": [4, 10]}),
    # issue 19's comparators (not hessmpi's methods), each tuned on one knob as in
    # robustness.py (the tuner's "lr" axis carries it; widened by "factor"); their budgets,
    # race caps and selection in gradient-equivalent work (drive.work), since one of their
    # steps costs many gradients: SGD's work is its steps. Hessian-free's first grid spans
    # 1e-2..1e2 (the best initial damping went from 1e-4 at full batch to 10 at 1,024)
    "hessian-free": dict(label="Hessian-free", optim={"name": "hessian_free"}, axes={},
                         knob="hf_damping", grid=[1.0, 0.1, 10.0, 0.01, 100.0], factor=10.0,
                         unit="work", max_points=7),
    "entropy-sgd": dict(label="Entropy-SGD", optim={"name": "entropy_sgd"}, axes={}, lr=32.0,
                        unit="work"),
}
BASELINES = ("sgd", "sgd-momentum", "adam")  # tuned on the baselines' grid sizes ("sgd")
COMPARATORS = tuple(m for m, v in METHODS.items() if v.get("unit") == "work")


def unit_of(method: str) -> str:
    """What ``method``'s budget, race caps and selection count: "steps" or "work"."""
    return METHODS[method].get("unit", "steps")


def shown(method: str, point: dict | None) -> str:
    """A point as text, the tuned knob under its own name."""
    knob = METHODS[method].get("knob")
    return tables.fmt_point(point if point is None or not knob else
                            {knob if k == "lr" else k: v for k, v in point.items()})


def grid_class(method: str) -> str:
    """The key of ``method``'s grid sizes in a mode's lr_points and max_points."""
    return "sgd" if method in BASELINES else "qn"


MODES = {
    "quick": dict(problems=["softmax"], batches=[1024, 8000],
                  methods=["sgd", "secant", "secant-ls"],
                  targets={1024: ["rel 0.1"], 8000: ["rel 0.1", "rel 0.01"]},
                  lr_points={"sgd": 3, "qn": 2},
                  axes={"secant": {}, "secant-ls": {"memory": [10], "probe_every": [1]}},
                  widen_axes=False, max_points={"sgd": 4, "qn": 3},
                  budget={1024: 800, 8000: 600}, ratio_cap=1.5, headline={}, minutes=3.6,
                  jobs=2, timing_steps=30),
    "full": dict(problems=["softmax", "mlp", "autoencoder"], batches=list(BATCHES),
                 methods=["sgd", "secant", "secant-ls", "secant-history", "deflated"],
                 targets=None, lr_points={"sgd": 3, "qn": 3}, axes={}, widen_axes=True,
                 max_points={"sgd": 8, "qn": 12}, budget=None, ratio_cap=2.0,
                 headline={"softmax": 3, "mlp": 3}, minutes=8.5, jobs=1,
                 timing_steps=TIMING_STEPS),
    # issue 17: Fashion-MNIST's 60,000 rows; the options besides lr fixed where they were
    # chosen (mnist-t10k); SGD's and Adam's learning rates tuned interior here
    "fashion": dict(problems=["fashion-softmax", "fashion-mlp"], batches=list(FASHION_BATCHES),
                    methods=["sgd", "adam", "secant-averaged", "secant-history",
                             "secant-overlap"],
                    targets=None, lr_points={"sgd": 3, "qn": 3},
                    axes={"secant-history": {"memory": [20]},
                          "secant-overlap": {"memory": [20]},
                          "secant-overlap-fixed": {"newton_lr": [1.0]}}, widen_axes=False,
                    max_points={"sgd": 9, "qn": 5}, budget=None, ratio_cap=2.0,
                    headline={"fashion-softmax": 3, "fashion-mlp": 3,
                              "fashion-autoencoder": 3, "fashion-cnn": 3}, minutes=300, jobs=1,
                    timing_steps=30, aim_wall=0.6),
}


# ----- the sweep ---------------------------------------------------------------------------

def name_of(problem: str, batch: int, method: str) -> str:
    return f"{problem}-b{batch}-{method}"


def unit_targets(mode: dict, problem: str, batch: int) -> list[str]:
    return list((mode["targets"] or PROBLEMS[problem]["targets"])[batch])


def unit_budget(mode: dict, problem: str, batch: int) -> int:
    return (mode["budget"] or PROBLEMS[problem]["budget"])[batch]


def is_reference(problem: str, batch: int, method: str) -> bool:
    """The unit whose SGD runs fix the problem's train-loss target."""
    prob = PROBLEMS[problem]
    return method == "sgd" and batch == prob["reference_batch"] and "reference_steps" in prob


def first_points(mode: dict, problem: str, method: str, batch: int) -> list[dict]:
    """The first grid: learning rates (the method's own grid if it has one; else the
    problem's first guess for the method, the method's own guess, else anchor
    (B/reference)^exponent on anchor 2^k; then that / factor and x factor (2 unless the
    method says), most promising first) x the method's options."""
    anchor, exponent = PROBLEMS[problem]["lr"]
    guess = PROBLEMS[problem].get("first_lr", {}).get(method) or METHODS[method].get(
        "lr") or anchor * 2.0 ** round(exponent * math.log2(
            batch / PROBLEMS[problem]["reference_batch"]))
    factor = METHODS[method].get("factor", 2.0)
    lrs = METHODS[method].get("grid") or [guess, guess / factor, guess * factor][
        :mode["lr_points"][grid_class(method)]]
    axes = mode["axes"].get(method, METHODS[method]["axes"])
    return [{"lr": lr, **dict(zip(axes, values, strict=True))}
            for lr in lrs for values in itertools.product(*axes.values())]


def optim_of(method: str, point: dict, ranks: int) -> dict:
    """The [optim] keys of a point (the deflated method keeps m = P k near 10; a
    comparator's "lr" is its knob)."""
    o = {**METHODS[method]["optim"], **point}
    if "knob" in METHODS[method]:
        o[METHODS[method]["knob"]] = o.pop("lr")
    if method == "deflated" and ranks > 1:
        o["pairs_per_rank"] = max(1, o["pairs_per_rank"] // ranks)
    return o


def config_of(problem: str, method: str, point: dict, *, batch: int, ranks: int, seed: int,
              steps: int, data: str, device: str = "cpu", threads: int = 0) -> dict:
    """The configuration of one run, as a dict for hessmpi.config.from_dict."""
    return {"data": {"path": data}, "model": PROBLEMS[problem]["model"],
            "optim": optim_of(method, point, ranks),
            "train": {"batch_size": batch // ranks, "seed": seed, "steps": steps},
            "backend": {"device": device, "threads": threads}}


def units(mode: dict, problems, batches, methods) -> list[tuple[str, int, str]]:
    """Priority order: the full batch first (the references fix train targets), larger
    batches before smaller, SGD before the methods compared with it."""
    out = [(p, b, m) for b in batches for p in problems for m in methods]
    return sorted(out, key=lambda u: (-u[1], u[2] != "sgd", problems.index(u[0])))


def depends(unit, todo: list) -> list[str]:
    problem, batch, method = unit
    deps = [name_of(problem, batch, "sgd")] if method != "sgd" else []
    if "reference_steps" in PROBLEMS[problem] and not is_reference(*unit):
        deps.append(name_of(problem, PROBLEMS[problem]["reference_batch"], "sgd"))
    return [d for d in deps if d in {name_of(*u) for u in todo}]


# ----- worker: one unit, or timings alone ---------------------------------------------------

def worker(spec: dict) -> dict:
    from hessmpi import config
    from hessmpi.trainer import Training

    comm, backend = launch.context(spec["device"], threads=spec["threads"])
    shards = drive.shards(spec["data"], comm)
    tag = f"{spec['problem']} b{spec['batch']}"

    def make(method, point, seed, steps):
        cfg = config.from_dict(config_of(spec["problem"], method, point, batch=spec["batch"],
                                         ranks=comm.size, seed=seed, steps=steps,
                                         data=spec["data"], device=spec["device"],
                                         threads=backend.threads))
        return Training(cfg, comm, backend, shards=shards)

    if spec["kind"] == "timing":
        out = []
        for item in spec["items"]:
            training = make(item["method"], item["point"], 0, item["steps"] + TIMING_WARMUP)
            for step in range(TIMING_WARMUP):
                training.step(step)
            before = training.objective.counters()
            t0 = time.perf_counter()
            for step in range(TIMING_WARMUP, TIMING_WARMUP + item["steps"]):
                training.step(step)
            per = {k: (v - before[k]) / item["steps"]
                   for k, v in training.objective.counters().items()}
            out.append(dict(item, ms=1e3 * (time.perf_counter() - t0) / item["steps"],
                            device=backend.device, **per))
            if comm.rank == 0:
                print(f"  timing {tag} {item['method']} {shown(item['method'], item['point'])}: "
                      f"{out[-1]['ms']:.3f} ms/step", flush=True)
        return dict(items=out)

    method, budget, unit = spec["method"], spec["budget"], unit_of(spec["method"])
    thresholds = dict(spec["thresholds"])
    train_names = [n for n in thresholds if not n.startswith("test")]
    reference = spec["reference"]

    def late() -> bool:
        return bool(comm.bcast(time.time() > spec["deadline"]))

    def train(point, seed, limits, fixed=False):
        r = drive.drive(make(method, point, seed, budget), budget=budget, unit=unit,
                        limits=limits, base=1 if unit == "work" else spec["eval_base"],
                        per=40, deadline=spec["deadline"],
                        train_targets={} if fixed else {n: thresholds[n] for n in train_names},
                        test_targets={} if fixed else {n: v for n, v in thresholds.items()
                                                        if n.startswith("test")},
                        with_test=any(n.startswith("test") for n in thresholds))
        r.update(point=point, seed=seed, limits=limits)
        if comm.rank == 0:
            print(f"  {tag} {method} {shown(method, point)} seed {seed}: {r['status']} "
                  f"after {r['steps']} steps, F {r['curve'][-1][4]:.6g}, "
                  f"{1e3 * r['t_step']:.2f} ms/step", flush=True)
        return r

    def cap(name) -> float:
        sgd = (spec["sgd_steps"] or {}).get(name)
        return min(budget, math.ceil(spec["ratio_cap"] * sgd)) if sgd else budget

    def run(point, points):
        limits = {}
        for n in train_names:
            limits[n] = cap(n)
            k = tune.best(points, tune.to_target(thresholds[n], unit, seeds=1)) \
                if thresholds[n] is not None else None
            if k is not None:
                hit = drive.first_hit(points[k]["records"][0], thresholds[n])
                limits[n] = min(limits[n], math.ceil(RACE * hit[unit]))
        return [train(point, 0, limits, fixed=reference)]

    selections = ({"final F": tune.final} if reference else
                  {n: tune.to_target(thresholds[n], unit, seeds=1) for n in train_names})
    res = tune.tune(run, spec["points"], selections, max_points=spec["max_points"],
                    widen_axes=spec["widen_axes"], late=late,
                    factor=METHODS[method].get("factor", 2.0))
    points, notes, info = res["points"], res["notes"], None
    if reference and "final F" in res["chosen"]:
        k = res["chosen"]["final F"]
        for seed in spec["seeds"][1:]:
            points[k]["records"].append(train(points[k]["point"], seed, {}, fixed=True))
        value = tune.upper_median(drive.final_value(r) for r in points[k]["records"])
        thresholds.update({n: value for n in train_names})
        if REF_ACC in thresholds:          # its best test accuracy, less REF_ACC_MARGIN
            thresholds[REF_ACC] = tune.upper_median(
                max(row[4] for row in r["test_curve"]) for r in points[k]["records"]
            ) - REF_ACC_MARGIN
        info = dict(point=points[k]["point"], value=value, steps=budget,
                    seeds=len(points[k]["records"]), placement=res["placement"]["final F"])
    chosen = {n: k for n in train_names if thresholds[n] is not None
              and (k := tune.best(points, tune.to_target(thresholds[n], unit, seeds=1)))}
    for k in dict.fromkeys(chosen.values()) if not reference else ():
        for seed in spec["seeds"][1:]:        # headline seeds: no racing, the ratio cap only
            if late():
                notes.append(f"deadline: seed {seed} not run")
                break
            points[k]["records"].append(train(points[k]["point"], seed,
                                              {n: cap(n) for n in train_names}))
    return dict(problem=spec["problem"], batch=spec["batch"], method=method, ranks=comm.size,
                device=backend.device, threads=backend.threads, budget=budget,
                thresholds=thresholds, sgd_steps=spec["sgd_steps"], ratio_cap=spec["ratio_cap"],
                reference=info, points=list(points.values()), notes=notes,
                chosen={n: points[k]["point"] for n, k in chosen.items()},
                placement={n: tune.placement(points, k, spec["widen_axes"])
                           for n, k in chosen.items()})


# ----- parent: specs, scheduler, timing -----------------------------------------------------

class Sweep:
    """The units of one invocation, their specs and results."""

    def __init__(self, args, mode_name: str, data: str, fstar: float | None):
        self.args, self.mode_name, self.mode = args, mode_name, MODES[mode_name]
        self.data, self.fstar, self.results = data, fstar, {}
        self.problems = args.problems or self.mode["problems"]
        self.batches = args.batches or self.mode["batches"]
        self.methods = args.methods or self.mode["methods"]
        self.jobs = args.jobs or self.mode["jobs"]
        cores = len(os.sched_getaffinity(0))
        self.threads = args.threads or max(1, cores // (self.jobs * args.ranks))

    def thresholds(self, problem: str, batch: int) -> dict:
        out = {}
        for n in unit_targets(self.mode, problem, batch):
            if n.startswith("rel "):
                out[n] = self.fstar * (1 + float(n[4:]))
            elif n.startswith("test acc ") and n != REF_ACC:
                out[n] = float(n[9:])
            else:
                ref = self.results.get(name_of(problem, PROBLEMS[problem]["reference_batch"],
                                               "sgd")) or {}
                out[n] = (ref.get("thresholds") or {}).get(n)
        return out

    def spec(self, unit, deadline: float) -> dict:
        problem, batch, method = unit
        reference = is_reference(*unit)
        thresholds = self.thresholds(problem, batch)
        sgd = self.results.get(name_of(problem, batch, "sgd"))
        sgd_steps = None
        if method != "sgd" and sgd:
            sgd_steps = {}
            for n, v in thresholds.items():
                hits = [drive.first_hit(p["records"][0], v) for p in sgd["points"]
                        if v is not None and not n.startswith("test")]
                sgd_steps[n] = min((h["steps"] for h in hits if h), default=None)
        return dict(kind="unit", problem=problem, batch=batch, method=method,
                    device=self.args.device, threads=self.threads, data=self.data[problem],
                    thresholds=thresholds, reference=reference,
                    budget=PROBLEMS[problem]["reference_steps"] if reference
                    else unit_budget(self.mode, problem, batch),
                    eval_base=PROBLEMS[problem].get("eval_every")
                    or max(2, unit_budget(self.mode, problem, batch) // 400),
                    points=first_points(self.mode, problem, method, batch),
                    widen_axes=self.mode["widen_axes"], ratio_cap=self.mode["ratio_cap"],
                    max_points=METHODS[method].get("max_points")
                    or self.mode["max_points"][grid_class(method)],
                    sgd_steps=sgd_steps, deadline=deadline,
                    seeds=list(range(self.mode["headline"].get(problem, 1)
                                     if batch in HEADLINE.get(problem, (FULL_BATCH,))
                                     else 1)))

    def run(self, deadline: float, tmp: Path, on_result) -> list[str]:
        """Start every unit once the units it depends on finished, ``jobs`` at a time;
        returns what was not run and why."""
        pending = units(self.mode, self.problems, self.batches, self.methods)
        todo, running, failed, not_run = list(pending), {}, set(), []
        while pending or running:
            for name, (job, t0) in list(running.items()):
                if job.poll() is None:
                    continue
                del running[name]
                try:
                    self.results[name] = job.result()
                    print(f"batch_scaling: {name} done in {time.time() - t0:.0f} s", flush=True)
                    on_result(name, self.results[name])
                except SystemExit as e:
                    failed.add(name)
                    not_run.append(f"{name}: {e}")
                    if self.jobs > 1:
                        print((tmp / f"{name}.log").read_text()[-3000:], flush=True)
            for unit in list(pending):
                name, deps = name_of(*unit), depends(unit, todo)
                if name in self.results:          # given (--given): not run again
                    pending.remove(unit)
                    continue
                if any(d in failed for d in deps):
                    pending.remove(unit)
                    failed.add(name)
                    not_run.append(f"{name}: a unit it depends on did not finish")
                    continue
                if len(running) >= self.jobs or any(d not in self.results for d in deps):
                    continue
                pending.remove(unit)
                spec = self.spec(unit, deadline)
                unknown = any(v is None for v in spec["thresholds"].values())
                if time.time() > deadline or (unknown and not spec["reference"]):
                    failed.add(name)
                    not_run.append(f"{name}: " + ("past the time budget (--minutes)" if
                                                  time.time() > deadline else
                                                  "its train target is unknown"))
                    continue
                print(f"batch_scaling: start {name} ({len(spec['points'])} points, budget "
                      f"{spec['budget']} {unit_of(unit[2])})", flush=True)
                log = tmp / f"{name}.log" if self.jobs > 1 else None
                running[name] = (launch.start(__file__, spec, self.args.ranks, log=log),
                                 time.time())
            time.sleep(0.2)
        return not_run


def retime(results: dict, args, steps: int) -> None:
    """results["timings"]: every chosen configuration timed alone, one worker per problem
    and batch; the whole set RETIME_ROUNDS times over, each configuration's ms/step the
    median of its rounds (``ms_rounds`` keeps them). Not the comparators: their steps vary
    in cost (CG iterations), their wall is that of their runs."""
    items: dict[str, list] = {}
    for u in results["units"].values():
        if u["method"] in COMPARATORS:
            continue
        for point in {tune.key(p): p for p in chosen_points(u)}.values():
            items.setdefault(u["problem"], []).append(dict(
                problem=u["problem"], batch=u["batch"], method=u["method"], point=point,
                steps=steps))
    results["timings"] = []
    print(f"batch_scaling: timing {sum(map(len, items.values()))} chosen configurations "
          "alone ...", flush=True)
    rounds: dict[str, list] = {}
    for _ in range(RETIME_ROUNDS):
        for problem, mine in items.items():
            u = next(u for u in results["units"].values() if u["problem"] == problem)
            for batch in sorted({i["batch"] for i in mine}):
                data = results["data"]
                spec = dict(kind="timing", problem=problem, batch=batch,
                            data=data[problem] if isinstance(data, dict) else data,
                            device="gpu" if u["device"].startswith("gpu") else "cpu",
                            threads=args.threads or u["threads"],
                            items=[i for i in mine if i["batch"] == batch])
                for t in launch.launch(__file__, spec, u["ranks"])["items"]:
                    rounds.setdefault(json.dumps([problem, batch, t["method"], t["point"]],
                                                 sort_keys=True), []).append(t)
    for timed in rounds.values():
        ms = [t["ms"] for t in timed]
        results["timings"].append(dict(timed[0], ms=float(np.median(ms)), ms_rounds=ms))


def chosen_points(u: dict) -> list[dict]:
    pts = list(u["chosen"].values())
    return pts + ([u["reference"]["point"]] if u.get("reference") else [])


# ----- results: cells, tables, verdict, plot ------------------------------------------------

def cell(u: dict, name: str) -> dict:
    """What a unit did for target ``name``: the chosen point (the test target's: that of the
    train target), its seeds' hits, or the most steps its runs took without reaching it."""
    test = name.startswith("test")
    select = next((n for n in u["thresholds"] if not n.startswith("test")), None)
    point = u["chosen"].get(select if test else name) or (
        u["reference"] or {}).get("point")
    out = dict(point=point, hits=[], reached=0, seeds=0, censored=None, status=None)

    def censor(records, status):
        """The longest run (in the method's unit): its steps, and its work."""
        longest = max(records, default=None, key=lambda r: (
            r["works"][-1] if unit_of(u["method"]) == "work" and r.get("works") else
            r["steps"]))
        out.update(censored=longest and longest["steps"], status=status,
                   censored_work=longest["works"][-1] if longest and longest.get("works")
                   else math.nan)

    if point is None:
        records = [r for p in u["points"] for r in p["records"]]
        statuses = {r["status"] for r in records}
        censor(records, "diverged" if statuses == {"diverged"} else "not reached")
        return out
    records = next(p["records"] for p in u["points"] if p["point"] == point)
    hits = [drive.first_hit(r, u["thresholds"][name], test) for r in records]
    out.update(hits=hits, reached=sum(h is not None for h in hits), seeds=len(hits))
    if not out["reached"]:
        censor(records, "not reached")
    return out


def ms_per_step(results: dict, u: dict, point: dict) -> tuple[float, str]:
    for t in results.get("timings", []):
        if (t["problem"], t["batch"], t["method"], t["point"]) == (
                u["problem"], u["batch"], u["method"], point):
            return t["ms"], "alone"
    recs = next(p["records"] for p in u["points"] if p["point"] == point)
    return 1e3 * float(np.median([r["t_step"] for r in recs])), "in-run"


def summarize(results: dict) -> list[dict]:
    """One row per (problem, target, batch, method)."""
    rows = []
    for u in results["units"].values():
        for name, value in u["thresholds"].items():
            c = cell(u, name)

            def median(field, c=c):
                v = [h[field] if h else math.inf for h in c["hits"]]
                return float(np.median(v)) if v else math.inf

            ms, how = ms_per_step(results, u, c["point"]) if c["point"] else (math.nan, "-")
            steps = median("steps")
            if u["method"] in COMPARATORS:      # a step's cost varies: the runs' own wall
                wall, how = median("wall"), "in-run"
            else:
                wall = steps * ms / 1e3 if math.isfinite(steps) else math.inf
            select = next(n for n in u["thresholds"] if not n.startswith("test"))
            rows.append(dict(problem=u["problem"], target=name, value=value, batch=u["batch"],
                             method=u["method"], cell=c, steps=steps, ms=ms, timing=how,
                             grad_evals=median("grad_evals"),
                             forward_evals=median("forward_evals"), work=median("work"),
                             wall=wall,
                             device=u["device"], placement=u["placement"].get(
                                 select if name.startswith("test") else name)
                             or (u["reference"] or {}).get("placement")))
    return rows


def steps_text(r: dict) -> str:
    c = r["cell"]
    if not c["reached"]:
        return "-" if c["censored"] is None else f">{c['censored']:,}" + (
            f" steps, {c['censored_work']:,.0f} work" if r["method"] in COMPARATORS else "") + (
            " (diverged)" if c["status"] == "diverged" else "")
    text = tables.spread([h["steps"] if h else math.inf for h in c["hits"]])
    if not math.isfinite(r["steps"]):
        text = f">{max(h['steps'] for h in c['hits'] if h):,}"
    elif r["method"] in COMPARATORS:
        text += f" steps, {r['work']:,.0f} work"
    return text + (f" ({c['reached']}/{c['seeds']})" if c["seeds"] > 1 else "")


def verdicts(rows: list[dict], aim_wall: float = AIM_WALL) -> list[dict]:
    """At each (problem, target, batch): hessmpi's method (not a baseline) with the fewest
    steps, its steps and wall ratios to the best-tuned SGD+momentum, and the methods
    meeting the aim (<= AIM_STEPS x its steps and <= ``aim_wall`` x its wall time)."""
    out = []
    for problem, target, batch in sorted({(r["problem"], r["target"], r["batch"])
                                          for r in rows}):
        here = [r for r in rows if (r["problem"], r["target"], r["batch"])
                == (problem, target, batch)]
        # the better tuned SGD+momentum: momentum 0.9, or momentum tuned too
        sgd = min((r for r in here if r["method"] in ("sgd", "sgd-momentum")),
                  key=lambda r: (r["steps"], r["wall"]), default=None)
        qn = [r for r in here if r["method"] not in BASELINES + COMPARATORS]
        if sgd is None or not qn:
            continue
        best = min(qn, key=lambda r: (r["steps"], r["wall"]))
        ok = math.isfinite(sgd["steps"]) and math.isfinite(best["steps"])
        meeting = [r["method"] for r in qn if math.isfinite(r["steps"]) and ok
                   and r["steps"] <= AIM_STEPS * sgd["steps"] and r["wall"]
                   <= aim_wall * sgd["wall"]]
        note = "" if math.isfinite(sgd["steps"]) else "SGD did not reach it"
        out.append(dict(problem=problem, target=target, batch=batch, best=best["method"],
                        best_steps=best["steps"], meeting=meeting, note=note,
                        steps_ratio=best["steps"] / sgd["steps"] if ok else math.nan,
                        wall_ratio=best["wall"] / sgd["wall"] if ok else math.nan))
    return out


def target_label(name: str, value) -> str:
    if name.startswith("rel "):
        return f"F <= F*(1+{name[4:]})"
    if name == REF_ACC:
        return (f"test acc >= {value:.2%} (SGD's best - {REF_ACC_MARGIN:.1%})"
                if value is not None else "test acc (unknown)")
    if name.startswith("test acc "):
        return f"test acc >= {float(name[9:]):.0%}"
    return f"F <= {value:.5g}" if value is not None else "F <= (unknown)"


def print_tables(results: dict) -> None:
    rows = summarize(results)
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    fs = results.get("fstar")
    print(f"\n## hessmpi batch scaling ({results['mode']}), {results['machine']['date']}, "
          f"{results['machine']['host']}\n")
    if results["ranks"] == 1:
        print("One rank takes each global batch: exact for SGD+momentum (P ranks take the same "
              "steps), not for the secant methods, whose P ranks form P pairs per step from "
              "their own shards. Check a headline point with --ranks P.\n")
    print(f"Global batch = ranks x batch per rank ({results['ranks']} rank(s)). Steps = "
          "optimizer steps to the first evaluation of the full training objective F (or of the "
          "test accuracy) that meets the target; each method's configuration chosen per target "
          "on the training objective (the test-accuracy row uses the train-loss choice). '>N': "
          "not reached in the N steps its runs were allowed. Wall = steps x ms/step ("
          + ("measured alone" if results.get("timings") else "inside the runs")
          + "); evaluations excluded. Hessian-free and Entropy-SGD (the comparators): "
          "budgets, race caps and the choice of point in gradient-equivalent work (a "
          "forward pass 1/3, a Gauss-Newton product 5/3 of a gradient; SGD's work is its "
          "steps), '>' the longest run's steps and work, wall their runs' own time to the "
          "hit." + (f" F* = {fs['fstar']:.10g} (Newton-CG, ||grad|| "
                                          f"{fs['grad_norm']:.1e})." if fs else ""))
    for problem, name in dict.fromkeys((r["problem"], r["target"]) for r in rows):
        mine = [r for r in rows if (r["problem"], r["target"]) == (problem, name)]
        batches = sorted({r["batch"] for r in mine})
        vs = {v["batch"]: v for v in verdicts(mine)}
        print(f"\n### {PROBLEMS[problem]['label']}: {target_label(name, mine[0]['value'])}\n")
        table = []
        for b in batches:
            at = {r["method"]: r for r in mine if r["batch"] == b}
            v = vs.get(b)
            best = "-" if not v else (v["note"] or "-") if not math.isfinite(
                v["steps_ratio"]) else f"{v['steps_ratio']:.2f} ({v['best']})"
            table.append([b, *(steps_text(at[m]) if m in at else "not run" for m in methods),
                          best, tables.ratio(v["wall_ratio"]) if v else "-"])
        print(tables.table(["batch", *(f"{METHODS[m]['label']} steps" for m in methods),
                            "best variant / SGD steps", "wall ratio"], table))
        table = []
        for r in sorted(mine, key=lambda r: (r["batch"], methods.index(r["method"]))):
            ok = math.isfinite(r["steps"])
            knob = METHODS[r["method"]].get("knob", "lr")
            where = ", ".join(f"{knob if k == 'lr' else k} {v}"
                              for k, v in (r["placement"] or {}).items()) or "-"
            table.append([r["batch"], r["method"], shown(r["method"], r["cell"]["point"]),
                          where, steps_text(r), *((f"{r['grad_evals']:,.0f}",
                                                   f"{r['forward_evals']:,.0f}",
                                                   f"{r['work']:,.0f}",
                                                   f"{r['ms']:.2f} ({r['timing']})",
                                                   f"{r['wall']:.2f}") if ok else ["-"] * 5),
                          r["device"]])
        print()
        print(tables.table(["batch", "method", "chosen", "where the best was", "steps",
                            "grad evals", "forward evals", "gradient-equivalents",
                            "ms/step", "wall to target s", "device"], table))
    aim_wall = MODES[results["mode"]].get("aim_wall", AIM_WALL)
    print(f"\n### The aim at large batch: hessmpi's best method (Adam is a baseline) in <= "
          f"{AIM_STEPS} x SGD+momentum's steps and <= {aim_wall} x its wall time\n")
    vs = [v for v in verdicts(rows, aim_wall) if v["batch"] in LARGE]
    print(tables.table(["problem", "target", "batch", "best variant (steps)", "steps ratio",
                        "wall ratio", "variants meeting the aim", "aim"], [
        [v["problem"], v["target"], v["batch"], f"{v['best']} ({v['best_steps']:,.0f})"
         if math.isfinite(v["best_steps"]) else "none reached it", tables.ratio(
             v["steps_ratio"]), tables.ratio(v["wall_ratio"]), ", ".join(v["meeting"]) or "-",
         "MET" if v["meeting"] else "NOT MET" + (f" ({v['note']})" if v["note"] else "")]
        for v in vs]))
    head = [v for v in vs if v["batch"] == max(LARGE)] if results["mode"] != "fashion" else vs
    if head:
        missed = [v for v in head if not v["meeting"]]
        where = f"batch {max(LARGE)}" if results["mode"] != "fashion" else "batch >= 4096"
        print(f"\nVerdict: the aim is {'NOT MET' if missed else 'MET'} at {where} "
              + (f"for {len(missed)} of {len(head)} targets: " + "; ".join(
                  f"{v['problem']} {v['target']} b{v['batch']} (steps "
                  f"{tables.ratio(v['steps_ratio'])}, "
                  f"wall {tables.ratio(v['wall_ratio'])})" for v in missed) if missed else
                 f"for every target measured ({len(head)})") + ".")
    print("\n### Every point tuned (seed 0; steps to each training target, '>' = stopped "
          "before it, * = chosen)")
    for name, u in results["units"].items():
        names = [n for n in u["thresholds"] if not n.startswith("test")]
        ref = u.get("reference")
        print(f"\n#### {name} on {u['device']}, budget {u['budget']} "
              f"{unit_of(u['method'])}" + (
            f", SGD's steps {u['sgd_steps']}, ratio cap {u['ratio_cap']:g}"
            if u.get("sgd_steps") else "") + (
            f"; reference: F = {ref['value']:.6g} after {ref['steps']} steps at lr "
            f"{ref['point']['lr']:.4g} (lr {ref['placement']['lr']}; upper median of "
            f"{ref['seeds']} seed(s))" if ref else ""))
        for note in u["notes"]:
            print(f"NOTE: {note}")
        table = []
        for p in u["points"]:
            r = p["records"][0]
            hits = [drive.first_hit(r, u["thresholds"][n]) for n in names]
            table.append([shown(u["method"], p["point"]), r["status"], f"{r['steps']:,}", *(
                (f"{h['steps']:,}" if h else f">{r['steps']:,}")
                + (f" ({h['work']:,.0f} work)" if h and u["method"] in COMPARATORS else "")
                + (" *" if u["chosen"].get(n) == p["point"] else "")
                for n, h in zip(names, hits, strict=True)), f"{r['curve'][-1][4]:.6g}",
                f"{r['fallback_rate']:.1%}", f"{1e3 * r['t_step']:.2f}"])
        print()
        print(tables.table(["point", "status", "steps run", *names, "final F", "fallback",
                            "ms/step"], table))
    for line in results.get("not_run", []):
        print(f"NOT RUN: {line}")


def plot(results: dict, path: Path) -> None:
    """Steps to target against the global batch, log-log, a panel per (problem, target), a
    line per method, open triangles where a method did not reach it, SGD's perfect scaling;
    the comparators dashed, in gradient-equivalents (SGD's steps, in those units)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarize(results)
    panels = list(dict.fromkeys((r["problem"], r["target"]) for r in rows))
    if not panels:
        return
    cols = min(3, len(panels))
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, squeeze=False,
                             figsize=(5.2 * cols, 4.2 * math.ceil(len(panels) / cols)))
    colors = dict(zip(METHODS, ["black", "dimgray", "tab:blue", "tab:red", "tab:green", "tab:cyan",
                                "tab:olive", "tab:pink", "tab:purple", "tab:orange",
                                "tab:brown", "darkgoldenrod", "teal"],
                      strict=True))
    for ax, (problem, name) in zip(axes.flat, panels, strict=False):
        mine = [r for r in rows if (r["problem"], r["target"]) == (problem, name)]
        bs = sorted({r["batch"] for r in mine})
        for i, m in enumerate(METHODS):
            pts = sorted((r for r in mine if r["method"] == m), key=lambda r: r["batch"])
            done = [r for r in pts if math.isfinite(r["steps"])]
            if m in COMPARATORS:
                if done:
                    ax.plot([r["batch"] for r in done], [r["work"] for r in done], "s--",
                            color=colors[m], label=f"{METHODS[m]['label']} "
                            "(gradient-equivalents)")
                continue
            if done:
                ax.plot([r["batch"] for r in done], [r["steps"] for r in done], "o-",
                        color=colors[m], label=METHODS[m]["label"])
            cut = [r for r in pts if not math.isfinite(r["steps"]) and r["cell"]["censored"]]
            shift = 2.0 ** (0.05 * (i - 2))       # side by side, so the triangles show
            ax.plot([r["batch"] * shift for r in cut], [r["cell"]["censored"] for r in cut],
                    "^", color=colors[m], markerfacecolor="none", markersize=9)
        sgd = [r for r in mine if r["method"] == "sgd" and math.isfinite(r["steps"])]
        if sgd:
            b0 = min(sgd, key=lambda r: r["batch"])
            ax.plot(bs, [b0["steps"] * b0["batch"] / b for b in bs], ":", color="grey",
                    label="perfect scaling")
        ax.set(xscale="log", yscale="log", xlabel="global batch size (samples per step)",
               ylabel="steps to target (comparators: gradient-equivalents)")
        ax.set_xticks(bs, [str(b) for b in bs])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_title(f"{problem}: {target_label(name, mine[0]['value'])}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("hessmpi: steps to target against global batch size (open triangles: not "
                 "reached in that many steps)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(results: dict, out: Path) -> None:
    results = json.loads(tables.save("batch_scaling", results, ROOT, out).read_text())
    print_tables(results)
    plot(results, out.with_suffix(".png"))
    print(f"\nsaved {out} and {out.with_suffix('.png')}")


# ----- the job-array recipe -----------------------------------------------------------------

def jobs_array(sweep: Sweep) -> str:
    """A SLURM job-array script: one ``hessmpi train`` task per run of the first grids (not
    the comparators': their budgets count work, which ``train.steps`` cannot say)."""
    runs = []
    for problem, batch, method in units(sweep.mode, sweep.problems, sweep.batches,
                                        sweep.methods):
        if method in COMPARATORS:
            continue
        steps = (PROBLEMS[problem]["reference_steps"] if is_reference(problem, batch, method)
                 else unit_budget(sweep.mode, problem, batch))
        every = max(1, steps // 40)
        for point in first_points(sweep.mode, problem, method, batch):
            cfg = config_of(problem, method, point, batch=batch, ranks=sweep.args.ranks,
                            seed=0, steps=steps,
                            data=os.path.relpath(sweep.data[problem], ROOT),
                            device=sweep.args.device)
            cfg["train"].update(log_every=1, eval_every=every)
            cfg["checkpoint"] = {"every": every, "keep": 1000}
            sets = [f"{s}.{k}={v if isinstance(v, str) else json.dumps(v)}"
                    for s, t in cfg.items() for k, v in t.items()]
            out = f"runs/batch-scaling/{name_of(problem, batch, method)}-" + "-".join(
                f"{k}{v:g}" for k, v in point.items())
            runs.append(shlex.join([a for s in sets for a in ("--set", s)] + ["--out", out]))
    return "\n".join([
        "#!/usr/bin/env bash",
        "# The batch-scaling sweep's first grids as a SLURM job array (benchmarks/",
        "# batch_scaling.py --jobs-array): one `hessmpi train` per run, each to its full step",
        "# budget, checkpoints every 1/40 of it, so that F on every training row can be",
        "# evaluated afterwards (at batch 8000 the logged train_loss is F itself). Widening,",
        "# the reference target and the headline seeds depend on these results: a second",
        "# submission, by hand. Build the data first: batch_scaling.py --prepare.",
        "#SBATCH --job-name=hessmpi-batch-scaling", f"#SBATCH --array=0-{len(runs) - 1}",
        "#SBATCH --nodes=1", f"#SBATCH --ntasks={sweep.args.ranks}",
        "#SBATCH --cpus-per-task=4", "#SBATCH --time=00:20:00",
        "#SBATCH --output=%x-%A_%a.out", "set -euo pipefail",
        'cd "${HESSMPI_ROOT:-$SLURM_SUBMIT_DIR}"', "RUNS=(",
        *(f"  {shlex.quote(r)}" for r in runs), ")",
        'eval "args=(${RUNS[$SLURM_ARRAY_TASK_ID]})"',
        'srun --mpi=pmi2 "${HESSMPI_BIN:-.venv/bin/hessmpi}" train "${args[@]}"', ""])


# ----- main ------------------------------------------------------------------------------------

def main(argv=None) -> None:
    def csv(kind, known=None):
        def parse(text):
            values = [kind(x) for x in text.split(",") if x]
            bad = [v for v in values if known is not None and v not in known]
            if bad:
                raise argparse.ArgumentTypeError(f"{bad} not of {', '.join(map(str, known))}")
            return values
        return parse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the smoke test (default)")
    mode.add_argument("--full", action="store_true", help="every problem, batch and method")
    mode.add_argument("--fashion", action="store_true",
                      help="Fashion-MNIST (60,000 rows) at global batch 1,024-16,384 (issue 17)")
    ap.add_argument("--report", nargs="+", type=Path, metavar="JSON",
                    help="merge results files (later ones win per unit), print, plot")
    ap.add_argument("--retime", action="store_true",
                    help="with --report: time the chosen configurations alone again")
    ap.add_argument("--jobs-array", action="store_true",
                    help="print a SLURM job-array script of the first grids")
    ap.add_argument("--prepare", action="store_true", help="build the dataset and F* only")
    ap.add_argument("--problems", type=csv(str, PROBLEMS))
    ap.add_argument("--batches", type=csv(int, BATCHES + FASHION_BATCHES))
    ap.add_argument("--methods", type=csv(str, METHODS))
    ap.add_argument("--ranks", type=int, default=1, help="MPI ranks per unit (default 1)")
    ap.add_argument("--jobs", type=int, help="units at once (quick: 2, full: 1); with more "
                    "than one, the chosen configurations are re-timed alone afterwards")
    ap.add_argument("--threads", type=int, help="BLAS threads per rank (default: the cores "
                    "shared by the jobs' ranks)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    ap.add_argument("--minutes", type=float, help="no run starts after this (quick 3.6, "
                    "full 8.5); what was not run is listed")
    ap.add_argument("--out", type=Path, help="results JSON (the plot goes beside it)")
    ap.add_argument("--given", type=Path, metavar="JSON",
                    help="take the units this earlier results file holds (e.g. the SGD "
                    "references that fix the targets) instead of running them again")
    args = ap.parse_args(argv)
    mode_name = "full" if args.full else "fashion" if args.fashion else "quick"
    if args.report:
        results = None
        for part in (json.loads(p.read_text()) for p in args.report):
            if results is None:
                results = part
                continue
            results["units"].update(part["units"])
            if isinstance(results.get("data"), dict) and isinstance(part.get("data"), dict):
                results["data"] = {**results["data"], **part["data"]}
            results["timings"] = [t for t in results.get("timings", []) if not any(
                (t["problem"], t["batch"]) == (n["problem"], n["batch"])
                for n in part.get("timings", []))] + part.get("timings", [])
            results["not_run"] = results.get("not_run", []) + part.get("not_run", [])
            results["fstar"] = results.get("fstar") or part.get("fstar")
        if args.retime:
            retime(results, args, MODES[results["mode"]]["timing_steps"])
        save(results, args.out or ROOT / "bench-results" / (
            f"batch_scaling{SUFFIX[results['mode']]}.json"))
        return
    problems = args.problems or MODES[mode_name]["problems"]
    data = {p: str(datasets.dataset(PROBLEMS[p]["data"], ROOT)) for p in problems}
    sweep = Sweep(args, mode_name, data, None)
    if args.jobs_array:
        print(jobs_array(sweep), end="")
        return
    fstar = None
    if "softmax" in sweep.problems:
        fstar = datasets.softmax_optimum(data["softmax"], PROBLEMS["softmax"]["model"]["l2"],
                                         ROOT)
        sweep.fstar = fstar["fstar"]
        print(f"batch_scaling: F* = {fstar['fstar']:.12g} (||grad|| {fstar['grad_norm']:.1e})")
    if args.prepare:
        return
    out = args.out or ROOT / "bench-results" / f"batch_scaling{SUFFIX[mode_name]}.json"
    started, minutes = time.time(), args.minutes or sweep.mode["minutes"]
    retiming = sweep.jobs > 1
    deadline = started + 60 * minutes * (0.85 if retiming else 1.0)
    results = dict(mode=mode_name, command=shlex.join(sys.argv), ranks=args.ranks, data=data,
                   jobs=sweep.jobs, threads=sweep.threads, minutes=minutes, fstar=fstar,
                   units={}, timings=[], settings=dict(race=RACE,
                                                       ratio_cap=sweep.mode["ratio_cap"]))
    print(f"batch_scaling: {mode_name}: "
          f"{len(units(sweep.mode, sweep.problems, sweep.batches, sweep.methods))} units, "
          f"{sweep.jobs} at a time with {sweep.threads} BLAS thread(s) per rank; time budget "
          f"{minutes:g} min", flush=True)

    def on_result(name, res):
        results["units"][name] = res
        tables.save("batch_scaling", results, ROOT, out)

    if args.given:
        given = json.loads(args.given.read_text())
        sweep.results.update(given["units"])
        results["units"].update(given["units"])
        results["given"] = str(args.given)

    with tempfile.TemporaryDirectory(prefix="hessmpi-bs-") as tmp:
        results["not_run"] = sweep.run(deadline, Path(tmp), on_result)
    if retiming and results["units"]:
        retime(results, args, sweep.mode["timing_steps"])
    results["seconds"] = time.time() - started
    save(results, out)
    print(f"batch_scaling: {results['seconds'] / 60:.1f} min in all")


if __name__ == "__main__":
    launch.script(worker, main)
