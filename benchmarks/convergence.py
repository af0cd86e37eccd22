"""Convergence benchmark: SGD with momentum against the secant method, to targets.

    .venv/bin/python benchmarks/convergence.py            (--quick: what `make bench` runs)
    .venv/bin/python benchmarks/convergence.py --full     (the whole table; over an hour here)
    .venv/bin/python benchmarks/convergence.py --full --append --max-minutes 20   (continue)
    .venv/bin/python benchmarks/convergence.py --report bench-results/convergence.json

Problems: softmax regression and the MLP, each on the scikit-learn digits and on mnist-t10k
(first 8,000 train, last 2,000 test), with P = 2 and 4 ranks, batch 64 per rank, several
seeds. The parent process builds the datasets into bench-results/ (never into the repo),
computes the softmax optimum F* once by a float64 Newton-CG solve on the exact Hessian
(DenseNet.curvature_product), then launches itself under mpiexec once per (problem, P).
Each launch runs every configuration and seed in-process: a fresh hessmpi.trainer.Run per
run, driven step by step with Run.step, while the full training objective F(theta) (all
training rows the trainer uses, one Allreduce) and the test accuracy are evaluated on the
side at a fixed schedule of steps. Evaluation time is not counted in the wall times.

Measured per run: gradient evaluations per rank (the trainer's grad_evals, probes included)
and training wall time until a target is first seen met; the fallback rate; the step time
split (t_grad, t_comm, t_solve) as the trainer measures it.

Targets: softmax, F <= F* (1 + 1e-2) and (digits) F* (1 + 1e-3); MLP, a test-accuracy and a
train-loss target (the best SGD learning rate's median F after a fixed budget of gradient
evaluations). SGD's learning rate comes from a grid of factor 2 that is widened until the
best is interior; the secant configurations are chosen on the training objective only.
Raw results go to bench-results/convergence.json (--quick: convergence-quick.json); the
tables are printed as markdown. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench-results"
DATA_DIR = RESULTS_DIR / "convergence-data"
FSTAR_CACHE = RESULTS_DIR / "convergence-fstar.json"
SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist-t10k"
MNIST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
MNIST_TRAIN_ROWS = 8000

BATCH = 64
L2 = 1e-4
MOMENTUM = 0.9
FSTAR_GRAD_TOL = 1e-10              # ||grad F|| of the reference solve
GRID_FACTOR = 2.0
CHECK_EVERY = 500                   # steps between bitwise parameter-consistency checks
BLOWUP = 3.0                        # F > BLOWUP * F(theta_0): count the run as diverged
RACE_FACTOR = 1.5                   # a run stops at this multiple of its grid's best so far

# The prototype's table (ALGORITHM.md section 6): (problem, P, target) -> (SGD, secant).
PROTOTYPE = {
    ("softmax-digits", 2, "rel 0.01"): (990, 1850),
    ("softmax-digits", 4, "rel 0.01"): (740, 1630),
    ("softmax-digits", 4, "rel 0.001"): (1750, 18726),
    ("softmax-mnist", 4, "rel 0.01"): (10925, None),
    ("mlp-digits", 2, "test acc"): (82, 156),
    ("mlp-mnist", 2, "test acc"): (150, 230),
    ("mlp-mnist", 4, "test acc"): (90, 140),
    ("mlp-mnist", 4, "train loss"): (750, 1230),
}


# ----- problems, grids, budgets ---------------------------------------------------------------
# sgd_budget: gradient evaluations per rank an SGD run may use (for the MLPs, the point at
# which the train-loss target is taken); secant runs stop at secant_ratio_cap x SGD's median
# to the tightest target SGD reached (at most secant_budget); eval_base: steps between
# evaluations of F early on (the interval doubles later, keeping the resolution near 1/20 of
# the steps done); variants: the secant variants run (None: all); grid: SGD's first grid,
# most promising rate first (the racing caps then bite early).
PROBLEMS = {
    "softmax-digits": dict(dataset="digits", kind="softmax", hidden=[], eval_base=5,
                           rel_targets=[1e-2, 1e-3], grid=[0.2, 0.1, 0.4, 0.8],
                           sgd_budget=30000, secant_budget=60000, secant_ratio_cap=3.0,
                           variants=None),
    "softmax-mnist": dict(dataset="mnist-t10k", kind="softmax", hidden=[], eval_base=10,
                          rel_targets=[1e-2], grid=[0.1, 0.05, 0.2], sgd_budget=40000,
                          secant_budget=60000, secant_ratio_cap=3.0,
                          variants=["newton_lr=0.5", "memory=2"]),
    "mlp-digits": dict(dataset="digits", kind="mlp", hidden=[64], eval_base=2,
                       acc_target=0.92, grid=[0.05, 0.1, 0.2, 0.025], sgd_budget=600,
                       secant_budget=2400, secant_ratio_cap=4.0, variants=None),
    "mlp-mnist": dict(dataset="mnist-t10k", kind="mlp", hidden=[256, 256], eval_base=5,
                      acc_target=0.95, grid=[0.1, 0.05, 0.2], sgd_budget=750,
                      secant_budget=3000, secant_ratio_cap=4.0,
                      variants=["newton_lr=0.5", "memory=2"]),
}

# --full runs these in this order (the most wanted first); --quick the second list.
FULL_ORDER = [("softmax-digits", 4), ("softmax-mnist", 4), ("mlp-mnist", 4), ("mlp-digits", 2),
              ("mlp-digits", 4), ("softmax-digits", 2), ("mlp-mnist", 2), ("softmax-mnist", 2)]
QUICK_ORDER = [("softmax-digits", 2), ("mlp-digits", 2)]

# The first is tuned on its own learning-rate grid; the others run at its best rate(s).
SECANT_CONFIGS = [
    ("defaults", {}, 1.0),
    ("newton_lr=0.5", {"newton_lr": 0.5}, 1.0),
    ("newton_lr=0.1", {"newton_lr": 0.1}, 1.0),
    ("damping=1", {"damping": 1.0}, 1.0),
    ("damping=0", {"damping": 0.0}, 1.0),
    ("memory=2", {"memory": 2}, 1.0),
]


def fmt_lr(lr: float) -> str:
    return f"{lr:.4g}"


# ----- worker: one MPI rank of one (problem, P) launch -----------------------------------------

class Evaluator:
    """F(theta) over all training rows the trainer uses (every rank its own equal shard, one
    Allreduce) and the test accuracy (every rank its own test rows), in ``dtype``; the values
    every rank returns are rank 0's (a broadcast), so every decision on them is collective."""

    def __init__(self, comm, data_path: str, hidden: list[int], dtype):
        from hessmpi.data import read_shard
        from hessmpi.models import DenseNet

        self.comm = comm
        train = read_shard(data_path, "train", comm.rank, comm.size, equal=True)
        test = read_shard(data_path, "test", comm.rank, comm.size, equal=False)
        self.x, self.y = train.x.astype(dtype), train.y
        self.xt, self.yt = test.x.astype(dtype), test.y
        self.rows = int(comm.sum(len(self.y)))
        self.test_rows = int(comm.sum(len(self.yt)))
        self.model = DenseNet([self.x.shape[1], *hidden, train.n_classes], "relu", L2,
                              dtype=dtype)
        self.dtype = np.dtype(dtype)

    def __call__(self, theta, with_test: bool) -> tuple[float, float]:
        th = np.asarray(theta, dtype=self.dtype)
        if not np.isfinite(th).all():
            return math.nan, math.nan
        loss_sum, _ = self.model.evaluate(th, self.x, self.y)
        correct = self.model.evaluate(th, self.xt, self.yt)[1] if with_test else 0
        sums = np.array([loss_sum, correct], dtype=np.float64)
        self.comm.allreduce_sum_(sums)
        f = sums[0] / self.rows + 0.5 * L2 * float(np.dot(th, th))
        acc = sums[1] / self.test_rows if with_test else math.nan
        return self.comm.bcast((float(f), float(acc)))


