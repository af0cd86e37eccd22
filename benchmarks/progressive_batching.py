"""Progressive batching on Fashion-MNIST (issue 17): does growing the batch by the augmented
inner-product test reach SGD's targets sooner than the best-tuned fixed-batch SGD+momentum?

    .venv/bin/python benchmarks/progressive_batching.py \\
        --given bench-results/batch_scaling-fashion-overlap.json --ranks 2
    .venv/bin/python benchmarks/progressive_batching.py --report RESULTS.json

From a batch_scaling ``--fashion`` results file (``--given``) it takes, per problem and
starting global batch, the targets (SGD's F after 150 steps at 16,384; its best test
accuracy less 0.005) and the tuned SGD points (momentum 0.9, and momentum tuned). Then,
side by side in one invocation on the same ranks: those SGD points again (fixed batch, 3
seeds), and, starting from the same batch with ``optim.batch_test = "inner_product"``
(nu 5.84 as the papers, K 8; theta tuned from their 0.9 down): SGD+momentum (the better
SGD's momentum) and L-BFGS (history pairs, y on the step's own batch = full overlap, Powell
damping, Armijo search; Bollapragada et al. 2018's PBQN). Learning rate x theta (L-BFGS:
theta alone, at the better SGD's rate) are tuned on seed 0 on the wall time to the train
target (3 points a side, x2 apart, widened toward an edge best up to 3 more points), then
3 seeds. Reported per target: median and worst steps,
epochs (rows drawn / 60,000) and in-run wall seconds (evaluations excluded), their ratios to
the better SGD, divergences, the batch grown to. One MPI job per (problem, batch, method).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import numpy as np

from hessmpi.bench import drive, launch, tables

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("train loss", "test acc ref")
THEIRS = ("sgd", "sgd-momentum")                     # the given file's tuned SGD
TEST = {"batch_test": "inner_product", "batch_nu": 5.84, "batch_pieces": 8}
THETAS = (0.9, 0.45, 0.225)         # the papers' theta, then stricter: the batch grows sooner
METHODS = {   # optim keys beside lr (and the better SGD's momentum where None)
    "sgd-progressive": {"name": "sgd", "momentum": None, **TEST},
    "lbfgs-progressive": {"name": "secant", "pairs": "history", "curvature": "lbfgs",
                          "memory": 10, "powell": True, "line_search": "armijo",
                          "newton_lr": 1.0, "momentum": 0.0, "damping": 0.0, "h0": "bb",
                          "max_step_ratio": 1e4, **TEST},
}
MODELS = {"fashion-softmax": {"name": "softmax", "l2": 1e-4},
          "fashion-mlp": {"name": "mlp", "hidden": [256, 256], "activation": "relu",
                          "l2": 1e-4}}


def worker(spec: dict) -> dict:
    """Every run of one (problem, batch, method): the grid on seed 0 (widened to an
    interior best), then the other seeds at the best; each run's hits of the targets."""
    from hessmpi import config
    from hessmpi.trainer import Training

    comm, backend = launch.context("cpu", threads=spec["threads"])
    shards = drive.shards(spec["data"], comm)
    thresholds, n_rows = spec["thresholds"], sum(comm.allgather(len(shards[0].y)))

    def run(optim: dict, seed: int) -> dict:
        cfg = config.from_dict({
            "data": {"path": spec["data"]}, "model": MODELS[spec["problem"]], "optim": optim,
            "train": {"batch_size": spec["batch"] // comm.size, "seed": seed,
                      "steps": spec["budget"]},
            "backend": {"threads": backend.threads}})
        r = drive.drive(Training(cfg, comm, backend, shards=shards), budget=spec["budget"],
                        train_targets={"train loss": thresholds["train loss"]},
                        test_targets={"test acc ref": thresholds["test acc ref"]},
                        base=max(2, spec["budget"] // 400), per=40,
                        deadline=time.time() + spec["seconds"])
        drawn = np.cumsum(r["rows"])
        hits = {}
        for name in TARGETS:
            h = drive.first_hit(r, thresholds[name], test=name.startswith("test"))
            hits[name] = h and dict(steps=h["steps"], wall=h["wall"], epochs=float(
                drawn[h["steps"] - 1]) / n_rows if h["steps"] else 0.0)
        out = dict(optim=optim, seed=seed, status=r["status"], steps=r["steps"], hits=hits,
                   final_batch=r["rows"][-1] if r["rows"] else spec["batch"],
                   t_step=r["t_step"], final_f=r["curve"][-1][4])
        if comm.rank == 0:
            said = {n: (h and f"{h['steps']} steps {h['wall']:.1f} s") for n, h in hits.items()}
            print(f"  {spec['problem']} b{spec['batch']} {spec['method']} lr {optim['lr']:g} "
                  f"theta {optim.get('batch_theta', '-')} "
                  f"seed {seed}: {r['status']} after {r['steps']} steps, batch "
                  f"{out['final_batch']:,}, {said}", flush=True)
        return comm.bcast(out)           # rank 0's walls decide, on every rank alike

    def wall(record) -> float:
        h = record["hits"]["train loss"]
        return h["wall"] if h else math.inf

    def at(point) -> dict:
        return {**spec["optim"], **dict(zip(("lr", "batch_theta"), point, strict=False))}

    axes = [spec["lrs"]] + ([spec["thetas"]] if spec["thetas"] else [])
    grid = {point: run(at(point), 0) for point in itertools.product(*axes)}
    while spec["widen"] and len(grid) < spec["widen"]:
        best = min(grid, key=lambda p: wall(grid[p]))
        if math.isinf(wall(grid[best])):
            break
        for i, value in enumerate(best):      # an edge of an axis: one point beyond it
            line = sorted({p[i] for p in grid})
            if value in (line[0], line[-1]) and len(line) > 1:
                step = line[1] / line[0]
                beyond = value / step if value == line[0] else value * step
                grid[best[:i] + (beyond,) + best[i + 1:]] = run(
                    at(best[:i] + (beyond,) + best[i + 1:]), 0)
                break
        else:
            break
    best = min(grid, key=lambda p: wall(grid[p]))
    # every seed run anew at the chosen point: seed 0's grid run was the best of several
    records = [run(at(best), seed) for seed in range(spec["seeds"])]

    def bracketed(i: int) -> bool:        # a point below and above the best along axis i
        line = [p[i] for p in grid if p[:i] + p[i + 1:] == best[:i] + best[i + 1:]]
        return len({p[i] for p in grid}) == 1 or min(line) < best[i] < max(line)

    interior = all(bracketed(i) for i in range(len(best)))
    return dict(problem=spec["problem"], batch=spec["batch"], method=spec["method"],
                grid=[[*p, wall(r)] for p, r in grid.items()], lr=best[0],
                theta=best[1] if len(best) > 1 else None, interior=interior,
                records=records)


# ----- the parent ----------------------------------------------------------------------------

def plan(given: dict, problems, batches, seeds: int, seconds: float, threads: int) -> list:
    specs = []
    for problem in problems:
        for batch in batches:
            units = {m: u for m in THEIRS if (u := given["units"].get(f"{problem}-b{batch}-{m}"))}
            if "sgd" not in units:
                raise SystemExit(f"{problem} at batch {batch}: the given file has no SGD unit")
            thresholds = units["sgd"]["thresholds"]
            points = {m: u["chosen"]["train loss"] for m, u in units.items()}
            common = dict(problem=problem, batch=batch, data=given["data"][problem],
                          thresholds=thresholds, budget=units["sgd"]["budget"], seeds=seeds,
                          seconds=seconds, threads=threads)
            for m, point in points.items():
                specs.append(dict(common, method=m, lrs=[point["lr"]], thetas=[], widen=0,
                                  optim={"name": "sgd", "momentum": 0.9,
                                         **{k: v for k, v in point.items() if k != "lr"}}))
            # the better SGD: fewer steps to the train target in the given file
            better = min(units, key=lambda m: min(
                (h["steps"] for p in units[m]["points"] if p["point"] == points[m]
                 for r in p["records"][:1]
                 if (h := drive.first_hit(r, thresholds["train loss"]))), default=math.inf))
            lr, momentum = points[better]["lr"], points[better].get("momentum", 0.9)
            for m, keys in METHODS.items():
                optim = {k: (momentum if v is None else v) for k, v in keys.items()}
                # L-BFGS: its step is newton_lr 1 from h0 = bb; lr only scales the first
                # step and the fallbacks, so theta alone is tuned (and each run costs more)
                lrs = [lr] if keys["name"] == "secant" else [lr / 2, lr, lr * 2]
                specs.append(dict(common, method=m, lrs=lrs, thetas=list(THETAS),
                                  widen=3 * len(lrs) + 3, optim=optim))
    return specs


def rows_of(results: dict) -> list[dict]:
    out = []
    for u in results["units"]:
        for name in TARGETS:
            hits = [r["hits"][name] for r in u["records"]]
            def field(key, hits=hits):
                return [h[key] if h else math.inf for h in hits]
            out.append(dict(problem=u["problem"], batch=u["batch"], method=u["method"],
                            target=name, lr=u["lr"], theta=u["theta"],
                            interior=u["interior"],
                            steps=field("steps"), epochs=field("epochs"), wall=field("wall"),
                            diverged=sum(r["status"] == "diverged" for r in u["records"]),
                            final_batch=max(r["final_batch"] for r in u["records"])))
    return out


def report(results: dict) -> None:
    rows = rows_of(results)
    print(f"\n## progressive batching, {results['machine']['date']}, "
          f"{results['machine']['host']}, {results['ranks']} ranks, "
          f"{results['seeds']} seeds\n")
    for problem, batch, target in sorted({(r["problem"], r["batch"], r["target"])
                                          for r in rows}):
        here = [r for r in rows if (r["problem"], r["batch"], r["target"])
                == (problem, batch, target)]
        sgd = min((r for r in here if r["method"] in THEIRS),
                  key=lambda r: (np.median(r["steps"]), np.median(r["wall"])))
        table = []
        for r in here:
            med = {k: float(np.median(r[k])) for k in ("steps", "epochs", "wall")}
            worst = {k: max(r[k]) for k in ("steps", "epochs", "wall")}
            ratio = {k: med[k] / float(np.median(sgd[k])) for k in ("epochs", "wall")}
            point = f"{r['lr']:g}" + (f", theta {r['theta']:g}" if r["theta"] else "")
            table.append([r["method"], point + ("" if r["interior"] else " (edge)"),
                          tables.spread(r["steps"]), f"{med['epochs']:.2f}",
                          f"{worst['epochs']:.2f}", f"{med['wall']:.1f}",
                          f"{worst['wall']:.1f}", tables.ratio(ratio["epochs"]),
                          tables.ratio(ratio["wall"]), f"{r['final_batch']:,}",
                          f"{sum(map(math.isfinite, r['steps']))}/{len(r['steps'])}",
                          str(r["diverged"])])
        print(f"### {problem}, start batch {batch:,}, {target}\n")
        print(tables.table(["method", "point", "steps", "epochs", "worst", "wall s", "worst",
                            "x epochs", "x wall", "last batch", "reached", "diverged"],
                           table))
        print()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--given", type=Path, help="a batch_scaling --fashion results file")
    ap.add_argument("--report", type=Path, help="print the tables of a results file")
    ap.add_argument("--problems", default="fashion-softmax,fashion-mlp")
    ap.add_argument("--batches", default="1024,4096")
    ap.add_argument("--methods", default=",".join([*THEIRS, *METHODS]))
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=240, help="wall limit of one run")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results" /
                    "progressive_batching.json")
    args = ap.parse_args(argv)
    if args.report:
        report(json.loads(args.report.read_text()))
        return
    if not args.given:
        ap.error("give --given (a batch_scaling --fashion results file) or --report")
    given = json.loads(args.given.read_text())
    threads = max(1, len(__import__("os").sched_getaffinity(0)) // args.ranks)
    specs = [s for s in plan(given, args.problems.split(","),
                             [int(b) for b in args.batches.split(",")], args.seeds,
                             args.seconds, threads)
             if s["method"] in args.methods.split(",")]
    results = dict(benchmark="progressive_batching", machine=tables.machine(ROOT),
                   ranks=args.ranks, seeds=args.seeds, given=str(args.given), units=[])
    for spec in specs:
        print(f"progressive_batching: {spec['problem']} b{spec['batch']} {spec['method']}",
              flush=True)
        results["units"].append(launch.launch(__file__, spec, args.ranks))
        tables.save("progressive_batching", results, ROOT, args.out)
    report(results)


if __name__ == "__main__":
    launch.script(worker, main)
