"""Convergence benchmark: SGD with momentum against the secant method, to targets.

    .venv/bin/python benchmarks/convergence.py            (--quick: what `make bench` runs)
    .venv/bin/python benchmarks/convergence.py --full     (the whole table; over an hour here)
    .venv/bin/python benchmarks/convergence.py --full --append --max-minutes 20   (continue)
    .venv/bin/python benchmarks/convergence.py --report bench-results/convergence.json

Problems: softmax regression and the MLP on the scikit-learn digits and on mnist-t10k, at
P = 2 and 4 ranks, batch 64 per rank, several seeds. The parent builds the datasets
(hessmpi.bench.datasets) and the softmax optimum F*, then launches itself under mpiexec once
per (problem, P); the launch runs every configuration and seed in-process, each a fresh
hessmpi Training driven by hessmpi.bench.drive to a budget of gradient evaluations per rank
(probes included) or to its targets, F over every training row evaluated on the side.
SGD's learning rate comes from a factor-2 grid widened until its best is interior
(hessmpi.bench.tune), chosen on the training objective; so is every secant choice. Results:
bench-results/convergence.json (--quick: convergence-quick.json); markdown tables.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from hessmpi.bench import datasets, drive, launch, tables, tune

ROOT = Path(__file__).resolve().parent.parent
BATCH, L2, MOMENTUM = 64, 1e-4, 0.9
RACE = 1.5                           # a run stops at this multiple of its grid's best so far
CHECK_EVERY = 500                    # steps between checks that the ranks agree bitwise

# The prototype's table (ALGORITHM.md section 6): (problem, P, target) -> (SGD, secant).
PROTOTYPE = {
    ("softmax-digits", 2, "rel 0.01"): (990, 1850), ("softmax-digits", 4, "rel 0.01"): (740, 1630),
    ("softmax-digits", 4, "rel 0.001"): (1750, 18726),
    ("softmax-mnist", 4, "rel 0.01"): (10925, None), ("mlp-digits", 2, "test acc"): (82, 156),
    ("mlp-mnist", 2, "test acc"): (150, 230), ("mlp-mnist", 4, "test acc"): (90, 140),
    ("mlp-mnist", 4, "train loss"): (750, 1230),
}
# sgd_budget: gradient evaluations per rank of an SGD run (for the MLPs, where the train-loss
# target is taken); secant runs stop at secant_ratio_cap x SGD's median to the tightest target
# SGD reached (at most secant_budget); eval_base: steps between the first evaluations; grid:
# SGD's first grid, most promising first; variants: the secant variants run (None: all).
PROBLEMS = {
    "softmax-digits": dict(dataset="digits", hidden=[], eval_base=5, rel_targets=[1e-2, 1e-3],
                           grid=[0.2, 0.1, 0.4, 0.8], sgd_budget=30000, secant_budget=60000,
                           secant_ratio_cap=3.0, variants=None),
    "softmax-mnist": dict(dataset="mnist-t10k", hidden=[], eval_base=10, rel_targets=[1e-2],
                          grid=[0.1, 0.05, 0.2], sgd_budget=40000, secant_budget=60000,
                          secant_ratio_cap=3.0, variants=["newton_lr=0.5", "memory=2"]),
    "mlp-digits": dict(dataset="digits", hidden=[64], eval_base=2, acc_target=0.92,
                       grid=[0.05, 0.1, 0.2, 0.025], sgd_budget=600, secant_budget=2400,
                       secant_ratio_cap=4.0, variants=None),
    "mlp-mnist": dict(dataset="mnist-t10k", hidden=[256, 256], eval_base=5, acc_target=0.95,
                      grid=[0.1, 0.05, 0.2], sgd_budget=750, secant_budget=3000,
                      secant_ratio_cap=4.0, variants=["newton_lr=0.5", "memory=2"]),
}
FULL_ORDER = [("softmax-digits", 4), ("softmax-mnist", 4), ("mlp-mnist", 4), ("mlp-digits", 2),
              ("mlp-digits", 4), ("softmax-digits", 2), ("mlp-mnist", 2), ("softmax-mnist", 2)]
QUICK_ORDER = [("softmax-digits", 2), ("mlp-digits", 2)]
# The first is tuned on its own learning-rate grid; the others run at its best rate.
SECANT_CONFIGS = [("defaults", {}), ("newton_lr=0.5", {"newton_lr": 0.5}),
                  ("newton_lr=0.1", {"newton_lr": 0.1}), ("damping=1", {"damping": 1.0}),
                  ("damping=0", {"damping": 0.0}), ("memory=2", {"memory": 2})]


def is_softmax(prob: dict) -> bool:
    return not prob["hidden"]


def targets(launch_: dict) -> dict[str, tuple[float, bool]]:
    """{target name: (threshold, on the test split)} of a launch, loosest first."""
    prob = launch_["problem"]
    if is_softmax(prob):
        return {f"rel {r:g}": (launch_["fstar"] * (1 + r), False) for r in prob["rel_targets"]}
    out = {"test acc": (prob["acc_target"], True)}
    if launch_.get("train_target") is not None:
        out["train loss"] = (launch_["train_target"], False)
    return out


def hit_evals(record: dict, target: tuple[float, bool]) -> float:
    h = drive.first_hit(record, *target)
    return h["grad_evals"] if h else math.inf


# ----- worker: one MPI launch of one (problem, P) ------------------------------------------

def worker(spec: dict) -> dict:
    from hessmpi import config
    from hessmpi.trainer import Training

    started = time.perf_counter()
    comm, backend = launch.context()
    prob, seeds = spec["problem"], spec["seeds"]
    softmax = is_softmax(prob)
    shards = drive.shards(spec["data"], comm)
    model = ({"name": "softmax", "l2": L2} if softmax else
             {"name": "mlp", "hidden": prob["hidden"], "activation": "relu", "l2": L2})
    runs, notes = [], []

    def log(text):
        if comm.rank == 0:
            print(text, flush=True)

    def run_lr(label: str, optim: dict, lr: float, cap: float, chase: list[str]) -> list:
        goals = targets(spec)
        out = []
        for seed in seeds:
            cfg = config.from_dict({"data": {"path": spec["data"]}, "model": model,
                                    "optim": {"momentum": MOMENTUM, **optim, "lr": lr},
                                    "train": {"batch_size": BATCH, "seed": seed,
                                              "steps": max(1, int(cap))},
                                    "backend": {"device": "cpu", "threads": backend.threads}})
            r = drive.drive(Training(cfg, comm, backend, shards=shards), budget=cap,
                            unit="grad_evals", base=prob["eval_base"], with_test=not softmax,
                            check_every=CHECK_EVERY,
                            train_targets={n: goals[n][0] for n in chase if not goals[n][1]},
                            test_targets={n: goals[n][0] for n in chase if goals[n][1]})
            r.update(label=label, lr=lr, seed=seed, cap=cap, pursued=chase)
            last = r["curve"][-1]
            log(f"  {label} lr {lr:.4g} seed {seed}: {r['status']} after {r['grad_evals']:.0f} "
                f"evals (cap {cap:.0f}), F {last[4]:.6g}" + (
                    "" if softmax else f", test acc {r['test_curve'][-1][4]:.4f}")
                + f", fallback {r['fallback_rate']:.1%}, {r['wall']:.1f} s")
            out.append(r)
        runs.extend(out)
        return out

    def grid(label, optim, first, limit, chase, selections, race):
        """The tuner on the learning rate, racing on ``race``'s best median so far."""
        def run(point, points):
            cap = limit
            if race is not None and points:
                best = min(selections[race](p["records"])[0] for p in points.values())
                cap = min(cap, math.ceil(RACE * best)) if math.isfinite(best) else cap
            return run_lr(label, optim, point["lr"], cap, chase)

        res = tune.tune(run, [{"lr": lr} for lr in first], selections,
                        max_points=spec["max_grid"], log=lambda t: log(f"  {label}: {t}"))
        notes.extend(f"{label}: {n}" for n in res["notes"])
        return res

    def lr_of(res, name):
        k = res["chosen"].get(name)
        return None if k is None else res["points"][k]["point"]["lr"]

    # --- SGD with momentum
    goals = targets(spec)
    if softmax:
        names = list(goals)
        tight = names[-1]
        sel = {n: tune.to_target(goals[n][0], "grad_evals") for n in names}
        sgd = grid("sgd", {"name": "sgd"}, spec["grid"], spec["sgd_budget"], names, sel, tight)
        best = {n: lr_of(sgd, n) for n in names}
        race = ([n for n in names if best[n] is not None] or [tight])[-1]
        loose, tight_lr = best[names[0]] or spec["grid"][0], best[race] or best[names[0]]
        tight_lr = tight_lr or loose
        # the clip makes the secant step about 2 eta |g|: start near half SGD's best rates
        secant_grid = list(dict.fromkeys([tight_lr / 2, tight_lr, loose / 2]))
        main, chase_main = names[0], [names[0]]
        sgd_race = sel[race](sgd["points"][sgd["chosen"][race]]["records"])[0] \
            if race in sgd["chosen"] else math.inf
    else:
        sgd = grid("sgd", {"name": "sgd"}, spec["grid"], spec["sgd_budget"], [],
                   {"F at budget": tune.final}, None)
        best = {"F at budget": lr_of(sgd, "F at budget")}
        key = sgd["chosen"]["F at budget"]
        spec["train_target"] = tune.upper_median(drive.final_value(r)
                                                 for r in sgd["points"][key]["records"])
        goals = targets(spec)
        race = main = "train loss"
        chase_main = list(goals)
        sel = {race: tune.to_target(goals[race][0], "grad_evals")}
        lr = best["F at budget"]
        secant_grid = [lr / 2, lr, 2 * lr]
        sgd_race = sel[race](sgd["points"][key]["records"])[0]
    limit = spec["secant_budget"]
    if math.isfinite(sgd_race):
        limit = min(limit, math.ceil(spec["secant_ratio_cap"] * sgd_race))

    # --- secant: the defaults on their own grid, then the variants at its best rate
    configs = spec["secant_configs"]
    sec_sel = sel if softmax else {race: sel[race]}
    base = grid(configs[0][0], {"name": "secant", **configs[0][1]}, secant_grid, limit,
                list(goals), sec_sel, race)
    variant_lr = lr_of(base, main)
    if variant_lr is None:
        variant_lr = base["points"][tune.best(base["points"], tune.final)]["point"]["lr"]
        notes.append(f"no secant default reached '{main}': the variants run at the rate "
                     "whose runs came closest (the lowest median final F)")
    select_main = tune.to_target(goals[main][0], "grad_evals")
    for label, overrides in configs[1:]:
        done: dict[tuple, list] = {}
        for r in runs:
            if r["label"] != "sgd":
                done.setdefault((r["label"], r["lr"]), []).append(r)
        best_main = min(select_main(rs)[0] for rs in done.values())
        cap = limit if math.isinf(best_main) else min(limit, math.ceil(RACE * best_main))
        run_lr(label, {"name": "secant", **overrides}, variant_lr, cap, chase_main)
    return dict(problem_name=spec["name"], problem=prob, ranks=comm.size, seeds=seeds,
                threads_per_rank=backend.threads, fstar=spec.get("fstar"),
                train_target=spec.get("train_target"), race_target=race, sgd_best_lr=best,
                sgd_placement=sgd["placement"], secant_limit=limit, notes=notes,
                sgd_budget=spec["sgd_budget"], secant_budget=spec["secant_budget"],
                secant_ratio_cap=spec["secant_ratio_cap"], mpi_library=comm.library_version(),
                train_rows=int(comm.sum(len(shards[0].y))),
                env={k: v for k, v in os.environ.items() if k.startswith("MPIR_CVAR")},
                seconds=time.perf_counter() - started, runs=runs)


