"""The deep autoencoder below full batch: reconstruction error against work (issue 19).

    .venv/bin/python benchmarks/autoencoder_work.py                  (about 15 minutes here)
    .venv/bin/python benchmarks/autoencoder_work.py --report bench-results/autoencoder_work.json

Martens (2010) found Hessian-free ahead of SGD+momentum on the deep autoencoder
784-1000-500-250-30 at equal work. Here, on mnist-t10k's 8,000 training rows at global batch
1,024 (``--batch``; ``--ranks``), seed 0, side by side in one invocation: SGD+momentum (0.9),
distributed Hessian-free and the large-batch candidate (jobs/configs/recommended_largebatch
.toml), each for WORK gradient-equivalent evaluations per rank (hessmpi.bench.drive.work: a
forward pass 1/3 of a gradient, a Gauss-Newton product 5/3). Each is tuned on one knob (SGD's
and the candidate's learning rate on a factor-2 grid, Hessian-free's initial damping on a
factor-10 grid), widened until its best point, by the reconstruction error F (the training
objective on all 8,000 rows) at its last evaluation within WORK, is interior. Reported for
each chosen point: F at fixed amounts of work, the work and wall time to SGD's F at WORK,
and the plot of F against work. Results: bench-results/autoencoder_work.json, the plot
beside it; a call with ``--methods`` replaces those methods in an existing file of the same
batch, ranks and work.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
import tomllib
from pathlib import Path

from robustness import PROBLEMS as MODELS

from hessmpi.bench import datasets, drive, launch, tables, tune

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "jobs" / "configs" / "recommended_largebatch.toml"
WORK, MAX_POINTS, SEED = 450, 6, 0       # 3 x the 150 steps of the full-batch comparison
MARKS = (50, 100, 200, 300, 450)         # the work at which F is tabulated
SGD_GRID = MODELS["autoencoder"][1]      # full batch's: 0.006 was interior there
#: label, [optim] besides the knob, the knob, its first grid, the grid's factor, steps
#: between evaluations of F
METHODS = {
    "sgd": ("SGD+momentum", {"name": "sgd", "momentum": 0.9}, "lr", SGD_GRID, 2.0, 10),
    "hessian-free": ("Hessian-free", {"name": "hessian_free"}, "hf_damping", [1.0, 0.1, 10.0],
                     10.0, 1),
    "candidate": ("recommended_largebatch.toml (candidate)",
                  tomllib.loads(RECIPE.read_text())["optim"], "lr", SGD_GRID, 2.0, 10),
}


def worker(spec: dict) -> dict:
    """Tune one method: the chosen point's record (``by_work``: rows [work, wall s, F] at
    each evaluation) and every point's F within the budget."""
    from hessmpi import config
    from hessmpi.trainer import Training

    comm, backend = launch.context()
    shards = drive.shards(spec["data"], comm)
    _, optim, knob, grid, factor, every = METHODS[spec["method"]]

    def run(point, _points):
        cfg = config.from_dict({
            "data": {"path": spec["data"]}, "model": MODELS["autoencoder"][0],
            "optim": {**optim, knob: point["lr"]},
            "train": {"batch_size": spec["batch"] // comm.size, "seed": SEED,
                      "steps": spec["work"]},
            "backend": {"threads": backend.threads}})
        r = drive.drive(Training(cfg, comm, backend, shards=shards), budget=spec["work"],
                        unit="work", base=every, per=10 ** 6, check_every=50)
        by_work = [[r["works"][step - 1] if step else 0.0,
                    r["walls"][step - 1] if step else 0.0, f] for step, _, _, _, f in r["curve"]]
        if comm.rank == 0:
            print(f"  {spec['method']} {knob}={point['lr']:g}: {r['status']} after "
                  f"{r['steps']} steps, {by_work[-1][0]:.0f} work, F {by_work[-1][2]:.6g}, "
                  f"{r['wall']:.1f} s", flush=True)
        return [dict(status=r["status"], steps=r["steps"], curve=r["curve"], by_work=by_work,
                     wall=r["wall"])]

    def within_budget(records) -> tuple[float, float]:
        """F at the last evaluation within the budget (a step may overshoot it)."""
        f = f_at(records[0]["by_work"], spec["work"])
        return (f if records[0]["status"] != "diverged" and math.isfinite(f) else math.inf,
                0.0)

    res = tune.tune(run, [{"lr": v} for v in grid], {"F": within_budget},
                    max_points=MAX_POINTS, factor=factor)
    k = res["chosen"].get("F")
    return dict(method=spec["method"], knob=knob, ranks=comm.size, notes=res["notes"],
                value=res["points"][k]["point"]["lr"] if k else None,
                placement=(res["placement"].get("F") or {}).get("lr"),
                record=res["points"][k]["records"][0] if k else None,
                finals={p["point"]["lr"]: within_budget(p["records"])[0]
                        for p in res["points"].values()})


