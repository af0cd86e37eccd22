"""Asynchronous SGD with and without delay compensation against synchronous SGD+momentum
(issue 20): ASGD, DC-ASGD (adaptive lambda) and synchronous data-parallel SGD+momentum on 3
and 5 ranks, the training objective and test accuracy against gradient evaluations and
against wall time, and the staleness of the asynchronous updates.

    .venv/bin/python benchmarks/asynchronous.py               (quick: one seed, 3.5 minutes here)
    .venv/bin/python benchmarks/asynchronous.py --seeds 3     (3 seeds, 6 minutes here)
    .venv/bin/python benchmarks/asynchronous.py --full        (3 seeds, twice the budget)
    .venv/bin/python benchmarks/asynchronous.py --delay 0.004 (the emulated workers' spread)
    .venv/bin/python benchmarks/asynchronous.py --report bench-results/asynchronous.json

The MLP 64-64-10 (ReLU) on the scikit-learn digits, batch 32 per gradient, float32, one BLAS
thread per rank, CPU. A budget of G gradient evaluations over all ranks: synchronous SGD
takes G/P steps of P gradients (global batch 32 P); ASGD and DC-ASGD take G updates, each one
worker's gradient (P - 1 workers, rank 0 serves). The reference "sequential" is ASGD on 2
ranks: one worker, no staleness, i.e. sequential SGD at batch 32. Each method's learning rate
is tuned per rank count on seed 0 without delay (factor-2 grid widened until its best final F
is interior). F (every training row) and the test accuracy are evaluated afterwards on
snapshots of the parameters taken every G/20 gradients (not counted in the wall times).

Then every method runs again at its tuned rate with EMULATED heterogeneous workers: worker k
of W (asynchronous) or rank r of P (synchronous) sleeps delay x k/(W-1) (resp. r/(P-1))
seconds after each gradient, so the fastest computes at full speed and the slowest
``delay`` later. On this 2-core machine 5 ranks share 2 cores, which hides most asynchrony
(the OS serialises the workers): the emulated figures are marked as such. Results:
bench-results/asynchronous[-full].json and asynchronous[-full].png.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hessmpi.bench import datasets, launch, tables, tune

ROOT = Path(__file__).resolve().parent.parent
MODEL = {"name": "mlp", "hidden": [64], "activation": "relu", "l2": 1e-4}
BATCH, MOMENTUM, SNAPSHOTS = 32, 0.9, 20
METHODS = ("sgd", "asgd", "dcasgd")
LABELS = {"sgd": "SGD+momentum (sync)", "asgd": "ASGD", "dcasgd": "DC-ASGD-a",
          "sequential": "sequential SGD (ASGD, 1 worker)"}
#: the first learning-rate grid of each method (widened by the tuner)
GRIDS = {"sgd": [0.05, 0.1, 0.2], "asgd": [0.1, 0.2, 0.4], "dcasgd": [0.1, 0.2, 0.4],
         "sequential": [0.1, 0.2, 0.4]}
MODES = {"quick": dict(seeds=[0], budget=4000, ranks=[3, 5]),
         "full": dict(seeds=[0, 1, 2], budget=8000, ranks=[3, 5])}
DELAY = 0.004


# ----- worker ------------------------------------------------------------------------------
def delays(spec: dict, size: int) -> list[float]:
    """The emulated per-rank delays (index = rank): a ramp from 0 to spec['delay'] over the
    ranks that compute (all ranks for sgd, the workers 1..P-1 otherwise)."""
    d = spec["delay"]
    if spec["method"] == "sgd":
        return [d * r / max(size - 1, 1) for r in range(size)]
    workers = size - 1
    return [0.0] + [d * (k - 1) / max(workers - 1, 1) for k in range(1, size)]


def config_of(spec: dict, size: int, threads: int) -> dict:
    from hessmpi import config

    method = "asgd" if spec["method"] == "sequential" else spec["method"]
    budget = spec["budget"]
    optim = {"name": method, "lr": spec["lr"]}
    if method == "sgd":
        optim["momentum"] = MOMENTUM
        steps = budget // size
    else:
        steps = budget
        if spec["delay"]:
            optim["async_delay"] = delays(spec, size)[1:]
    return config.from_dict({
        "data": {"path": spec["data"]}, "model": MODEL, "optim": optim,
        "train": {"batch_size": BATCH, "seed": spec["seed"], "steps": steps,
                  "log_every": steps, "eval_every": 0, "max_loss_ratio": 0.0,
                  "chance_window": 0},
        "backend": {"device": "cpu", "threads": threads}})


def worker(spec: dict) -> dict:
    """One run on every rank; rank 0 returns its drive-style record."""
    from hessmpi.errors import RunFailed

    np.seterr(all="ignore")          # the learning rates that diverge say so in the tables
    comm, backend = launch.context(threads=1)
    cfg = config_of(spec, comm.size, backend.threads)
    steps = cfg["train"]["steps"]
    per_step = comm.size if spec["method"] == "sgd" else 1      # gradients per step
    every = max(1, steps // SNAPSHOTS)
    snapshots = []                                              # (step, wall, theta)
    status, staleness = "budget", None
    if spec["method"] == "sgd":
        from hessmpi.trainer import Training

        training = Training(cfg, comm, backend)
        theta, model = training.theta, training.model
        snapshots.append((0, 0.0, theta.copy()))
        sleep = delays(spec, comm.size)[comm.rank]
        wall = 0.0
        for step in range(steps):
            started = time.perf_counter()
            if sleep:
                time.sleep(sleep)
            try:
                training.step(step)
            except RunFailed:
                status = "diverged"
                break
            wall += time.perf_counter() - started
            if (step + 1) % every == 0 or step + 1 == steps:
                snapshots.append((step + 1, wall, theta.copy()))
    else:
        from hessmpi.asynchronous import AsyncRun

        out = Path(comm.bcast(tempfile.mkdtemp(prefix="hessmpi-async-") if comm.rank == 0
                              else None)) / "run"
        run = AsyncRun(cfg, comm, backend, out)
        model = run.model
        if comm.rank == 0:
            snapshots.append((0, 0.0, run.theta.copy()))

            def snap(done, wall):
                if done % every == 0 or done == steps:
                    snapshots.append((done, wall, run.theta.copy()))

            run.on_update = snap
        try:
            run.run()
        except RunFailed:
            status = "diverged"
        if comm.rank == 0:
            staleness = run.staleness.tolist()
            shutil.rmtree(out.parent, ignore_errors=True)
    comm.barrier()
    if comm.rank != 0:
        return {}
    return evaluate(spec, model, snapshots, per_step, status, staleness)


def evaluate(spec, model, snapshots, per_step, status, staleness) -> dict:
    """The record of a run from its snapshots: F over every training row and the test
    accuracy at each, as drive's curves ([step, grad_evals, 0, wall, F] and [..., acc])."""
    from hessmpi.data import read_shard

    train = read_shard(spec["data"], "train", 0, 1, equal=False)
    test = read_shard(spec["data"], "test", 0, 1, equal=False)
    x, xt = train.x.astype(model.dtype), test.x.astype(model.dtype)
    curve, test_curve = [], []
    for step, wall, theta in snapshots:
        f = float(model.loss(theta, x, train.y))
        _, correct = model.evaluate(theta, xt, test.y)
        row = [step, step * per_step, 0, wall]
        curve.append([*row, f if math.isfinite(f) else math.inf])
        test_curve.append([*row, correct / len(test.y)])
    if not curve[-1][4] <= 3 * curve[0][4]:
        status = "diverged"
    return dict(status=status, curve=curve, test_curve=test_curve, staleness=staleness,
                wall=curve[-1][3], steps=curve[-1][0])