# ----- tables --------------------------------------------------------------------------------

def groups(launch_: dict) -> dict[tuple[str, float], list[dict]]:
    """{(label, lr): records over seeds}, in the order they ran."""
    out: dict[tuple[str, float], list[dict]] = {}
    for r in launch_["runs"]:
        out.setdefault((r["label"], r["lr"]), []).append(r)
    return out


def score(records: list[dict], target) -> tuple[float, float]:
    v = [hit_evals(r, target) for r in records]
    return float(np.median(v)), float(np.mean(v))


def final_f(records) -> float:
    return tune.final(records)[0]


def evals_cell(records: list[dict], target, name: str | None = None) -> str:
    """median [min-max] (reached/seeds); an unreached seed shows as >its evaluations."""
    h = [hit_evals(r, target) for r in records]
    if name is not None and all(name not in r["pursued"] for r in records) \
            and not any(map(math.isfinite, h)):
        return "- (not pursued)"
    ok = sum(map(math.isfinite, h))
    unreached = [r for r, e in zip(records, h, strict=True) if not math.isfinite(e)]
    div = sum(r["status"] == "diverged" for r in unreached)
    low = min((r["grad_evals"] for r in unreached if r["status"] != "diverged"), default=None)
    tail = f" ({ok}/{len(h)}" + (f", {div} diverged" if div else "") + ")"
    if not math.isfinite(float(np.median(h))):
        return (f"not reached: >{low:,.0f}" if low is not None else "diverged") + tail
    finite = [e for e in h if math.isfinite(e)]
    hi = f"{max(finite):,.0f}" if ok == len(h) else (f">{low:,.0f}" if low else "div")
    return f"{float(np.median(h)):,.0f} [{min(finite):,.0f}-{hi}]" + tail