def f_at(curve: list, work: float) -> float:
    """F at the last evaluation within ``work`` (NaN past the run's end)."""
    within = [f for w, _, f in curve if w <= work + 1e-9]
    return within[-1] if curve[-1][0] >= work - 1e-9 else math.nan


def to_target(curve: list, target: float) -> tuple[float, float] | None:
    """(work, wall s) of the first evaluation with F <= ``target``."""
    return next(((w, t) for w, t, f in curve if f <= target), None)


def report(results: dict) -> None:
    done = {m: r for m, r in results["methods"].items() if r["record"]}
    sgd = done.get("sgd")
    target = f_at(sgd["record"]["by_work"], results["work"]) if sgd else math.nan
    print(f"\n## The deep autoencoder at global batch {results['batch']:,} "
          f"({results['ranks']} rank(s), mnist-t10k, seed {SEED}), {results['work']} "
          "gradient-equivalents per method\n")
    print(f"F = the reconstruction error on all 8,000 training rows; target = SGD+momentum's "
          f"F at {results['work']} work ({target:.5g}); [the tuned knob, where it sits on "
          "its grid].\n")
    rows = []
    for m, r in results["methods"].items():
        label = METHODS[m][0]
        if not r["record"]:
            rows.append([label, f"every point diverged ({r['finals']})"] + ["-"] * (
                len(MARKS) + 3))
            continue
        curve = r["record"]["by_work"]
        hit = to_target(curve, target)
        rows.append([label, f"{r['knob']} {r['value']:g} ({r['placement']})",
                     *(f"{f_at(curve, w):.5g}" for w in MARKS),
                     f"{hit[0]:.0f} / {hit[1]:.1f} s" if hit else "not reached",
                     f"{r['record']['steps']:,}", f"{r['record']['wall']:.1f}"])
    print(tables.table(["method", "chosen", *(f"F at {w}" for w in MARKS),
                        "work / wall to target", "steps", "wall s"], rows))
    for m, r in results["methods"].items():
        for note in r["notes"]:
            print(f"NOTE ({m}): {note}")
        print(f"{m}: F within the budget at every point: " + ", ".join(
            f"{r['knob']} {v:g}: {f:.5g}" for v, f in sorted(
                (float(v), f) for v, f in r["finals"].items())))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for m, r in results["methods"].items():
        if r["record"]:
            curve = r["record"]["by_work"]
            ax.plot([w for w, _, _ in curve], [f for _, _, f in curve], ".-",
                    label=f"{METHODS[m][0]} ({r['knob']} {r['value']:g})")
    ax.set(yscale="log", xlabel="gradient-equivalent evaluations per rank",
           ylabel="reconstruction error F (8,000 rows)",
           title=f"deep autoencoder, global batch {results['batch']:,}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1024, help="global batch (default 1,024)")
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--work", type=int, default=WORK,
                    help=f"gradient-equivalents per method (default {WORK})")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results" / "autoencoder_work.json")
    ap.add_argument("--report", type=Path, metavar="JSON", help="print and plot a results file")
    args = ap.parse_args()
    if args.report:
        results = json.loads(args.report.read_text())
    else:
        unknown = set(args.methods.split(",")) - set(METHODS)
        if unknown or args.batch < args.ranks or args.work < 1:
            sys.exit(f"autoencoder_work: bad arguments: unknown methods {sorted(unknown)}"
                     if unknown else "autoencoder_work: need --batch >= --ranks, --work >= 1")
        data = str(datasets.dataset("mnist-t10k", ROOT))
        results = dict(command=shlex.join(sys.argv), batch=args.batch, ranks=args.ranks,
                       work=args.work, methods={})
        if args.out.is_file():      # keep the other methods of a file of the same setting
            old = json.loads(args.out.read_text())
            if all(old.get(k) == results[k] for k in ("batch", "ranks", "work")):
                results["methods"] = old["methods"]
        started = time.time()
        for m in args.methods.split(","):
            print(f"autoencoder_work: tuning {m} ...", flush=True)
            results["methods"][m] = launch.launch(__file__, dict(
                method=m, data=data, batch=args.batch, work=args.work), args.ranks)
            tables.save("autoencoder_work", results, ROOT, args.out)
        results["seconds"] = time.time() - started
        tables.save("autoencoder_work", results, ROOT, args.out)
    report(results)
    plot(results, (args.report or args.out).with_suffix(".png"))


if __name__ == "__main__":
    launch.script(worker, main)