def eval_interval(done: int, base: int) -> int:
    """Steps to the next evaluation after ``done`` steps: ``base`` for the first 20 intervals,
    then doubling so that the resolution stays near 1/20 of the steps done."""
    k = max(0, math.floor(math.log2(max(done, 1) / (20 * base))) + 1)
    return base * 2 ** k


def blas_threads_per_rank(mpi_comm) -> int:
    """BLAS threads per rank as `hessmpi train` chooses them: the node's cores shared evenly
    by the ranks on the node (1 when the ranks outnumber the cores)."""
    from hessmpi import backend

    if hasattr(backend, "node_layout"):
        local_rank, _, affinities = backend.node_layout(mpi_comm)
        return backend.blas_threads(local_rank, affinities)
    return backend.node_blas_threads(mpi_comm)  # the API before the GPU seam


class Worker:
    def __init__(self, spec: dict):
        from mpi4py import MPI

        from hessmpi.backend import make_backend
        from hessmpi.comm import Communicator

        self.spec = spec
        self.comm = Communicator(MPI.COMM_WORLD)
        threads = blas_threads_per_rank(MPI.COMM_WORLD)
        self.backend = make_backend("cpu", "float32", threads)
        self.threads = threads
        prob = spec["problem"]
        eval_dtype = np.float64 if prob["kind"] == "softmax" else np.float32
        self.evaluate = Evaluator(self.comm, spec["data_path"], prob["hidden"], eval_dtype)
        tmp = tempfile.mkdtemp(prefix="hessmpi-conv-") if self.comm.rank == 0 else None
        self.tmp = Path(self.comm.bcast(tmp))
        self.counter = 0
        self.f0 = None

    def log(self, text: str) -> None:
        if self.comm.rank == 0:
            print(text, flush=True)

    def config(self, optim: dict, seed: int, steps: int) -> dict:
        from hessmpi import config

        prob = self.spec["problem"]
        sets = [f"data.path={json.dumps(self.spec['data_path'])}",
                f"model.name={'softmax' if prob['kind'] == 'softmax' else 'mlp'}",
                f"model.hidden={json.dumps(prob['hidden'] or [1])}", f"model.l2={L2!r}",
                "model.activation=relu", f"train.batch_size={BATCH}", f"train.seed={seed}",
                f"train.steps={steps}", "backend.dtype=float32", "backend.device=cpu",
                f"backend.threads={self.threads}", f"optim.momentum={MOMENTUM!r}",
                "optim.check_every=0"]
        for key, value in optim.items():
            sets.append(f"optim.{key}={json.dumps(value)}")
        return config.load(None, sets)

    def train(self, optim: dict, seed: int, budget: int, stop) -> dict:
        """One run of ``optim`` (overrides of [optim]) and ``seed`` until ``budget`` gradient
        evaluations per rank or ``stop(F, acc)`` at an evaluation; returns its record."""
        from hessmpi.errors import RunFailed
        from hessmpi.trainer import Interval, Run

        prob = self.spec["problem"]
        cfg = self.config(optim, seed, 1)
        self.counter += 1
        run = Run(cfg, self.comm, self.backend, self.tmp / f"run{self.counter}")
        # steps for the schedule's bookkeeping only (constant rate): the loop ends on the
        # gradient evaluations, which the optimizer may count fractionally per step
        run.cfg["train"]["steps"] = max(1, int(budget))
        with_test = prob["kind"] == "mlp"
        f, acc = self.evaluate(run.theta, with_test)
        if self.f0 is None:
            self.f0 = f
        curve = [[0, 0, 0.0, f, acc]]
        interval = Interval()
        wall = 0.0
        status = "budget"
        kept_sum = fallbacks = 0
        next_eval = eval_interval(0, prob["eval_base"])
        perf = time.perf_counter
        done = 0
        while run.grad_evals < budget - 1e-9:
            t0 = perf()
            try:
                _, info = run.step(done, interval)
            except RunFailed:
                status = "diverged"
                break
            wall += perf() - t0
            done += 1
            kept_sum += info.rank_kept
            fallbacks += info.fallback
            if done % CHECK_EVERY == 0:
                run.check_consistency(done)
            last = run.grad_evals >= budget - 1e-9
            if done == next_eval or last:
                f, acc = self.evaluate(run.theta, with_test)
                curve.append([done, float(run.grad_evals), wall, f, acc])
                next_eval = done + eval_interval(done, prob["eval_base"])
                if not math.isfinite(f) or f > BLOWUP * self.f0:
                    status = "diverged"
                    break
                if stop(f, acc):
                    status = "stopped"
                    break
        gpe = run.grad_evals / max(done, 1)
        if status != "diverged":
            run.check_consistency(done)
        counts = dict(getattr(run.optimizer, "counts", {}))
        return dict(optim=optim, seed=seed, status=status, steps=done,
                    grad_evals=float(run.grad_evals), grad_evals_per_step=gpe, wall=wall,
                    forward_evals=float(getattr(run, "forward_evals", 0)),
                    curve=curve, fallbacks=fallbacks,
                    fallback_rate=fallbacks / max(done, 1),
                    fallback_reasons={k: v for k, v in counts.items() if k != "clipped"},
                    clipped_rate=counts.get("clipped", 0) / max(done, 1),
                    rank_kept_mean=kept_sum / max(done, 1),
                    t_grad=interval.mean("t_grad"), t_comm=interval.mean("t_comm"),
                    t_solve=interval.mean("t_solve"), t_step=wall / max(done, 1),
                    bytes_sent=interval.mean("bytes_sent"))


