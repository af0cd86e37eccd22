"""Wall time to target at full batch, side by side: SGD+momentum against the secant methods
with the Armijo line search, each at the configuration benchmarks/batch_scaling.py chose.

    .venv/bin/python benchmarks/fullbatch_wall.py [--reps 5] [--ranks 1]

Softmax regression on mnist-t10k (8,000 training rows, l2 1e-4, float32), every rank's batch
its whole shard. Each method runs the number of steps batch_scaling.py measured it needs to
reach F within 1e-2 and 1e-3 of F* (medians over 3 seeds); the wall time of those steps is
timed in alternating order (A B C A B C ...), ``--reps`` times, and the medians and their
ratios to SGD are printed. History pairs and SGD take the same steps on any rank count
(checked on 1, 2 and 4 ranks); the probe pairs' steps hold on one rank only (on 2 and 4
ranks they did not reach 1e-1 in 700 steps), so with ``mpiexec -n P`` (P > 1) that row is
left out. Beside them, the machine's limit for this problem: the rate of the softmax
gradient's two matrix products (8000 x 784 by 784 x 10, and its transpose) and the time of
one forward product, so that a step's cost can be read as matrix products.
Results: bench-results/fullbatch_wall.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench-results" / "batch_scaling-data" / "mnist-t10k.h5"

#: target -> [(label, [optim] keys, steps)]: the configurations and steps (medians over 3
#: seeds) batch_scaling.py --full chose for softmax at batch 8000 (this machine, 2026-11-25;
#: benchmarks/README.md).
_LS = {"line_search": "armijo", "newton_lr": 1.0, "momentum": 0.0, "damping": 0.0,
       "h0": "bb", "max_step_ratio": 1e4}
SGD = {"name": "sgd", "lr": 3.0, "momentum": 0.9}
HISTORY, PROBE = "secant, history pairs + Armijo", "secant, probe pairs + Armijo"
METHODS = {
    "1e-2": [("SGD+momentum", SGD, 372),
             (HISTORY, {"name": "secant", "pairs": "history", **_LS, "lr": 0.75, "memory": 10},
              105),
             (PROBE, {"name": "secant", **_LS, "lr": 1.5, "memory": 20}, 102)],
    "1e-3": [("SGD+momentum", SGD, 624),
             (HISTORY, {"name": "secant", "pairs": "history", **_LS, "lr": 0.75, "memory": 20},
              138),
             (PROBE, {"name": "secant", **_LS, "lr": 1.5, "memory": 20}, 126)],
}


def make_run(comm, backend, optim: dict, steps: int, out: Path):
    from hessmpi import config
    from hessmpi.trainer import Run

    sets = [f"data.path={json.dumps(str(DATA))}", "model.name=\"softmax\"", "model.l2=1e-4",
            "train.batch_size=0", f"train.steps={steps}", "backend.dtype=\"float32\"",
            "backend.device=\"cpu\"", f"backend.threads={backend.threads}",
            "optim.check_every=0", "checkpoint.every=0"]
    sets += [f"optim.{k}={json.dumps(v)}" for k, v in optim.items()]
    return Run(config.load(None, sets), comm, backend, out)


def timed_steps(comm, backend, optim: dict, steps: int, tmp: Path) -> float:
    """Seconds of ``steps`` optimizer steps from the initial point (set-up excluded)."""
    from hessmpi.trainer import Interval

    run = make_run(comm, backend, optim, steps, tmp / f"run{time.monotonic_ns()}")
    interval = Interval()
    comm.comm.Barrier()
    t0 = time.perf_counter()
    for step in range(steps):
        run.step(step, interval)
    comm.comm.Barrier()
    return time.perf_counter() - t0


def matmul_limits(ranks: int, reps: int = 20) -> dict:
    """Seconds of the softmax gradient's two products at batch 8000 / ranks, and their rate."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8000 // ranks, 784), dtype=np.float32)
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
            "gflops": 2 * 2 * x.shape[0] * 784 * 10 / t / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads per rank")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results" / "fullbatch_wall.json")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from mpi4py import MPI

    from hessmpi.backend import make_backend, node_layout
    from hessmpi.comm import Communicator

    comm = Communicator(MPI.COMM_WORLD)
    if comm.rank == 0 and not DATA.is_file():   # built once from ../shared/data, git-ignored
        import importlib.util

        spec = importlib.util.spec_from_file_location("batch_scaling",
                                                      ROOT / "benchmarks" / "batch_scaling.py")
        bs = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bs)
        bs.build_dataset(DATA.parent, bs.SHARED_MNIST)
    comm.comm.Barrier()
    local_rank, _, _ = node_layout(MPI.COMM_WORLD)
    backend = make_backend("cpu", "float32", args.threads, local_rank=local_rank)
    tmp = Path(comm.bcast(tempfile.mkdtemp(prefix="hessmpi-fbw-") if comm.rank == 0 else None))
    limits = matmul_limits(comm.size)
    if comm.size > 1:   # its steps hold on one rank only (benchmarks/README.md)
        for methods in METHODS.values():
            methods[:] = [m for m in methods if m[0] != PROBE]
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.reps):
        for target, methods in METHODS.items():
            for label, optim, steps in methods:
                times.setdefault((label, target), []).append(
                    timed_steps(comm, backend, optim, steps, tmp))
    if comm.rank:
        return
    rows = []
    print(f"\nsoftmax, mnist-t10k, full batch on {comm.size} rank(s) x {args.threads} thread(s);"
          f" medians of {args.reps} alternating repetitions\n")
    print("| target | method | steps | wall s (median [min-max]) | ms/step | wall / SGD |")
    print("| --- | --- | --- | --- | --- | --- |")
    for target, methods in METHODS.items():
        base = statistics.median(times[(methods[0][0], target)])
        for label, _, n in methods:
            t = times[(label, target)]
            med = statistics.median(t)
            rows.append(dict(target=target, method=label, steps=n, wall_s=t, median_s=med,
                             ratio=med / base))
            print(f"| {target} | {label} | {n} | {med:.2f} [{min(t):.2f}-{max(t):.2f}] | "
                  f"{1e3 * med / n:.1f} | {med / base:.2f} |")
    print(f"\nmachine limit: the gradient's two products {limits['grad_products_ms']:.2f} ms "
          f"({limits['gflops']:.1f} GFLOP/s), one forward product "
          f"{limits['forward_product_ms']:.2f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(ranks=comm.size, threads=args.threads, reps=args.reps,
                                        limits=limits, rows=rows), indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
