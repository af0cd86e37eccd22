"""Batch scaling: optimizer steps to a target against the global batch size, each point tuned.

    .venv/bin/python benchmarks/batch_scaling.py --quick     (softmax only, a smoke test, < 4 min)
    python benchmarks/batch_scaling.py --full --problems softmax,mlp --out A.json (~6.5 min)
    python benchmarks/batch_scaling.py --full --problems autoencoder --out B.json (~6 min)
    python benchmarks/batch_scaling.py --full                (all of it: ~12.5 min on an H100)
    python benchmarks/batch_scaling.py --list [--full]       (the runs of the sweep; runs nothing)
    python benchmarks/batch_scaling.py --jobs-array [--full] (a SLURM job-array recipe of them)
    python benchmarks/batch_scaling.py --report A.json B.json (merge results; tables and plot)
    python benchmarks/batch_scaling.py --report A.json --retime (and re-time the choices alone)
    python benchmarks/batch_scaling.py --prepare             (only the dataset and F*, to carry)

The question (issue 10; ALGORITHM.md sections 6-9): distributed training is the large-batch
regime (global batch = ranks x batch per rank; wall time goes with steps), so measure steps to
a target against the global batch size, each point tuned (Shallue et al. 2018; Zhang et al.
2019), for SGD with momentum 0.9, the secant method without a line search, the secant method
with the Armijo line search on the shared batch and a memory of several steps' probe pairs,
the same on history pairs (the steps taken and the change of the averaged gradient on the
same global batch), and the deflated variant.

Problems (mnist-t10k: the first 8,000 samples train, the last 2,000 test; built with
hessmpi.importers.mnist into bench-results/batch_scaling-data/, never into the repository):
softmax regression (targets: the full training objective F within 1e-2 of its optimum F*
at every batch, 1e-3 at the full batch only; F* from a float64 Newton-CG solve on the exact
Hessian, benchmarks/convergence.py's); the MLP 784-256-256-10 (targets: a train-loss target
and 95% test accuracy); the deep autoencoder 784-1000-500-250-30-... (target: a train-loss
target). The MLP's and the autoencoder's train targets are the upper median over seeds of F
after ``reference_steps`` steps of SGD+momentum at the full batch, its learning rate chosen by
that F on a grid whose best point is interior (so SGD reaches them at the full batch in about
that many steps, by construction).

Method: every run is a hessmpi.trainer.Run driven step by step with Run.step, in-process, one
process per (problem, batch, method) unit, with one rank of batch B by default. Data
parallelism is exact for the gradient: for SGD one rank at batch B takes the same steps as P
ranks at B/P each (checked on 1, 2 and 4 ranks). It is not exact for the secant methods: the
number of pairs per step is P x pairs_per_rank, and with one rank each pair's curvature
comes from the whole batch rather than one rank's shard. Measured here, softmax at 8000 to
1e-1: 60 steps on 1 x 8000, 480 on 2 x 4000, not in 560 on 4 x 2000. One rank flatters the
secant methods; ``--ranks P`` runs the units under mpiexec with B/P per rank instead. The
full training objective F (all training rows, one Allreduce) is evaluated on the side at a
schedule of steps (every ``base`` steps for the first 40 evaluations, then every 1/40 of the
steps done), and every stop is decided on values every rank holds alike (F broadcast from
rank 0, step counts, a deadline broadcast from rank 0). Evaluation time is not counted.

Tuning, on the training objective only: each (method, batch) starts from a small grid (the
learning rate at 3 points a factor 2 apart around a guess, times the method's own options:
newton_lr for the secant method, memory and probe_every T for the line-search variant,
probe_every T for the deflated one); for every training target the best point (fewest steps)
must be interior on every axis, else the grid is widened there automatically (up to a limit;
the tables say where each best point was: interior, at the bound of its option's range, or at
the EDGE where the widening stopped). The test split is read only to report the MLP's
test-accuracy target, for the configuration chosen by the train-loss target. Racing: a run
stops once it has passed RACE x the best steps so far of every training target it has not
reached, and quasi-Newton runs stop at RATIO_CAP x SGD's steps at the same batch (a '>N' in the
tables). Several seeds at the headline points (softmax and the MLP at the full batch): the
chosen configurations re-run with seeds 1.. and the medians reported.

Devices: see Planner (--device auto: the GPU, but softmax up to batch 4096 on CPU cores,
several units at once; all methods of one (problem, batch) on the same device). Wall time
per step: the chosen configurations are re-timed alone after the sweep (``TIMING_STEPS``
steps after ``TIMING_WARMUP``; ``--no-timing``: the in-run times), so that steps convert to
time. The aim (issue
10): at large batch the best variant reaches each target in at most half SGD+momentum's steps
and at most 0.65 x its wall time; the output says whether it was met, target by target.

Results: bench-results/batch_scaling.json (--quick: batch_scaling-quick.json), markdown tables
on standard output, and the log-log plot bench-results/batch_scaling.png (-quick.png).
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import functools
import itertools
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
DATA_DIR = RESULTS_DIR / "batch_scaling-data"
SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist-t10k"
MNIST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
TRAIN_ROWS = 8000                    # the ../shared/data convention: first 8,000 of t10k train

BATCHES = (256, 1024, 4096, 8000)    # global batch sizes; 8000 = the whole training split
FULL_BATCH = 8000
MOMENTUM = 0.9
GRID_FACTOR = 2.0                    # learning-rate grids: a factor 2 apart
RACE = 1.5                           # a run stops at RACE x the best steps so far (per target)
BLOWUP = 3.0                         # F > BLOWUP x F(theta_0): diverged
AIM_STEPS, AIM_WALL = 0.5, 0.65      # issue 10's aim at large batch
LARGE_BATCHES = (4096, 8000)         # where the aim is checked (8000 is the headline)
TIMING_STEPS, TIMING_WARMUP = 60, 5
EVALS_PER_DOUBLING = 40              # evaluation resolution: about 1/40 of the steps done
QN_STEPS_FACTOR = 0.6               # estimate: a quasi-Newton run's steps / SGD's (measured)
CPU_SOFTMAX_MAX_BATCH = 4096         # --device auto: softmax at these batches on CPU cores
DEADLINE_RESERVE = 0.15              # share of --minutes kept for timing, tables and the plot

# ----- problems ---------------------------------------------------------------------------------
# lr guess of SGD at batch B: anchor * (B / 8000) ** exponent, snapped to anchor * 2^k.
# budget: steps an SGD run may take at each batch; expected: a priori SGD steps of the
# estimate (measured on an H100 and on this project's prototype, ALGORITHM.md s.6-9).
PROBLEMS: dict[str, dict] = {
    "softmax": dict(
        label="softmax regression, mnist-t10k",
        model={"name": "softmax", "l2": 1e-4},
        array_config="jobs/configs/mnist_mlp.toml",
        # 1e-3 only at the full batch: at 4096 SGD+momentum needs more than 2,500 steps for it
        # and at 1024 more than 6,000 (measured on the H100 machine), and the quasi-Newton
        # grids chasing it there would not fit a 9-minute call
        targets={256: ["rel 0.01"], 1024: ["rel 0.01"], 4096: ["rel 0.01"],
                 8000: ["rel 0.01", "rel 0.001"]},
        lr_anchor=3.0, lr_exponent=0.8,
        budget={256: 20000, 1024: 6000, 4096: 2500, 8000: 1500},
        expected={256: 14000, 1024: 3000, 4096: 1400, 8000: 624},
    ),
    "mlp": dict(
        label="MLP 784-256-256-10 (ReLU), mnist-t10k",
        model={"name": "mlp", "hidden": [256, 256], "activation": "relu", "l2": 1e-4},
        array_config="jobs/configs/mnist_mlp.toml",
        targets=["train loss", "test acc 0.95"],
        reference_steps=400,
        lr_anchor=0.125, lr_exponent=0.15,
        budget={256: 3000, 1024: 1500, 4096: 1000, 8000: 800},
        expected={256: 700, 1024: 300, 4096: 350, 8000: 400},
    ),
    "autoencoder": dict(
        label="deep autoencoder 784-1000-500-250-30 (logistic), mnist-t10k",
        model={"name": "autoencoder", "encoder": [1000, 500, 250, 30], "l2": 1e-5},
        array_config="jobs/configs/mnist_autoencoder.toml",
        targets=["train loss"],
        reference_steps=300,
        lr_anchor=3e-3, lr_exponent=0.0,
        budget={256: 2500, 1024: 1200, 4096: 800, 8000: 600},
        expected={256: 600, 1024: 350, 4096: 330, 8000: 300},
    ),
}

# ----- methods ----------------------------------------------------------------------------------
# optim: the [optim] keys every point of the method sets; axes: the options tuned besides the
# learning rate (initial values; widened along AXIS_LATTICE when a best point sits at an end).
METHODS: dict[str, dict] = {
    "sgd": dict(label="SGD+momentum", optim={"name": "sgd", "momentum": MOMENTUM}, axes={}),
    "secant": dict(label="secant (no line search)",
                   optim={"name": "secant", "momentum": MOMENTUM},
                   axes={"newton_lr": [0.2, 0.5]}),
    # The classical quasi-Newton recipe on the shared batch: Armijo backtracking from the full
    # step, no momentum, no damping (the line search makes it unnecessary; damping 0.1 adds
    # 0.1 I to every pair's curvature and stalled softmax at 8e-2 relative on a first try),
    # the Barzilai-Borwein scale s'y/y'y of the initial inverse Hessian, the clip far away.
    "secant-ls": dict(label="secant, probe pairs + Armijo + memory",
                      optim={"name": "secant", "line_search": "armijo", "newton_lr": 1.0,
                             "momentum": 0.0, "damping": 0.0, "h0": "bb",
                             "max_step_ratio": 1e4},
                      axes={"memory": [5, 10], "probe_every": [1]}),
    # Multi-batch quasi-Newton (Berahas et al. 2016): the pairs are the steps taken and the change
    # of the averaged gradient on the same global batch (free at the full batch, one more
    # gradient per step below it), the same Armijo recipe as secant-ls.
    "secant-history": dict(label="secant, history pairs + Armijo",
                           optim={"name": "secant", "pairs": "history",
                                  "line_search": "armijo", "newton_lr": 1.0, "momentum": 0.0,
                                  "damping": 0.0, "h0": "bb", "max_step_ratio": 1e4},
                           axes={"memory": [5, 10]}),
    # k = 10 basis columns (the softmax Hessian's top eigenvalue is a block of 9), full
    # Newton step (alpha = 1) in the tracked space, momentum on the complement.
    "deflated": dict(label="deflated (k=10)",
                     optim={"name": "deflated", "pairs_per_rank": 10, "newton_lr": 1.0,
                            "momentum": MOMENTUM},
                     axes={"probe_every": [4, 10]}),
}
AXIS_LATTICE = {"newton_lr": [0.05, 0.1, 0.2, 0.5, 1.0, 2.0],
                "memory": [1, 2, 5, 10, 20, 40],
                "probe_every": [1, 2, 4, 10, 20, 50]}

MODES: dict[str, dict] = {
    # a smoke test sized for a busy 2-core machine (20-50 ms per softmax step there): the
    # 1e-2 target only at the full batch (batch 1024 needs about 3,000 SGD steps for it)
    "quick": dict(problems=["softmax"], batches=[1024, 8000],
                  methods=["sgd", "secant", "secant-ls"],
                  targets={"softmax": {1024: ["rel 0.1"], 8000: ["rel 0.1", "rel 0.01"]}},
                  lr_points={"sgd": 3, "qn": 2}, axes={"secant": {}, "secant-ls": {
                      "memory": [10], "probe_every": [1]}},
                  widen_axes=False, max_points={"sgd": 4, "qn": 3},
                  budget={"softmax": {1024: 800, 8000: 600}}, ratio_cap=1.5,
                  expected={"softmax": {1024: 500, 8000: 380}},
                  headline={}, minutes=3.6, jobs=2, timing=True, timing_steps=30),
    "full": dict(problems=list(PROBLEMS), batches=list(BATCHES), methods=list(METHODS),
                 targets={}, lr_points={"sgd": 3, "qn": 3}, axes={}, widen_axes=True,
                 max_points={"sgd": 8, "qn": 12}, budget={}, ratio_cap=2.0,
                 headline={("softmax", FULL_BATCH): 3, ("mlp", FULL_BATCH): 3},
                 minutes=8.5, jobs=None, timing=True),
}


def _apply_overrides() -> None:
    """HESSMPI_BENCH_OVERRIDES (JSON, for smoke tests of the machinery): {"problems": {name:
    {key: value}}, "modes": {name: {key: value}}} merged over PROBLEMS and MODES (dicts one
    level deep), in the parent and, inherited, in its workers."""
    text = os.environ.get("HESSMPI_BENCH_OVERRIDES")
    if not text:
        return
    over = json.loads(text)
    for table, key in ((PROBLEMS, "problems"), (MODES, "modes")):
        for name, changes in over.get(key, {}).items():
            for k, v in changes.items():
                if isinstance(v, dict) and isinstance(table[name].get(k), dict):
                    v = {int(i) if i.isdigit() else i: x for i, x in v.items()}
                table[name][k] = v


_apply_overrides()


def is_qn(method: str) -> bool:
    return method != "sgd"


def fmt(x: float) -> str:
    return f"{x:.4g}"


# ----- the sweep's expansion ----------------------------------------------------------------------

def lr_guess(problem: str, method: str, batch: int) -> float:
    """The centre of a unit's first learning-rate grid, on the lattice anchor * 2^k."""
    p = PROBLEMS[problem]
    raw = p["lr_anchor"] * (batch / FULL_BATCH) ** p["lr_exponent"]
    k = round(math.log2(raw / p["lr_anchor"]))
    return p["lr_anchor"] * 2.0 ** k


