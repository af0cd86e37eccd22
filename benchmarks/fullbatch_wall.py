"""Wall time to target at full batch, side by side: SGD+momentum against the secant methods
with the Armijo line search, each at the configuration benchmarks/batch_scaling.py chose.

    .venv/bin/python benchmarks/fullbatch_wall.py [--reps 5] [--threads 1]
    .venv/bin/mpiexec -n 2 .venv/bin/python benchmarks/fullbatch_wall.py --out OUT.json

Softmax regression on mnist-t10k (8,000 training rows, l2 1e-4, float32), every rank's batch
its whole shard. Each method runs the steps batch_scaling.py measured it needs to reach F
within 1e-2 and 1e-3 of F* (medians over 3 seeds), from the same start; those steps are
timed in alternating order (A B C A B C ...), ``--reps`` times; medians and their ratios to
SGD. History pairs and SGD take the same steps on any rank count; the probe pairs' steps
hold on one rank only, so on P > 1 ranks that row is left out. Beside them the machine's
limit: the softmax gradient's two matrix products (8000/P x 784 by 784 x 10, and the
transpose) and one forward product. Results: bench-results/fullbatch_wall.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from hessmpi.bench import datasets, launch, tables

ROOT = Path(__file__).resolve().parent.parent
_LS = {"name": "secant", "line_search": "armijo", "newton_lr": 1.0, "momentum": 0.0,
       "damping": 0.0, "h0": "bb", "max_step_ratio": 1e4}
SGD = {"name": "sgd", "lr": 3.0, "momentum": 0.9}
HISTORY, PROBE = "secant, history pairs + Armijo", "secant, probe pairs + Armijo"
#: target -> [(label, [optim] keys, steps)]: batch_scaling.py --full's choices and medians
#: over 3 seeds for softmax at batch 8000 (2026-11-25; benchmarks/README.md)
METHODS = {
    "1e-2": [("SGD+momentum", SGD, 372),
             (HISTORY, {**_LS, "pairs": "history", "lr": 0.75, "memory": 10}, 105),
             (PROBE, {**_LS, "lr": 1.5, "memory": 20}, 102)],
    "1e-3": [("SGD+momentum", SGD, 624),
             (HISTORY, {**_LS, "pairs": "history", "lr": 0.75, "memory": 20}, 138),
             (PROBE, {**_LS, "lr": 1.5, "memory": 20}, 126)],
}


def timed_steps(comm, backend, data: str, optim: dict, steps: int, shards) -> float:
    """Seconds of ``steps`` optimizer steps from the initial point (set-up excluded)."""
    from hessmpi import config
    from hessmpi.trainer import Training

    cfg = config.from_dict({"data": {"path": data}, "model": {"name": "softmax", "l2": 1e-4},
                            "optim": optim,
                            "train": {"batch_size": 0, "steps": steps},
                            "backend": {"device": "cpu", "threads": backend.threads}})
    training = Training(cfg, comm, backend, shards=shards)
    comm.barrier()
    t0 = time.perf_counter()
    for step in range(steps):
        training.step(step)
    comm.barrier()
    return time.perf_counter() - t0


def matmul_limits(rows: int, reps: int = 20) -> dict:
    """Seconds of the softmax gradient's two products on ``rows`` rows, and their rate."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, 784), dtype=np.float32)
    w = rng.standard_normal((784, 10), dtype=np.float32)
    z = x @ w
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x @ w
        x.T @ z
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return {"grad_products_ms": 1e3 * t, "forward_product_ms": 1e3 * t / 2,
            "gflops": 2 * 2 * rows * 784 * 10 / t / 1e9}


def main() -> None:
    from hessmpi.bench.drive import shards

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads per rank")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    comm, backend = launch.context(threads=args.threads)
    data = comm.bcast(str(datasets.dataset("mnist-t10k", ROOT)) if comm.rank == 0 else None)
    mine = shards(data, comm)
    limits = matmul_limits(8000 // comm.size)
    methods = {t: [m for m in ms if comm.size == 1 or m[0] != PROBE]
               for t, ms in METHODS.items()}
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.reps):
        for target, ms in methods.items():
            for label, optim, steps in ms:
                times.setdefault((label, target), []).append(
                    timed_steps(comm, backend, data, optim, steps, mine))
    if comm.rank:
        return
    print(f"\nsoftmax, mnist-t10k, full batch on {comm.size} rank(s) x {args.threads} "
          f"thread(s); medians of {args.reps} alternating repetitions\n")
    rows, out = [], []
    for target, ms in methods.items():
        base = statistics.median(times[(ms[0][0], target)])
        for label, _, n in ms:
            t = times[(label, target)]
            med = statistics.median(t)
            out.append(dict(target=target, method=label, steps=n, wall_s=t, median_s=med,
                            ratio=med / base))
            rows.append([target, label, n, f"{med:.2f} [{min(t):.2f}-{max(t):.2f}]",
                         f"{1e3 * med / n:.1f}", f"{med / base:.2f}"])
    print(tables.table(["target", "method", "steps", "wall s (median [min-max])", "ms/step",
                        "wall / SGD"], rows))
    print(f"\nmachine limit: the gradient's two products {limits['grad_products_ms']:.2f} ms "
          f"({limits['gflops']:.1f} GFLOP/s), one forward product "
          f"{limits['forward_product_ms']:.2f} ms")
    path = tables.save("fullbatch_wall", dict(ranks=comm.size, threads=args.threads,
                                              reps=args.reps, limits=limits, rows=out),
                       ROOT, args.out)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
