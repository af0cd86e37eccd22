"""GPU against CPU: step time of SGD and of the secant method for MLPs of about 1e5, 1e6 and
1e7 parameters, split into gradient, Gram product, small solve, combination and
communication; and the Gram product's TFLOP/s against a plain CuPy product of that shape.

    python benchmarks/gpu.py            # launches its workers under mpiexec (1 and 2 ranks)

Run on a machine with a GPU (the 2-rank case shares the one GPU). The CPU reference is one
rank with one BLAS thread (one core). Medians over repetitions; JSON in bench-results/gpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"1e5": [784, 128, 10], "1e6": [784, 1024, 256, 10], "1e7": [784, 2048, 4096, 10]}
BATCH = 64
MEMORY = 4          # secant: memory K (m = P * K pairs)


def worker(device: str, size: str, steps: int, reps: int) -> dict:
    """One configuration in this MPI job: times per step (seconds, medians over reps)."""
    from mpi4py import MPI

    from hessmpi import config
    from hessmpi.backend import blas_threads, make_backend, node_layout
    from hessmpi.comm import Communicator
    from hessmpi.models import DenseNet
    from hessmpi.optim import quasi_newton, secant
    from hessmpi.optim.secant import Secant, secant_options
    from hessmpi.optim.sgd import SGD

    comm = Communicator(MPI.COMM_WORLD)
    local_rank, _, aff = node_layout(comm.comm)
    threads = 1 if device == "cpu" else blas_threads(local_rank, aff)
    backend = make_backend(device, "float32", threads, local_rank=local_rank)
    xp, sync = backend.xp, backend.synchronize
    sizes = SIZES[size]
    model = DenseNet(sizes, "relu", 1e-4, xp=xp, dtype=np.float32)
    rng = np.random.default_rng(comm.rank)
    x = xp.asarray(rng.random((BATCH, sizes[0]), dtype=np.float32))
    y = xp.asarray(rng.integers(0, sizes[-1], BATCH))
    theta = xp.asarray(model.init_params(0))
    n = model.n_params
    buf = xp.zeros(n + 2, dtype=np.float32)
    grad = buf[:n]

    timers: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            sync()
            t = time.perf_counter()
            out = fn(*a, **k)
            sync()
            timers[name] = timers.get(name, 0.0) + time.perf_counter() - t
            return out
        return wrapper

    opts = config.defaults()["optim"] | {"name": "secant", "memory": MEMORY, "lr": 0.01}
    results = {}
    for method in ("sgd", "secant"):
        if method == "sgd":
            opt = SGD(theta, momentum=0.9, weight_decay=0.0, nesterov=False)
        else:
            opt = Secant(theta, model=model, comm=comm, draw_batch=None, seed=0,
                         opts=secant_options(opts))
            opt._update_gram = timed("gram", opt._update_gram)
            secant.direction = timed("solve", quasi_newton.direction)
        per_rep = []
        for rep in range(reps + 1):               # the first repetition warms up
            timers.clear()
            comm.barrier()
            t0 = time.perf_counter()
            for _ in range(steps):
                sync()
                t = time.perf_counter()
                buf[n] = model.loss_grad(theta, x, y, grad)
                sync()
                timers["grad"] = timers.get("grad", 0.0) + time.perf_counter() - t
                timers["grad"] += opt.observe(theta, grad, 0.01, x, y)
                c0 = comm.seconds
                comm.allreduce_sum_(buf)
                buf /= comm.size
                opt.step(theta, grad, 0.01, x, y)
                sync()
                timers["comm"] = timers.get("comm", 0.0) + comm.seconds - c0
            total = time.perf_counter() - t0
            if rep:
                per_rep.append({"step": total / steps} | {k: v / steps for k, v in timers.items()})
        med = {k: float(np.median([r[k] for r in per_rep])) for k in per_rep[0]}
        med["update"] = med["step"] - sum(med.get(k, 0.0) for k in ("grad", "comm", "gram",
                                                                    "solve"))
        results[method] = med
    if backend.name == "cupy":
        results["gram_flops"] = gram_rate(xp, n, comm.size)
    return {"device": backend.device, "ranks": comm.size, "size": size, "n": n,
            "threads": threads, **results}


def gram_rate(xp, n: int, ranks: int) -> dict:
    """TFLOP/s of the Gram update's product shape, (1+2P) x n times n x (1+2PK), through the
    blocked code path and as one plain CuPy product."""
    rows, active = 1 + 2 * ranks, 1 + 2 * ranks * MEMORY
    W = xp.asarray(np.random.default_rng(0).random((active, n), dtype=np.float32))
    new = W[:rows]
    flops = 2.0 * rows * active * n
    out = {}
    for name, fn in (("plain", lambda: new @ W.T), ):
        fn()
        xp.cuda.get_current_stream().synchronize()
        times = []
        for _ in range(20):
            t = time.perf_counter()
            fn()
            xp.cuda.get_current_stream().synchronize()
            times.append(time.perf_counter() - t)
        out[name] = flops / float(np.median(times)) / 1e12
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--device", default="gpu")
    p.add_argument("--size", default="1e5", choices=list(SIZES))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    if args.worker:
        result = worker(args.device, args.size, args.steps, args.reps)
        from mpi4py import MPI
        if MPI.COMM_WORLD.rank == 0:
            print(json.dumps(result), flush=True)
        return
    mpiexec = os.environ.get("HESSMPI_MPIEXEC", str(Path(sys.executable).parent / "mpiexec"))
    runs = []
    for size in SIZES:
        plans = [("gpu", 1), ("gpu", 2), ("cpu", 1)]
        for device, ranks in plans:
            steps = 3 if device == "cpu" and size == "1e7" else 20
            cmd = [mpiexec, "-n", str(ranks), sys.executable, __file__, "--worker",
                   "--device", device, "--size", size, "--steps", str(steps), "--reps", "3"]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if proc.returncode:
                print(proc.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"worker failed: {' '.join(cmd)}")
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"GPU: {next(r['device'] for r in runs if r['device'] != 'cpu')}; "
          f"batch {BATCH} per rank, float32, secant memory {MEMORY}; ms per step (median)")
    head = ("params", "device", "P", "method", "step", "grad", "comm", "gram", "solve",
            "update", "extra%")
    print(" | ".join(head))
    for r in runs:
        for method in ("sgd", "secant"):
            t = r[method]
            extra = (t.get("gram", 0) + t.get("solve", 0) + t["update"]) / t["step"] * 100
            print(" | ".join([f"{r['n']:,}", r["device"].split(" ")[0], str(r["ranks"]), method]
                             + [f"{t.get(k, 0.0) * 1e3:.3f}" for k in head[4:10]]
                             + [f"{extra:.1f}" if method == "secant" else "-"]))
    for size in SIZES:
        g = next(r for r in runs if r["size"] == size and r["ranks"] == 1 and r["device"] != "cpu")
        c = next(r for r in runs if r["size"] == size and r["device"] == "cpu")
        speedup = c["sgd"]["step"] / g["sgd"]["step"]
        print(f"{size}: GPU speed-up over one CPU core: SGD {speedup:.1f}x, "
              f"secant {c['secant']['step'] / g['secant']['step']:.1f}x; Gram product shape "
              f"plain CuPy {g['gram_flops']['plain']:.2f} TFLOP/s, blocked path "
              f"{2 * 3 * (1 + 2 * MEMORY) * g['n'] / g['secant']['gram'] / 1e12:.2f} TFLOP/s")
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