def hessmpi_revision() -> str:
    """The git commit of the hessmpi tree this launch imported, '+dirty' if it had local
    changes under hessmpi/ (the package is developed while benchmarks run)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "hessmpi"], cwd=ROOT,
                               text=True, capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def first_hit(curve: list, test) -> tuple[float, float]:
    """(gradient evaluations, wall seconds) at the first evaluation where test(F, acc) holds;
    (inf, inf) if never."""
    for _, evals, wall, f, acc in curve:
        if test(f, acc):
            return float(evals), float(wall)
    return math.inf, math.inf


def target_tests(spec: dict, train_target: float | None = None) -> dict:
    """{target name: test(F, acc)} of a problem, loosest first."""
    prob = spec["problem"]
    if prob["kind"] == "softmax":
        fstar = spec["fstar"]
        return {f"rel {r:g}": (lambda f, a, r=r: f <= fstar * (1 + r))
                for r in prob["rel_targets"]}
    out = {"test acc": lambda f, a: a >= prob["acc_target"]}
    if train_target is not None:
        out["train loss"] = lambda f, a: f <= train_target
    return out


def median_key(values: list[float]) -> tuple[float, float]:
    """Sort key of per-seed results (inf = not reached; lower is better): median, then mean."""
    v = np.asarray(values, dtype=np.float64)
    return float(np.median(v)), float(np.mean(v))


def evals_key(test):
    """Selection by gradient evaluations to a target: the per-seed first hits."""
    return lambda records: median_key([first_hit(r["curve"], test)[0] for r in records])


def final_f_key(records: list[dict]) -> tuple[float, float]:
    """Selection by the full training objective F at the end of the budget."""
    return median_key([r["curve"][-1][3] if r["status"] != "diverged" else math.inf
                       for r in records])


def best_of(by_lr: dict, key) -> float | None:
    """The learning rate with the lowest key (ties: the smaller rate); None if no rate has
    a finite key."""
    scored = {lr: key(rs) for lr, rs in by_lr.items()}
    if all(math.isinf(k[0]) for k in scored.values()):
        return None
    return min(scored, key=lambda lr: (*scored[lr], lr))


def worker_main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    revision = hessmpi_revision()  # before the Worker imports the package
    w = Worker(spec)
    prob, seeds = spec["problem"], spec["seeds"]
    started = time.perf_counter()
    softmax = prob["kind"] == "softmax"
    runs: list[dict] = []
    notes: list[str] = []

    def run_lr(label: str, optim: dict, lr: float, cap: int, stop,
               pursued: list[str]) -> list[dict]:
        out = []
        for seed in seeds:
            r = w.train({**optim, "lr": lr}, seed, cap, stop)
            r.update(label=label, lr=lr, cap=cap, pursued=pursued)
            out.append(r)
            last = r["curve"][-1]
            w.log(f"  {label} lr {fmt_lr(lr)} seed {seed}: {r['status']} after "
                  f"{r['grad_evals']:.0f} evals (cap {cap}), F {last[3]:.6g}"
                  + (f", test acc {last[4]:.4f}" if not softmax else "")
                  + (f", fallback {r['fallback_rate']:.1%}" if optim["name"] == "secant"
                     else "") + f", {r['wall']:.1f} s")
        runs.extend(out)
        return out

    def tune(label: str, optim: dict, grid: list[float], limit: int, stop, selections: dict,
             race: str | None, pursued: list[str]) -> dict[float, list[dict]]:
        """Run ``optim`` at every rate of ``grid`` on every seed; widen the grid by a factor
        GRID_FACTOR at an edge until the best rate of every selection is interior (at most
        spec["max_grid"] rates). Racing: a run stops at RACE_FACTOR x the best median so far
        of selection ``race`` (gradient evaluations), where it can no longer be the best."""
        by_lr: dict[float, list[dict]] = {}

        def cap() -> int:
            c = limit
            if race is not None and by_lr:
                best = min(selections[race](rs)[0] for rs in by_lr.values())
                if math.isfinite(best):
                    c = min(c, int(math.ceil(RACE_FACTOR * best)))
            return c

        for lr in grid:
            if lr not in by_lr:
                by_lr[lr] = run_lr(label, optim, lr, cap(), stop, pursued)
        blind: set[str] = set()
        while True:
            lrs = sorted(by_lr)
            extend = None
            for name, key in selections.items():
                best = best_of(by_lr, key)
                if best is None:
                    # no rate reached it: widen once toward the rate whose runs came closest
                    # (the lowest median F where they stopped; they stopped at one cap)
                    if name in blind:
                        continue
                    blind.add(name)
                    best = best_of(by_lr, final_f_key)
                    if best not in (lrs[0], lrs[-1]):
                        continue
                    notes.append(f"{label}: no rate reached '{name}'; widened once toward "
                                 "the lowest final F")
                if best == lrs[0]:
                    extend = lrs[0] / GRID_FACTOR
                elif best == lrs[-1]:
                    extend = lrs[-1] * GRID_FACTOR
                if extend is not None:
                    break
            if extend is None:
                break
            if len(lrs) >= spec["max_grid"]:
                notes.append(f"{label}: the grid stopped at {len(lrs)} rates with a best at "
                             "its edge")
                break
            w.log(f"  {label}: widening the grid to lr {fmt_lr(extend)}")
            by_lr[extend] = run_lr(label, optim, extend, cap(), stop, pursued)
        return by_lr

    # --- SGD with momentum
    tests = target_tests(spec)
    if softmax:
        tight = list(tests)[-1]
        sgd_sel = {name: evals_key(test) for name, test in tests.items()}
        sgd = tune("sgd", {"name": "sgd"}, spec["grid"], spec["sgd_budget"], tests[tight],
                   sgd_sel, tight, list(tests))
        sgd_best = {name: best_of(sgd, key) for name, key in sgd_sel.items()}
        reached = [n for n in tests if sgd_best[n] is not None]
        race = reached[-1] if reached else tight
        loose_lr = sgd_best[list(tests)[0]] or spec["grid"][0]
        tight_lr = sgd_best[race] or loose_lr
        # the clip makes the secant step about 2 x eta x |g| (newton_lr 0.2 x max_step_ratio
        # 10), so its best rate sits near half SGD's: start there
        secant_grid = list(dict.fromkeys([tight_lr / GRID_FACTOR, tight_lr,
                                          loose_lr / GRID_FACTOR]))
        train_target = None
    else:
        sgd_sel = {"F at budget": final_f_key}
        sgd = tune("sgd", {"name": "sgd"}, spec["grid"], spec["sgd_budget"],
                   lambda f, a: False, sgd_sel, None, ["F at budget"])
        sgd_best = {"F at budget": best_of(sgd, final_f_key)}
        lr = sgd_best["F at budget"]
        # the upper median of its seeds' F at the budget: at least half of them reach it
        finals = sorted(r["curve"][-1][3] for r in sgd[lr])
        train_target = finals[len(finals) // 2]
        tests = target_tests(spec, train_target)
        race = "train loss"
        secant_grid = [lr / GRID_FACTOR, lr, GRID_FACTOR * lr]
    sgd_race = evals_key(tests[race])(sgd[sgd_best[race] if softmax
                                          else sgd_best["F at budget"]])[0]
    limit = spec["secant_budget"]
    if math.isfinite(sgd_race):
        limit = min(limit, int(math.ceil(spec["secant_ratio_cap"] * sgd_race)))

    # --- secant: the defaults on their own learning-rate grid, then the variants at the
    # defaults' best rate of each selection; every choice on the training objective
    def secant_stop(f, a):
        return all(test(f, a) for test in tests.values())

    if softmax:
        sec_sel = {name: evals_key(test) for name, test in tests.items()}
    else:
        sec_sel = {"train loss": evals_key(tests["train loss"])}
    configs = spec["secant_configs"]
    secant: dict[str, dict[float, list[dict]]] = {}
    default_label, default_over, _ = configs[0]
    secant[default_label] = tune(default_label, {"name": "secant", **default_over},
                                 secant_grid, limit, secant_stop, sec_sel, race, list(tests))
    base = secant[default_label]
    # The variants chase the main target only (softmax: the loosest; MLP: train loss and
    # test accuracy) at the defaults' best rate for it, racing against the best secant run.
    main = list(tests)[0] if softmax else race
    main_test = tests[main] if softmax else secant_stop
    pursued = [main] if softmax else list(tests)
    variant_lr = best_of(base, sec_sel[main])
    if variant_lr is None:
        variant_lr = best_of(base, final_f_key)
        notes.append(f"no secant default reached '{main}': the variants run at the rate whose "
                     "runs came closest (the lowest median final F)")
    for label, overrides, mult in configs[1:]:
        everything = [rs for cfg in secant.values() for rs in cfg.values()]
        best = min(sec_sel[main](rs)[0] for rs in everything)
        cap = limit if math.isinf(best) else min(limit, int(math.ceil(RACE_FACTOR * best)))
        lr = variant_lr * mult
        secant[label] = {lr: run_lr(label, {"name": "secant", **overrides}, lr, cap,
                                    main_test, pursued)}

    if w.comm.rank == 0:
        result = dict(problem=spec["name"], ranks=w.comm.size, seeds=seeds,
                      threads_per_rank=w.threads, fstar=spec.get("fstar"),
                      train_rows=w.evaluate.rows, test_rows=w.evaluate.test_rows,
                      targets=list(tests), race_target=race, sgd_best_lr=sgd_best,
                      train_target=train_target, secant_limit=limit, notes=notes,
                      sgd_budget=spec["sgd_budget"], secant_budget=spec["secant_budget"],
                      secant_ratio_cap=spec["secant_ratio_cap"], race_factor=RACE_FACTOR,
                      eval_base=prob["eval_base"], mpi_library=w.comm.library_version(),
                      hessmpi=revision,
                      env={k: v for k, v in os.environ.items() if k.startswith("MPIR_CVAR")},
                      seconds=time.perf_counter() - started, runs=runs)
        Path(result_path).write_text(json.dumps(result))
        shutil.rmtree(w.tmp, ignore_errors=True)
    w.comm.barrier()


# ----- parent: data, F*, launches, tables -----------------------------------------------------

def build_datasets() -> dict[str, Path]:
    """bench-results/convergence-data/{digits,mnist-t10k}.h5, built once with
    hessmpi.importers (git-ignored; the shared data is never copied into the repository)."""
    from hessmpi import importers
    from hessmpi.data import write_dataset

    DATA_DIR.mkdir(parents=True, exist_ok=True)
    paths = {"digits": DATA_DIR / "digits.h5", "mnist-t10k": DATA_DIR / "mnist-t10k.h5"}
    if not paths["digits"].is_file():
        train, test, attrs = importers.digits()
        write_dataset(paths["digits"], train, test, **attrs)
    if not paths["mnist-t10k"].is_file():
        images, labels = (SHARED_MNIST / name for name in MNIST_FILES)
        if images.is_file() and labels.is_file():
            train, test, attrs = importers.mnist(images, labels, n_train=MNIST_TRAIN_ROWS)
            write_dataset(paths["mnist-t10k"], train, test, **attrs)
    return paths


def read_train(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    import h5py

    with h5py.File(path, "r") as f:
        return f["train/x"][()], f["train/y"][()], int(f.attrs["n_classes"])


def newton_cg_optimum(x: np.ndarray, y: np.ndarray, n_classes: int) -> dict:
    """min F of softmax regression on (x, y), float64, by Newton's method with the exact
    Hessian (DenseNet.curvature_product) solved by conjugate gradients (truncated early,
    tight near the end) and an Armijo backtracking line search; to ||grad F|| <= 1e-10."""
    from hessmpi.models import DenseNet

    x = x.astype(np.float64)
    model = DenseNet([x.shape[1], n_classes], "relu", L2, dtype=np.float64)
    theta = np.zeros(model.n_params)
    g = np.empty_like(theta)
    hv = np.empty_like(theta)
    total_cg = newton = 0
    started = time.perf_counter()
    for _ in range(200):
        f = float(model.loss_grad(theta, x, y, g))
        gnorm = float(np.linalg.norm(g))
        if gnorm <= FSTAR_GRAD_TOL:
            break
        newton += 1
        # CG on H p = -g to relative residual min(0.5, sqrt(||g||)) (superlinear), at least
        # 1e-3 * FSTAR_GRAD_TOL / ||g|| below the tolerance once close
        rtol = min(0.5, math.sqrt(gnorm), 0.1 * FSTAR_GRAD_TOL / gnorm + 1e-12 / gnorm)
        rtol = max(rtol, 1e-14)
        p = np.zeros_like(theta)
        r = -g.copy()
        d = r.copy()
        rr = float(r @ r)
        for _ in range(5000):
            model.curvature_product(theta, d, x, y, out=hv)
            total_cg += 1
            alpha = rr / float(d @ hv)
            p += alpha * d
            r -= alpha * hv
            rr_new = float(r @ r)
            if math.sqrt(rr_new) <= rtol * gnorm:
                break
            d = r + (rr_new / rr) * d
            rr = rr_new
        t, slope = 1.0, float(g @ p)
        while t > 1e-12:
            if float(model.loss(theta + t * p, x, y)) <= f + 1e-4 * t * slope:
                break
            t *= 0.5
        theta += t * p
    f = float(model.loss_grad(theta, x, y, g))
    return dict(fstar=f, grad_norm=float(np.linalg.norm(g)), newton_iters=newton,
                cg_iters=total_cg, seconds=time.perf_counter() - started)


def fstar_for(dataset: str, path: Path, rows: int) -> dict:
    """F* on the first ``rows`` training rows of ``path`` (the rows the trainer uses at a
    given P: equal shards drop the remainder), cached in bench-results."""
    x, y, n_classes = read_train(path)
    digest = hashlib.sha256(x[:rows].tobytes() + y[:rows].tobytes()).hexdigest()[:16]
    key = f"{dataset}:{rows}:{L2!r}:{digest}"
    cache = json.loads(FSTAR_CACHE.read_text()) if FSTAR_CACHE.is_file() else {}
    if key not in cache:
        print(f"convergence: F* of softmax regression on {dataset} ({rows} rows) by "
              "Newton-CG in float64 ...", flush=True)
        cache[key] = newton_cg_optimum(x[:rows], y[:rows], n_classes)
        print(f"  F* = {cache[key]['fstar']:.12g}, ||grad|| {cache[key]['grad_norm']:.1e}, "
              f"{cache[key]['newton_iters']} Newton / {cache[key]['cg_iters']} CG iterations, "
              f"{cache[key]['seconds']:.1f} s", flush=True)
        FSTAR_CACHE.parent.mkdir(parents=True, exist_ok=True)
        FSTAR_CACHE.write_text(json.dumps(cache, indent=1) + "\n")
    return cache[key]


def mpiexec_command() -> list[str]:
    """HESSMPI_MPIEXEC (the Makefile exports it), else the mpiexec beside this Python."""
    launcher = os.environ.get("HESSMPI_MPIEXEC")
    if launcher:
        return shlex.split(launcher)
    return [str(Path(sys.executable).parent / "mpiexec")]


def launch_env(ranks: int) -> dict:
    """More ranks than cores: MPICH's busy-wait in a collective then burns the time slices
    the other ranks need (measured here at 4 ranks on 2 cores: 9-13 ms per step of softmax
    regression); MPIR_CVAR_ENABLE_HEAVY_YIELD=1 makes the waiting ranks sleep (2 ms). At
    ranks <= cores it costs latency (0.5 -> 1.3 ms), so it is set only when oversubscribed."""
    if ranks > len(os.sched_getaffinity(0)) and "MPIR_CVAR_ENABLE_HEAVY_YIELD" not in os.environ:
        return {"MPIR_CVAR_ENABLE_HEAVY_YIELD": "1"}
    return {}


def launch(spec: dict, ranks: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="hessmpi-conv-") as tmp:
        spec_path, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [*mpiexec_command(), "-n", str(ranks), sys.executable,
               str(Path(__file__).resolve()), "--worker", str(spec_path), str(result)]
        env = dict(os.environ, MPIEXEC_TIMEOUT=str(int(timeout)))
        env.update(launch_env(ranks))
        proc = subprocess.run(cmd, cwd=ROOT, timeout=timeout + 60, check=False, env=env)
        if proc.returncode != 0 or not result.is_file():
            raise SystemExit(f"convergence: the {ranks}-rank worker failed "
                             f"(exit {proc.returncode}): {shlex.join(cmd)}")
        return json.loads(result.read_text())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="digits problems, P=2 (default)")
    mode.add_argument("--full", action="store_true", help="every problem at P = 2 and 4")
    mode.add_argument("--report", type=Path, metavar="JSON",
                      help="print the tables of an earlier results file and exit")
    ap.add_argument("--problems", nargs="+", choices=list(PROBLEMS))
    ap.add_argument("--ranks", nargs="+", type=int)
    ap.add_argument("--seeds", type=int)
    ap.add_argument("--budget-scale", type=float, default=1.0,
                    help="multiply every gradient-evaluation budget")
    ap.add_argument("--grid", type=float, nargs="+", help="initial SGD grid (all problems)")
    ap.add_argument("--secant", nargs="+", help="only these secant configuration labels")
    ap.add_argument("--max-grid", type=int, default=9, help=argparse.SUPPRESS)
    ap.add_argument("--append", action="store_true",
                    help="add launches to the results file instead of starting a new one: "
                         "with no --problems/--ranks, those of the mode's list it lacks; a "
                         "launch of the same problem and P is replaced")
    ap.add_argument("--max-minutes", type=float, default=0,
                    help="start no further (problem, P) launch after this many minutes "
                         "(0: no limit); what was left out is listed")
    ap.add_argument("--out", type=Path, help="results file")
    ap.add_argument("--timeout", type=float, default=3600,
                    help="seconds before one launch is abandoned (default 3600)")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(*args.worker)
        return
    parent(args)


def parent(args) -> None:
    if args.report:
        print_tables(json.loads(args.report.read_text()))
        return
    full = args.full
    if args.problems or args.ranks:
        order = [(name, P) for name in (args.problems or list(PROBLEMS))
                 for P in (args.ranks or ([4, 2] if full else [2]))]
    else:
        order = FULL_ORDER if full else QUICK_ORDER
    seeds = list(range(args.seeds or (3 if full else 2)))
    out = args.out or RESULTS_DIR / ("convergence.json" if full else "convergence-quick.json")
    started = time.perf_counter()
    paths = build_datasets()
    results = dict(benchmark="convergence", mode="full" if full else "quick",
                   date=datetime.now(UTC).isoformat(timespec="seconds"), host=platform.node(),
                   cores=len(os.sched_getaffinity(0)), numpy=np.__version__,
                   command=shlex.join([Path(sys.executable).name, *sys.argv]),
                   batch_per_rank=BATCH, l2=L2, momentum=MOMENTUM, dtype="float32",
                   fstar={}, launches=[])
    configs = [c for c in SECANT_CONFIGS
               if not args.secant or c[0] in args.secant or c is SECANT_CONFIGS[0]]
    results["not_run"] = []
    earlier = 0.0
    if args.append and out.is_file():
        old = json.loads(out.read_text())
        if not (args.problems or args.ranks):  # the default order: only what is missing
            have = {(x["problem"], x["ranks"]) for x in old["launches"]}
            order = [item for item in order if item not in have]
        mine = set(order)
        old["launches"] = [x for x in old["launches"] if (x["problem"], x["ranks"]) not in mine]
        old["not_run"] = [x for x in old.get("not_run", [])
                          if tuple(x.split(":")[0].split(" P=")) not in
                          {(n, str(P)) for n, P in mine}]
        old.setdefault("appended", []).append(dict(date=results["date"],
                                                   command=results["command"]))
        results = old
    earlier = results.get("seconds", 0.0)
    for name, P in order:
        prob = dict(PROBLEMS[name])
        if not full and prob["kind"] == "softmax":
            prob["rel_targets"] = prob["rel_targets"][:1]  # quick: the 1e-2 target only
        path = paths[prob["dataset"]]
        if not path.is_file():
            print(f"convergence: SKIPPED {name}: {SHARED_MNIST} not found", flush=True)
            results["not_run"].append(f"{name} P={P}: {SHARED_MNIST} not found")
            continue
        elapsed = time.perf_counter() - started
        if args.max_minutes and elapsed > 60 * args.max_minutes:
            print(f"convergence: NOT RUN {name} P={P}: past --max-minutes "
                  f"{args.max_minutes:g}", flush=True)
            results["not_run"].append(f"{name} P={P}: past --max-minutes {args.max_minutes:g} "
                                      f"({elapsed / 60:.0f} min used)")
            continue
        spec = dict(name=name, problem=prob, data_path=str(path), seeds=seeds,
                    grid=args.grid or prob["grid"], max_grid=args.max_grid,
                    sgd_budget=int(prob["sgd_budget"] * args.budget_scale),
                    secant_budget=int(prob["secant_budget"] * args.budget_scale),
                    secant_ratio_cap=prob["secant_ratio_cap"],
                    secant_configs=[c for c in configs if c is configs[0]
                                    or prob["variants"] is None
                                    or c[0] in prob["variants"]])
        if prob["kind"] == "softmax":
            y = read_train(path)[1]
            rows = (len(y) // P) * P
            fs = fstar_for(prob["dataset"], path, rows)
            results["fstar"][f"{name} P={P}"] = dict(rows=rows, **fs)
            spec["fstar"] = fs["fstar"]
        print(f"convergence: {name}, P = {P}, seeds {seeds} ...", flush=True)
        t = time.perf_counter()
        res = launch(spec, P, args.timeout)
        print(f"convergence: {name}, P = {P} done in {time.perf_counter() - t:.0f} s",
              flush=True)
        res["problem_spec"] = prob
        results["launches"].append(res)
        results["seconds"] = earlier + time.perf_counter() - started
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results) + "\n")
    print_tables(results)
    print(f"\nsaved {out} ({time.perf_counter() - started:.0f} s in all)")


# ----- tables -------------------------------------------------------------------------------

def launch_tests(launch: dict) -> dict:
    """{target name: test(F, acc)} of a finished launch."""
    prob = launch["problem_spec"]
    spec = dict(problem=prob, fstar=launch.get("fstar"))
    return target_tests(spec, launch.get("train_target"))


def groups(launch: dict) -> dict[tuple[str, float], list[dict]]:
    """{(label, lr): records over seeds}, in the order they ran."""
    out: dict[tuple[str, float], list[dict]] = {}
    for r in launch["runs"]:
        out.setdefault((r["label"], r["lr"]), []).append(r)
    return out


def hits(records: list[dict], test) -> list[tuple[float, float]]:
    return [first_hit(r["curve"], test) for r in records]


def evals_cell(records: list[dict], test, name: str | None = None) -> str:
    """median [min-max] (reached/seeds); an unreached seed shows as >its evaluations; '-'
    where the runs did not pursue target ``name`` and did not reach it."""
    h = [e for e, _ in hits(records, test)]
    if (name is not None and all(name not in r.get("pursued", [name]) for r in records)
            and not any(math.isfinite(e) for e in h)):
        return "- (not pursued)"
    n, ok = len(h), sum(math.isfinite(e) for e in h)
    unreached = [r for r, e in zip(records, h, strict=True) if not math.isfinite(e)]
    div = sum(r["status"] == "diverged" for r in unreached)
    low = min((r["grad_evals"] for r in unreached if r["status"] != "diverged"), default=None)
    tail = f" ({ok}/{n}" + (f", {div} diverged" if div else "") + ")"
    med = float(np.median(h))
    if not math.isfinite(med):
        return (f"not reached: >{low:,.0f}" if low is not None else "diverged") + tail
    finite = [e for e in h if math.isfinite(e)]
    hi = f"{max(finite):,.0f}" if ok == n else (f">{low:,.0f}" if low is not None else "div")
    return f"{med:,.0f} [{min(finite):,.0f}-{hi}]" + tail


def median_of(values) -> float:
    v = [x for x in values if math.isfinite(x)]
    return float(np.median(v)) if v else math.nan


def wall(x: float) -> str:
    return f"{x:.1f}" if math.isfinite(x) else "-"


def ms(x: float) -> str:
    return f"{x * 1e3:.2f}"


def choose(launch: dict) -> dict:
    """Per target: SGD's chosen (label, lr) and the secant's chosen (label, lr).
    Softmax: the best of each family for that target (the target is the training
    objective). MLP: SGD's rate chosen by F after its budget, the secant configuration by
    the train-loss target; each family's choice is then used for both targets."""
    tests = launch_tests(launch)
    g = groups(launch)
    sgd = {k: v for k, v in g.items() if k[0] == "sgd"}
    sec = {k: v for k, v in g.items() if k[0] != "sgd"}
    out = {}
    softmax = launch["problem_spec"]["kind"] == "softmax"
    for name, test in tests.items():
        if softmax:
            lr = launch["sgd_best_lr"].get(name)
            sel = test
        else:
            lr = launch["sgd_best_lr"]["F at budget"]
            sel = tests["train loss"]
        sgd_key = ("sgd", lr) if lr is not None else None
        if sgd_key is None:  # no rate reached it: show the one that came closest in F
            sgd_key = min(sgd, key=lambda k: final_f_key(sgd[k]))
        # fewest evaluations to the selection target; among configurations that never reach
        # it, the one that came closest (lowest median final F)
        sec_key = min(sec, key=lambda k: (*median_key([e for e, _ in hits(sec[k], sel)]),
                                          final_f_key(sec[k])[0], k[1]))
        out[name] = dict(sgd=sgd_key, secant=sec_key)
    return out


