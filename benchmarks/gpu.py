"""GPU against CPU: step time of SGD and of the secant method for MLPs of about 1e5, 1e6 and
1e7 parameters, split into gradient, Gram update, small solve, combination and
communication; and the Gram product's TFLOP/s against a plain CuPy product of that shape.

    python benchmarks/gpu.py            # launches its workers under mpiexec (1 and 2 ranks)

Run on a machine with a GPU (the 2-rank case shares the one GPU). The CPU reference is one
rank with one BLAS thread (one core). Steps run by their public parts
(hessmpi.bench.split); medians over repetitions; JSON in bench-results/gpu.json.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from hessmpi.bench import launch, split, tables

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"1e5": [784, 128, 10], "1e6": [784, 1024, 256, 10], "1e7": [784, 2048, 4096, 10]}
BATCH, MEMORY, LR = 64, 4, 0.01
COLUMNS = ("step", "grad", "comm", "gram", "solve", "update")


def worker(spec: dict) -> dict:
    """One (device, size) in this MPI job: seconds per step by part, medians over reps."""
    from hessmpi import config
    from hessmpi.data import Sampler
    from hessmpi.models import DenseNet
    from hessmpi.objective import Objective
    from hessmpi.optim import SGD

    comm, backend = launch.context(spec["device"], threads=1 if spec["device"] == "cpu" else 0)
    xp, sync, sizes = backend.xp, backend.synchronize, SIZES[spec["size"]]
    model = DenseNet(sizes, "relu", 1e-4, xp=xp, dtype=np.float32)
    rng = np.random.default_rng(comm.rank)
    x = xp.asarray(rng.random((BATCH, sizes[0]), dtype=np.float32))
    y = xp.asarray(rng.integers(0, sizes[-1], BATCH))
    objective = Objective(model, comm, x, y, Sampler(BATCH, BATCH, 0, comm.rank))
    theta = xp.asarray(model.init_params(0))
    opts = config.options(config.from_dict({"optim": {"name": "secant", "memory": MEMORY,
                                                      "lr": LR}}), "optim")
    results = {}
    for method in ("sgd", "secant"):
        if method == "sgd":
            sgd = SGD(theta, momentum=0.9, weight_decay=0.0, nesterov=False)

            def step(sgd=sgd):
                p = split.sgd_step(theta, objective, sgd, LR, sync=sync)
                return dict(grad=p["grad"], comm=p["allreduce"])
        else:
            sec = split.SplitSecant(theta, objective, opts)

            def step(sec=sec):
                objective.next_batch()
                p = sec.step(theta, objective, LR, sync=sync)
                return dict(grad=p["grad"] + p["probe"], comm=p["comm"], gram=p["gram"],
                            solve=p["solve"])
        per_rep = []
        for rep in range(spec["reps"] + 1):            # the first repetition warms up
            comm.barrier()
            t0, parts = time.perf_counter(), []
            for _ in range(spec["steps"]):
                parts.append(step())
            total = time.perf_counter() - t0
            if rep:
                rep_parts = {k: sum(p.get(k, 0.0) for p in parts) / spec["steps"]
                             for k in COLUMNS[1:5]}
                per_rep.append(dict(rep_parts, step=total / spec["steps"]))
        med = {k: float(np.median([r[k] for r in per_rep])) for k in per_rep[0]}
        med["update"] = med["step"] - sum(med[k] for k in COLUMNS[1:5])
        results[method] = med
    if backend.name == "cupy":
        results["gram_tflops"] = gram_rate(xp, model.n_params, comm.size)
    return dict(device=backend.device, ranks=comm.size, size=spec["size"], n=model.n_params,
                threads=backend.threads, **results)


def gram_rate(xp, n: int, ranks: int) -> float:
    """TFLOP/s of the Gram update's product shape, (1+2P) x n times n x (1+2PK), as one
    plain CuPy product."""
    rows, active = 1 + 2 * ranks, 1 + 2 * ranks * MEMORY
    W = xp.asarray(np.random.default_rng(0).random((active, n), dtype=np.float32))
    times = []
    for _ in range(21):
        t = time.perf_counter()
        W[:rows] @ W.T
        xp.cuda.get_current_stream().synchronize()
        times.append(time.perf_counter() - t)
    return 2.0 * rows * active * n / float(np.median(times[1:])) / 1e12


def main() -> None:
    runs = []
    for size in SIZES:
        for device, ranks in (("gpu", 1), ("gpu", 2), ("cpu", 1)):
            steps = 3 if device == "cpu" and size == "1e7" else 20
            spec = dict(device=device, size=size, steps=steps, reps=3)
            runs.append(launch.launch(__file__, spec, ranks, timeout=600))
    gpu = next(r["device"] for r in runs if r["device"] != "cpu")
    print(f"GPU: {gpu}; batch {BATCH} per rank, float32, secant memory {MEMORY}; ms per step "
          "(median)\n")
    rows = []
    for r in runs:
        for method in ("sgd", "secant"):
            t = r[method]
            extra = (t["gram"] + t["solve"] + t["update"]) / t["step"] * 100
            rows.append([f"{r['n']:,}", r["device"].split(" ")[0], r["ranks"], method,
                         *(f"{t[k] * 1e3:.3f}" if t.get(k) else "-" for k in COLUMNS),
                         f"{extra:.1f}" if method == "secant" else "-"])
    print(tables.table(["params", "device", "P", "method", *COLUMNS, "extra %"], rows))
    for size in SIZES:
        g = next(r for r in runs if r["size"] == size and r["ranks"] == 1
                 and r["device"] != "cpu")
        c = next(r for r in runs if r["size"] == size and r["device"] == "cpu")
        blocked = 2 * 3 * (1 + 2 * MEMORY) * g["n"] / g["secant"]["gram"] / 1e12
        print(f"{size}: GPU speed-up over one CPU core: SGD "
              f"{c['sgd']['step'] / g['sgd']['step']:.1f}x, secant "
              f"{c['secant']['step'] / g['secant']['step']:.1f}x; Gram product shape plain "
              f"CuPy {g['gram_tflops']:.2f} TFLOP/s, the code path {blocked:.2f} TFLOP/s")
    print(f"saved {tables.save('gpu', dict(runs=runs), ROOT)}")


if __name__ == "__main__":
    launch.script(worker, main)