def med(values) -> float:
    v = [x for x in values if math.isfinite(x)]
    return float(np.median(v)) if v else math.nan


def choose(launch_: dict) -> dict:
    """Per target: (SGD's (label, lr), the secant's (label, lr)). Softmax: each family's best
    for that target; MLP: SGD's rate by F after its budget, the secant configuration by the
    train-loss target, each used for both targets. All on the training objective."""
    goals, g = targets(launch_), groups(launch_)
    sgd = {k: v for k, v in g.items() if k[0] == "sgd"}
    sec = {k: v for k, v in g.items() if k[0] != "sgd"}
    softmax = is_softmax(launch_["problem"])
    out = {}
    for name in goals:
        lr = launch_["sgd_best_lr"].get(name if softmax else "F at budget")
        sgd_key = ("sgd", lr) if lr is not None else min(sgd, key=lambda k: final_f(sgd[k]))
        select = goals[name if softmax else "train loss"]
        sec_key = min(sec, key=lambda k: (*score(sec[k], select), final_f(sec[k]), k[1]))
        out[name] = (sgd_key, sec_key)
    return out


def target_label(launch_: dict, name: str) -> str:
    if name.startswith("rel "):
        return f"F <= F*(1+{name[4:]})"
    if name == "test acc":
        return f"test acc >= {launch_['problem']['acc_target']:.0%}"
    return f"F <= {launch_['train_target']:.4f} (SGD at {launch_['sgd_budget']})"