def summary_rows(launch: dict) -> list[dict]:
    tests = launch_tests(launch)
    g = groups(launch)
    rows = []
    for name, pick in choose(launch).items():
        test = tests[name]
        s_recs, c_recs = g[pick["sgd"]], g[pick["secant"]]
        s_h, c_h = hits(s_recs, test), hits(c_recs, test)
        s_med = float(np.median([e for e, _ in s_h]))
        c_med = float(np.median([e for e, _ in c_h]))
        if math.isfinite(s_med) and math.isfinite(c_med):
            ratio = f"{c_med / s_med:.2f}"
        elif math.isfinite(s_med):
            done = min(r["grad_evals"] for r, (e, _) in zip(c_recs, c_h, strict=True)
                       if not math.isfinite(e))
            ratio = f"> {done / s_med:.1f}"
        else:
            ratio = "-"
        # median over all seeds (an unreached seed counts as infinite): '-' if not reached
        s_wall = float(np.median([w for _, w in s_h]))
        c_wall = float(np.median([w for _, w in c_h]))
        rows.append(dict(
            problem=launch["problem"], P=launch["ranks"], target=name,
            sgd=f"{evals_cell(s_recs, test)}", sgd_lr=pick["sgd"][1],
            secant=evals_cell(c_recs, test), secant_cfg=pick["secant"][0],
            secant_lr=pick["secant"][1], ratio=ratio, sgd_med=s_med, secant_med=c_med,
            sgd_wall=s_wall, secant_wall=c_wall,
            wall_ratio=(c_wall / s_wall if math.isfinite(s_wall) and math.isfinite(c_wall)
                        else math.nan),
            fallback=median_of(r["fallback_rate"] for r in c_recs)))
    return rows


