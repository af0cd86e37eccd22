"""Time one data-parallel training step of the MLP 784-256-256-10, split into its parts.

    .venv/bin/python benchmarks/step_time.py            (what `make bench` runs)
    .venv/bin/python benchmarks/step_time.py --ranks 1 2 --reps 7 --steps 200
    .venv/bin/python benchmarks/step_time.py --ranks 2 --intranode mpi window

Launches itself under mpiexec once per rank count. Each rank builds a hessmpi Training (the
MLP on mnist-t10k, batch 64 per rank, SGD momentum 0.9) and runs its steps by their public
parts (hessmpi.bench.split.sgd_step: batch gather, gradient, Allreduce, averaging, update),
interleaved with the gradient's own 8 matrix products alone (same shapes, threads, and
ranks at once), the rate the gradient is held to. BLAS threads as `hessmpi train` chooses
them. The gradient's Allreduce is MPI's own (`--intranode mpi`, what `hessmpi train` does
by default) or goes through the node's shared-memory window (`window`); given both, each
rank count runs with each, one after the other (benchmarks/sharded.py interleaves
them in one job, the fairer comparison on a loaded machine). Prints tables; every figure
per rank and repetition goes to bench-results/step_time.json. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from hessmpi.bench import datasets, launch, split, tables, timing

ROOT = Path(__file__).resolve().parent.parent
SIZES, BATCH, LR = [784, 256, 256, 10], 64, 0.01
TARGET_RATIO = 0.70        # gradient GFLOP/s >= 70 % of its matmuls' own GFLOP/s
TARGET_COMM_SHARE = 0.10   # Allreduce < 10 % of the step at 2 ranks
QUIET_RUN_DELAY = 0.05     # a repetition is disturbed when some rank waited for a CPU this
                           # fraction of its wall time (run delay)


def gradient_flops(sizes: list[int], batch: int) -> dict:
    """Exact matmul FLOPs of one loss_grad: forward x W_l, weight gradients a_l^T delta,
    input gradients delta W_l^T for every layer but the first."""
    layers = list(zip(sizes[:-1], sizes[1:], strict=True))
    forward = sum(2 * batch * fi * fo for fi, fo in layers)
    inputs = sum(2 * batch * fi * fo for fi, fo in layers[1:])
    return dict(forward=forward, weight_grads=forward, input_grads=inputs,
                total=2 * forward + inputs)


def worker(spec: dict) -> dict:
    from hessmpi import config
    from hessmpi.trainer import Training

    comm, backend = launch.context(intranode=spec.get("intranode", "mpi"))
    cfg = config.from_dict({"data": {"path": spec["data"]}, "model": {
        "name": "mlp", "hidden": SIZES[1:-1], "l2": 1e-4}, "optim": {"lr": LR},
        "train": {"batch_size": BATCH}, "backend": {"device": "cpu", "threads":
                                                   backend.threads}})
    tr = Training(cfg, comm, backend)
    model, theta, perf = tr.model, tr.theta, time.perf_counter

    def steps(k: int) -> dict:
        delay, start = timing.run_delay(), perf()
        parts = [split.sgd_step(theta, tr.objective, tr.optimizer, LR) for _ in range(k)]
        wall = perf() - start
        out = {p: sum(x[p] for x in parts) / k for p in parts[0]}
        return dict(out, wall=wall / k, steps_run_delay=(timing.run_delay() - delay) / wall)

    # the gradient's 8 matmuls on real activations, with DenseNet's transposes and targets
    (w0, b0), (w1, b1), (w2, b2) = model.views(theta)
    tr.objective.next_batch()
    xb, yb = tr.objective.x, tr.objective.y
    a1 = np.maximum(xb @ w0 + b0, 0)
    a2 = np.maximum(a1 @ w1 + b1, 0)
    z = a2 @ w2 + b2
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(BATCH), yb] -= 1
    d3 = p / BATCH
    d2 = (d3 @ w2.T) * (a2 > 0)
    d1 = (d2 @ w1.T) * (a1 > 0)
    (g0, _), (g1, _), (g2, _) = model.views(np.zeros_like(theta))
    mm = np.matmul

    def matmuls(k: int) -> tuple[float, float]:
        delay, start = timing.run_delay(), perf()
        for _ in range(k):
            mm(xb, w0)
            mm(a1, w1)
            mm(a2, w2)
            mm(a2.T, d3, out=g2)
            mm(d3, w2.T)
            mm(a1.T, d2, out=g1)
            mm(d2, w1.T)
            mm(xb.T, d1, out=g0)
        wall = perf() - start
        return wall / k, (timing.run_delay() - delay) / wall

    def allreduce_alone(k: int) -> float:
        """Seconds inside the collective of Objective.reduce_gradient (the step's own
        buffer: the window's segment with --intranode window), each right after a Barrier."""
        total = 0.0
        for _ in range(k):
            comm.barrier()
            before = comm.seconds
            tr.objective.reduce_gradient(0.0)
            total += comm.seconds - before
        return total / k

    warm = perf()
    steps(spec["warmup"])
    matmuls(max(spec["warmup"] // 2, 1))
    allreduce_alone(max(spec["warmup"] // 2, 1))
    per_step = comm.max((perf() - warm) / spec["warmup"])
    k = spec["steps"]     # a busy machine makes steps 10x slower: fit the budget
    if per_step * k * spec["reps"] > spec["budget"]:
        k = max(20, int(spec["budget"] / (per_step * spec["reps"])))
    reps = []
    for _ in range(spec["reps"]):
        comm.barrier()
        rep = steps(k)
        comm.barrier()
        rep["matmuls"], rep["matmuls_run_delay"] = matmuls(k)
        rep["allreduce_alone"] = allreduce_alone(max(k // 2, 10))
        reps.append(rep)
    comm.barrier()
    peak = timing.matmul_rate(seed=comm.rank)
    comm.barrier()
    bandwidth = timing.read_bandwidth()
    mine = dict(rank=comm.rank, threads=backend.threads, reps=reps, peak_matmul_flops=peak,
                read_sum_bytes_per_s=bandwidth)
    return dict(ranks=comm.size, n_params=model.n_params, steps_per_rep=k,
                allreduce_bytes=(model.n_params + 2) * 4, data_source=tr.train_shard.source,
                collective=tr.objective.gradient_collective,
                per_rank=comm.allgather(mine))


def summarise(raw: dict, flops: dict) -> dict:
    """Per repetition the mean over ranks of each part (they move in lockstep through the
    Allreduce), then median [min-max] over repetitions."""
    ranks = raw["per_rank"]
    n = len(ranks[0]["reps"])

    def mean(name):
        return [float(np.mean([r["reps"][i][name] for r in ranks])) for i in range(n)]

    s = {p: mean(p) for p in ("batch", "grad", "allreduce", "average", "update", "wall",
                              "matmuls", "allreduce_alone")}
    delay = [max(max(r["reps"][i]["steps_run_delay"], r["reps"][i]["matmuls_run_delay"])
                 for r in ranks) for i in range(n)]
    s["step"] = [sum(s[p][i] for p in ("batch", "grad", "allreduce", "average", "update"))
                 for i in range(n)]
    s["other"] = [s["batch"][i] + s["average"][i] for i in range(n)]
    s["grad_gflops"] = [flops["total"] / t / 1e9 for t in s["grad"]]
    s["matmul_gflops"] = [flops["total"] / t / 1e9 for t in s["matmuls"]]
    s["ratio"] = [m / g for m, g in zip(s["matmuls"], s["grad"], strict=True)]
    s["allreduce_share"] = [c / t for c, t in zip(s["allreduce"], s["step"], strict=True)]
    out = {k: timing.stats(v) for k, v in s.items()}
    quiet = [d <= QUIET_RUN_DELAY for d in delay]
    return dict(out, quiet_reps=quiet, reliable=2 * sum(quiet) > n,
                samples_per_s=raw["ranks"] * BATCH / out["step"]["median"],
                threads_per_rank=ranks[0]["threads"],
                peak_gflops=[float(np.median(r["peak_matmul_flops"])) / 1e9 for r in ranks],
                read_gb_s=[float(np.median(r["read_sum_bytes_per_s"])) / 1e9 for r in ranks])


def us(s: dict) -> str:
    return f"{s['median'] * 1e6:.0f} [{s['min'] * 1e6:.0f}-{s['max'] * 1e6:.0f}]"


def spread(s: dict, f: str = ".1f") -> str:
    return f"{s['median']:{f}} [{s['min']:{f}}-{s['max']:{f}}]"


def report(runs: list, flops: dict, args) -> None:
    first = runs[0]["raw"]
    m = tables.machine()
    print(f"\nhessmpi step time: MLP {'-'.join(map(str, SIZES))} ({first['n_params']:,} "
          f"parameters), relu, l2 1e-4, float32, batch {BATCH} per rank, SGD momentum 0.9")
    print(f"data: {first['data_source']}; machine: {m['cores']} cores ({m['cpu']}), "
          f"{m['blas'][0]['internal_api'] if m['blas'] else 'BLAS ?'}, {m['mpi']}")
    done = sorted({r["raw"]["steps_per_rep"] for r in runs})
    print(f"{args.reps} repetitions x {'/'.join(map(str, done))} steps after {args.warmup} "
          "warm-up steps; microseconds per step, median [min-max over repetitions], mean "
          "over ranks" + (f" (shortened from {args.steps} steps to fit --budget)"
                          if done != [args.steps] else "") + "\n")
    rows = [[r["ranks"], r["intranode"], r["s"]["threads_per_rank"], *(us(r["s"][p]) for p in (
        "step", "grad", "allreduce", "update", "other")), f"{r['s']['samples_per_s']:.0f}",
        f"{sum(r['s']['quiet_reps'])}/{len(r['s']['quiet_reps'])}"] for r in runs]
    print(tables.table(["ranks", "intranode", "thr", "step", "gradient", "Allreduce",
                        "update", "other*", "samples/s", "quiet**"], rows))
    print("  * other = batch gather x[idx], y[idx] + averaging /= size + loss read-back")
    print(f"  ** repetitions in which no rank waited for a CPU more than {QUIET_RUN_DELAY:.0%} "
          "of the wall time (run delay); with half or fewer quiet the verdicts read UNRELIABLE")

    def verdict(ok: bool, s: dict) -> str:
        return ("met" if ok else "NOT met") + ("" if s["reliable"] else
                                               " (UNRELIABLE: machine busy)")

    print(f"\ngradient matmul FLOPs per step: {flops['total'] / 1e6:.2f} M (forward "
          f"{flops['forward'] / 1e6:.2f} M, weight grads {flops['weight_grads'] / 1e6:.2f} M, "
          f"input grads {flops['input_grads'] / 1e6:.2f} M); per rank, ranks at once\n")
    print(tables.table(
        ["ranks", "gradient GFLOP/s", "its 8 matmuls alone", "ratio", "matmuls alone (us)",
         f"target ratio >= {TARGET_RATIO:.2f}"],
        [[f"{r['ranks']} {r['intranode']}", spread(r["s"]["grad_gflops"]),
          spread(r["s"]["matmul_gflops"]),
          spread(r["s"]["ratio"], ".2f"), us(r["s"]["matmuls"]),
          verdict(r["s"]["ratio"]["median"] >= TARGET_RATIO, r["s"])] for r in runs]))
    print()
    for r in runs:
        s, sh = r["s"], r["s"]["allreduce_share"]
        print(f"Allreduce at {r['ranks']} rank(s), {r['raw']['collective']}: "
              f"{sh['median']:.1%} of the step "
              f"[{sh['min']:.1%}-{sh['max']:.1%}]; alone after a Barrier "
              f"{s['allreduce_alone']['median'] * 1e6:.0f} us "
              f"({first['allreduce_bytes'] / 1e6:.2f} MB)" + (
                  f"; target < {TARGET_COMM_SHARE:.0%}: "
                  f"{verdict(sh['median'] < TARGET_COMM_SHARE, s)}" if r["ranks"] > 1 else ""))
    print("\ncontext (per rank; ranks measured at once):")
    for r in runs:
        s = r["s"]
        print(f"  {r['ranks']} rank(s) {r['intranode']} x {s['threads_per_rank']} thread(s): "
              "float32 1024^3 "
              f"matmul {', '.join(f'{p:.1f}' for p in s['peak_gflops'])} GFLOP/s (sum "
              f"{sum(s['peak_gflops']):.1f}); read-and-sum of 256 MiB "
              f"{', '.join(f'{b:.1f}' for b in s['read_gb_s'])} GB/s (sum "
              f"{sum(s['read_gb_s']):.1f})")
    if any(not r["busy_before"] < 0.1 for r in runs):
        print(f"\nWARNING: other processes kept the CPUs "
              f"{max(r['busy_before'] for r in runs):.0%} busy just before a run: the figures "
              "above are inflated and noisy; rerun on a quiet machine.")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--steps", type=int, default=200, help="steps per repetition")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--budget", type=float, default=40, help="seconds of timed repetitions "
                    "per rank count; on a busy machine the repetitions are shortened to fit")
    ap.add_argument("--wait-idle", type=float, default=30,
                    help="seconds to wait for a quiet machine before each run")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--intranode", nargs="+", choices=("mpi", "window"), default=["mpi"],
                    help="the gradient's collective: MPI's own Allreduce (mpi, as hessmpi "
                         "train by default) and/or the shared-memory window")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    data = str(datasets.dataset("mnist-t10k", ROOT))
    flops = gradient_flops(SIZES, BATCH)
    runs = []
    for ranks in args.ranks:
        for intranode in (args.intranode if ranks > 1 else args.intranode[:1]):
            busy = timing.wait_for_idle(args.wait_idle)
            print(f"step_time: {ranks} rank(s), intranode {intranode} (CPUs {busy:.0%} busy "
                  "just before) ...", flush=True)
            raw = launch.launch(__file__, dict(vars(args), data=data, intranode=intranode),
                                ranks, timeout=args.timeout)
            runs.append(dict(ranks=ranks, intranode=intranode, busy_before=busy,
                             s=summarise(raw, flops), raw=raw))
    report(runs, flops, args)
    path = tables.save("step_time", dict(args=vars(args), flops=flops, runs=runs), ROOT)
    print(f"\nsaved {path} ({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    launch.script(worker, main)