def summary_rows(launch_: dict) -> list[dict]:
    goals, g, rows = targets(launch_), groups(launch_), []
    for name, (sgd_key, sec_key) in choose(launch_).items():
        s, c = g[sgd_key], g[sec_key]
        s_med, c_med = score(s, goals[name])[0], score(c, goals[name])[0]
        if math.isfinite(s_med) and math.isfinite(c_med):
            ratio = f"{c_med / s_med:.2f}"
        elif math.isfinite(s_med):
            done = min(r["grad_evals"] for r in c if not math.isfinite(hit_evals(r, goals[name])))
            ratio = f"> {done / s_med:.1f}"
        else:
            ratio = "-"

        def wall(records, target=goals[name]):
            hits = [drive.first_hit(r, *target) for r in records]
            return float(np.median([h["wall"] if h else math.inf for h in hits]))

        rows.append(dict(problem=launch_["problem_name"], P=launch_["ranks"], target=name,
                         sgd=evals_cell(s, goals[name]), sgd_lr=sgd_key[1],
                         secant=evals_cell(c, goals[name]), secant_cfg=sec_key[0],
                         secant_lr=sec_key[1], ratio=ratio, sgd_med=s_med, secant_med=c_med,
                         sgd_wall=wall(s), secant_wall=wall(c),
                         fallback=med(r["fallback_rate"] for r in c)))
    return rows


def fs(x: float, f: str = ".1f") -> str:
    return f"{x:{f}}" if math.isfinite(x) else "-"