def target_label(launch: dict, name: str) -> str:
    prob = launch["problem_spec"]
    if name.startswith("rel "):
        return f"F <= F*(1+{name[4:]})"
    if name == "test acc":
        return f"test acc >= {prob['acc_target']:.0%}"
    return f"F <= {launch['train_target']:.4f} (SGD at {launch['sgd_budget']})"


def print_tables(results: dict) -> None:
    order = list(PROBLEMS)
    launches = sorted(results["launches"], key=lambda x: (order.index(x["problem"])
                                                         if x["problem"] in order else 99,
                                                         x["ranks"]))
    print()
    print(f"## hessmpi convergence benchmark ({results['mode']}), {results['date']}, "
          f"{results['cores']} cores")
    print()
    print(f"Batch {results['batch_per_rank']} per rank, {results['dtype']} training, l2 "
          f"{results['l2']:g}, momentum {results['momentum']}. Work = gradient evaluations "
          "per rank (the trainer's grad_evals: a secant probe step costs 2) until the first "
          "evaluation of the full training objective F (softmax: float64; MLP: float32) or of "
          "the test accuracy that meets the target; median [min-max] over seeds (reached/"
          "seeds). Wall = training seconds to that point (evaluations excluded).")
    if results.get("not_run"):
        print()
        print("NOT RUN: " + "; ".join(results["not_run"]))
    print()
    print("### Summary")
    print()
    print("| problem | P | target | SGD lr | SGD evals | secant (lr) | secant evals | ratio "
          "| SGD wall s | secant wall s | wall ratio | secant fallback |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for launch in launches:
        for row in summary_rows(launch):
            wr = row["wall_ratio"]
            print(f"| {row['problem']} | {row['P']} | {target_label(launch, row['target'])} "
                  f"| {fmt_lr(row['sgd_lr'])} | {row['sgd']} | {row['secant_cfg']} "
                  f"({fmt_lr(row['secant_lr'])}) | {row['secant']} | {row['ratio']} "
                  f"| {wall(row['sgd_wall'])} | {wall(row['secant_wall'])} "
                  f"| {'-' if math.isnan(wr) else f'{wr:.2f}'} | {row['fallback']:.1%} |")
    print()
    print("### Against the prototype (ALGORITHM.md section 6), median gradient evaluations")
    print()
    print("| problem | P | target | prototype SGD | ours SGD | prototype secant | ours secant "
          "| prototype ratio | our ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    ours = {(row["problem"], row["P"], row["target"]): row
            for launch in launches for row in summary_rows(launch)}
    for (prob, P, target), (p_sgd, p_sec) in PROTOTYPE.items():
        row = ours.get((prob, P, target))
        p_ratio = f"{p_sec / p_sgd:.2f}" if p_sec else "-"
        if row is None:
            o_sgd = o_sec = o_ratio = "not run"
        else:
            o_sgd = (f"{row['sgd_med']:,.0f}" if math.isfinite(row["sgd_med"])
                     else "not reached")
            o_sec = (f"{row['secant_med']:,.0f}" if math.isfinite(row["secant_med"])
                     else "not reached")
            o_ratio = row["ratio"]
        print(f"| {prob} | {P} | {target} | {p_sgd:,} | {o_sgd} | "
              f"{f'{p_sec:,}' if p_sec else 'not reached'} | {o_sec} | {p_ratio} | {o_ratio} |")
    for launch in launches:
        print_launch(launch, results)


def print_launch(launch: dict, results: dict) -> None:
    tests = launch_tests(launch)
    g = groups(launch)
    prob = launch["problem_spec"]
    picks = choose(launch)
    print()
    head = f"### {launch['problem']}, P = {launch['ranks']}"
    if launch.get("fstar") is not None:
        fs = results["fstar"].get(f"{launch['problem']} P={launch['ranks']}", {})
        head += (f": F* = {launch['fstar']:.10g} on {launch['train_rows']} rows "
                 f"(Newton-CG, float64, ||grad|| {fs.get('grad_norm', math.nan):.1e})")
    elif launch.get("train_target") is not None:
        head += (f": train-loss target F <= {launch['train_target']:.5g} (the chosen SGD "
                 f"rate's median F over seeds after {launch['sgd_budget']} evaluations; "
                 "the upper median for an even number of seeds)")
    print(head)
    print()
    env = launch.get("env") or {}
    print(f"seeds {launch['seeds']}; {launch['threads_per_rank']} BLAS thread(s) per rank; "
          f"{launch['mpi_library']}" + (f"; {env}" if env else "") + "; hessmpi "
          f"{launch.get('hessmpi', 'revision not recorded')}; "
          f"{launch['seconds']:.0f} s for this launch. Evaluations every "
          f"{prob['eval_base']} steps at first, the interval doubling after 20 of them. SGD "
          f"runs at most {launch['sgd_budget']:,} evaluations; secant runs at most "
          f"{launch['secant_limit']:,} (= {launch['secant_ratio_cap']:g} x SGD's median to "
          f"'{launch['race_target']}', capped at {launch['secant_budget']:,}). Racing: a run "
          f"stops at {launch['race_factor']:g} x its grid's best median so far (to "
          f"'{launch['race_target']}'), where it can no longer be the best; '>N' marks such "
          "a seed.")
    for note in launch["notes"]:
        print(f"NOTE: {note}")
    names = list(tests)
    print()
    sgd_lrs = sorted(lr for label, lr in g if label == "sgd")
    best = launch["sgd_best_lr"]
    print("SGD + momentum 0.9, learning-rate grid (factor 2; * = chosen for that target):")
    print()
    extra = " | median F at budget | median test acc at budget" if prob["kind"] == "mlp" else ""
    print("| lr | " + " | ".join(names) + extra + " |")
    print("|" + " --- |" * (1 + len(names) + (2 if extra else 0)))
    for lr in sgd_lrs:
        recs = g[("sgd", lr)]
        cells = []
        for name in names:
            mark = " *" if picks[name]["sgd"] == ("sgd", lr) else ""
            cells.append(evals_cell(recs, tests[name]) + mark)
        if extra:
            cells.append(f"{median_key([r['curve'][-1][3] for r in recs])[0]:.5f}")
            cells.append(f"{median_of(r['curve'][-1][4] for r in recs):.4f}")
        print(f"| {fmt_lr(lr)} | " + " | ".join(cells) + " |")
    where = {n: (sgd_lrs.index(lr) if lr in sgd_lrs else None) for n, lr in best.items()
             if lr is not None}
    print()
    print("best SGD rate per selection: " + "; ".join(
        f"{n}: {fmt_lr(best[n])} (position {i + 1} of {len(sgd_lrs)}, "
        f"{'interior' if 0 < i < len(sgd_lrs) - 1 else 'EDGE'})" for n, i in where.items()))
    print()
    print("secant (the defaults on their own rate grid; each variant at the defaults' best "
          "rate for the main target, chasing that target only; * = chosen, on the training "
          "objective):")
    print()
    print("| config | lr | " + " | ".join(names) + " | fallback | clipped | kept | t_grad ms "
          "| t_comm ms | t_solve ms | step ms |")
    print("|" + " --- |" * (9 + len(names)))
    for (label, lr), recs in g.items():
        if label == "sgd":
            continue
        cells = []
        for name in names:
            mark = " *" if picks[name]["secant"] == (label, lr) else ""
            cells.append(evals_cell(recs, tests[name], name) + mark)
        print(f"| {label} | {fmt_lr(lr)} | " + " | ".join(cells)
              + f" | {median_of(r['fallback_rate'] for r in recs):.1%} "
              f"| {median_of(r['clipped_rate'] for r in recs):.1%} "
              f"| {median_of(r['rank_kept_mean'] for r in recs):.2f} "
              f"| {ms(median_of(r['t_grad'] for r in recs))} "
              f"| {ms(median_of(r['t_comm'] for r in recs))} "
              f"| {ms(median_of(r['t_solve'] for r in recs))} "
              f"| {ms(median_of(r['t_step'] for r in recs))} |")
    reasons: dict[str, int] = {}
    for r in launch["runs"]:
        for k, v in r.get("fallback_reasons", {}).items():
            reasons[k] = reasons.get(k, 0) + v
    if any(reasons.values()):
        print()
        print("fallbacks by reason, all secant runs: "
              + ", ".join(f"{k} {v}" for k, v in reasons.items() if v))
    print()
    print("step time of the chosen runs, median over seeds (ms per step; t_comm includes "
          "waiting for the slowest rank):")
    print()
    print("| target | optimizer | lr | t_grad | t_comm | t_solve | step | grad evals/step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, pick in picks.items():
        for key in (pick["sgd"], pick["secant"]):
            recs = g[key]
            print(f"| {name} | {key[0]} | {fmt_lr(key[1])} "
                  f"| {ms(median_of(r['t_grad'] for r in recs))} "
                  f"| {ms(median_of(r['t_comm'] for r in recs))} "
                  f"| {ms(median_of(r['t_solve'] for r in recs))} "
                  f"| {ms(median_of(r['t_step'] for r in recs))} "
                  f"| {recs[0]['grad_evals_per_step']} |")


if __name__ == "__main__":
    main()