def initial_lrs(problem: str, method: str, batch: int, points: int) -> list[float]:
    """The first learning rates of a unit, most promising first (the racing caps then bite
    early): the guess, then half of it, then twice it."""
    g = lr_guess(problem, method, batch)
    return [g, g / GRID_FACTOR, g * GRID_FACTOR][:points]


def unit_axes(mode: dict, method: str) -> dict[str, list]:
    return dict(mode["axes"].get(method, METHODS[method]["axes"]))


def unit_budget(mode: dict, problem: str, batch: int) -> int:
    return int(mode["budget"].get(problem, PROBLEMS[problem]["budget"])[batch])


def unit_targets(mode: dict, problem: str, batch: int) -> list[str]:
    """The targets of a unit: the problem's, or the mode's (a list, or one per batch)."""
    targets = mode["targets"].get(problem, PROBLEMS[problem]["targets"])
    return list(targets[batch] if isinstance(targets, dict) else targets)


def initial_points(mode: dict, problem: str, method: str, batch: int) -> list[dict]:
    """The first grid of a unit: learning rates x the method's options, in running order."""
    lrs = initial_lrs(problem, method, batch, mode["lr_points"]["qn" if is_qn(method) else "sgd"])
    axes = unit_axes(mode, method)
    names = list(axes)
    out = []
    for lr in lrs:
        for values in itertools.product(*(axes[n] for n in names)):
            out.append({"lr": lr, **dict(zip(names, values, strict=True))})
    return out