# ----- the parent ----------------------------------------------------------------------------
def launch_run(data: str, method: str, lr: float, seed: int, budget: int, ranks: int,
               delay: float = 0.0) -> dict:
    spec = dict(data=data, method=method, lr=lr, seed=seed, budget=budget, delay=delay)
    return launch.launch(__file__, spec, 2 if method == "sequential" else ranks,
                         timeout=900)


def run_all(mode: dict, delay: float, out: Path) -> dict:
    data = str(datasets.dataset("digits", ROOT))
    results = dict(mode=mode, delay=delay, model=MODEL, batch=BATCH, tuned={}, runs=[])
    cells = [("sequential", 2)] + [(m, p) for p in mode["ranks"] for m in METHODS]
    for method, ranks in cells:
        name = f"{method}/{ranks}"
        print(f"asynchronous: tuning {LABELS[method]} on {ranks} ranks ...", flush=True)

        def one(point, _points, method=method, ranks=ranks):
            return [launch_run(data, method, point["lr"], 0, mode["budget"], ranks)]

        res = tune.tune(one, [{"lr": lr} for lr in GRIDS[method]], {"F": tune.final},
                        max_points=6)
        k = res["chosen"]["F"]
        lr = res["points"][k]["point"]["lr"]
        finals = {p["point"]["lr"]: p["records"][0]["curve"][-1][4]
                  for p in res["points"].values()}
        results["tuned"][name] = dict(lr=lr, placement=res["placement"]["F"]["lr"],
                                      finals=finals)
        print("  lr " + ", ".join(f"{a:g}: F {f:.4g}" for a, f in sorted(finals.items()))
              + f" -> {lr:g} ({res['placement']['F']['lr']})", flush=True)
        for seed in mode["seeds"]:
            for d in ([0.0, delay] if method != "sequential" else [0.0]):
                if seed == 0 and not d:
                    record = res["points"][k]["records"][0]
                else:
                    record = launch_run(data, method, lr, seed, mode["budget"], ranks, d)
                results["runs"].append(dict(method=method, ranks=ranks, lr=lr, seed=seed,
                                            delay=d, **record))
                print(f"  seed {seed}{f', emulated delay {d:g} s' if d else ''}: F "
                      f"{record['curve'][-1][4]:.4g}, test acc "
                      f"{record['test_curve'][-1][4]:.4f}, {record['wall']:.2f} s", flush=True)
        tables.save(out.stem, results, ROOT, out)
    return results


