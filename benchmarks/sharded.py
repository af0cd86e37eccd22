"""The sharded exchange against the allgather exchange on this machine: the step split into
gradient, collectives and machinery, and the optimizer's bytes per rank, against P.

    .venv/bin/python benchmarks/sharded.py                      (1-2 minutes here)
    .venv/bin/python benchmarks/sharded.py --ranks 1 2 3 --reps 7 --steps 60

Launches itself under mpiexec once per rank count. Each rank builds the MLP 784-256-256-10 on
mnist-t10k (n = 269,322, float32, batch 64 per rank, one BLAS thread) and, for each exchange
side by side, interleaved repetition by repetition:

- SGD with momentum 0.9 (hessmpi.bench.split.sgd_step): gradient, Allreduce (sharded:
  reduce-scatter and the theta Allgather), update.
- the secant method with probe pairs, k = 1, memory K = max(1, 4 // P) (m = P K: 4, 4, 3),
  no line search, stepped by its public parts (hessmpi.bench.split.SplitSecant, the layout
  of optim.exchange): the step's gradient, the probe's gradient, the collectives (the
  gradient's reduction, the pairs' Allgather or Alltoall, the Gram rows' Allreduce, theta's
  Allgather), and the machinery: everything else (damping, g into W, the Gram update, the
  (2m+1)^2 work, the combination, the clip, momentum, theta -= v).

Then the bytes every rank's optimizer holds (hessmpi.optim.state_bytes, the largest rank)
for SGD, these probe pairs and history pairs (m = K = 4, Armijo), and the collectives alone
(MPI's, plain buffers) at sizes from 8 B to 4 MiB, for the alpha-beta model of
benchmarks/README.md. Wall clock; a repetition is quiet when no rank waited for a CPU more
than 5 % of it. Tables printed; every sample to bench-results/sharded.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from hessmpi.bench import datasets, launch, split, tables, timing

ROOT = Path(__file__).resolve().parent.parent
SIZES, BATCH, LR = [784, 256, 256, 10], 64, 0.01
EXCHANGES = ("allgather", "sharded")
QUIET = 0.05
AIM_MACHINERY, AIM_COMM_SHARE = 0.6, 0.10
COLLECTIVE_BYTES = [8, 1 << 10, 16 << 10, 256 << 10, 1 << 20, 4 << 20]


def memory_k(P: int) -> int:
    return max(1, 4 // P)


def collectives_alone(comm, nbytes: int, reps: int) -> dict:
    """Seconds of each collective the exchanges use, MPI's own on plain float32 buffers of
    ``nbytes`` per rank (Alltoallv: part j of a row to rank j, as the pairs move), each
    right after a Barrier; the median over reps, then over ranks."""
    P = comm.size
    count = max(nbytes // 4, P)
    counts = [count * (q + 1) // P - count * q // P for q in range(P)]
    displs = [count * q // P for q in range(P)]
    whole, part = np.ones(count, np.float32), np.ones(counts[comm.rank], np.float32)
    mine = [counts[comm.rank]] * P
    gathered = np.ones(P * mine[0], np.float32)
    ops = {
        "Allreduce": lambda: comm.allreduce_sum_(whole),
        "Reduce_scatter": lambda: comm.reduce_scatter_(whole, part, counts),
        "Allgatherv": lambda: comm.allgatherv_(whole, counts, displs),
        "Alltoallv": lambda: comm.alltoallv_(whole, counts, displs, gathered, mine,
                                             [q * mine[0] for q in range(P)]),
    }
    out = {}
    for op, fn in ops.items():
        samples = []
        for _ in range(reps):
            comm.barrier()
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        whole[...] = 1.0
        out[op] = float(np.median(comm.allgather(float(np.median(samples)))))
    return out


def worker(spec: dict) -> dict:
    from hessmpi import config
    from hessmpi.objective import Objective
    from hessmpi.optim import build_optimizer, state_bytes
    from hessmpi.trainer import Training

    comm, backend = launch.context(threads=1, intranode=spec["intranode"])
    P, K = comm.size, memory_k(comm.size)
    base = {"data": {"path": spec["data"]},
            "model": {"name": "mlp", "hidden": SIZES[1:-1], "l2": 1e-4},
            "train": {"batch_size": BATCH},
            "backend": {"device": "cpu", "threads": 1, "intranode": spec["intranode"]}}

    def training(exchange: str, optim: dict) -> Training:
        cfg = config.from_dict({**base, "optim": {"lr": LR, "exchange": exchange, **optim}})
        return Training(cfg, comm, backend)

    runs = {}
    for exchange in EXCHANGES:
        sgd = training(exchange, {"name": "sgd", "momentum": 0.9})
        sec = training(exchange, {"name": "secant", "memory": K})
        splitter = split.SplitSecant(sec.theta, sec.objective, config.options(
            sec.cfg, "optim"), seed=0)
        runs[exchange] = dict(sgd=sgd, sec=sec, split=splitter)

    def sgd_steps(r: dict, k: int) -> list[dict]:
        """SGD.step's parts (as hessmpi.bench.split.sgd_step), in both clocks."""
        tr = r["sgd"]
        objective, out = tr.objective, []
        for _ in range(k):
            objective.next_batch()
            t0 = timing.now()
            loss = objective.local_gradient(tr.theta)
            t1 = timing.now()
            c0 = np.array([comm.seconds, comm.cpu_seconds])
            objective.reduce_gradient(loss)
            tr.optimizer.update(tr.theta, objective.grad_part, LR)
            t2 = timing.now()
            c = np.array([comm.seconds, comm.cpu_seconds]) - c0
            rest = t2 - t1 - c
            out.append(dict(grad=(t1 - t0)[0], comm=c[0], step=(t2 - t0)[0],
                            machinery=rest[0], grad_cpu=(t1 - t0)[1], machinery_cpu=rest[1]))
        return out

    def secant_steps(r: dict, k: int) -> list[dict]:
        tr, s = r["sec"], r["split"]
        out = []
        for _ in range(k):
            tr.objective.next_batch()
            p = s.step(tr.theta, tr.objective, LR, now=timing.now)
            parts = p["pairs"] + p["gram"] + p["solve"] + p["comb"]     # [wall, cpu]
            out.append(dict(
                grad=p["grad"][0], probe=p["probe"][0], comm=p["comm"],
                step=float(sum(p[k][0] for k in ("grad", "probe", "reduce", "pairs", "gram",
                                                 "solve", "comb"))),
                machinery=parts[0] - p["comm_after_reduce"],
                grad_cpu=p["grad"][1],
                machinery_cpu=parts[1] - p["comm_cpu_after_reduce"],
                fallback=p["fallback"]))
        return out

    def rep_of(steps) -> dict:
        delay, start = timing.run_delay(), time.perf_counter()
        parts = steps()
        wall = time.perf_counter() - start
        keys = [k for k in parts[0] if k != "fallback"]
        out = {k: float(np.mean([p[k] for p in parts])) for k in keys}
        out["fallbacks"] = int(sum(p.get("fallback", False) for p in parts))
        out["run_delay"] = (timing.run_delay() - delay) / wall
        return out

    for r in runs.values():                  # warm-up, and the ring filled
        sgd_steps(r, spec["warmup"])
        secant_steps(r, spec["warmup"])
    reps = {f"{e} {m}": [] for e in EXCHANGES for m in ("sgd", "secant")}
    for _ in range(spec["reps"]):
        for exchange, r in runs.items():
            comm.barrier()
            reps[f"{exchange} sgd"].append(rep_of(lambda r=r: sgd_steps(r, spec["steps"])))
            comm.barrier()
            reps[f"{exchange} secant"].append(rep_of(lambda r=r: secant_steps(r,
                                                                            spec["steps"])))
    delays = {k: [max(comm.allgather(rep["run_delay"])) for rep in v] for k, v in reps.items()}

    paths = {e: r["sec"].objective.gradient_collective for e, r in runs.items()}
    paths["sgd allgather"] = runs["allgather"]["sgd"].objective.gradient_collective

    # the optimizer's bytes per rank, from its arrays, for three methods and each exchange
    bytes_held, m_of = {}, {}
    methods = {"sgd": ({"name": "sgd"}, 0),
               "secant probe": ({"name": "secant", "memory": K}, P * K),
               "secant history, Armijo": ({"name": "secant", "pairs": "history",
                                            "memory": 4, "line_search": "armijo"}, 4)}
    template = runs["allgather"]["sec"]
    for name, (optim, m) in methods.items():
        m_of[name] = m
        for exchange in EXCHANGES:
            opts = config.options(config.from_dict({**base, "optim": {
                "lr": LR, "exchange": exchange, **optim}}), "optim")
            objective = Objective(template.model, comm)
            opt = build_optimizer(opts, template.theta, objective, seed=0)
            bytes_held[f"{name}|{exchange}"] = comm.max(state_bytes(opt))
            del opt, objective

    alone = {nbytes: collectives_alone(comm, nbytes, spec["collective_reps"])
             for nbytes in COLLECTIVE_BYTES}
    intranode = intranode_ab(comm, backend, base, spec) if P > 1 else {}
    bandwidth = float(np.median(timing.read_bandwidth(64 << 20, reps=3)))
    return dict(ranks=P, memory=K, n_params=runs["sharded"]["sec"].model.n_params,
                reps=reps, delays=delays, bytes=bytes_held, m=m_of,
                alone={str(b): v for b, v in alone.items()}, read_bytes_per_s=bandwidth,
                paths=paths, intranode=intranode)