def print_tables(results: dict) -> None:
    order = list(PROBLEMS)
    launches = sorted(results["launches"], key=lambda x: (order.index(x["problem_name"]),
                                                          x["ranks"]))
    print(f"\n## hessmpi convergence benchmark ({results['mode']}), "
          f"{results['machine']['date']}, {results['machine']['cores']} cores\n")
    print(f"Batch {BATCH} per rank, float32, l2 {L2:g}, momentum {MOMENTUM}. Work = gradient "
          "evaluations per rank (a secant probe step costs 2) until the first evaluation of "
          "the full training objective F (float32, every training row) or of the test accuracy "
          "that meets the target; median [min-max] over seeds (reached/seeds). Wall = training "
          "seconds to that point (evaluations excluded).")
    for line in results.get("not_run", []):
        print(f"NOT RUN: {line}")
    print("\n### Summary\n")
    rows, ours = [], {}
    for launch_ in launches:
        for r in summary_rows(launch_):
            ours[r["problem"], r["P"], r["target"]] = r
            wr = r["secant_wall"] / r["sgd_wall"]
            rows.append([r["problem"], r["P"], target_label(launch_, r["target"]),
                         f"{r['sgd_lr']:.4g}", r["sgd"], f"{r['secant_cfg']} "
                         f"({r['secant_lr']:.4g})", r["secant"], r["ratio"], fs(r["sgd_wall"]),
                         fs(r["secant_wall"]), fs(wr, ".2f"), f"{r['fallback']:.1%}"])
    print(tables.table(["problem", "P", "target", "SGD lr", "SGD evals", "secant (lr)",
                        "secant evals", "ratio", "SGD wall s", "secant wall s", "wall ratio",
                        "secant fallback"], rows))
    print("\n### Against the prototype (ALGORITHM.md section 6), median gradient evaluations\n")
    rows = []
    for (prob, P, target), (p_sgd, p_sec) in PROTOTYPE.items():
        r = ours.get((prob, P, target))
        o = (["not run"] * 3 if r is None else
             [f"{x:,.0f}" if math.isfinite(x) else "not reached"
              for x in (r["sgd_med"], r["secant_med"])] + [r["ratio"]])
        rows.append([prob, P, target, f"{p_sgd:,}", o[0], f"{p_sec:,}" if p_sec else
                     "not reached", o[1], f"{p_sec / p_sgd:.2f}" if p_sec else "-", o[2]])
    print(tables.table(["problem", "P", "target", "prototype SGD", "ours SGD",
                        "prototype secant", "ours secant", "prototype ratio", "our ratio"],
                       rows))
    for launch_ in launches:
        print_launch(launch_)