def quantiles(hist: list[int] | None) -> str:
    """mean / median / p90 / max of a staleness histogram."""
    if not hist:
        return "-"
    h = np.asarray(hist, dtype=float)
    values = np.arange(len(h))
    c = np.cumsum(h) / h.sum()
    q = [int(values[np.searchsorted(c, p)]) for p in (0.5, 0.9)]
    return (f"{(h * values).sum() / h.sum():.2f} / {q[0]} / {q[1]} / "
            f"{int(values[h > 0].max())}")


def at_fraction(record, fraction: float, column: int = 4, test: bool = False) -> float:
    """F (or the test accuracy) at the snapshot nearest ``fraction`` of the budget."""
    curve = record["test_curve" if test else "curve"]
    target = fraction * curve[-1][1]
    return min(curve, key=lambda r: abs(r[1] - target))[column]


def first_reached(record, threshold: float) -> tuple[float, float]:
    """(gradient evaluations, wall s) at the first snapshot with F <= threshold."""
    hit = next((r for r in record["curve"] if r[4] <= threshold), None)
    return (hit[1], hit[3]) if hit else (math.inf, math.inf)


def report(results: dict, plot: Path | None = None) -> None:
    runs = results["runs"]
    budget = results["mode"]["budget"]
    seq = [r for r in runs if r["method"] == "sequential"]
    print(f"\nDigits MLP 64-64-10, batch {results['batch']} per gradient, a budget of {budget:,} "
          "gradient evaluations over all ranks; medians over seeds [min-max]. 'to target': "
          "gradient evaluations and seconds to the first snapshot whose F is at most the "
          "largest final F of the row's group (every method reaches it). Staleness: mean / "
          "median / p90 / max of the updates applied between a worker's fetch and its push.")
    for ranks in results["mode"]["ranks"]:
        for delay in sorted({r["delay"] for r in runs}):
            group = [r for r in runs if r["ranks"] == ranks and r["delay"] == delay]
            if not group:
                continue
            if not delay:
                group = seq + group
            target = max(np.median([r["curve"][-1][4] for r in group if r["method"] == m])
                         for m in {r["method"] for r in group})
            title = (f"{ranks} ranks" + (f", EMULATED heterogeneous workers (delay ramp 0 to "
                                         f"{delay:g} s per gradient)" if delay else "")
                     + f"; target F = {target:.4g}")
            rows = []
            for method in ["sequential", *METHODS]:
                rs = [r for r in group if r["method"] == method]
                if not rs:
                    continue
                tuned = results["tuned"][f"{method}/{rs[0]['ranks']}"]
                hits = [first_reached(r, target) for r in rs]
                rows.append([
                    LABELS[method] + (" (2 ranks)" if method == "sequential" else ""),
                    f"{tuned['lr']:g} ({tuned['placement']})",
                    tables.spread([at_fraction(r, 0.25) for r in rs], "{:.4f}".format),
                    tables.spread([at_fraction(r, 1.0) for r in rs], "{:.4f}".format),
                    tables.spread([at_fraction(r, 1.0, test=True) for r in rs],
                                  "{:.4f}".format),
                    tables.spread([h[0] for h in hits]),
                    tables.spread([h[1] for h in hits], "{:.2f}".format),
                    tables.spread([r["wall"] for r in rs], "{:.2f}".format),
                    quantiles(_merged([r["staleness"] for r in rs])),
                    sum(r["status"] == "diverged" for r in rs)])
            print(f"\n{title}:\n")
            print(tables.table(["method", "lr (grid)", "F at G/4", "F at G", "test acc at G",
                                "evals to target", "s to target", "wall s",
                                "staleness mean/p50/p90/max", "diverged"], rows))
            if not delay and seq:
                gap = _gap(runs, ranks, seq)
                if gap is not None:
                    print(f"\nDC-ASGD's share of the ASGD-to-sequential gap in final F on "
                          f"{ranks} ranks: {gap}")
    if plot is not None:
        _plot(results, plot)
        print(f"\nfigure: {plot}")


