"""Does jobs/configs/recommended_largebatch.toml hold where it was not tuned?

    .venv/bin/python benchmarks/largebatch_robustness.py            (about 20 minutes here)
    .venv/bin/python benchmarks/largebatch_robustness.py --report RESULTS.json

The recipe (overlap pairs, L-BFGS, a fixed step, its optim.lr 0.25 as shipped) was chosen on
Fashion-MNIST's 60,000 rows (softmax, 2 ranks, 3 seeds). Here: the 8,000 training rows of
mnist-t10k and of Fashion-MNIST (neither tuned on), softmax (where the recipe is
recommended) and the MLP 784-256-256-10 ReLU (where it is not), global batch a quarter and
a half of the rows, seeds 0-4, 1, 2 and 4 ranks. SGD+momentum (0.9) has its learning rate
tuned per (dataset, model, batch) on seed 0, 1 rank, by its best full-training F in STEPS
steps (factor-2 grid widened until the best is interior). Every cell runs both for STEPS
steps, F on all training rows every EVERY steps; the cell's target is SGD's best F. The
recipe twice: as shipped, and with optim.lr set to SGD's tuned rate (as its comment tells a
user to). Per cell: the recipe's steps to it and their ratio to SGD's (and to SGD's best F in
its first STEPS / 2 steps, a target inside the run), whether it diverged
(a failed run, or F above its start) and its final F against SGD's. Steps only: 4 ranks
share 2 cores.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import tomllib
from pathlib import Path

import numpy as np
from robustness import PROBLEMS as MODELS

from hessmpi.bench import datasets, drive, launch, tables, tune

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "jobs" / "configs" / "recommended_largebatch.toml"
STEPS, EVERY, MOMENTUM = 200, 10, 0.9
DATASETS = ("mnist-t10k", "fashion-mnist-8k")
PROBLEMS = ("softmax", "mlp-relu")
FRACTIONS = (0.25, 0.5)          # the global batch, of the training rows
SEEDS, RANKS = (0, 1, 2, 3, 4), (1, 2, 4)


def worker(spec: dict) -> dict:
    from hessmpi import config
    from hessmpi.trainer import Training

    comm, backend = launch.context()
    shards = drive.shards(spec["data"], comm)

    def run(optim: dict, seed: int) -> dict:
        cfg = config.from_dict({
            "data": {"path": spec["data"]}, "model": MODELS[spec["problem"]][0],
            "optim": optim, "train": {"batch_size": spec["batch"] // comm.size,
                                      "seed": seed, "steps": STEPS},
            "backend": {"threads": backend.threads}})
        r = drive.drive(Training(cfg, comm, backend, shards=shards), budget=STEPS,
                        base=EVERY, per=STEPS, check_every=50)
        return {k: r[k] for k in ("status", "steps", "curve")}   # rows [step, ., ., ., F]

    def sgd(lr: float, seed: int) -> dict:
        return run({"name": "sgd", "momentum": MOMENTUM, "lr": lr}, seed)

    if spec["kind"] == "tune":
        def best_f(records) -> tuple[float, float]:
            f = min(row[4] for row in records[0]["curve"])
            return (f if records[0]["status"] != "diverged" else math.inf, 0.0)

        res = tune.tune(lambda point, _: [sgd(point["lr"], 0)],
                        [{"lr": lr} for lr in spec["grid"]], {"F": best_f}, max_points=10)
        k = res["chosen"].get("F")
        return dict(lr=res["points"][k]["point"]["lr"] if k else None,
                    placement=res["placement"].get("F"),
                    finals={p["point"]["lr"]: min(row[4] for row in p["records"][0]["curve"])
                            for p in res["points"].values()})
    return dict(cells=[dict(seed=seed, sgd=sgd(spec["lr"], seed),
                            recipe=run(spec["recipe"], seed),
                            recipe_sgd_lr=run({**spec["recipe"], "lr": spec["lr"]}, seed))
                       for seed in spec["seeds"]])


def summary(cell: dict, which: str = "recipe") -> dict:
    """Target = SGD's best F; steps to it; divergence; final F of both (``which``: the
    recipe as shipped, or "recipe_sgd_lr", with SGD's tuned optim.lr)."""
    sgd, recipe = cell["sgd"], cell[which]
    target = min(row[4] for row in sgd["curve"])

    def steps(rec) -> float:
        return next((row[0] for row in rec["curve"] if row[4] <= target), math.inf)

    f = [row[4] for row in recipe["curve"]]
    diverged = recipe["status"] == "diverged" or not f[-1] <= f[0]
    # SGD that never went below its start has target F0 at step 0: no ratio
    ratio = steps(recipe) / steps(sgd) if steps(sgd) > 0 else math.nan
    half = min(row[4] for row in sgd["curve"] if row[0] <= STEPS // 2)
    to_half = [next((row[0] for row in r["curve"] if row[4] <= half), math.inf)
               for r in (recipe, sgd)]
    return dict(target=target, sgd_steps=steps(sgd), recipe_steps=steps(recipe),
                ratio=ratio, diverged=diverged,
                ratio_half=to_half[0] / to_half[1] if to_half[1] > 0 else math.nan,
                recipe_final=f[-1], sgd_final=sgd["curve"][-1][4])


def report(results: dict) -> None:
    print(f"\n## largebatch recipe robustness, {results['machine']['date']}, "
          f"{results['machine']['host']}: {STEPS} steps, seeds {list(SEEDS)}, ranks "
          f"{list(RANKS)}\n")
    rows = []
    for (key, group), which in itertools.product(results["groups"].items(),
                                                 ("recipe", "recipe_sgd_lr")):
        cells = [summary(c, which) for c in group["cells"]]
        ratios = [c["ratio"] for c in cells if not math.isnan(c["ratio"])]
        finite = [r for r in ratios if math.isfinite(r)]
        lr = results["recipe"]["lr"] if which == "recipe" else group["lr"]
        halves = [c["ratio_half"] for c in cells if not math.isnan(c["ratio_half"])]
        rows.append([key, f"{group['lr']:g} ({group['placement']['lr']})", f"{lr:g}",
                     len(cells), f"{np.median(halves):.2f}" if halves else "-",
                     f"{max(halves):.2f}" if halves else "-",
                     f"{np.median(ratios):.2f}" if finite else "-",
                     f"{max(ratios):.2f}" if finite else "-",
                     sum(not math.isfinite(r) for r in ratios),
                     sum(c["diverged"] for c in cells),
                     sum(c["recipe_final"] > c["sgd_final"] for c in cells)])
    print(tables.table(["dataset / model / global batch", "SGD lr", "recipe lr", "cells",
                        f"median x SGD steps to its F at {STEPS // 2}", "worst",
                        f"median x SGD steps to its best F in {STEPS}", "worst",
                        "not reached", "diverged",
                        "final F above SGD's"], rows))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", type=Path, help="print the tables of a results file")
    ap.add_argument("--problems", default=",".join(PROBLEMS))
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--out", type=Path,
                    default=ROOT / "bench-results" / "largebatch_robustness.json")
    args = ap.parse_args(argv)
    if args.report:
        report(json.loads(args.report.read_text()))
        return
    recipe = tomllib.loads(RECIPE.read_text())["optim"]
    results = dict(recipe=recipe, steps=STEPS, groups={})
    for name in args.datasets.split(","):
        data = str(datasets.dataset(name, ROOT))
        rows = 8000       # both datasets' training rows
        for problem in args.problems.split(","):
            for fraction in FRACTIONS:
                batch = int(fraction * rows)
                base = dict(data=data, problem=problem, batch=batch)
                tuned = launch.launch(__file__, dict(base, kind="tune",
                                                     grid=MODELS[problem][1]), 1)
                print(f"largebatch: {name} {problem} batch {batch}: SGD lr {tuned['lr']} "
                      f"({tuned['placement']})", flush=True)
                if tuned["lr"] is None:
                    print("  every SGD rate diverged: group skipped", flush=True)
                    continue
                group = dict(lr=tuned["lr"], placement=tuned["placement"], cells=[])
                for ranks in RANKS:
                    out = launch.launch(__file__, dict(base, kind="cells", lr=tuned["lr"],
                                                       recipe=recipe, seeds=list(SEEDS)),
                                        ranks)
                    group["cells"] += [dict(c, ranks=ranks) for c in out["cells"]]
                    for c in out["cells"]:
                        s, t = summary(c), summary(c, "recipe_sgd_lr")
                        print(f"  ranks {ranks} seed {c['seed']}: SGD {s['sgd_steps']} steps "
                              f"(F {s['sgd_final']:.4g}); recipe {s['recipe_steps']} "
                              f"(F {s['recipe_final']:.4g})"
                              + (" DIVERGED" if s["diverged"] else "")
                              + f"; at SGD's lr {t['recipe_steps']} (F {t['recipe_final']:.4g})"
                              + (" DIVERGED" if t["diverged"] else ""), flush=True)
                results["groups"][f"{name} / {problem} / {batch}"] = group
                tables.save("largebatch_robustness", results, ROOT, args.out)
    results = json.loads(args.out.read_text())
    report(results)


if __name__ == "__main__":
    launch.script(worker, main)