def print_launch(launch_: dict) -> None:
    goals, g, picks = targets(launch_), groups(launch_), choose(launch_)
    prob, names = launch_["problem"], list(goals)
    head = f"\n### {launch_['problem_name']}, P = {launch_['ranks']}"
    if launch_.get("fstar") is not None:
        head += f": F* = {launch_['fstar']:.10g} on {launch_['train_rows']} rows (Newton-CG)"
    elif launch_.get("train_target") is not None:
        head += (f": train-loss target F <= {launch_['train_target']:.5g} (the chosen SGD "
                 f"rate's upper median F over seeds after {launch_['sgd_budget']} evaluations)")
    print(head + "\n")
    print(f"seeds {launch_['seeds']}; {launch_['threads_per_rank']} BLAS thread(s) per rank; "
          f"{launch_['mpi_library']}" + (f"; {launch_['env']}" if launch_["env"] else "")
          + f"; {launch_['seconds']:.0f} s. Evaluations every {prob['eval_base']} steps at "
          f"first, the interval doubling after 20. SGD runs at most {launch_['sgd_budget']:,} "
          f"evaluations; secant at most {launch_['secant_limit']:,} (= "
          f"{launch_['secant_ratio_cap']:g} x SGD's median to '{launch_['race_target']}', "
          f"capped at {launch_['secant_budget']:,}). Racing: a run stops at {RACE:g} x its "
          "grid's best median so far; '>N' marks such a seed.")
    for note in launch_["notes"]:
        print(f"NOTE: {note}")
    print("\nSGD + momentum 0.9, learning-rate grid (factor 2; * = chosen for that target):\n")
    rows = []
    for lr in sorted(lr for label, lr in g if label == "sgd"):
        recs = g["sgd", lr]
        cells = [evals_cell(recs, goals[n]) + (" *" if picks[n][0] == ("sgd", lr) else "")
                 for n in names]
        if not is_softmax(prob):
            cells += [f"{final_f(recs):.5f}", f"{med(r['test_curve'][-1][4] for r in recs):.4f}"]
        rows.append([f"{lr:.4g}", *cells])
    extra = [] if is_softmax(prob) else ["median F at budget", "median test acc at budget"]
    print(tables.table(["lr", *names, *extra], rows))
    print("\nbest SGD rate per selection: " + "; ".join(
        f"{n}: {launch_['sgd_best_lr'][n]:.4g} (lr {where['lr']})"
        for n, where in launch_["sgd_placement"].items()))
    print("\nsecant (the defaults on their own rate grid; each variant at the defaults' best "
          "rate for the main target, chasing that target only; * = chosen, on the training "
          "objective):\n")
    rows = []
    for (label, lr), recs in g.items():
        if label == "sgd":
            continue
        cells = [evals_cell(recs, goals[n], n) + (" *" if picks[n][1] == (label, lr) else "")
                 for n in names]
        rows.append([label, f"{lr:.4g}", *cells, *(f"{med(r[k] for r in recs):.1%}" for k in
                                                    ("fallback_rate", "clipped_rate")),
                     f"{med(r['rank_kept_mean'] for r in recs):.2f}",
                     *(f"{1e3 * med(r[k] for r in recs):.2f}" for k in
                       ("t_grad", "t_comm", "t_solve", "t_step"))])
    print(tables.table(["config", "lr", *names, "fallback", "clipped", "kept", "t_grad ms",
                        "t_comm ms", "t_solve ms", "step ms"], rows))
    reasons: dict[str, int] = {}
    for r in launch_["runs"]:
        for k, v in r["fallback_reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
    if reasons:
        print("\nfallbacks by reason, all secant runs: "
              + ", ".join(f"{k} {v}" for k, v in reasons.items()))
    print("\nstep time of the chosen runs, median over seeds (ms per step; t_comm includes "
          "waiting for the slowest rank):\n")
    rows = [[name, k[0], f"{k[1]:.4g}", *(f"{1e3 * med(r[f] for r in g[k]):.2f}" for f in
                                          ("t_grad", "t_comm", "t_solve", "t_step")),
             f"{g[k][0]['grad_evals_per_step']:.3g}"] for name, pick in picks.items()
            for k in pick]
    print(tables.table(["target", "optimizer", "lr", "t_grad", "t_comm", "t_solve", "step",
                        "grad evals/step"], rows))


# ----- parent ----------------------------------------------------------------------------------

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
    ap.add_argument("--append", action="store_true", help="add launches to the results file "
                    "(with no --problems/--ranks: those of the mode it lacks; a launch of the "
                    "same problem and P is replaced)")
    ap.add_argument("--max-minutes", type=float, default=0, help="start no (problem, P) launch "
                    "after this many minutes (0: no limit); what was left out is listed")
    ap.add_argument("--out", type=Path, help="results file")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per launch")
    args = ap.parse_args(argv)
    if args.report:
        print_tables(json.loads(args.report.read_text()))
        return
    full = args.full
    order = ([(n, P) for n in args.problems or PROBLEMS for P in args.ranks or ([4, 2] if full
                                                                                 else [2])]
             if args.problems or args.ranks else FULL_ORDER if full else QUICK_ORDER)
    seeds = list(range(args.seeds or (3 if full else 2)))
    out = args.out or ROOT / "bench-results" / f"convergence{'' if full else '-quick'}.json"
    results = dict(mode="full" if full else "quick", command=" ".join(sys.argv), launches=[],
                   not_run=[])
    if args.append and out.is_file():
        results = json.loads(out.read_text())
        have = {(x["problem_name"], x["ranks"]) for x in results["launches"]}
        if not (args.problems or args.ranks):
            order = [item for item in order if item not in have]
        results["launches"] = [x for x in results["launches"]
                               if (x["problem_name"], x["ranks"]) not in set(order)]
    started = time.perf_counter()
    for name, P in order:
        prob = dict(PROBLEMS[name])
        if not full and is_softmax(prob):
            prob["rel_targets"] = prob["rel_targets"][:1]      # quick: 1e-2 only
        if args.max_minutes and time.perf_counter() - started > 60 * args.max_minutes:
            results["not_run"].append(f"{name} P={P}: past --max-minutes {args.max_minutes:g}")
            continue
        path = datasets.dataset(prob["dataset"], ROOT)
        spec = dict(name=name, problem=prob, data=str(path), seeds=seeds, grid=prob["grid"],
                    max_grid=9, sgd_budget=prob["sgd_budget"],
                    secant_budget=prob["secant_budget"],
                    secant_ratio_cap=prob["secant_ratio_cap"],
                    secant_configs=[c for i, c in enumerate(SECANT_CONFIGS) if i == 0 or
                                    prob["variants"] is None or c[0] in prob["variants"]])
        if is_softmax(prob):
            import h5py

            with h5py.File(path, "r") as f:
                rows = len(f["train/y"]) // P * P      # equal shards drop the remainder
            spec["fstar"] = datasets.softmax_optimum(path, L2, ROOT, rows)["fstar"]
        print(f"convergence: {name}, P = {P}, seeds {seeds} ...", flush=True)
        t = time.perf_counter()
        res = launch.launch(__file__, spec, P, timeout=args.timeout)
        print(f"convergence: {name}, P = {P} done in {time.perf_counter() - t:.0f} s",
              flush=True)
        results["launches"].append(res)
        tables.save("convergence", results, ROOT, out)
    results = json.loads(tables.save("convergence", results, ROOT, out).read_text())
    print_tables(results)
    print(f"\nsaved {out} ({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    launch.script(worker, main)