def _merged(hists: list) -> list[int] | None:
    hists = [h for h in hists if h]
    if not hists:
        return None
    out = np.zeros(max(map(len, hists)), dtype=int)
    for h in hists:
        out[:len(h)] += h
    return out.tolist()


def _gap(runs, ranks, seq) -> str | None:
    """(F_asgd - F_dcasgd) / (F_asgd - F_sequential) of the seed medians, in words."""
    def final(method, rs):
        v = [r["curve"][-1][4] for r in rs if r["method"] == method]
        return float(np.median(v)) if v else math.nan

    group = [r for r in runs if r["ranks"] == ranks and not r["delay"]]
    fa, fd, fs = final("asgd", group), final("dcasgd", group), final("sequential", seq)
    if not all(map(math.isfinite, (fa, fd, fs))):
        return None
    if fa <= fs:
        return (f"none to close: ASGD's final F {fa:.4g} is not above sequential SGD's "
                f"{fs:.4g} (DC-ASGD {fd:.4g})")
    return (f"{(fa - fd) / (fa - fs):.2f} (F: ASGD {fa:.4g}, DC-ASGD {fd:.4g}, sequential "
            f"{fs:.4g})")


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if r["seed"] == 0]
    delays_ = sorted({r["delay"] for r in runs})
    ranks_ = results["mode"]["ranks"]
    fig, axes = plt.subplots(len(ranks_) * len(delays_), 4, figsize=(19, 3.6 * len(ranks_)
                                                                       * len(delays_)),
                             squeeze=False)
    colors = {"sequential": "0.5", "sgd": "C0", "asgd": "C3", "dcasgd": "C2"}
    row = 0
    for ranks in ranks_:
        for delay in delays_:
            ax_e, ax_w, ax_a, ax_s = axes[row]
            for r in runs:
                if r["delay"] != delay or (r["ranks"] != ranks and r["method"] != "sequential"):
                    continue
                if r["method"] == "sequential" and delay:
                    continue
                c = np.asarray(r["curve"], dtype=float)
                t = np.asarray(r["test_curve"], dtype=float)
                kw = dict(color=colors[r["method"]], lw=1.4, label=LABELS[r["method"]])
                ax_e.semilogy(c[:, 1], c[:, 4], **kw)
                ax_w.semilogy(c[:, 3], c[:, 4], **kw)
                ax_a.plot(t[:, 1], t[:, 4], **kw)
                if r["staleness"] and r["method"] != "sequential":
                    h = np.asarray(r["staleness"], dtype=float)
                    shift = 0.2 if r["method"] == "dcasgd" else -0.2
                    ax_s.bar(np.arange(len(h)) + shift, h / h.sum(), width=0.4,
                             color=colors[r["method"]], label=LABELS[r["method"]])
            what = f"{ranks} ranks" + (", EMULATED delays" if delay else "")
            ax_e.set(title=f"F vs gradient evaluations ({what})", xlabel="gradient evaluations "
                     "over all ranks", ylabel="training objective F")
            ax_w.set(title=f"F vs wall time ({what})", xlabel="seconds")
            ax_a.set(title=f"test accuracy ({what})", xlabel="gradient evaluations",
                     ylim=(0.8, 1.0))
            ax_s.set(title=f"staleness ({what})", xlabel="updates between fetch and push",
                     ylabel="share of the updates", yscale="log")
            ax_e.legend(fontsize=8)
            for ax in (ax_e, ax_w, ax_a, ax_s):
                ax.grid(True, alpha=0.3)
            row += 1
    fig.suptitle(f"digits MLP, batch {results['batch']} per gradient; EMULATED: worker k of W "
                 f"sleeps {max(delays_):g} s x (k-1)/(W-1) per gradient (synchronous: rank r of "
                 "P, r/(P-1))", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="3 seeds, twice the budget")
    ap.add_argument("--delay", type=float, default=DELAY,
                    help=f"the slowest emulated worker's extra seconds per gradient "
                         f"(default {DELAY}; 0: no emulated runs)")
    ap.add_argument("--seeds", type=int, help="seeds per configuration (quick: 1, full: 3)")
    ap.add_argument("--report", type=Path, metavar="JSON", help="print the tables of a result")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        launch.serve(worker, args.worker)
        return
    if args.report:
        report(json.loads(args.report.read_text()), args.report.with_suffix(".png"))
        return
    name = "asynchronous-full" if args.full else "asynchronous"
    mode = dict(MODES["full" if args.full else "quick"])
    if args.seeds:
        mode["seeds"] = list(range(args.seeds))
        name += f"-{args.seeds}seeds"
    out = ROOT / "bench-results" / f"{name}.json"
    results = run_all(mode, args.delay, out)
    report(results, out.with_suffix(".png"))
    print(f"\nresults: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main(sys.argv[1:])