def intranode_ab(comm, backend, base: dict, spec: dict) -> dict:
    """The gradient's collective through the shared-memory window against MPI's own, in
    one job, interleaved block by block (the machine's noise hits both alike): SGD steps
    of both exchanges on a Communicator with intranode "window" and on one with "mpi";
    seconds per step of the step, the gradient and the reduction (the Allreduce or the
    reduce-scatter with the loss), and of the reduction alone after a Barrier."""
    from mpi4py import MPI

    from hessmpi import config
    from hessmpi.comm import Communicator
    from hessmpi.trainer import Training

    comms = {"window": Communicator(MPI.COMM_WORLD, intranode="window"), "mpi": comm}
    trainings = {}
    for path, c in comms.items():
        for exchange in EXCHANGES:
            cfg = config.from_dict({**base, "optim": {"name": "sgd", "lr": LR,
                                                      "exchange": exchange}})
            trainings[f"{exchange} {path}"] = Training(cfg, c, backend)
    samples = {k: {"step": [], "grad": [], "reduce": [], "alone": []} for k in trainings}
    for _ in range(spec["warmup"]):
        for tr in trainings.values():
            tr.step(0)
    for _ in range(spec["reps"] * spec["steps"] // 4):
        for key, tr in trainings.items():
            c, objective = tr.comm, tr.objective
            objective.next_batch()
            t0 = time.perf_counter()
            loss = objective.local_gradient(tr.theta)
            t1 = time.perf_counter()
            before = c.seconds
            objective.reduce_gradient(loss)
            reduce = c.seconds - before
            tr.optimizer.update(tr.theta, objective.grad_part, LR)
            t2 = time.perf_counter()
            samples[key]["step"].append(t2 - t0)
            samples[key]["grad"].append(t1 - t0)
            samples[key]["reduce"].append(reduce)
            c.barrier()
            before = c.seconds
            objective.reduce_gradient(loss)
            samples[key]["alone"].append(c.seconds - before)
    out = {key: {part: float(np.median(comm.allgather(float(np.median(v)))))
                 for part, v in parts.items()} for key, parts in samples.items()}
    for key, tr in trainings.items():
        out[key]["path"] = tr.objective.gradient_collective
    return out


def us(values) -> str:
    return tables.spread([v * 1e6 for v in values])


def report(results: list[dict], args) -> None:
    r0 = results[0]
    m = tables.machine()
    print(f"\nhessmpi sharded vs allgather: MLP {'-'.join(map(str, SIZES))} "
          f"({r0['n_params']:,} parameters), float32, batch {BATCH} per rank, 1 BLAS thread "
          f"per rank; {m['cores']} cores ({m['cpu']}), {m['mpi']}; {args.reps} repetitions x "
          f"{args.steps} steps after {args.warmup}; microseconds per step, median [min-max] "
          "over repetitions, mean over ranks\n")
    rows = []
    for r in results:
        P = r["ranks"]
        for exchange in EXCHANGES:
            for method in ("sgd", "secant"):
                reps = r["reps"][f"{exchange} {method}"]
                quiet = sum(d <= QUIET for d in r["delays"][f"{exchange} {method}"])
                grad, comm = [x["grad"] for x in reps], [x["comm"] for x in reps]
                mach, total = [x["machinery"] for x in reps], [x["step"] for x in reps]
                ratio = [x["machinery_cpu"] / x["grad_cpu"] for x in reps]
                share = [c / t for c, t in zip(comm, total, strict=True)]
                label = "sgd" if method == "sgd" else f"secant m={P * r['memory']}"
                rows.append([P, exchange, label, us(total), us(grad), us(comm),
                             tables.spread(share, lambda v: f"{v:.0%}"), us(mach),
                             us([x["machinery_cpu"] for x in reps]),
                             tables.spread(ratio, lambda v: f"{v:.2f}"),
                             f"{quiet}/{len(reps)}"])
    print(tables.table(["P", "exchange", "method", "step", "gradient (one)", "collectives",
                        "coll. share", "machinery", "machinery CPU", "machinery / gradient, CPU",
                        "quiet"], rows))
    print("  machinery: the secant step less its gradients and collectives (damping, g into "
          "W, Gram update, (2m+1)^2 work, combination, clip, momentum, theta -= v); for SGD "
          "the averaging and the update. Wall clock, and this thread's CPU time (CPU, which "
          "leaves out the time other processes held the core); the ratio to one batch-64 "
          "gradient in CPU time.")
    print(f"  aims: machinery <= {AIM_MACHINERY} of one batch-64 gradient at P >= 2; the "
          f"gradient's collective <= {AIM_COMM_SHARE:.0%} of a 2-rank SGD step")
    print("\ngradient collective: " + "; ".join(
        f"P={r['ranks']}: allgather {r['paths']['allgather']}, sharded "
        f"{r['paths']['sharded']}" for r in results))

    print("\noptimizer bytes per rank (MiB, the largest rank; every array it holds)\n")
    brow = []
    for name in r0["m"]:
        for r in results:
            a, s = r["bytes"][f"{name}|allgather"], r["bytes"][f"{name}|sharded"]
            brow.append([name, r["ranks"], r["m"][name] or "-", f"{a / 2**20:.2f}",
                         f"{s / 2**20:.2f}", f"{s / a:.2f}"])
    print(tables.table(["method", "P", "m", "allgather", "sharded", "sharded / allgather"],
                       brow))

    print("\ncollectives alone (MPI's, plain buffers), microseconds, median over ranks\n")
    crow = []
    for r in results:
        if r["ranks"] == 1:
            continue
        for op in ("Allreduce", "Reduce_scatter", "Allgatherv", "Alltoallv"):
            crow.append([r["ranks"], op, *(f"{r['alone'][str(b)][op] * 1e6:.1f}"
                                           for b in COLLECTIVE_BYTES)])
    print(tables.table(["P", "collective", *(f"{b} B" for b in COLLECTIVE_BYTES)], crow))
    ab = [[r["ranks"], key, f"{v['step'] * 1e6:,.0f}", f"{v['grad'] * 1e6:,.0f}",
           f"{v['reduce'] * 1e6:,.0f}", f"{v['reduce'] / v['step']:.1%}",
           f"{v['alone'] * 1e6:,.0f}", v["path"]]
          for r in results for key, v in r["intranode"].items()]
    if ab:
        print("\nthe gradient's collective, shared-memory window against MPI's own, SGD "
              "steps interleaved in one job (median over steps, then ranks), microseconds\n")
        print(tables.table(["P", "exchange / path", "step", "gradient", "reduction",
                            "reduction / step", "reduction alone", "collective"], ab))
    print("\nread-and-sum of 64 MiB per rank: " + ", ".join(
        f"P={r['ranks']} {r['read_bytes_per_s'] / 1e9:.1f} GB/s" for r in results))


# ----- the alpha-beta model at scale (benchmarks/README.md) ----------------------------------
#: Assumed for a cluster (not measurable here): per-message latency and per-byte time of the
#: inter-node network (100 Gb/s per rank's share), float32.
ALPHA, BETA, WORD = 2e-6, 1 / 12.5e9, 4
#: Measured on this machine, one core (benchmarks/README.md, secant_step.py): the Gram update
#: and the combination stream W at about 10 and 18 GB/s, the Gram kernel computes at about
#: 46 GFLOP/s from cache; the host's m x m work runs at about 20 GFLOP/s (LAPACK eigh and
#: small products, ~15 m^3 flops a step).
GRAM_BW, COMB_BW, GRAM_FLOPS, HOST_FLOPS = 10e9, 18e9, 46e9, 20e9


def step_model(P: int, n: float, m: int, new_rows: int, own_rows: int,
               alpha: float = ALPHA, beta: float = BETA) -> dict:
    """Per-rank seconds and bytes of one secant step of each exchange: ``m`` pairs kept,
    ``new_rows`` rows of W replaced a step (2 P k for the workers' probe pairs, 2 for a
    global pair), ``own_rows`` rows a rank forms whole (2k for probe pairs, 0 for global
    pairs). Collectives after Thakur, Rabenseifner & Gropp (2005): Allreduce 2 log P alpha
    + 2 (P-1)/P N beta; Reduce_scatter and Allgather log P alpha + (P-1)/P N beta;
    Alltoall (pairwise) (P-1) alpha + (P-1)/P N beta (N: what one rank sends)."""
    lg, f = np.log2(P), (P - 1) / P
    nb, rows = n * WORD, 2 * m + 1
    gram_rows = (1 + new_rows) * rows * WORD
    small = 2 * lg * alpha

    def machinery(columns: float) -> float:
        """The Gram update (new rows against every row: memory or compute bound), the
        combination (memory bound) over ``columns``, and the damping of own whole rows."""
        gram = max(rows * columns * WORD / GRAM_BW,
                   2 * (1 + new_rows) * rows * columns / GRAM_FLOPS)
        return gram + (rows + 1) * columns * WORD / COMB_BW + 3 * own_rows * nb / COMB_BW

    ag = dict(
        comm=(2 * lg * alpha + 2 * f * nb * beta                       # gradient Allreduce
              + (lg * alpha + (P - 1) * own_rows * nb * beta if own_rows else 0)),
        machinery=machinery(n), memory=(rows + 3) * nb)
    sh = dict(
        comm=(lg * alpha + f * nb * beta + small                     # RS + loss/flag
              + ((P - 1) * alpha + f * own_rows * nb * beta if own_rows else 0)   # pairs
              + 2 * lg * alpha + 2 * f * gram_rows * beta            # Gram rows
              + small                                                 # clip norm
              + lg * alpha + f * nb * beta),                          # theta Allgather
        machinery=machinery(n / P), memory=(rows + 1) * nb / P + (own_rows + 2) * nb)
    mxm = 15 * m ** 3 / HOST_FLOPS
    return dict(allgather=ag, sharded=sh, mxm=mxm, gram_rows_bytes=gram_rows)


def model_tables() -> str:
    """The model's tables for P = 8 ... 1024 and n = 1e6 ... 1e9."""
    out = []
    for title, k, K, hist in (("probe pairs, k = 1, K = 4 (m = 4P)", 1, 4, False),
                              ("probe pairs, k = 1, K = 1 (m = P)", 1, 1, False),
                              ("history pairs, K = 4 (m = 4)", 0, 4, True)):
        rows = []
        for P in (8, 64, 1024):
            m = 4 if hist else P * k * K
            for n in (1e6, 1e7, 1e8, 1e9):
                r = step_model(P, n, m, 2 if hist else 2 * P * k, 0 if hist else 2 * k)
                a, s = r["allgather"], r["sharded"]

                def gb(x):
                    return f"{x / 1e9:,.3g}"

                def ms(x):
                    return f"{x * 1e3:,.3g}"

                rows.append([P, f"{n:.0e}", m, gb(a["memory"]), gb(s["memory"]),
                             ms(a["comm"]), ms(s["comm"]), ms(a["machinery"]),
                             ms(s["machinery"]), ms(r["mxm"])])
        out.append(f"\n{title}\n")
        out.append(tables.table(["P", "n", "m", "state GB allgather", "state GB sharded",
                                 "comm ms allgather", "comm ms sharded",
                                 "machinery ms allgather", "machinery ms sharded",
                                 "m x m ms (both)"], rows))
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40, help="steps per repetition")
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--collective-reps", type=int, default=30)
    ap.add_argument("--intranode", choices=("mpi", "window"), default="mpi",
                    help="the gradient's collective of the step tables")
    ap.add_argument("--wait-idle", type=float, default=10)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--model", action="store_true",
                    help="print only the alpha-beta model at P = 8 ... 1024 (no runs)")
    args = ap.parse_args(argv)
    if args.model:
        print("alpha-beta model per rank and step (benchmarks/README.md): alpha "
              f"{ALPHA * 1e6:g} us, 1/beta {1 / BETA / 1e9:g} GB/s, float32; Gram update "
              f"{GRAM_BW / 1e9:g} GB/s and {GRAM_FLOPS / 1e9:g} GFLOP/s, combination "
              f"{COMB_BW / 1e9:g} GB/s, host m x m {HOST_FLOPS / 1e9:g} GFLOP/s")
        print(model_tables())
        return
    started = time.perf_counter()
    data = str(datasets.dataset("mnist-t10k", ROOT))
    results = []
    for ranks in args.ranks:
        busy = timing.wait_for_idle(args.wait_idle)
        print(f"sharded: {ranks} rank(s) (CPUs {busy:.0%} busy just before) ...", flush=True)
        raw = launch.launch(__file__, dict(vars(args), data=data), ranks,
                            timeout=args.timeout)
        results.append(dict(raw, busy_before=busy))
    report(results, args)
    print("\n" + model_tables())
    path = tables.save("sharded", dict(args=vars(args), results=results), ROOT)
    print(f"\nsaved {path} ({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    launch.script(worker, main)
