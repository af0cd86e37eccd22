"""Time the secant optimizer's per-step machinery against one gradient and the memory floor.

    .venv/bin/python benchmarks/secant_step.py
    .venv/bin/python benchmarks/secant_step.py --threads 1 --reps 61 --budget 60

One process (P = 1), the MLP 784-256-256-10 (n = 269,322, float32), k = 1 and memory
m = 2, 4, 8, 16, the ring filled with random pairs. Each repetition takes one secant step by
its public parts in the order Secant.step runs them (hessmpi.bench.split.SplitSecant):
gradient, probe, then other (reduction, damping, exchange, g into W), Gram
(PairMemory.update_gram), m x m (quasi_newton.direction), comb (PairMemory.combine, clip,
momentum), in three cache states (b64, b512, cold: the cache flushed before the reduction,
the Gram update and the combination), against the memory floor at the measured streaming
bandwidth; then ways of forming the Gram rows. Once per BLAS thread count, wall and thread
CPU clocks. Samples: bench-results/secant_step.json. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from hessmpi.bench import launch, split, tables, timing

ROOT = Path(__file__).resolve().parent.parent
SIZES, L2, SEED, LR = [784, 256, 256, 10], 1e-4, 0, 0.01
BATCHES, MS, REGIMES = (64, 512), (2, 4, 8, 16), ("b64", "b512", "cold")
PARTS = ("other", "gram", "qn", "comb", "total")
STREAM_BYTES = 256 << 20
BLOCK_BYTES = (64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20, 2 << 20)
MIN_REPS, MIN_VARIANT_REPS, VARIANT_SHARE, VARIANT_CAP_S = 5, 3, 0.4, 1.5
CONTENTION_LIMIT = 1.3     # wall gradient / 1-thread CPU time beyond which: UNRELIABLE
AIM_M, AIM_GRAD_FRACTION, AIM_BW_FRACTION = 4, 0.6, 0.5


class Samples(dict):
    """{name: {"wall": [...], "cpu": [...]}}."""

    def add(self, name: str, pair) -> None:
        d = self.setdefault(name, {"wall": [], "cpu": []})
        d["wall"].append(float(pair[0]))
        d["cpu"].append(float(pair[1]))


def fill_ring(memory, rng, h) -> None:
    """Random g and pairs with y = h * s (h > 0): S^T Y positive definite, every slot full,
    the Gram matrix exact (each step replaces a slot by a real pair)."""
    W, k = memory.W, memory.k
    W[0] = rng.standard_normal(W.shape[1], dtype=np.float32)
    for r in range(1, W.shape[0], 2 * k):
        W[r:r + k] = rng.standard_normal((k, W.shape[1]), dtype=np.float32) * 1e-2
        np.multiply(W[r:r + k], h, out=W[r + k:r + 2 * k])
    memory.filled, memory.next_slot = memory.slots, 0
    W64 = W.astype(np.float64)
    memory.gram[...] = W64 @ W64.T


def measure(threads: int, args) -> dict:
    from mpi4py import MPI

    from hessmpi import config
    from hessmpi.models import DenseNet
    from hessmpi.objective import Objective
    from hessmpi.optim.memory import GRAM_BLOCK_BYTES

    comm, _ = launch.context(threads=threads, world=MPI.COMM_SELF)
    model = DenseNet(SIZES, "relu", L2, xp=np, dtype=np.float32)
    n, objective = model.n_params, Objective(model, comm)
    theta = model.init_params(SEED)
    rng = np.random.default_rng(SEED)
    batches = {b: (rng.random((b, SIZES[0]), dtype=np.float32), rng.integers(0, 10, b))
               for b in BATCHES}
    h = rng.uniform(0.5, 2.0, n).astype(np.float32)
    flush = timing.Flusher()
    secs = {}
    for m in MS:
        opts = config.options(config.from_dict({"optim": {"name": "secant", "memory": m}}),
                              "optim")
        secs[m] = split.SplitSecant(theta, objective, opts, seed=SEED)
        fill_ring(secs[m].memory, rng, h)
    samples, fallbacks = Samples(), dict.fromkeys(MS, 0)

    def one_step(m: int, regime: str, record: bool) -> None:
        b = 64 if regime == "cold" else int(regime[1:])
        objective.use_batch(*batches[b])
        p = secs[m].step(theta, objective, LR, now=timing.now,
                         before=flush if regime == "cold" else (lambda _part: None))
        if p["fallback"]:
            fallbacks[m] += record
            return
        if record:
            samples.add(f"grad {b}", p["grad"])
            samples.add(f"observe {b}", p["probe"])
            parts = dict(other=p["reduce"] + p["pairs"], gram=p["gram"], qn=p["solve"],
                         comb=p["comb"])
            parts["total"] = sum(parts.values())
            for part, v in parts.items():
                samples.add(f"m{m} {regime} {part}", v)

    streams = timing.streams(STREAM_BYTES)
    for read in streams.values():
        read()
    for m in MS:                       # warm-up; also replaces the random pairs of m slots
        for _ in range(m):
            one_step(m, "b64", False)
        one_step(m, "b512", False)
    t_main, reps = time.perf_counter(), 0
    while reps < args.reps and (reps < MIN_REPS or time.perf_counter() - t_main < args.budget):
        reps += 1
        for name, read in streams.items():
            t0 = timing.now()
            read()
            samples.add(f"stream {name}", STREAM_BYTES / (timing.now() - t0))
        for m in MS:
            for regime in REGIMES:
                one_step(m, regime, True)
    variants = {"full W@W.T": None, "incremental, unblocked": n}
    variants.update({f"blocked {nb >> 10} KiB" + (" (default)" if nb == GRAM_BLOCK_BYTES
                                                   else ""): nb for nb in BLOCK_BYTES})
    blocks = {m: {} for m in MS}
    spent = {(m, v): 0.0 for m in MS for v in variants}
    t_var, variant_reps = time.perf_counter(), 0
    while variant_reps < args.variant_reps and (variant_reps < MIN_VARIANT_REPS or
                                                time.perf_counter() - t_var
                                                < args.budget * VARIANT_SHARE):
        variant_reps += 1
        for m in MS:
            memory = secs[m].memory
            default, rows = memory.gram_block, memory.W.shape[0]
            for name, nbytes in variants.items():
                if variant_reps > 1 and spent[m, name] > VARIANT_CAP_S:
                    continue
                flush()
                if nbytes is not None:
                    memory.gram_block = nbytes if nbytes == n else max(1, nbytes // (rows * 4))
                    blocks[m][name] = memory.gram_block
                t0 = timing.now()
                if nbytes is None:
                    np.matmul(memory.W, memory.W.T)
                else:
                    memory.update_gram(memory.next_slot)
                t = timing.now() - t0
                samples.add(f"variant m{m} {name}", t)
                spent[m, name] += t[0]
            memory.gram_block = default
    return dict(threads=threads, n=n, reps=reps, variant_reps=variant_reps,
                default_block_bytes=GRAM_BLOCK_BYTES, blocks=blocks,
                variants=list(variants), streams=list(streams), fallbacks=fallbacks,
                samples=samples)


def summarise(raw: dict, clock: str) -> dict:
    """Medians of one clock and what they imply."""
    n, smp = raw["n"], raw["samples"]

    def med(name):
        return float(np.median(smp[name][clock]))

    streams = {s: med(f"stream {s}") for s in raw["streams"]
               if clock == "wall" or raw["threads"] == 1 or s.startswith("numpy")}
    bw_name, bw = max(streams.items(), key=lambda t: t[1])
    grad = {b: med(f"grad {b}") for b in BATCHES}
    rows = {}
    for m in MS:
        a = 2 * m + 1
        gram_bytes, comb_bytes = a * n * 4, (a + 1) * n * 4
        per = {}
        for r in REGIMES:
            sec = {p: med(f"m{m} {r} {p}") for p in PARTS}
            per[r] = dict(seconds=sec, over_grad64=sec["total"] / grad[64],
                          over_grad512=sec["total"] / grad[512],
                          gram_gbs=gram_bytes / sec["gram"] / 1e9,
                          comb_gbs=comb_bytes / sec["comb"] / 1e9,
                          gram_fraction=gram_bytes / sec["gram"] / bw,
                          comb_fraction=comb_bytes / sec["comb"] / bw)
        floor = (gram_bytes + comb_bytes) / bw
        rows[m] = dict(rows=a, floor_seconds=floor, floor_over_grad64=floor / grad[64],
                       regimes=per)
        full = med(f"variant m{m} full W@W.T")
        rows[m]["variants"] = {v: dict(seconds=med(f"variant m{m} {v}"),
                                       gbs=a * n * 4 / med(f"variant m{m} {v}") / 1e9,
                                       speedup=full / med(f"variant m{m} {v}"))
                               for v in raw["variants"]}
        rows[m]["best_block"] = min((v for v in raw["variants"] if v.startswith("blocked")),
                                    key=lambda v: rows[m]["variants"][v]["seconds"])
    return dict(clock=clock, streams=streams, bandwidth_name=bw_name, bandwidth=bw,
                grad=grad, observe={b: med(f"observe {b}") for b in BATCHES}, rows=rows)


def report(raw: dict, s: dict) -> None:
    clock = {"wall": "wall-clock time", "cpu": "CPU time of this thread (leaves out the "
             "time other processes held the core)"}[s["clock"]]
    print(f"\n=== BLAS threads {raw['threads']}, {clock} ===\n    ({raw['reps']} interleaved "
          f"repetitions, Gram variants {raw['variant_reps']}; load average "
          f"{raw['load'][0]:.1f} before, {raw['load'][1]:.1f} after; medians)")
    print("streaming read of a 256 MiB float32 array, GB/s: " + ", ".join(
        f"{k} {v / 1e9:.1f}" + (" <- reference" if k == s["bandwidth_name"] else "")
        for k, v in s["streams"].items()))
    print("one gradient: " + ", ".join(f"batch {b} {s['grad'][b] * 1e6:.0f} us"
                                       for b in BATCHES)
          + "; observe (probe gradient + pair): " + ", ".join(
              f"batch {b} {s['observe'][b] * 1e6:.0f} us" for b in BATCHES) + "\n")
    rows = []
    for m in MS:
        row = s["rows"][m]
        for r in REGIMES:
            x, t = row["regimes"][r], row["regimes"][r]["seconds"]
            rows.append([m, row["rows"], r, *(f"{t[p] * 1e6:.0f}" for p in PARTS),
                         f"{x['over_grad64']:.2f}", f"{x['over_grad512']:.2f}",
                         f"{x['gram_gbs']:.1f} ({x['gram_fraction']:.2f})",
                         f"{x['comb_gbs']:.1f} ({x['comb_fraction']:.2f})",
                         f"{row['floor_seconds'] * 1e6:.0f} ({row['floor_over_grad64']:.2f})"
                         if r == "cold" else ""])
    print(tables.table(["m", "rows", "cache", "other us", "Gram us", "m x m us", "comb us",
                        "total us", "/g64", "/g512", "Gram GB/s (of streaming)",
                        "comb GB/s (of streaming)", "floor us (/g64)"], rows))
    print("\nGram rows of the 3 new rows, cache flushed: us, GB/s of the (2m+1) n 4 bytes, "
          "speed-up over the full W@W.T\n")
    print(tables.table(["way", *(f"m = {m}" for m in MS)], [
        [v, *(f"{x['seconds'] * 1e6:.0f} us {x['gbs']:.1f} x{x['speedup']:.1f}"
              for x in (s["rows"][m]["variants"][v] for m in MS))] for v in raw["variants"]]))
    print("  fastest blocking: " + ", ".join(
        f"m={m}: {s['rows'][m]['best_block'].removeprefix('blocked ')}" for m in MS))


def report_aims(runs: list) -> None:
    print("\ncache: b64 / b512: right after the gradient and the probe at that batch; cold: "
          "cache flushed before the reduction,\n  the Gram update and the combination. "
          "Steps that fell back to SGD (not timed): " + ", ".join(
              f"m={m} {v}" for m, v in runs[0]["raw"]["fallbacks"].items())
          + f". Gram blocks: GRAM_BLOCK_BYTES / ((2m+1) 4) columns, default "
          f"{runs[0]['raw']['default_block_bytes'] >> 10} KiB.")
    print(f"\naims at m = {AIM_M}: machinery <= {AIM_GRAD_FRACTION} x one batch-64 gradient; "
          f"Gram update and combination >= {AIM_BW_FRACTION} x streaming bandwidth")
    cpu = [s["grad"][64] for run in runs for s in run["summaries"] if s["clock"] == "cpu"]
    for run in runs:
        for s in run["summaries"]:
            row, head = s["rows"][AIM_M], f"  threads {run['raw']['threads']} {s['clock']:4s}"
            for r in REGIMES:
                x = row["regimes"][r]
                bw_met = min(x["gram_fraction"], x["comb_fraction"]) >= AIM_BW_FRACTION
                print(f"{head} {r:5s}: machinery {x['over_grad64']:.2f} x gradient ("
                      f"{'met' if x['over_grad64'] <= AIM_GRAD_FRACTION else 'NOT met'}); "
                      f"Gram {x['gram_fraction']:.2f}, combination {x['comb_fraction']:.2f} "
                      f"of streaming ({'met' if bw_met else 'NOT met'})")
            print(f"{head} memory floor {row['floor_seconds'] * 1e6:.0f} us = "
                  f"{row['floor_over_grad64']:.2f} x gradient")
            slow = s["grad"][64] / cpu[0] if cpu and s["clock"] == "wall" else 0.0
            if slow > CONTENTION_LIMIT:
                print(f"{head} UNRELIABLE: its batch-64 gradient took {slow:.1f} x the CPU "
                      "time of one thread doing it: other processes held the cores")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=31,
                    help="most repetitions of the step in each cache state")
    ap.add_argument("--variant-reps", type=int, default=11,
                    help="most repetitions of the Gram variants")
    ap.add_argument("--budget", type=float, default=30.0, help="seconds per thread count "
                    f"after which the repetitions stop (at least {MIN_REPS})")
    ap.add_argument("--threads", type=int, nargs="+",
                    help="BLAS thread counts (default: 1 and the cores of this process)")
    args = ap.parse_args(argv)
    started, cores = time.perf_counter(), len(os.sched_getaffinity(0))
    m = tables.machine()
    print(f"hessmpi secant step machinery: MLP {'-'.join(map(str, SIZES))}, float32, one "
          f"process (P = 1), k = 1, memory = m; {cores} cores ({m['cpu']}), "
          f"{m['blas'][0]['internal_api'] if m['blas'] else 'BLAS ?'}", flush=True)
    runs = []
    for threads in args.threads or sorted({1, cores}):
        load = os.getloadavg()[0]
        raw = measure(threads, args)
        raw["load"] = (load, os.getloadavg()[0])
        summaries = [summarise(raw, c) for c in (("wall", "cpu") if threads == 1
                                                 else ("wall",))]
        for s in summaries:
            report(raw, s)
        runs.append(dict(raw=raw, summaries=summaries))
    report_aims(runs)
    if max(r["raw"]["load"][1] for r in runs) > cores:
        print(f"\nWARNING: load average above {cores} during the run: other processes "
              "shared the cores; medians are robust to some of it, not to all.")
    path = tables.save("secant_step", dict(sizes=SIZES, ms=MS, lr=LR, runs=runs), ROOT)
    print(f"\nsaved {path} ({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
