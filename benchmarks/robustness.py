"""Does the recommended full-batch recipe hold where it was not tuned? Issue 15's matrix.

    .venv/bin/python benchmarks/robustness.py              (--quick, in `make bench`: minutes)
    .venv/bin/python benchmarks/robustness.py --full       (the matrix: about an hour here)
    .venv/bin/python benchmarks/robustness.py --full --problems autoencoder   (reduced)
    .venv/bin/python benchmarks/robustness.py --report bench-results/robustness.json
    .venv/bin/python benchmarks/robustness.py --comparators bench-results/robustness.json

At full batch (every rank's batch its whole shard): models softmax, MLP 784-256-256-10 with
ReLU and with tanh (and, reduced, the deep autoencoder) on mnist-t10k (where the recipe was
chosen) and on the first 8,000 training rows of Fashion-MNIST (never tuned on), 5 seeds,
1, 2 and 4 ranks. SGD+momentum (0.9) is tuned per problem and dataset on a factor-2
learning-rate grid widened until its best point, by F after 150 steps on seed 0, is
interior. Every cell (dataset, model, seed, ranks) then runs, in one process, side by side:
SGD+momentum at that rate for 150 steps, whose best F in them is the cell's target, and the
recipe of jobs/configs/recommended_fullbatch.toml for 150 steps. Per cell: steps and wall time to
the target (ratios to SGD's), the recipe's largest rise of F from one step to the next
(relative), divergence (a failed run, or F above its start). Beside it, as the anchor, SciPy's
L-BFGS-B (memory 10, float64, one process) on the same objectives: function-and-gradient
evaluations to each seed's target. Results: bench-results/robustness[-quick].json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import tomllib
from pathlib import Path

import numpy as np

from hessmpi.bench import datasets, drive, launch, tables, tune

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "jobs" / "configs" / "recommended_fullbatch.toml"
STEPS, MOMENTUM = 150, 0.9
MLP = {"name": "mlp", "hidden": [256, 256], "l2": 1e-4}
#: model config, SGD's first grid (most promising first)
PROBLEMS = {
    "softmax": ({"name": "softmax", "l2": 1e-4}, [1.0, 0.5, 2.0]),
    "mlp-relu": ({**MLP, "activation": "relu"}, [0.3, 0.15, 0.6]),
    "mlp-tanh": ({**MLP, "activation": "tanh"}, [0.3, 0.15, 0.6]),
    "autoencoder": ({"name": "autoencoder", "l2": 1e-5}, [0.006, 0.003, 0.012]),
}
DATASETS = ("mnist-t10k", "fashion-mnist-8k")
MODES = {
    "quick": dict(problems=["softmax"], datasets=DATASETS, seeds=[0, 1], ranks=[1, 2]),
    "full": dict(problems=["softmax", "mlp-relu", "mlp-tanh"], datasets=DATASETS,
                 seeds=[0, 1, 2, 3, 4], ranks=[1, 2, 4]),
}
#: the reduced form for the autoencoder (0.8 s a full-batch step here)
REDUCED = dict(datasets=("mnist-t10k",), seeds=[0], ranks=[1])


# ----- worker: SGD tuning, or one cell --------------------------------------------------------
def training(spec: dict, optim: dict, seed: int, comm, backend, shards):
    from hessmpi import config
    from hessmpi.trainer import Training

    cfg = config.from_dict({"data": {"path": spec["data"]}, "model": spec["model"],
                            "optim": optim, "train": {"batch_size": 0, "seed": seed,
                                                      "steps": STEPS},
                            "backend": {"device": "cpu", "threads": backend.threads}})
    return Training(cfg, comm, backend, shards=shards)


def worker(spec: dict) -> dict:
    comm, backend = launch.context()
    shards = drive.shards(spec["data"], comm)

    def run(optim, seed):
        record = drive.drive(training(spec, optim, seed, comm, backend, shards), budget=STEPS,
                             base=STEPS, check_every=50)
        record.pop("test_curve")
        return record

    if spec["kind"] == "comparator":
        def one(point, _points):     # the tuned scalar is spec["knob"] (lr, or HF's lambda_0)
            optim = {**spec["optim"], spec["knob"]: point["lr"]}
            record = drive.drive(training(spec, optim, 0, comm, backend, shards),
                                 budget=spec["budget"], unit="work", base=spec["budget"],
                                 check_every=50)
            record.pop("test_curve")
            return [record]

        res = tune.tune(one, [{"lr": v} for v in spec["grid"]], {"F": tune.final},
                        max_points=8, factor=spec["factor"])
        k = res["chosen"].get("F")
        return dict(records=res["points"][k]["records"] if k else [],
                    point=res["points"][k]["point"] if k else None,
                    placement=res["placement"].get("F"),
                    finals={p["point"]["lr"]: drive.final_value(p["records"][0])
                            for p in res["points"].values()})
    if spec["kind"] == "tune":
        def sgd(point, _points):
            return [run({"name": "sgd", "momentum": MOMENTUM, "lr": point["lr"]}, 0)]

        res = tune.tune(sgd, [{"lr": lr} for lr in spec["grid"]], {"F": tune.final},
                        max_points=10)
        k = res["chosen"].get("F")
        finals = {p["point"]["lr"]: drive.final_value(p["records"][0])
                  for p in res["points"].values()}
        return dict(lr=None if k is None else res["points"][k]["point"]["lr"],
                    placement=res["placement"].get("F"), finals=finals, notes=res["notes"])
    sgd = run({"name": "sgd", "momentum": MOMENTUM, "lr": spec["lr"]}, spec["seed"])
    recipe = run(spec["recipe"], spec["seed"])
    return dict(sgd=sgd, recipe=recipe, ranks=comm.size)


# ----- the anchor: SciPy's L-BFGS-B ------------------------------------------------------------
def lbfgs_anchor(data: str, model_cfg: dict, seed: int, target: float) -> dict:
    """L-BFGS-B (memory 10) from the same initial point, float64, one process: function and
    gradient evaluations and iterations until F <= target (at most 4 x STEPS iterations)."""
    from scipy.optimize import minimize

    from hessmpi import config
    from hessmpi.models import build_model

    train, _ = drive.shards(data, _Solo())
    cfg = config.from_dict({"model": model_cfg})
    model = build_model(cfg["model"], train.x.shape[1], train.n_classes, xp=np,
                        dtype=np.float64)
    x, y = train.x.astype(np.float64), train.y
    values, grad = [], np.empty(model.n_params)

    def fun(theta):
        values.append(float(model.loss_grad(theta, x, y, grad)))
        return values[-1], grad.copy()

    iters = []
    started = time.perf_counter()
    try:
        minimize(fun, model.init_params(seed).astype(np.float64), jac=True, method="L-BFGS-B",
                 callback=lambda th: _stop(iters, values, target),
                 options=dict(maxcor=10, maxiter=4 * STEPS, ftol=0, gtol=0))
    except StopIteration:
        pass
    hit = next((i + 1 for i, v in enumerate(values) if v <= target), None)
    return dict(evals=hit, iters=len(iters) if hit else None, total_evals=len(values),
                seconds=time.perf_counter() - started)


def _stop(iters, values, target):
    iters.append(values[-1])
    if min(values) <= target:
        raise StopIteration


class _Solo:
    """What ``drive.shards`` needs of a communicator, for one process without MPI."""

    rank, size = 0, 1

    @staticmethod
    def collectively(fn, *args, **kwargs):
        return fn(*args, **kwargs)


# ----- the parent --------------------------------------------------------------------------------
def first_step(losses: list, final: float, target: float) -> int | None:
    """Steps k to the first F(theta_k) <= target, from the per-step F (F(theta_0..K-1)) and
    the final F(theta_K)."""
    values = [*losses[1:], final]
    return next((k + 1 for k, v in enumerate(values) if v <= target), None)


def cell_summary(cell: dict) -> dict:
    """The cell's target is SGD's best objective in its STEPS steps (at full batch the loss
    of every step is F: SGD+momentum is not monotone, and its F after STEPS steps can be far
    above its best)."""
    sgd, recipe = cell["sgd"], cell["recipe"]
    target = min([*sgd["losses"], drive.final_value(sgd)])
    out = dict(target=target, sgd_final=drive.final_value(sgd), sgd_status=sgd["status"],
               status=recipe["status"],
               fallback_reasons=recipe["fallback_reasons"],
               forward_evals=recipe["forward_evals"])
    for name, rec in (("sgd", sgd), ("recipe", recipe)):
        k = first_step(rec["losses"], drive.final_value(rec), target)
        out[f"{name}_steps"] = k
        out[f"{name}_wall"] = rec["walls"][k - 1] if k else None
        per_step = (rec["grad_evals"] + rec["forward_evals"]) / max(rec["steps"], 1)
        out[f"{name}_evals"] = k * per_step if k else None
    f = [*recipe["losses"], drive.final_value(recipe)]
    rises = [(b - a) / abs(a) for a, b in zip(f, f[1:], strict=False) if a]
    out["max_rise"] = max(rises) if rises else 0.0
    out["diverged"] = recipe["status"] == "diverged" or not f[-1] <= f[0]
    out["final"] = f[-1]
    return out


def run_matrix(args, mode: dict, out: Path) -> dict:
    recipe = tomllib.loads(RECIPE.read_text())["optim"]
    results = dict(mode=mode, recipe=recipe, steps=STEPS, tuning={}, cells=[], anchor={})
    for dataset in mode["datasets"]:
        data = str(datasets.dataset(dataset, ROOT))
        for problem in mode["problems"]:
            model, grid = PROBLEMS[problem]
            reduced = problem == "autoencoder"
            if reduced and dataset not in REDUCED["datasets"]:
                continue
            spec = dict(data=data, model=model)
            print(f"robustness: tuning SGD on {problem} / {dataset} ...", flush=True)
            tuned = launch.launch(__file__, {**spec, "kind": "tune", "grid": grid}, 1)
            results["tuning"][f"{problem}/{dataset}"] = tuned
            print(f"  SGD lr {tuned['lr']} ({tuned['placement']}); F at {STEPS}: "
                  + ", ".join(f"{lr:g}: {f:.5g}" for lr, f in sorted(
                      (float(k), v) for k, v in tuned["finals"].items())), flush=True)
            for seed in (REDUCED if reduced else mode)["seeds"]:
                for ranks in (REDUCED if reduced else mode)["ranks"]:
                    cell = launch.launch(__file__, {**spec, "kind": "cell", "seed": seed,
                                                    "lr": tuned["lr"], "recipe": recipe}, ranks)
                    s = dict(dataset=dataset, problem=problem, seed=seed, ranks=ranks,
                             sgd_lr=tuned["lr"], **cell_summary(cell))
                    results["cells"].append(s)
                    print(f"  seed {seed}, {ranks} rank(s): target {s['target']:.5g}; SGD "
                          f"{s['sgd_steps']} steps, recipe {s['recipe_steps']} steps "
                          f"({s['status']}, largest rise {s['max_rise']:.2g})", flush=True)
                    if args.anchor and ranks == 1:
                        a = lbfgs_anchor(data, model, seed, s["target"])
                        results["anchor"][f"{problem}/{dataset}/{seed}"] = a
                        print(f"    L-BFGS-B: {a['evals']} evaluations, {a['iters']} "
                              "iterations", flush=True)
                    tables.save(out.stem, results, ROOT, out)
    return results


#: The comparators of issue 19 at full batch, each tuned on an interior grid of one knob
#: (by F at the end of COMPARE_WORK gradient-equivalent evaluations: products and forward
#: passes at their matrix-product cost): Hessian-free's initial lambda (it adapts; factor
#: 10), Entropy-SGD's learning rate (factor 2; its grid starts at 32, where the grid that
#: started at 1 ended on every cell it was run on). (optim, knob, first grid, factor)
COMPARATORS = {"hessian_free": ({"name": "hessian_free"}, "hf_damping", [1.0, 0.1, 10.0], 10),
               "entropy_sgd": ({"name": "entropy_sgd"}, "lr", [32.0, 16.0, 64.0], 2)}
COMPARE_WORK = 3 * STEPS


def run_comparators(results: dict, out: Path) -> dict:
    """Seed 0, one rank, every (dataset, problem) of ``results``: each comparator to the
    cell's target (SGD's F after STEPS steps), beside SGD and the recipe of that cell; a
    comparator the file already holds is kept (an interrupted call goes on where it was)."""
    rows = results.setdefault("comparators", {})
    for cell in results["cells"]:
        if cell["seed"] != 0 or cell["ranks"] != 1:
            continue
        key = f"{cell['problem']}/{cell['dataset']}"
        data = str(datasets.dataset(cell["dataset"], ROOT))
        for name, (optim, knob, grid, factor) in COMPARATORS.items():
            if f"{key}/{name}" in rows:     # measured by an earlier call on this file
                print(f"robustness: {name} on {key}: kept from {out}", flush=True)
                continue
            print(f"robustness: {name} on {key} ...", flush=True)
            res = launch.launch(__file__, dict(kind="comparator", data=data,
                                               model=PROBLEMS[cell["problem"]][0],
                                               optim=optim, knob=knob, grid=grid,
                                               factor=factor, budget=COMPARE_WORK), 1)
            rec = res["records"][0] if res["records"] else None
            hit = None if rec is None else first_step(rec["losses"], drive.final_value(rec),
                                                      cell["target"])
            rows[f"{key}/{name}"] = dict(
                knob=knob, value=res["point"] and res["point"]["lr"],
                placement=res.get("placement"), steps=hit,
                work=rec["works"][hit - 1] if hit else None,
                wall=rec["walls"][hit - 1] if hit else None, status=rec and rec["status"],
                final=rec and drive.final_value(rec), total_work=rec and rec["works"][-1])
            print(f"  {name}: {hit} steps to {cell['target']:.5g}", flush=True)
            tables.save(out.stem, results, ROOT, out)
    return results


def report_comparators(results: dict) -> None:
    rows = []
    for cell in results["cells"]:
        if cell["seed"] != 0 or cell["ranks"] != 1:
            continue
        key = f"{cell['problem']}/{cell['dataset']}"
        line = [cell["dataset"], cell["problem"], f"{cell['target']:.5g}",
                f"{cell['sgd_steps']} / {cell['sgd_evals']:.0f} / {cell['sgd_wall']:.1f}",
                f"{cell['recipe_steps']} / {cell['recipe_evals']:.0f} / "
                f"{cell['recipe_wall']:.1f}" if cell["recipe_steps"] else "-"]
        for name in COMPARATORS:
            c = results.get("comparators", {}).get(f"{key}/{name}")
            where = "" if c is None else (
                f" [{c['knob']} {c['value']:g}, {(c['placement'] or {}).get('lr', '?')}]")
            line.append("-" if c is None else
                        (f"{c['steps']} / {c['work']:.0f} / {c['wall']:.1f}" if c["steps"] else
                         f"> {c['total_work']:.0f} work (F {c['final']:.4g})") + where)
        rows.append(line)
    if rows:
        print("\nThe comparators (issue 19), seed 0, 1 rank, to the same target: steps / "
              "gradient-equivalent evaluations (a forward pass 1/3, a Gauss-Newton product "
              f"5/3) / wall s; within {COMPARE_WORK} evaluations; [the tuned knob, where it "
              "sits on its grid]:\n")
        print(tables.table(["data", "model", "target F", "SGD+momentum", "recipe",
                            *COMPARATORS], rows))


def report(results: dict) -> None:
    cells = results["cells"]
    rows, verdict = [], []
    keys = sorted({(c["dataset"], c["problem"]) for c in cells},
                  key=lambda k: (DATASETS.index(k[0]), list(PROBLEMS).index(k[1])))
    for dataset, problem in keys:
        cs = [c for c in cells if (c["dataset"], c["problem"]) == (dataset, problem)]
        steps = [c["recipe_steps"] / c["sgd_steps"] if c["recipe_steps"] and c["sgd_steps"]
                 else math.inf for c in cs]
        walls = [c["recipe_wall"] / c["sgd_wall"] if c["recipe_wall"] and c["sgd_wall"]
                 else math.inf for c in cs]
        anchor = [results["anchor"].get(f"{problem}/{dataset}/{c['seed']}", {}).get("evals")
                  for c in cs if c["ranks"] == 1]
        ours = [c["recipe_evals"] for c in cs if c["ranks"] == 1]
        tuned = results["tuning"][f"{problem}/{dataset}"]
        rows.append([dataset + (" (tuned here)" if dataset == "mnist-t10k" else ""), problem,
                     f"{tuned['lr']:g} ({(tuned['placement'] or {}).get('lr', '?')})",
                     len(cs), tables.spread([c["sgd_steps"] or math.inf for c in cs]),
                     tables.spread([c["recipe_steps"] or math.inf for c in cs]),
                     f"{tables.ratio(float(np.median(steps)))} / {tables.ratio(max(steps))}",
                     f"{tables.ratio(float(np.median(walls)))} / {tables.ratio(max(walls))}",
                     f"{max(c['max_rise'] for c in cs):.1e}",
                     sum(c["diverged"] for c in cs),
                     tables.spread([a or math.inf for a in anchor]),
                     tables.spread([o or math.inf for o in ours])])
        verdict.append((dataset, problem, steps, walls, cs, anchor, ours))
    print(f"\nThe recipe ({RECIPE.relative_to(ROOT)}) against SGD+momentum at full batch, "
          f"{STEPS} steps; per cell the target is SGD's best F in {STEPS} steps; ratios median / "
          "worst over seeds and rank counts; evaluations at 1 rank: L-BFGS-B's function-and-"
          "gradient evaluations, the recipe's gradients and forward passes (its mean per step "
          "times its steps):\n")
    print(tables.table(["data", "model", "SGD lr (grid)", "cells", "SGD steps",
                        "recipe steps", "steps ratio", "wall ratio", "largest rise",
                        "diverged", "L-BFGS-B evals", "recipe evals"], rows))
    by_ranks = []
    for ranks in sorted({c["ranks"] for c in cells}):
        cs = [c for c in cells if c["ranks"] == ranks]
        r = [c["recipe_steps"] / c["sgd_steps"] if c["recipe_steps"] and c["sgd_steps"]
             else math.inf for c in cs]
        by_ranks.append([ranks, len(cs), tables.ratio(float(np.median(r))),
                         tables.ratio(max(r)), sum(c["diverged"] for c in cs)])
    print("\nBy rank count:\n")
    print(tables.table(["ranks", "cells", "median steps ratio", "worst", "diverged"],
                       by_ranks))
    all_steps = [x for v in verdict for x in v[2]]
    all_walls = [x for v in verdict for x in v[3]]
    rises = max(c["max_rise"] for c in cells)
    lbfgs_ok = all(np.median([o or math.inf for o in v[6]])
                   <= np.median([a or math.inf for a in v[5]]) for v in verdict)
    print("\nGoals: zero divergences: " + ("MET" if not any(c["diverged"] for c in cells)
                                           else "NOT MET")
          + f"; zero rises (largest {rises:.1e}, float32 round-off is ~1e-7): "
          + ("MET" if rises <= 1e-6 else "NOT MET")
          + f"; median steps <= 0.5x ({tables.ratio(float(np.median(all_steps)))}, worst "
          f"{tables.ratio(max(all_steps))}): "
          + ("MET" if np.median(all_steps) <= 0.5 else "NOT MET")
          + f"; median wall <= 0.6x ({tables.ratio(float(np.median(all_walls)))}, worst "
          f"{tables.ratio(max(all_walls))}): "
          + ("MET" if np.median(all_walls) <= 0.6 else "NOT MET")
          + "; at most L-BFGS-B's evaluations on each problem (medians): "
          + ("MET" if lbfgs_ok else "NOT MET"))
    report_comparators(results)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="the whole matrix")
    ap.add_argument("--problems", help="comma-separated subset of " + ", ".join(PROBLEMS))
    ap.add_argument("--datasets", help="comma-separated subset of " + ", ".join(DATASETS))
    ap.add_argument("--into", type=Path, metavar="JSON",
                    help="merge into this result: its cells, tuning and anchors of the "
                         "(dataset, problem) pairs run here are replaced")
    ap.add_argument("--no-anchor", dest="anchor", action="store_false",
                    help="skip SciPy's L-BFGS-B")
    ap.add_argument("--report", type=Path, metavar="JSON", help="print the tables of a result")
    ap.add_argument("--comparators", type=Path, metavar="JSON",
                    help="run Hessian-free and Entropy-SGD on the problems of a result (seed "
                         "0, one rank, its targets) and add them to it")
    args = ap.parse_args(argv)
    if args.report:
        report(json.loads(args.report.read_text()))
        return
    if args.comparators:
        report(run_comparators(json.loads(args.comparators.read_text()), args.comparators))
        return
    mode = dict(MODES["full" if args.full else "quick"])
    if args.problems:
        mode["problems"] = args.problems.split(",")
    if args.datasets:
        mode["datasets"] = tuple(args.datasets.split(","))
    out = ROOT / "bench-results" / ("robustness.json" if args.full else "robustness-quick.json")
    if args.into:
        out = args.into.with_name(args.into.stem + "-part.json")
    results = run_matrix(args, mode, out)
    if args.into:
        results = merge(json.loads(args.into.read_text()), results)
        out = args.into
        tables.save(out.stem, results, ROOT, out)
    report(results)
    print(f"\nresults: {out}")


def merge(old: dict, new: dict) -> dict:
    """``old`` with the cells, tuning and anchors of every (dataset, problem) of ``new``
    replaced by ``new``'s."""
    done = {(c["dataset"], c["problem"]) for c in new["cells"]}
    old["cells"] = [c for c in old["cells"] if (c["dataset"], c["problem"]) not in done] \
        + new["cells"]
    old["tuning"].update(new["tuning"])
    for key, value in new["anchor"].items():
        old["anchor"][key] = value
    return old


if __name__ == "__main__":
    launch.script(worker, main)