def point_optim(method: str, point: dict, ranks: int = 1) -> dict:
    """The [optim] overrides of a point (the deflated method keeps m = P k near 10)."""
    o = dict(METHODS[method]["optim"])
    o.update(point)
    if method == "deflated" and ranks > 1:
        o["pairs_per_rank"] = max(1, METHODS["deflated"]["optim"]["pairs_per_rank"] // ranks)
    return o


def expand_sweep(mode: str = "full", problems=None, batches=None, methods=None,
                 ranks: int = 1) -> list[dict]:
    """The runs the sweep starts with, one dict per run: problem, method, batch (global),
    ranks, batch_per_rank, point (lr and the method's options), optim (the [optim]
    overrides), model, seed, steps (the most the run may take), stage ("reference": SGD at
    the full batch that fixes the MLP's / autoencoder's train target; "tune": the first grid;
    "seeds": a re-run of the configuration chosen for a target, known only after tuning, so
    its point is None). Widening adds points beyond these where a best point sits at an
    end of its grid; they are decided while the sweep runs."""
    m = MODES[mode]
    problems = list(problems or m["problems"])
    batches = sorted(batches or m["batches"])
    methods = list(methods or m["methods"])
    runs = []
    for problem in problems:
        prob = PROBLEMS[problem]
        for batch in batches:
            if batch % ranks:
                raise ValueError(f"batch {batch} is not a multiple of {ranks} ranks")
            for method in methods:
                reference = (method == "sgd" and batch == FULL_BATCH
                             and "reference_steps" in prob)
                steps = prob["reference_steps"] if reference else unit_budget(m, problem, batch)
                for point in initial_points(m, problem, method, batch):
                    runs.append(dict(problem=problem, method=method, batch=batch, ranks=ranks,
                                     batch_per_rank=batch // ranks, point=point,
                                     optim=point_optim(method, point, ranks),
                                     model=dict(prob["model"]), seed=0, steps=steps,
                                     stage="reference" if reference else "tune"))
                for seed in range(1, m["headline"].get((problem, batch), 1)):
                    if reference:
                        # the reference's own seeds: its best rate (lowest F), fixed steps
                        runs.append(dict(problem=problem, method=method, batch=batch,
                                         ranks=ranks, batch_per_rank=batch // ranks,
                                         point=None, optim=None, model=dict(prob["model"]),
                                         seed=seed, steps=steps, stage="reference",
                                         target=None))
                        continue
                    for target in unit_targets(m, problem, batch):
                        if target.startswith("test"):
                            continue
                        runs.append(dict(problem=problem, method=method, batch=batch,
                                         ranks=ranks, batch_per_rank=batch // ranks,
                                         point=None, optim=None, model=dict(prob["model"]),
                                         seed=seed, steps=unit_budget(m, problem, batch),
                                         stage="seeds", target=target))
    return runs


def describe_run(r: dict) -> str:
    if r["point"] is None and r.get("target") is None:
        hyper = "the reference's best learning rate"
    elif r["point"] is None:
        hyper = f"the configuration chosen for '{r['target']}'"
    else:
        hyper = " ".join(f"{k}={fmt(v) if isinstance(v, float) else v}"
                         for k, v in r["point"].items())
    return (f"{r['problem']:<11} {r['method']:<9} batch {r['batch']:>5} "
            f"({r['ranks']}x{r['batch_per_rank']})  {hyper:<40} seed {r['seed']}  "
            f"<= {r['steps']} steps  [{r['stage']}]")


# ----- the job-array recipe ---------------------------------------------------------------------

def train_args(r: dict, data_path: str, runs_dir: str, device: str = "auto") -> list[str]:
    """`hessmpi train` arguments that reproduce run ``r`` with a fixed step budget (the
    array has no early stop): checkpoints every evaluation interval keep the parameters so
    that F can be evaluated on all training rows afterwards (at batch 8000 the logged
    train_loss is F itself)."""
    prob = PROBLEMS[r["problem"]]
    every = max(1, r["steps"] // 40)
    sets = [f"data.path={data_path}", f"train.batch_size={r['batch_per_rank']}",
            f"train.steps={r['steps']}", f"train.seed={r['seed']}", "train.log_every=1",
            f"train.eval_every={every}", f"checkpoint.every={every}",
            "checkpoint.keep=1000", f"backend.device={device}"]
    for section in ("model", "optim"):
        sets += [f"{section}.{k}={set_value(v)}" for k, v in r[section].items()]
    point = "-".join(f"{k}{fmt(v) if isinstance(v, float) else v}" for k, v in r["point"].items())
    out = f"{runs_dir}/{r['problem']}-b{r['batch']}-{r['method']}-{point}-s{r['seed']}"
    args = ["--config", prob["array_config"]]
    for s in sets:
        args += ["--set", s]
    return args + ["--out", out]


def set_value(v) -> str:
    """A --set value: bare strings, TOML lists and booleans, Python's float repr."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def jobs_array(runs: list[dict], data_path: str, device=lambda problem: "auto") -> str:
    """A SLURM job-array script: one array task per run of the sweep's first stage."""
    concrete = [r for r in runs if r["point"] is not None]
    later = [r for r in runs if r["point"] is None]
    ranks = concrete[0]["ranks"] if concrete else 1
    lines = [
        "#!/usr/bin/env bash",
        "# hessmpi batch-scaling sweep as a SLURM job array (written by",
        "# benchmarks/batch_scaling.py --jobs-array): one array task per run, each a plain",
        "# `hessmpi train` with a fixed step budget. Submit from the hessmpi checkout after",
        "# building the dataset (python benchmarks/batch_scaling.py --prepare):",
        f"#     sbatch --array=0-{len(concrete) - 1} this-script.sbatch",
        "# In-process the benchmark stops a run early at its target and widens a grid whose",
        "# best point sits at an end; here every run goes to its budget, and the widening and",
        "# the headline seeds are a second submission once the best points are known (listed",
        "# at the end). F on all training rows at each checkpoint gives the steps to target.",
        "#SBATCH --job-name=hessmpi-batch-scaling",
        f"#SBATCH --array=0-{len(concrete) - 1}",
        "#SBATCH --nodes=1",
        f"#SBATCH --ntasks={ranks}",
        "#SBATCH --gpus-per-task=1",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --time=00:20:00",
        "#SBATCH --output=%x-%A_%a.out",
        "set -euo pipefail",
        'cd "${HESSMPI_ROOT:-$SLURM_SUBMIT_DIR}"',
        'HESSMPI=${HESSMPI_BIN:-.venv/bin/hessmpi}',
        "RUNS=(",
    ]
    for r in concrete:
        args = train_args(r, data_path, "runs/batch-scaling", device(r["problem"]))
        lines.append("  " + shlex.quote(shlex.join(args)))
    lines += [
        ")",
        'if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then',
        '    echo "submit with sbatch --array=0-$((${#RUNS[@]} - 1))" >&2; exit 2',
        "fi",
        'eval "args=(${RUNS[$SLURM_ARRAY_TASK_ID]})"',
        'echo "hessmpi-batch-scaling task $SLURM_ARRAY_TASK_ID: hessmpi train ${args[*]}"',
        'srun --mpi=pmi2 "$HESSMPI" train "${args[@]}"',
    ]
    if later:
        lines += ["", "# Second stage, after the first: the headline seeds re-run each method's "
                  "chosen configuration:"]
        for r in later:
            lines.append(f"#   {describe_run(r)}")
    return "\n".join(lines) + "\n"


# ----- pure selection on the training objective (never the test split) ---------------------

def train_hit(record: dict, threshold: float) -> dict | None:
    """The first evaluation at which F <= threshold: {steps, grad_evals, forward_evals,
    wall}; None if never. Reads the training curve only."""
    for step, ge, fe, wall, f in record["curve"]:
        if f <= threshold:
            return dict(steps=step, grad_evals=ge, forward_evals=fe, wall=wall)
    return None


def test_hit(record: dict, threshold: float) -> dict | None:
    """The first evaluation at which the test accuracy >= threshold (reporting only)."""
    for step, ge, fe, wall, acc in record.get("test_curve") or []:
        if acc >= threshold:
            return dict(steps=step, grad_evals=ge, forward_evals=fe, wall=wall)
    return None


def final_f(record: dict) -> float:
    if record["status"] == "diverged":
        return math.inf
    f = record["curve"][-1][4]
    return f if math.isfinite(f) else math.inf


def point_key(point: dict) -> str:
    return json.dumps(point, sort_keys=True)


def best_point(points: dict[str, dict], threshold: float | None) -> str | None:
    """The key of the point whose seed-0 run reached F <= threshold in the fewest steps
    (ties: fewer gradient evaluations, then the smaller learning rate); None if none did.
    With threshold None: the lowest F where the runs ended (the reference selection, or a
    direction for widening when nothing reached a target)."""
    scored = []
    for key, p in points.items():
        rec = p["records"][0]
        if threshold is None:
            score = (final_f(rec), 0.0)
            if math.isinf(score[0]):
                continue
        else:
            hit = train_hit(rec, threshold)
            if hit is None:
                continue
            score = (hit["steps"], hit["grad_evals"])
        scored.append((*score, p["point"]["lr"], key))
    return min(scored)[-1] if scored else None


def neighbours(points: dict[str, dict], key: str, axis: str) -> tuple[list, list]:
    """Values of ``axis`` below and above the point's among evaluated points that agree with
    it on every other axis."""
    p = points[key]["point"]
    others = {k: v for k, v in p.items() if k != axis}
    values = [q["point"][axis] for q in points.values()
              if {k: v for k, v in q["point"].items() if k != axis} == others]
    return [v for v in values if v < p[axis]], [v for v in values if v > p[axis]]


def placement(points: dict[str, dict], key: str, widen_axes: bool = True) -> dict[str, str]:
    """Where a best point sits on each axis: interior, bound (the end of the option's range,
    the other side evaluated), EDGE (an end of the evaluated grid) or fixed (an option the
    mode does not tune)."""
    p = points[key]["point"]
    out = {}
    for axis in p:
        below, above = neighbours(points, key, axis)
        if axis != "lr" and not widen_axes and not below and not above:
            out[axis] = "fixed"
            continue
        lattice = AXIS_LATTICE.get(axis)
        at_low = lattice is not None and p[axis] == lattice[0]
        at_high = lattice is not None and p[axis] == lattice[-1]
        if below and above:
            out[axis] = "interior"
        elif (below or at_low) and (above or at_high):
            out[axis] = "bound"
        else:
            out[axis] = "EDGE"
    return out


def outward(points: dict[str, dict], key: str, axis: str, widen_axes: bool) -> list[dict]:
    """Points one step beyond a best point along ``axis`` where it sits at an end of the
    evaluated grid (the learning rate by GRID_FACTOR, an option to the next lattice value)."""
    p = points[key]["point"]
    below, above = neighbours(points, key, axis)
    new = []
    if axis == "lr":
        if not below:
            new.append(p["lr"] / GRID_FACTOR)
        if not above:
            new.append(p["lr"] * GRID_FACTOR)
    elif widen_axes:   # to the nearest lattice values beyond it (the grid may be off-lattice)
        lattice = sorted(AXIS_LATTICE.get(axis, []))
        lower = [v for v in lattice if v < p[axis]]
        higher = [v for v in lattice if v > p[axis]]
        if not below and lower:
            new.append(lower[-1])
        if not above and higher:
            new.append(higher[0])
    return [{**p, axis: v} for v in new]


# ----- worker: one MPI job running one unit (problem, batch, method) -------------------------

def eval_interval(done: int, base: int, per: int = EVALS_PER_DOUBLING) -> int:
    """Steps to the next evaluation: ``base`` for the first ``per``, then doubling, so that
    the resolution stays near 1/``per`` of the steps done (benchmarks/convergence.py's
    schedule, with 40 where it has 20)."""
    k = max(0, math.floor(math.log2(max(done, 1) / (per * base))) + 1)
    return base * 2 ** k


class Evaluator:
    """F(theta) over all training rows (each rank its equal shard, one Allreduce), and the
    test accuracy (each rank its test rows; the MLP's report only). Every rank returns rank
    0's values (a broadcast), so decisions taken on them are collective."""

    def __init__(self, comm, backend, model_cfg: dict, data_path: str, with_test: bool):
        from hessmpi.data import read_shard
        from hessmpi.models import build_model

        xp, dtype = backend.xp, backend.dtype
        self.comm, self.xp = comm, xp
        train = read_shard(data_path, "train", comm.rank, comm.size, equal=True)
        self.x, self.y = xp.asarray(train.x, dtype=dtype), xp.asarray(train.y)
        self.rows = int(comm.sum(len(train.y)))
        self.with_test = with_test
        if with_test:
            test = read_shard(data_path, "test", comm.rank, comm.size, equal=False)
            self.xt, self.yt = xp.asarray(test.x, dtype=dtype), xp.asarray(test.y)
            self.test_rows = int(comm.sum(len(test.y)))
        self.model = build_model(model_cfg, train.x.shape[1], train.n_classes, xp=xp,
                                 dtype=dtype)

    def train_objective(self, theta) -> float:
        loss_sum, _ = self.model.evaluate(theta, self.x, self.y)
        sums = np.array([loss_sum])
        self.comm.allreduce_sum_(sums)
        f = sums[0] / self.rows + 0.5 * self.model.l2 * float(theta @ theta)
        return float(self.comm.bcast(f if math.isfinite(f) else math.inf))

    def test_accuracy(self, theta) -> float:
        _, correct = self.model.evaluate(theta, self.xt, self.yt)
        sums = np.array([float(correct)])
        self.comm.allreduce_sum_(sums)
        return float(self.comm.bcast(sums[0] / self.test_rows))


class Unit:
    """One (problem, batch, method): its grid search, widening and headline seeds, every run a
    fresh hessmpi Run in this process."""

    def __init__(self, spec: dict):
        from mpi4py import MPI

        from hessmpi import trainer
        from hessmpi.backend import blas_threads, make_backend, node_layout
        from hessmpi.comm import Communicator
        from hessmpi.data import read_shard

        self.spec = spec
        self.comm = Communicator(MPI.COMM_WORLD)
        local_rank, _, affinities = node_layout(MPI.COMM_WORLD)
        threads = spec.get("threads") or blas_threads(local_rank, affinities)
        self.backend = make_backend(spec["device"], "float32", threads, local_rank=local_rank)
        self.threads = threads
        # every Run of this process reads the same shards: read them once
        trainer.read_shard = functools.lru_cache(maxsize=8)(read_shard)
        self.problem = PROBLEMS[spec["problem"]]
        model_cfg = self.model_config()
        self.evaluator = (Evaluator(self.comm, self.backend, model_cfg, spec["data_path"],
                                    with_test=any(t.startswith("test") for t in spec["targets"]))
                          if spec["kind"] != "timing" else None)
        tmp = tempfile.mkdtemp(prefix="hessmpi-bs-") if self.comm.rank == 0 else None
        self.tmp = Path(self.comm.bcast(tmp))
        self.counter = 0
        self.notes: list[str] = []

    def log(self, text: str) -> None:
        if self.comm.rank == 0:
            print(text, flush=True)

    def model_config(self) -> dict:
        from hessmpi import config

        cfg = config.defaults()["model"]
        cfg.update(self.problem["model"])
        return cfg

    def late(self) -> bool:
        return bool(self.comm.bcast(time.time() > self.spec["deadline"]))

    def make_run(self, method: str, point: dict, seed: int, steps: int):
        from hessmpi import config
        from hessmpi.trainer import Run

        spec = self.spec
        sets = [f"data.path={json.dumps(spec['data_path'])}",
                f"train.batch_size={spec['batch'] // self.comm.size}", f"train.seed={seed}",
                f"train.steps={steps}", "backend.dtype=float32",
                f"backend.device={spec['device']}", f"backend.threads={self.threads}",
                "optim.check_every=0"]
        sets += [f"model.{k}={json.dumps(v)}" for k, v in self.problem["model"].items()]
        sets += [f"optim.{k}={json.dumps(v)}"
                 for k, v in point_optim(method, point, self.comm.size).items()]
        cfg = config.load(None, sets)
        self.counter += 1
        return Run(cfg, self.comm, self.backend, self.tmp / f"run{self.counter}")

    def finish_run(self, run) -> None:
        if self.comm.rank == 0:
            shutil.rmtree(run.out, ignore_errors=True)

    # ----- one training run ----------------------------------------------------------------
    def train(self, point: dict, seed: int, budget: int, limits: dict[str, float],
              thresholds: dict[str, float | None], fixed: bool = False) -> dict:
        """One run of ``point`` until every target is reached, the racing limits of every
        unreached training target are passed, ``budget`` steps, divergence or the deadline;
        ``fixed``: exactly ``budget`` steps (the reference runs). ``thresholds``: target name
        -> F threshold (train) or accuracy (test); None where not yet known."""
        from hessmpi.errors import RunFailed
        from hessmpi.trainer import Interval

        method = self.spec["method"]
        run = self.make_run(method, point, seed, budget)
        ev = self.evaluator
        train_t = {n: v for n, v in thresholds.items() if not n.startswith("test")}
        test_t = {n: v for n, v in thresholds.items() if n.startswith("test")}
        f0 = ev.train_objective(run.theta)
        curve = [[0, 0.0, 0, 0.0, f0]]
        test_curve = ([[0, 0.0, 0, 0.0, ev.test_accuracy(run.theta)]] if test_t else None)
        reached: set[str] = set()
        interval = Interval()
        perf = time.perf_counter
        wall, done, status = 0.0, 0, "budget"
        fallbacks = kept = 0
        base = self.spec["eval_base"]
        next_eval = eval_interval(0, base)
        for step in range(budget):
            t0 = perf()
            try:
                info = run.step(step, interval)
            except RunFailed:
                status = "diverged"
                break
            wall += perf() - t0
            done = step + 1
            fallbacks += info.fallback
            kept += info.rank_kept
            if done != next_eval and done != budget:
                continue
            next_eval = done + eval_interval(done, base)
            f = ev.train_objective(run.theta)
            counted = run.objective
            row = [done, float(counted.grad_evals), int(counted.forward_evals), wall]
            curve.append([*row, f])
            if test_t:
                test_curve.append([*row, ev.test_accuracy(run.theta)])
            if not math.isfinite(f) or f > BLOWUP * f0:
                status = "diverged"
                break
            if fixed:
                continue
            reached |= {n for n, v in train_t.items() if v is not None and f <= v}
            if test_t:
                reached |= {n for n, v in test_t.items() if test_curve[-1][4] >= v}
            unreached = [n for n in train_t if n not in reached]
            if not unreached and all(n in reached for n in test_t):
                status = "reached"
                break
            if unreached and all(done >= limits[n] for n in unreached):
                status = "raced"
                break
            if self.late():
                status = "deadline"
                break
        counts = dict(getattr(run.optimizer, "counts", {}))
        record = dict(point=point, seed=seed, status=status, steps=done,
                      grad_evals=float(run.objective.grad_evals),
                      forward_evals=int(run.objective.forward_evals),
                      wall=wall, t_step=wall / max(done, 1), budget=budget,
                      limits={n: (v if math.isfinite(v) else None) for n, v in limits.items()},
                      curve=curve, test_curve=test_curve,
                      fallback_rate=fallbacks / max(done, 1),
                      fallback_reasons={k: v for k, v in counts.items()
                                        if k != "clipped" and v},
                      clipped_rate=counts.get("clipped", 0) / max(done, 1),
                      rank_kept_mean=kept / max(done, 1),
                      t_grad=interval.mean("t_grad"), t_comm=interval.mean("t_comm"),
                      t_solve=interval.mean("t_solve"))
        self.finish_run(run)
        last = curve[-1]
        self.log(f"  {self.spec['problem']} b{self.spec['batch']} {method} "
                 + " ".join(f"{k}={fmt(v) if isinstance(v, float) else v}"
                            for k, v in point.items())
                 + f" seed {seed}: {status} after {done} steps, F {last[4]:.6g}"
                 + (f", test acc {test_curve[-1][4]:.4f}" if test_curve else "")
                 + f", {1e3 * record['t_step']:.2f} ms/step")
        return record

    # ----- the grid search -------------------------------------------------------------------
    def limits(self, points: dict, thresholds: dict) -> dict[str, float]:
        """Per training target: the step at which a run that has not reached it stops."""
        spec = self.spec
        out = {}
        for name, value in thresholds.items():
            if name.startswith("test"):
                continue
            lim = float(spec["budget"])
            sgd = (spec.get("sgd_steps") or {}).get(name)
            if sgd is not None:
                lim = min(lim, math.ceil(spec["ratio_cap"] * sgd))
            if value is not None:
                best = best_point(points, value)
                if best is not None:
                    hit = train_hit(points[best]["records"][0], value)
                    lim = min(lim, math.ceil(RACE * hit["steps"]))
            out[name] = lim
        return out

    def search(self, thresholds: dict, reference: bool) -> dict:
        spec = self.spec
        points: dict[str, dict] = {}
        budget = spec["budget"]

        def run_point(point):
            rec = self.train(point, 0, budget, self.limits(points, thresholds), thresholds,
                             fixed=reference)
            points[point_key(point)] = dict(point=point, records=[rec])

        for point in spec["points"]:
            if self.late():
                self.notes.append("deadline: the first grid was not finished")
                break
            run_point(point)
        # widen until every training target's best point is interior (or the limits)
        selections = [None] if reference else [n for n in thresholds if not n.startswith("test")]
        exhausted = False
        while points and not exhausted:
            new: list[dict] = []
            for name in selections:
                value = None if reference else thresholds[name]
                key = best_point(points, value)
                if key is None and name == selections[0]:
                    key = best_point(points, None)   # toward the lowest F where runs ended
                if key is None:
                    continue
                for axis in points[key]["point"]:
                    for p in outward(points, key, axis, spec["widen_axes"]):
                        if point_key(p) not in points and p not in new:
                            new.append(p)
            if not new:
                break
            for p in new:
                if len(points) >= spec["max_points"]:
                    self.notes.append(f"grid limit of {spec['max_points']} points reached")
                    exhausted = True
                    break
                if self.late():
                    self.notes.append("deadline: widening stopped")
                    exhausted = True
                    break
                self.log(f"  widening: {p}")
                run_point(p)
        return points

    def run_unit(self) -> dict:
        spec = self.spec
        started = time.perf_counter()
        thresholds = dict(spec["thresholds"])
        reference = spec.get("reference", False)
        points = self.search(thresholds, reference)
        reference_info = None
        if reference and points:
            # the reference: the best rate by F after the fixed steps, run with every seed;
            # the target is the upper median of their F there, so at least half the seeds
            # reach it within those steps (benchmarks/convergence.py's train-loss target)
            key = best_point(points, None)
            if key is not None:
                for seed in spec["seeds"][1:]:
                    rec = self.train(points[key]["point"], seed, spec["budget"], {},
                                     thresholds, fixed=True)
                    points[key]["records"].append(rec)
                finals = sorted(final_f(r) for r in points[key]["records"])
                value = finals[len(finals) // 2]
                for name in thresholds:
                    if not name.startswith("test"):
                        thresholds[name] = value
                reference_info = dict(point=points[key]["point"], value=value,
                                      steps=spec["budget"], seeds=len(finals),
                                      placement=placement(points, key, spec["widen_axes"]))
        chosen = {}
        for name, value in thresholds.items():
            if name.startswith("test") or value is None:
                continue
            key = best_point(points, value)
            if key is not None:
                chosen[name] = key
        # headline seeds: each chosen configuration again with seeds 1..S-1, no racing
        for key in dict.fromkeys(chosen.values()) if not reference else ():
            for seed in spec["seeds"][1:]:
                if self.late():
                    self.notes.append(f"deadline: seed {seed} not run")
                    break
                limits = {n: float(spec["budget"]) for n in thresholds
                          if not n.startswith("test")}
                sgd = spec.get("sgd_steps") or {}
                for n in limits:
                    if sgd.get(n) is not None:
                        limits[n] = min(limits[n], math.ceil(spec["ratio_cap"] * sgd[n]))
                rec = self.train(points[key]["point"], seed, spec["budget"], limits,
                                 thresholds, fixed=reference)
                points[key]["records"].append(rec)
        return dict(kind="unit", problem=spec["problem"], batch=spec["batch"],
                    method=spec["method"], ranks=self.comm.size, device=self.backend.device,
                    backend=self.backend.name, threads=self.threads, budget=spec["budget"],
                    eval_base=spec["eval_base"], thresholds=thresholds,
                    sgd_steps=spec.get("sgd_steps"), ratio_cap=spec["ratio_cap"],
                    reference=reference_info, points=list(points.values()),
                    chosen={n: points[k]["point"] for n, k in chosen.items()},
                    placement={n: placement(points, k, spec["widen_axes"])
                               for n, k in chosen.items()},
                    notes=self.notes, seconds=time.perf_counter() - started,
                    mpi_library=self.comm.library_version())

    # ----- timing: step cost measured alone ---------------------------------------------------
    def run_timing(self) -> dict:
        """Wall time per step of each item (a method and point at a batch) in this process
        alone: TIMING_WARMUP steps, then up to TIMING_STEPS timed ones (no evaluations)."""
        from hessmpi.errors import RunFailed
        from hessmpi.trainer import Interval

        out = []
        for item in self.spec["items"]:
            self.spec["batch"] = item["batch"]
            steps = item["warmup"] + item["steps"]
            run = self.make_run(item["method"], item["point"], 0, steps)
            interval = Interval()
            wall, timed, ge0, fe0 = 0.0, 0, 0.0, 0
            for step in range(steps):
                if step == item["warmup"]:
                    ge0, fe0 = run.objective.grad_evals, run.objective.forward_evals
                t0 = time.perf_counter()
                try:
                    run.step(step, interval)
                except RunFailed:
                    break
                if step >= item["warmup"]:
                    wall += time.perf_counter() - t0
                    timed += 1
            out.append(dict(item, ms=1e3 * wall / timed if timed else math.nan, timed=timed,
                            grad_evals_per_step=(run.objective.grad_evals - ge0) / max(timed, 1),
                            forward_evals_per_step=(run.objective.forward_evals - fe0)
                            / max(timed, 1),
                            device=self.backend.device))
            self.finish_run(run)
            self.log(f"  timing {item['problem']} b{item['batch']} {item['method']} "
                     f"{item['point']}: {out[-1]['ms']:.3f} ms/step over {timed} steps")
        return dict(kind="timing", items=out)


def worker_main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    unit = Unit(spec)
    result = unit.run_timing() if spec["kind"] == "timing" else unit.run_unit()
    if unit.comm.rank == 0:
        Path(result_path).write_text(json.dumps(result))
        shutil.rmtree(unit.tmp, ignore_errors=True)
    unit.comm.barrier()


# ----- parent: data, F*, estimate, scheduling ---------------------------------------------------

def build_dataset(data_dir: Path, mnist_dir: Path) -> Path:
    """data_dir/mnist-t10k.h5 (first 8,000 train, last 2,000 test), built once with
    hessmpi.importers.mnist from the shared IDX files; never inside the tracked tree."""
    from hessmpi import importers
    from hessmpi.data import write_dataset

    path = data_dir / "mnist-t10k.h5"
    if not path.is_file():
        images, labels = (mnist_dir / name for name in MNIST_FILES)
        if not (images.is_file() and labels.is_file()):
            raise SystemExit(f"batch_scaling: no dataset at {path} and no MNIST IDX files in "
                             f"{mnist_dir} (--mnist DIR, or carry {data_dir})")
        train, test, attrs = importers.mnist(images, labels, n_train=TRAIN_ROWS)
        write_dataset(path, train, test, **attrs)
    return path


def softmax_fstar(path: Path, data_dir: Path, l2: float) -> dict:
    """F* of softmax regression on the training split: benchmarks/convergence.py's float64
    Newton-CG solve on the exact Hessian (to ||grad F|| <= 1e-10), cached in
    data_dir/fstar.json (and taken from convergence's cache where it holds the same key)."""
    import hashlib

    import h5py

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import convergence

    with h5py.File(path, "r") as f:
        x, y, n_classes = f["train/x"][()], f["train/y"][()], int(f.attrs["n_classes"])
    digest = hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()[:16]
    key = f"mnist-t10k:{len(y)}:{l2!r}:{digest}"
    cache_path = data_dir / "fstar.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    if key not in cache:
        theirs = (json.loads(convergence.FSTAR_CACHE.read_text())
                  if convergence.FSTAR_CACHE.is_file() else {})
        if key in theirs and l2 == convergence.L2:
            cache[key] = theirs[key]
        else:
            if l2 != convergence.L2:
                raise SystemExit(f"batch_scaling: convergence.py solves for l2 {convergence.L2}")
            print(f"batch_scaling: F* of softmax regression on {len(y)} rows by Newton-CG in "
                  "float64 (benchmarks/convergence.py) ...", flush=True)
            cache[key] = convergence.newton_cg_optimum(x, y, n_classes)
        cache_path.write_text(json.dumps(cache, indent=1) + "\n")
    return dict(cache[key], key=key)


def mpiexec_command() -> list[str]:
    """HESSMPI_MPIEXEC (words allowed, e.g. "mpiexec --allow-run-as-root"), else the mpiexec
    beside this Python, else the one on PATH."""
    launcher = os.environ.get("HESSMPI_MPIEXEC")
    if launcher:
        return shlex.split(launcher)
    beside = Path(sys.executable).parent / "mpiexec"
    return [str(beside) if beside.exists() else shutil.which("mpiexec") or "mpiexec"]


def start_worker(spec: dict, ranks: int, tmp: Path, name: str, log_path: Path | None):
    """Start a worker process on ``spec``; returns (process, result path, log file)."""
    spec_path, result = tmp / f"{name}.spec.json", tmp / f"{name}.result.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path),
           str(result)]
    if ranks > 1:
        cmd = [*mpiexec_command(), "-n", str(ranks), *cmd]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = open(log_path, "w") if log_path else None  # noqa: SIM115 - closed by the caller
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out or None,
                            stderr=subprocess.STDOUT if out else None)
    return proc, result, out


def unit_name(problem: str, batch: int, method: str) -> str:
    return f"{problem}-b{batch}-{method}"


class Planner:
    """The units of a sweep, their devices, specs and dependencies, in priority order.

    Devices (``--device``): auto runs every unit on the GPU when there is one, except
    softmax regression at batches up to CPU_SOFTMAX_MAX_BATCH when the machine has 8 cores
    or more: those (7,850 parameters, launch-bound on a GPU) run on the CPU, one core each,
    several at once (measured on the H100 machine, ms per SGD step, GPU / one core: batch
    256 1.2 / 0.6, 1024 1.3 / 2.5, 4096 1.5 / 11, 8000 1.6 / 26-38; the GPU is the scarce
    resource, so the small batches, which take the most steps, go to the cores). gpu or cpu
    put every unit there; PROBLEM=DEVICE pairs choose per problem. All methods at one
    (problem, batch) run on the same device, so wall-time ratios compare like with like.
    GPU units run ``gpu_jobs`` at a time (1: two processes sharing the H100 ran MLP steps
    2-3x slower each), CPU units ``cpu_jobs`` at a time with ``cpu_threads`` threads."""

    def __init__(self, args, mode_name: str, data_path: Path, fstar: float | None):
        self.args = args
        self.mode_name = mode_name
        self.mode = MODES[mode_name]
        self.problems = args.problems or self.mode["problems"]
        self.batches = sorted(args.batches or self.mode["batches"], reverse=True)
        self.methods = args.methods or self.mode["methods"]
        self.data_path = data_path
        self.fstar = fstar
        self.results: dict[str, dict] = {}
        cores = len(os.sched_getaffinity(0))
        gpu = gpu_available()
        self.devices: dict[str, str] = {}
        for problem in self.problems:
            for batch in self.batches:
                want = args.device.get(problem, args.device.get("*", "auto"))
                if want == "auto":
                    small = (problem == "softmax" and batch <= CPU_SOFTMAX_MAX_BATCH
                             and cores >= 8)
                    want = "cpu" if not gpu or small else "gpu"
                elif want == "gpu" and not gpu:
                    raise SystemExit(f"batch_scaling: --device gpu for {problem}, but CuPy "
                                     "finds no GPU")
                self.devices[f"{problem}-b{batch}"] = want
        self.gpu_jobs = args.gpu_jobs or 1
        on_gpu = any(d == "gpu" for d in self.devices.values())
        spare = max(1, cores - (3 * self.gpu_jobs if on_gpu else 0))
        self.cpu_jobs = args.jobs or self.mode["jobs"] or max(1, spare // 2 if not on_gpu
                                                                else spare - 1)
        self.cpu_threads = args.threads or max(1, spare // (self.cpu_jobs * args.ranks))
        self.gpu_threads = args.threads or 2

    def device(self, problem: str, batch: int) -> str:
        return self.devices[f"{problem}-b{batch}"]

    def threads(self, problem: str, batch: int) -> int:
        return (self.gpu_threads if self.device(problem, batch) == "gpu"
                else self.cpu_threads)

    def units(self) -> list[tuple[str, int, str]]:
        """Priority order: the full batch first (the MLP / autoencoder reference fixes their
        targets), large batches before small, SGD before the methods compared with it."""
        out = [(p, b, m) for b in self.batches for p in self.problems for m in self.methods]
        return sorted(out, key=lambda u: (-u[1], is_qn(u[2]), self.problems.index(u[0])))

    def depends(self, unit) -> list[str]:
        problem, batch, method = unit
        deps = []
        if is_qn(method) and "sgd" in self.methods:
            deps.append(unit_name(problem, batch, "sgd"))
        ref = unit_name(problem, FULL_BATCH, "sgd")
        if ("reference_steps" in PROBLEMS[problem] and unit_name(*unit) != ref
                and FULL_BATCH in self.batches and "sgd" in self.methods):
            deps.append(ref)
        return deps

    def thresholds(self, problem: str, batch: int) -> dict[str, float | None]:
        out = {}
        for name in unit_targets(self.mode, problem, batch):
            if name.startswith("rel "):
                out[name] = self.fstar * (1 + float(name[4:]))
            elif name.startswith("test acc "):
                out[name] = float(name[9:])
            else:
                ref = self.results.get(unit_name(problem, FULL_BATCH, "sgd"))
                out[name] = (ref["thresholds"][name] if ref and ref.get("reference")
                             else None)
        return out

    def spec(self, unit, deadline: float) -> dict:
        problem, batch, method = unit
        prob = PROBLEMS[problem]
        reference = (method == "sgd" and batch == FULL_BATCH and "reference_steps" in prob)
        budget = prob["reference_steps"] if reference else unit_budget(self.mode, problem, batch)
        sgd = self.results.get(unit_name(problem, batch, "sgd"))
        sgd_steps = None
        thresholds = self.thresholds(problem, batch)
        if is_qn(method) and sgd:
            sgd_steps = {}
            for name, value in thresholds.items():
                if name.startswith("test") or value is None:
                    continue
                hits = [train_hit(p["records"][0], value) for p in sgd["points"]]
                steps = [h["steps"] for h in hits if h]
                sgd_steps[name] = min(steps) if steps else None
        mx = self.mode["max_points"]["qn" if is_qn(method) else "sgd"]
        return dict(kind="unit", problem=problem, batch=batch, method=method,
                    device=self.device(problem, batch), threads=self.threads(problem, batch),
                    data_path=str(self.data_path), targets=list(thresholds),
                    thresholds=thresholds, reference=reference, budget=budget,
                    eval_base=max(2, unit_budget(self.mode, problem, batch) // 400),
                    points=initial_points(self.mode, problem, method, batch),
                    widen_axes=self.mode["widen_axes"], max_points=mx,
                    ratio_cap=self.mode["ratio_cap"], sgd_steps=sgd_steps,
                    seeds=list(range(self.args.seeds or
                                     self.mode["headline"].get((problem, batch), 1))),
                    deadline=deadline)


def run_units(planner: Planner, ranks: int, deadline: float, tmp: Path, on_result
              ) -> list[str]:
    """Run every unit once its dependencies have finished, at most planner.gpu_jobs GPU
    units and planner.cpu_jobs CPU units at once; returns what was not run and why."""
    slots = {"gpu": planner.gpu_jobs, "cpu": planner.cpu_jobs}
    pending = planner.units()
    running: dict[str, tuple] = {}
    done: set[str] = set()
    dropped: set[str] = set()
    not_run = []
    while pending or running:
        for name, (proc, result, log, started, _) in list(running.items()):
            if proc.poll() is None:
                continue
            if log:
                log.close()
            del running[name]
            if proc.returncode == 0 and result.is_file():
                res = json.loads(result.read_text())
                planner.results[name] = res
                done.add(name)
                on_result(name, res, time.perf_counter() - started)
            else:
                dropped.add(name)
                not_run.append(f"{name}: the worker failed (exit {proc.returncode})")
                print(f"batch_scaling: {not_run[-1]}", flush=True)
                path = tmp / f"{name}.log"
                if path.is_file():
                    print("".join(path.read_text().splitlines(True)[-30:]), flush=True)
        progressed = False
        for unit in list(pending):
            name = unit_name(*unit)
            deps = planner.depends(unit)
            if any(d in dropped for d in deps):
                pending.remove(unit)
                dropped.add(name)
                not_run.append(f"{name}: a unit it depends on did not finish")
                continue
            pool = planner.device(unit[0], unit[1])
            busy = sum(1 for r in running.values() if r[4] == pool)
            if any(d not in done for d in deps) or busy >= slots[pool]:
                continue
            pending.remove(unit)
            if time.time() > deadline:
                dropped.add(name)
                not_run.append(f"{name}: past the time budget (--minutes)")
                continue
            spec = planner.spec(unit, deadline)
            if any(v is None for n, v in spec["thresholds"].items()) and not spec["reference"]:
                dropped.add(name)
                not_run.append(f"{name}: its train target is unknown (the reference did "
                               "not finish)")
                continue
            quiet = planner.gpu_jobs + planner.cpu_jobs > 1
            log = tmp / f"{name}.log" if quiet else None
            print(f"batch_scaling: start {name} on {pool} ({len(spec['points'])} points"
                  + (f", seeds {spec['seeds']}" if len(spec["seeds"]) > 1 else "")
                  + f", budget {spec['budget']} steps)", flush=True)
            proc, result, logf = start_worker(spec, ranks, tmp, name, log)
            running[name] = (proc, result, logf, time.perf_counter(), pool)
            progressed = True
        if running and not progressed:
            time.sleep(0.2)
    return not_run


# ----- estimate and timing alone ----------------------------------------------------------------

def probe_items(planner: Planner) -> list[dict]:
    items = []
    for problem, batch, method in planner.units():
        point = initial_points(planner.mode, problem, method, batch)[0]
        items.append(dict(problem=problem, batch=batch, method=method, point=point,
                          warmup=3, steps=8))
    return items


def run_timing(planner: Planner, items: list[dict], ranks: int, tmp: Path, tag: str) -> list:
    """Time ``items`` one after another, one worker per (problem, device), nothing else
    running."""
    out = []
    for problem, device in itertools.product(planner.problems, ("gpu", "cpu")):
        mine = [i for i in items if i["problem"] == problem
                and planner.device(problem, i["batch"]) == device]
        if not mine:
            continue
        spec = dict(kind="timing", problem=problem, batch=mine[0]["batch"],
                    method=mine[0]["method"], device=device,
                    threads=planner.threads(problem, mine[0]["batch"]),
                    data_path=str(planner.data_path), targets=[], items=mine,
                    deadline=math.inf)
        proc, result, _ = start_worker(spec, ranks, tmp, f"{tag}-{problem}-{device}", None)
        proc.wait()
        if proc.returncode == 0 and result.is_file():
            out += json.loads(result.read_text())["items"]
        else:
            print(f"batch_scaling: the {tag} worker of {problem} failed "
                  f"(exit {proc.returncode})", flush=True)
    return out


def estimate(planner: Planner, probe: list[dict]) -> dict:
    """Seconds the sweep should take, from the measured ms/step of each unit's first point.
    A unit's runs: its first grid, 1 (SGD) or 2 widening points and the headline seeds (one
    run per chosen point and seed); each SGD run about the a priori SGD steps to the unit's
    tightest target (racing stops the worse ones), each quasi-Newton run QN_STEPS_FACTOR of
    that (the mean over the units measured on the H100 machine), at most the ratio cap;
    0.5 s per run of set-up and evaluations; steps inside the sweep 1.2 x (GPU) and
    1.3 x (CPU) slower than alone (measured on the H100 machine with 11 CPU units beside
    the GPU ones). GPU units share planner.gpu_jobs slots (counted as 1 + 0.2 per extra
    job), CPU units planner.cpu_jobs; the CPU side takes at least its longest unit chain
    (SGD, then the slowest method). The upper bound lets every run go to its limit."""
    ms = {(i["problem"], i["batch"], i["method"]): i["ms"] for i in probe}
    slow = {"gpu": 1.2, "cpu": 1.3}
    pools = {"gpu": [0.0, 0.0, 0.0], "cpu": [0.0, 0.0, 0.0]}   # typical, upper, longest chain
    per_problem: dict[str, float] = {}
    expected = planner.mode.get("expected", {})
    chains: dict[tuple, list[float]] = {}
    unit_s: dict[tuple, float] = {}
    for problem, batch, method in planner.units():
        t = ms.get((problem, batch, method), math.nan) / 1e3
        if not math.isfinite(t):
            continue
        device = planner.device(problem, batch)
        t *= slow[device]
        prob = PROBLEMS[problem]
        budget = unit_budget(planner.mode, problem, batch)
        n = len(initial_points(planner.mode, problem, method, batch))
        seeds = planner.mode["headline"].get((problem, batch), 1) - 1
        exp = min(budget, expected.get(problem, prob["expected"]).get(batch, budget))
        if method == "sgd" and batch == FULL_BATCH and "reference_steps" in prob:
            exp = budget = prob["reference_steps"]
        run_max = budget if not is_qn(method) else min(budget, planner.mode["ratio_cap"] * exp)
        extra = min(planner.mode["max_points"]["qn" if is_qn(method) else "sgd"] - n,
                    2 if is_qn(method) else 1)
        chosen = len([n for n in unit_targets(planner.mode, problem, batch)
                      if not n.startswith("test")])
        runs = n + extra + chosen * seeds
        typ = t * runs * exp * (QN_STEPS_FACTOR if is_qn(method) else 1.0) + 0.5 * runs
        up = t * runs * run_max + 0.5 * runs
        unit_s[(problem, batch, method)] = typ
        pool = pools[device]
        pool[0] += typ
        pool[1] += up
        chain = chains.setdefault((problem, batch), [0.0, 0.0])
        chain[0 if method == "sgd" else 1] = max(chain[0 if method == "sgd" else 1], typ)
        if device == "cpu":
            pool[2] = max(pool[2], sum(chain))
        per_problem[problem] = per_problem.get(problem, 0.0) + typ
    gpu_eff = 1 + 0.2 * (planner.gpu_jobs - 1)
    wall = max(pools["gpu"][0] / gpu_eff, pools["cpu"][0] / planner.cpu_jobs, pools["cpu"][2])
    wall_up = max(pools["gpu"][1] / gpu_eff, pools["cpu"][1] / planner.cpu_jobs,
                  pools["cpu"][2])
    timing = 0.0
    if planner.mode["timing"] and not planner.args.no_timing:
        timing = sum(1.5 * v / 1e3 * (TIMING_STEPS + TIMING_WARMUP) + 0.3
                     for v in ms.values()) + 8.0 * len(planner.problems)
    return dict(gpu_s=pools["gpu"][0], cpu_s=pools["cpu"][0], per_problem_s=per_problem,
                wall_s=wall + timing, upper_s=wall_up + timing, timing_s=timing,
                gpu_jobs=planner.gpu_jobs, cpu_jobs=planner.cpu_jobs,
                units_s={unit_name(*k): v for k, v in unit_s.items()})


# ----- results: choices, tables, verdict, plot --------------------------------------------------

def target_names(results: dict, problem: str) -> list[str]:
    for u in results["units"].values():
        if u["problem"] == problem:
            return list(u["thresholds"])
    return []


def target_label(name: str, value: float | None) -> str:
    if name.startswith("rel "):
        return f"F <= F*(1+{name[4:]})"
    if name.startswith("test acc "):
        return f"test acc >= {float(name[9:]):.0%}"
    return f"F <= {value:.5g}" if value is not None else "F <= (unknown)"


def timing_ms(results: dict, u: dict, point: dict) -> tuple[float, str]:
    """ms per step of a unit's point: measured alone if it was, else inside the unit."""
    for t in results.get("timings", []):
        if (t["problem"], t["batch"], t["method"]) == (u["problem"], u["batch"], u["method"]) \
                and t["point"] == point and math.isfinite(t["ms"]):
            return t["ms"], "alone"
    for p in u["points"]:
        if p["point"] == point:
            recs = [r for r in p["records"] if r["steps"] > 0]
            return 1e3 * float(np.median([r["t_step"] for r in recs])), "in-run"
    return math.nan, "-"


def cell(u: dict, name: str) -> dict:
    """What a unit did for target ``name``: the chosen point, its records' hits (median over
    seeds; None where a seed did not reach it), or where it stopped."""
    value = u["thresholds"].get(name)
    test = name.startswith("test")
    select = next((n for n in u["thresholds"] if not n.startswith("test")), None)
    chosen = u["chosen"].get(select if test else name)
    if chosen is None and u.get("reference"):
        # the reference unit's configuration is its rate chosen by F after its fixed steps
        # (its own seed 0 may stop short of the upper median over seeds it defines)
        chosen = u["reference"]["point"]
    out = dict(point=chosen, hits=[], reached=0, seeds=0, censored=None, status=None)
    if chosen is None:
        # nobody reached it: report the most steps any run took without reaching it
        steps = [r["steps"] for p in u["points"] for r in p["records"]]
        statuses = {r["status"] for p in u["points"] for r in p["records"]}
        out.update(censored=max(steps) if steps else None,
                   status="diverged" if statuses == {"diverged"} else "not reached")
        return out
    recs = next(p["records"] for p in u["points"] if p["point"] == chosen)
    hits = [(test_hit(r, value) if test else train_hit(r, value)) for r in recs]
    out.update(hits=hits, reached=sum(h is not None for h in hits), seeds=len(hits))
    if out["reached"] == 0:
        out.update(censored=max(r["steps"] for r in recs), status="not reached")
    return out


def median_hit(c: dict, field: str) -> float:
    vals = [h[field] if h else math.inf for h in c["hits"]]
    return float(np.median(vals)) if vals else math.inf


def summarize(results: dict) -> list[dict]:
    """One row per (problem, target, batch, method) with steps, evaluations, time."""
    rows = []
    for u in results["units"].values():
        for name in u["thresholds"]:
            c = cell(u, name)
            ms, how = timing_ms(results, u, c["point"]) if c["point"] else (math.nan, "-")
            steps = median_hit(c, "steps")
            rows.append(dict(problem=u["problem"], target=name, batch=u["batch"],
                             method=u["method"], value=u["thresholds"][name], cell=c,
                             steps=steps, grad_evals=median_hit(c, "grad_evals"),
                             forward_evals=median_hit(c, "forward_evals"), ms=ms, timing=how,
                             wall=steps * ms / 1e3 if math.isfinite(steps) else math.inf,
                             device=u["device"],
                             placement=u["placement"].get(
                                 next((n for n in u["thresholds"] if not n.startswith("test")),
                                      name) if name.startswith("test") else name)))
    return rows


def steps_text(r: dict) -> str:
    c = r["cell"]
    if c["point"] is None or c["reached"] == 0:
        if c["censored"] is None:
            return "-"
        return f">{c['censored']:,}" + (" (diverged)" if c["status"] == "diverged" else "")
    vals = [h["steps"] for h in c["hits"] if h]
    text = f"{r['steps']:,.0f}" if math.isfinite(r["steps"]) else f">{max(vals):,}"
    if c["seeds"] > 1:
        text += f" [{min(vals):,}-{max(vals):,}] ({c['reached']}/{c['seeds']})"
    return text


def verdicts(rows: list[dict]) -> list[dict]:
    """At each large batch and target: the quasi-Newton variant with the fewest steps, its
    ratios to SGD's steps and wall time, and whether some variant meets the aim."""
    out = []
    keys = sorted({(r["problem"], r["target"], r["batch"]) for r in rows})
    for problem, target, batch in keys:
        here = [r for r in rows if (r["problem"], r["target"], r["batch"])
                == (problem, target, batch)]
        sgd = next((r for r in here if r["method"] == "sgd"), None)
        qn = [r for r in here if r["method"] != "sgd"]
        if sgd is None or not qn:
            continue
        best = min(qn, key=lambda r: (r["steps"], r["wall"]))
        v = dict(problem=problem, target=target, batch=batch, best=best["method"],
                 sgd_steps=sgd["steps"], best_steps=best["steps"], steps_ratio=math.nan,
                 wall_ratio=math.nan, met=False, meeting=[], note="")
        if not math.isfinite(sgd["steps"]):
            v["note"] = "SGD did not reach it"
            if math.isfinite(best["steps"]):
                v["note"] += f"; {best['method']} did in {best['steps']:,.0f} steps"
        elif math.isfinite(best["steps"]):
            v["steps_ratio"] = best["steps"] / sgd["steps"]
            v["wall_ratio"] = best["wall"] / sgd["wall"]
        for r in qn:
            if math.isfinite(r["steps"]) and math.isfinite(sgd["steps"]):
                if r["steps"] <= AIM_STEPS * sgd["steps"] and r["wall"] <= AIM_WALL * sgd["wall"]:
                    v["meeting"].append(r["method"])
        v["met"] = bool(v["meeting"])
        out.append(v)
    return out


def ratio_text(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:.2f}"


def print_tables(results: dict) -> None:
    rows = summarize(results)
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    print()
    print(f"## hessmpi batch scaling ({results['mode']}), {results['date']}, "
          f"{results['host']}")
    print()
    fs = results.get("fstar")
    if results["ranks"] == 1:
        print("One rank takes each global batch: exact for SGD+momentum (P ranks take the same "
              "steps), not for the secant methods, whose P ranks form P pairs per step from "
              "their own shards (on softmax at 8000, 2 and 4 ranks needed far more steps than "
              "one; see benchmarks/README.md). Check a headline point with --ranks P.")
        print()
    print(f"Global batch = ranks x batch per rank ({results['ranks']} rank(s)). Steps = optimizer "
          "steps to the first evaluation of the full training objective F (or of the test "
          "accuracy) that meets the target; each method's configuration chosen per target on "
          "the training objective (the test-accuracy row uses the train-loss choice). '>N': "
          "not reached in the N steps its runs were allowed (budget, racing or ratio cap). "
          "Wall = steps x ms/step" + (" (ms/step measured alone, after the sweep)"
                                      if results.get("timings") else " (ms/step inside the runs)")
          + "; evaluations excluded."
          + (f" F* = {fs['fstar']:.10g} (Newton-CG, float64, ||grad|| "
             f"{fs['grad_norm']:.1e})." if fs else ""))
    for problem in dict.fromkeys(r["problem"] for r in rows):
        for name in dict.fromkeys(r["target"] for r in rows if r["problem"] == problem):
            mine = [r for r in rows if r["problem"] == problem and r["target"] == name]
            value = mine[0]["value"]
            print()
            print(f"### {PROBLEMS[problem]['label']}: {target_label(name, value)}")
            print()
            print("| batch | " + " | ".join(f"{METHODS[m]['label']} steps" for m in methods)
                  + " | best variant / SGD steps | wall ratio |")
            print("|" + " --- |" * (len(methods) + 3))
            batches = sorted({r["batch"] for r in mine})
            vs = {v["batch"]: v for v in verdicts(mine)}
            for b in batches:
                cells = []
                for m in methods:
                    r = next((r for r in mine if r["batch"] == b and r["method"] == m), None)
                    cells.append(steps_text(r) if r else "not run")
                v = vs.get(b)
                br = (f"{ratio_text(v['steps_ratio'])} ({v['best']})" if v else "-")
                if v and not math.isfinite(v["steps_ratio"]) and v["note"]:
                    br = v["note"]
                print(f"| {b} | " + " | ".join(cells) + f" | {br} | "
                      + (ratio_text(v["wall_ratio"]) if v else "-") + " |")
            print()
            print("| batch | method | chosen | where the best was | steps | grad evals "
                  "| forward evals | ms/step | wall to target s | device |")
            print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
            for b in batches:
                for m in methods:
                    r = next((r for r in mine if r["batch"] == b and r["method"] == m), None)
                    if r is None:
                        continue
                    pt = r["cell"]["point"]
                    chosen = ("-" if pt is None else " ".join(
                        f"{k}={fmt(v) if isinstance(v, float) else v}" for k, v in pt.items()))
                    where = ("-" if not r["placement"] else ", ".join(
                        f"{k} {v}" for k, v in r["placement"].items()))
                    reached = math.isfinite(r["steps"])
                    print(f"| {b} | {m} | {chosen} | {where} | {steps_text(r)} | "
                          + (f"{r['grad_evals']:,.0f} | {r['forward_evals']:,.0f}" if reached
                             else "- | -")
                          + (f" | {r['ms']:.2f} ({r['timing']}) | " if reached else " | - | ")
                          + (f"{r['wall']:.2f}" if reached else "-") + f" | {r['device']} |")
    print_verdict(results, rows)
    print_units(results)


def print_verdict(results: dict, rows: list[dict]) -> None:
    print()
    print(f"### The aim at large batch: the best variant in <= {AIM_STEPS} x SGD+momentum's "
          f"steps and <= {AIM_WALL} x its wall time")
    print()
    print("| problem | target | batch | best variant (steps) | steps ratio | wall ratio "
          "| variants meeting the aim | aim |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    vs = [v for v in verdicts(rows) if v["batch"] in LARGE_BATCHES]
    for v in vs:
        best = (f"{v['best']} ({v['best_steps']:,.0f})" if math.isfinite(v["best_steps"])
                else "none reached it")
        print(f"| {v['problem']} | {v['target']} | {v['batch']} | {best} | "
              f"{ratio_text(v['steps_ratio'])} | "
              f"{ratio_text(v['wall_ratio'])} | {', '.join(v['meeting']) or '-'} | "
              + ("MET" if v["met"] else "NOT MET" + (f" ({v['note']})" if v["note"] else ""))
              + " |")
    head = [v for v in vs if v["batch"] == max(LARGE_BATCHES)]
    if head:
        met = [v for v in head if v["met"]]
        print()
        if len(met) == len(head):
            print(f"Verdict: the aim is MET at batch {max(LARGE_BATCHES)} for every target "
                  f"measured ({len(head)}).")
        else:
            print(f"Verdict: the aim is NOT MET at batch {max(LARGE_BATCHES)} for "
                  f"{len(head) - len(met)} of {len(head)} targets: "
                  + "; ".join(f"{v['problem']} {v['target']} (steps "
                              f"{ratio_text(v['steps_ratio'])}, wall "
                              f"{ratio_text(v['wall_ratio'])})"
                              for v in head if not v["met"]) + ".")


def print_units(results: dict) -> None:
    print()
    print("### Every point tuned (seed 0; steps to each training target, '>' = stopped "
          "before it)")
    for name, u in results["units"].items():
        names = [n for n in u["thresholds"] if not n.startswith("test")]
        print()
        ref = u.get("reference")
        print(f"#### {name} on {u['device']}, budget {u['budget']} steps"
              + (f", SGD's steps {u['sgd_steps']}, ratio cap {u['ratio_cap']:g}"
                 if u.get("sgd_steps") else "")
              + (f"; reference: F = {ref['value']:.6g} after {ref['steps']} steps at "
                 f"lr {fmt(ref['point']['lr'])} (lr {ref['placement']['lr']}; upper median "
                 f"of {ref.get('seeds', 1)} seed(s))" if ref else "")
              + f"; {u['seconds']:.0f} s")
        for note in u.get("notes", []):
            print(f"NOTE: {note}")
        print()
        print("| point | status | steps run | " + " | ".join(names)
              + " | final F | fallback | ms/step |")
        print("|" + " --- |" * (6 + len(names)))
        for p in u["points"]:
            r = p["records"][0]
            cells = []
            for n in names:
                value = u["thresholds"][n]
                h = train_hit(r, value) if value is not None else None
                mark = " *" if u["chosen"].get(n) == p["point"] else ""
                cells.append((f"{h['steps']:,}" if h else f">{r['steps']:,}") + mark)
            pt = " ".join(f"{k}={fmt(v) if isinstance(v, float) else v}"
                          for k, v in p["point"].items())
            print(f"| {pt} | {r['status']} | {r['steps']:,} | " + " | ".join(cells)
                  + f" | {r['curve'][-1][4]:.6g} | {r['fallback_rate']:.1%} "
                  f"| {1e3 * r['t_step']:.2f} |")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarize(results)
    panels = list(dict.fromkeys((r["problem"], r["target"]) for r in rows))
    if not panels:
        return
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.2 * nrows), squeeze=False)
    colors = {"sgd": "black", "secant": "tab:blue", "secant-ls": "tab:red",
              "secant-history": "tab:green",
              "deflated": "tab:purple"}
    for ax, (problem, name) in zip(axes.flat, panels, strict=False):
        mine = [r for r in rows if r["problem"] == problem and r["target"] == name]
        for i, m in enumerate(METHODS):
            pts = sorted((r for r in mine if r["method"] == m), key=lambda r: r["batch"])
            if not pts:
                continue
            xs = [r["batch"] for r in pts if math.isfinite(r["steps"])]
            ys = [r["steps"] for r in pts if math.isfinite(r["steps"])]
            ax.plot(xs, ys, "o-", color=colors[m], label=METHODS[m]["label"])
            shift = 2.0 ** (0.05 * (i - len(METHODS) // 2))   # so the triangles do not hide
            cx = [r["batch"] * shift for r in pts if not math.isfinite(r["steps"])
                  and r["cell"]["censored"]]
            cy = [r["cell"]["censored"] for r in pts if not math.isfinite(r["steps"])
                  and r["cell"]["censored"]]
            if cx:
                ax.plot(cx, cy, "^", color=colors[m], markerfacecolor="none", markersize=9)
        sgd = sorted((r for r in mine if r["method"] == "sgd" and math.isfinite(r["steps"])),
                     key=lambda r: r["batch"])
        if sgd:
            b0, s0 = sgd[0]["batch"], sgd[0]["steps"]
            bs = sorted({r["batch"] for r in mine})
            ax.plot(bs, [s0 * b0 / b for b in bs], ":", color="grey", label="perfect scaling")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        bs = sorted({r["batch"] for r in mine})
        ax.set_xticks(bs)
        ax.set_xticklabels([str(b) for b in bs])
        ax.set_xlabel("global batch size (samples per step)")
        ax.set_ylabel("optimizer steps to target")
        ax.set_title(f"{problem}: {target_label(name, mine[0]['value'])}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("hessmpi: steps to target against global batch size (open triangles: not "
                 "reached in that many steps)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----- main ---------------------------------------------------------------------------------------

def parse_device(text: str) -> dict[str, str]:
    """--device auto|cpu|gpu, or PROBLEM=DEVICE pairs (softmax=cpu,mlp=gpu; the rest auto)."""
    choices = ("auto", "cpu", "gpu")
    if "=" not in text:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"--device {text}: expected auto, cpu or gpu")
        return {"*": text}
    table = dict(item.split("=", 1) for item in text.split(","))
    if any(v not in choices for v in table.values()) or any(k not in PROBLEMS for k in table):
        raise argparse.ArgumentTypeError(f"--device {text}: expected PROBLEM=auto|cpu|gpu")
    return table


def csv_list(kind):
    def parse(text: str):
        return [kind(x) for x in text.split(",") if x]
    return parse


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the smoke test (default)")
    mode.add_argument("--full", action="store_true", help="every problem, batch and method")
    ap.add_argument("--list", action="store_true", help="print the runs of the sweep and exit")
    ap.add_argument("--jobs-array", action="store_true",
                    help="print a SLURM job-array recipe of the runs and exit")
    ap.add_argument("--report", nargs="+", type=Path, metavar="JSON",
                    help="merge results files (later ones win per unit), print, plot, exit")
    ap.add_argument("--prepare", action="store_true",
                    help="build the dataset and F* (to carry to another machine) and exit")
    ap.add_argument("--estimate-only", action="store_true",
                    help="measure a few steps per unit, print the time estimate and exit")
    ap.add_argument("--problems", type=csv_list(str), help="e.g. softmax,mlp,autoencoder")
    ap.add_argument("--batches", type=csv_list(int), help="global batch sizes, e.g. 4096,8000")
    ap.add_argument("--methods", type=csv_list(str), help=f"of {', '.join(METHODS)}")
    ap.add_argument("--device", type=parse_device, default=parse_device("auto"),
                    help="backend.device of the runs: auto (default: MLP and autoencoder on "
                    "the GPU if any, softmax on the CPU if it has 8+ cores), cpu, gpu, or "
                    "PROBLEM=DEVICE pairs, e.g. softmax=gpu")
    ap.add_argument("--ranks", type=int, default=1,
                    help="MPI ranks per unit (batch per rank = batch / ranks; default 1)")
    ap.add_argument("--jobs", type=int, help="CPU units run at once (quick: 2; full: the "
                    "cores left by the GPU units)")
    ap.add_argument("--gpu-jobs", type=int, help="GPU units run at once (default 1; more "
                    "share the GPU)")
    ap.add_argument("--threads", type=int, help="BLAS threads per rank (default: CPU units "
                    "the cores / jobs, GPU units 2)")
    ap.add_argument("--seeds", type=int, help="seeds at every point (default: 3 at the "
                    "headline point of --full, else 1)")
    ap.add_argument("--minutes", type=float, help="time budget: no new run starts after it "
                    "(quick 3.5, full 8.5); what was not run is listed")
    ap.add_argument("--retime", action="store_true",
                    help="with --report: time the chosen configurations alone again (on "
                    "this machine, now) and use those times")
    ap.add_argument("--no-timing", action="store_true",
                    help="no re-timing alone after the sweep (use the in-run step times)")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--mnist", type=Path, default=SHARED_MNIST, help="the MNIST t10k IDX files")
    ap.add_argument("--out", type=Path, help="results JSON")
    ap.add_argument("--plot", type=Path, help="plot PNG")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if args.worker:
        worker_main(*args.worker)
        return
    mode_name = "full" if args.full else "quick"
    suffix = "" if mode_name == "full" else "-quick"
    out = args.out or RESULTS_DIR / f"batch_scaling{suffix}.json"
    png = args.plot or out.with_suffix(".png")
    for name in args.problems or []:
        if name not in PROBLEMS:
            ap.error(f"unknown problem {name}; known: {', '.join(PROBLEMS)}")
    for name in args.methods or []:
        if name not in METHODS:
            ap.error(f"unknown method {name}; known: {', '.join(METHODS)}")
    for b in args.batches or []:
        if b not in BATCHES:
            ap.error(f"batch {b} not one of {BATCHES}")
    if args.report:
        results = merge(json.loads(p.read_text()) for p in args.report)
        tail = "" if results["mode"] == "full" else "-quick"
        out = args.out or RESULTS_DIR / f"batch_scaling{tail}.json"
        if args.retime:
            units = results["units"].values()
            args.problems = list(dict.fromkeys(u["problem"] for u in units))
            args.batches = sorted({u["batch"] for u in units})
            args.methods = list(dict.fromkeys(u["method"] for u in units))
            args.device = {u["problem"]: u["device"].split(":")[0] for u in units}
            args.threads = args.threads or max(u["threads"] for u in units)
            args.ranks = max(u["ranks"] for u in units)
            planner = Planner(args, results["mode"], args.data_dir / "mnist-t10k.h5", None)
            with tempfile.TemporaryDirectory(prefix="hessmpi-bs-") as tmp:
                retime(results, planner, MODES[results["mode"]], args.ranks, Path(tmp))
        save(results, out, args.plot or out.with_suffix(".png"))
        return
    if args.list or args.jobs_array:
        runs = expand_sweep(mode_name, args.problems, args.batches, args.methods, args.ranks)
        if args.list:
            for r in runs:
                print(describe_run(r))
            print(f"# {len(runs)} runs ({mode_name}); widening adds points where a best point "
                  "sits at an end of its grid", file=sys.stderr)
        else:
            data = args.data_dir / "mnist-t10k.h5"
            rel = data.relative_to(ROOT) if data.is_relative_to(ROOT) else data
            print(jobs_array(runs, str(rel), lambda p: args.device.get(
                p, args.device.get("*", "auto"))), end="")
        return
    run_sweep(args, mode_name, out, png)


def merge(parts) -> dict:
    results = None
    for part in parts:
        if results is None:
            results = part
            continue
        results["units"].update(part["units"])
        results["timings"] = [t for t in results.get("timings", []) if not any(
            (t["problem"], t["batch"], t["method"]) == (n["problem"], n["batch"], n["method"])
            for n in part.get("timings", []))] + part.get("timings", [])
        results["not_run"] = results.get("not_run", []) + part.get("not_run", [])
        results.setdefault("merged", []).append(part.get("command"))
        results["fstar"] = results.get("fstar") or part.get("fstar")
    return results


def save(results: dict, out: Path, png: Path) -> None:
    print_tables(results)
    for line in results.get("not_run", []):
        print(f"NOT RUN: {line}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results) + "\n")
    plot(results, png)
    print(f"\nsaved {out} and {png}")


def run_sweep(args, mode_name: str, out: Path, png: Path) -> None:
    started = time.time()
    mode = MODES[mode_name]
    minutes = args.minutes or mode["minutes"]
    args.data_dir.mkdir(parents=True, exist_ok=True)
    data_path = build_dataset(args.data_dir, args.mnist)
    problems = args.problems or mode["problems"]
    fstar = None
    if "softmax" in problems:
        fstar = softmax_fstar(data_path, args.data_dir, PROBLEMS["softmax"]["model"]["l2"])
        print(f"batch_scaling: F* = {fstar['fstar']:.12g} (||grad|| {fstar['grad_norm']:.1e})",
              flush=True)
    if args.prepare:
        print(f"batch_scaling: prepared {args.data_dir} (carry it to the machine that runs "
              "the sweep)")
        return
    planner = Planner(args, mode_name, data_path, fstar["fstar"] if fstar else None)
    timing = mode["timing"] and not args.no_timing
    results = dict(benchmark="batch_scaling", mode=mode_name,
                   date=datetime.now(UTC).isoformat(timespec="seconds"), host=platform.node(),
                   cores=len(os.sched_getaffinity(0)),
                   command=shlex.join([Path(sys.executable).name, *sys.argv]),
                   ranks=args.ranks, devices=planner.devices, gpu_jobs=planner.gpu_jobs,
                   cpu_jobs=planner.cpu_jobs, cpu_threads=planner.cpu_threads,
                   gpu_threads=planner.gpu_threads, minutes=minutes, fstar=fstar, units={},
                   timings=[], not_run=[],
                   settings=dict(race=RACE, ratio_cap=mode["ratio_cap"], grid_factor=GRID_FACTOR,
                                 momentum=MOMENTUM, aim_steps=AIM_STEPS, aim_wall=AIM_WALL,
                                 evals_per_doubling=EVALS_PER_DOUBLING,
                                 problems={p: PROBLEMS[p] for p in problems},
                                 methods={m: METHODS[m] for m in planner.methods}))
    print(f"batch_scaling: {mode_name}: {len(planner.units())} units; devices "
          + ", ".join(f"{p} {d}" for p, d in planner.devices.items())
          + f"; {planner.gpu_jobs} GPU unit(s) at a time with {planner.gpu_threads} BLAS "
          f"thread(s), {planner.cpu_jobs} CPU unit(s) with {planner.cpu_threads}; time budget "
          f"{minutes:g} min", flush=True)
    with tempfile.TemporaryDirectory(prefix="hessmpi-bs-") as tmpdir:
        tmp = Path(tmpdir)
        t = time.time()
        probe = run_timing(planner, probe_items(planner), args.ranks, tmp, "probe")
        est = estimate(planner, probe)
        results["estimate"] = dict(est, probe=probe, probe_seconds=time.time() - t)
        print(f"batch_scaling: estimate from {len(probe)} short timings ({time.time() - t:.0f} "
              f"s): GPU units {est['gpu_s'] / 60:.1f} min and CPU units {est['cpu_s'] / 60:.1f} "
              f"min of runs; with {planner.gpu_jobs} GPU and {planner.cpu_jobs} CPU unit(s) "
              f"at a time about {est['wall_s'] / 60:.1f} min in all (at most "
              f"{est['upper_s'] / 60:.1f} min if every run goes to its limit)"
              + (f", {est['timing_s']:.0f} s of it timing alone" if est["timing_s"] else "")
              + "; per problem (runs in sequence): "
              + ", ".join(f"{p} {v / 60:.1f} min" for p, v in est["per_problem_s"].items())
              + f". The time budget is {minutes:g} min"
              + (": runs past it are not started and are listed." if
                 est["wall_s"] > 60 * minutes * (1 - DEADLINE_RESERVE) else "."), flush=True)
        if args.estimate_only:
            return
        reserve = DEADLINE_RESERVE * 60 * minutes if timing else 10.0
        deadline = started + 60 * minutes - reserve

        def on_result(name, res, seconds):
            results["units"][name] = res
            results["seconds"] = time.time() - started
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results) + "\n")
            print(f"batch_scaling: {name} done in {seconds:.0f} s "
                  f"({(time.time() - started) / 60:.1f} min so far)", flush=True)

        results["not_run"] = run_units(planner, args.ranks, deadline, tmp, on_result)
        if timing and results["units"]:
            retime(results, planner, mode, args.ranks, tmp)
    results["seconds"] = time.time() - started
    save(results, out, png)
    print(f"batch_scaling: {results['seconds'] / 60:.1f} min in all")


def timing_items(results: dict, mode: dict) -> list[dict]:
    """The chosen configuration of every unit and target, to time alone: up to the mode's
    timing steps, or the most steps it took to a target (at least 10)."""
    items = []
    rows = summarize(dict(results, timings=[]))
    for u in results["units"].values():
        mine = [r for r in rows if (r["problem"], r["batch"], r["method"])
                == (u["problem"], u["batch"], u["method"])]
        for pt in {point_key(r["cell"]["point"]): r["cell"]["point"] for r in mine
                   if r["cell"]["point"] is not None}.values():
            steps = [r["steps"] for r in mine if r["cell"]["point"] == pt
                     and math.isfinite(r["steps"])]
            n = int(min(mode.get("timing_steps", TIMING_STEPS),
                        max(steps) if steps else TIMING_STEPS))
            items.append(dict(problem=u["problem"], batch=u["batch"], method=u["method"],
                              point=pt, warmup=TIMING_WARMUP, steps=max(n, 10)))
    return items


def retime(results: dict, planner: Planner, mode: dict, ranks: int, tmp: Path) -> None:
    """Replace results["timings"] by the chosen configurations timed alone, one at a time."""
    items = timing_items(results, mode)
    t = time.time()
    print(f"batch_scaling: timing {len(items)} chosen configurations alone ...", flush=True)
    results["timings"] = run_timing(planner, items, ranks, tmp, "timing")
    results["timing_seconds"] = time.time() - t


def gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no CuPy, no driver, no device
        return False


if __name__ == "__main__":
    main()
