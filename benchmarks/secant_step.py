"""Time the secant optimizer's per-step machinery against one gradient and the memory floor.

    .venv/bin/python benchmarks/secant_step.py
    .venv/bin/python benchmarks/secant_step.py --threads 1 --reps 61 --budget 60

One process (hessmpi.comm.Communicator(MPI.COMM_SELF), so P = 1). For the MLP 784-256-256-10
(n = 269,322, float32) and m = 2, 4, 8, 16 pairs (pairs_per_rank k = 1, memory K = m: the ring
holds m pairs, W has 2m+1 rows and each step's Gram update recomputes the 1 + 2k = 3 new rows
against all 2m+1), a Secant object is built directly (Secant(theta, model=, comm=,
draw_batch=None, seed=0, opts=secant_options(defaults with the overrides))) and its ring filled
with random pairs whose S^T Y is positive definite; then each repetition does what a training
step does: model.loss_grad at theta (timed: the gradient), Secant.observe (the probe gradient,
which writes this rank's real pair into the ring) and Secant.step. The real step is timed,
split into its parts by wrapping the instance's ``_update_gram`` and the module's
``direction``:

    other        damping y += lam*s, the (one-rank) Allgather, W[0] = g, the row indices
    Gram         Secant._update_gram: the blocked incremental update
    m x m        quasi_newton.direction on the (2m+1) x (2m+1) Gram matrix
    combination  everything after direction returns: the coefficients,
                 xp.matmul(coef, W[:active], out=u), the clip on ||u|| where step() has
                 one, the momentum update and theta -= v

in three cache states, interleaved repetition by repetition so that the machine's noise
falls on all alike:

    b64, b512    right after the gradient and observe() at that batch, as in training
    cold         batch 64, and the last-level cache flushed (a 64 MiB buffer written) after
                 observe(), before the Gram update and before the combination: every part
                 reads W from memory, the case the bandwidth floor describes

The floor: the Gram update must read the (2m+1)*n*4 bytes of W[:active]; the combination
reads them and writes n*4 (its momentum traffic, 5n*4 more, is not counted). Divided by the
best plain streaming read of a 256 MiB array measured in the same run (numpy a.sum() on one
core, BLAS sdot(a, a), BLAS sgemv a @ ones).

A second table compares, cache flushed, ways of forming the Gram rows: the plain full
product W[:a] @ W[:a].T (the prototype's approach), the incremental product unblocked
(gram_block = n), and the blocked incremental update at several GRAM_BLOCK_BYTES
(set on the instance as ``gram_block``).

Everything runs once per BLAS thread count (default: 1, and the cores of this process, which
the trainer gives one rank alone on a node). Two clocks are read at every mark: wall time, and
the CPU time of this thread, which leaves out the time other processes held the core; on a
shared machine the CPU time of the one-thread run is the stable measure of the work itself.

Prints tables and writes every sample to bench-results/secant_step.json. See
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench-results" / "secant_step.json"

SIZES = [784, 256, 256, 10]
ACTIVATION, L2, SEED, LR = "relu", 1e-4, 0, 0.01
BATCHES = (64, 512)
MS = (2, 4, 8, 16)
STREAM_BYTES = 256 << 20   # the array of the streaming-read references
FLUSH_BYTES = 64 << 20     # written to evict the last-level cache (32 MiB here)
BLOCK_BYTES = (64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20, 2 << 20)

MIN_REPS, MIN_VARIANT_REPS = 5, 3   # repetitions run whatever the time budget
VARIANT_SHARE = 0.4        # the Gram variants' time budget, relative to --budget
VARIANT_CAP_S = 1.5        # seconds after which one Gram variant stops repeating

CONTENTION_LIMIT = 1.3     # wall-clock gradient / one thread's CPU time beyond which a
                           # wall-clock verdict is flagged as unreliable
AIM_M = 4
AIM_GRAD_FRACTION = 0.6    # machinery at m = 4 <= 0.6 of one batch-64 gradient
AIM_BW_FRACTION = 0.5      # Gram update and combination >= half the streaming bandwidth

#: [optim] keys held at the plain method whatever the defaults: a probe pair every step on the
#: whole batch, no line search (only those that this version of the config knows are set)
PINNED = dict(pairs="probe", probe="sgd", probe_every=1, probe_batch=1.0, line_search="none")

PARTS = ("other", "gram", "qn", "comb", "total")
REGIMES = ("b64", "b512", "cold")

CLOCKS = ("wall", "cpu")


def now() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this thread). The thread's CPU time leaves out the time
    other processes held the core, so with one BLAS thread it is the cost of the work itself
    on a shared machine (memory stalls included); with more BLAS threads only wall time
    counts."""
    return time.perf_counter(), time.thread_time()


def span(a, b) -> np.ndarray:
    return np.array([b[0] - a[0], b[1] - a[1]])


class Flusher:
    """Writes a buffer larger than the last-level cache."""

    def __init__(self, nbytes: int):
        self.buf = np.ones(nbytes // 4, dtype=np.float32)

    def __call__(self) -> None:
        self.buf.fill(1.0)


class Timed:
    """The real Secant.step of one instance, cut into its parts. ``_update_gram`` is wrapped
    on the instance, ``direction`` in the secant module (both call through to the originals);
    when ``cold`` the cache is flushed before the step, the Gram update and the combination,
    outside the timed spans."""

    def __init__(self, sec, secant_module, flush: Flusher):
        self.sec, self.flush, self.cold = sec, flush, False
        self.secant_module = secant_module
        self.marks: dict[str, tuple] = {}
        original = sec._update_gram

        def update_gram(slot_index):
            self.marks["pre1"] = now()
            if self.cold:
                flush()
            self.marks["gram0"] = now()
            original(slot_index)
            self.marks["gram1"] = now()

        sec._update_gram = update_gram

    def step(self, theta, grad) -> dict | None:
        """One step; {part: array([wall, cpu])}, or None if it fell back to SGD."""
        mod, original = self.secant_module, self.secant_module.direction
        marks = self.marks

        def direction(*args, **kwargs):
            marks["qn0"] = now()
            d = original(*args, **kwargs)
            marks["qn1"] = now()
            if self.cold:
                self.flush()
            marks["comb0"] = now()
            return d

        marks.clear()
        if self.cold:
            self.flush()
        mod.direction = direction
        try:
            t0 = now()
            info = self.sec.step(theta, grad, LR)
            t1 = now()
        finally:
            mod.direction = original
        if info.fallback:
            return None   # the SGD step replaced the combination: not a sample (counted)
        missing = {"pre1", "gram0", "gram1", "qn0", "qn1", "comb0"} - marks.keys()
        if missing:
            raise SystemExit("secant_step: Secant.step no longer calls self._update_gram and "
                             "the module-level direction() as this benchmark expects "
                             f"(no marks {sorted(missing)}); update the Timed class")
        parts = dict(other=span(t0, marks["pre1"]) + span(marks["gram1"], marks["qn0"]),
                     gram=span(marks["gram0"], marks["gram1"]),
                     qn=span(marks["qn0"], marks["qn1"]),
                     comb=span(marks["comb0"], t1))
        parts["total"] = sum(parts.values())
        return parts


def fill_ring(sec, rng, h) -> None:
    """Random g and pairs with y = h * s (h > 0), so that S^T Y is positive definite; every
    slot full; Gram exact. (observe() replaces a slot by real pairs before each step.)"""
    W = sec.W
    W[0] = rng.standard_normal(W.shape[1], dtype=np.float32)
    for r in range(1, W.shape[0], 2 * sec.k):
        s = W[r:r + sec.k]
        s[...] = rng.standard_normal(s.shape, dtype=np.float32) * 1e-2
        np.multiply(s, h, out=W[r + sec.k:r + 2 * sec.k])
    sec.filled, sec.next_slot = sec.slots, 0
    W64 = W.astype(np.float64)
    sec.gram[...] = W64 @ W64.T


class Samples:
    """Wall and CPU samples of named quantities."""

    def __init__(self):
        self.d: dict[str, dict[str, list]] = {}

    def add(self, key: str, pair) -> None:
        d = self.d.setdefault(key, {c: [] for c in CLOCKS})
        for c, v in zip(CLOCKS, pair, strict=True):
            d[c].append(float(v))

    def stats(self) -> dict:
        return {k: {c: stats(v) for c, v in d.items()} for k, d in self.d.items()}


def stats(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return dict(median=float(np.median(v)), q1=float(np.percentile(v, 25)),
                q3=float(np.percentile(v, 75)), min=float(v.min()), max=float(v.max()),
                values=[float(x) for x in v])


def measure(threads: int, args) -> dict:
    from mpi4py import MPI
    from threadpoolctl import threadpool_info, threadpool_limits

    import hessmpi.optim.secant as secant_module
    from hessmpi import config
    from hessmpi.comm import Communicator
    from hessmpi.models import DenseNet
    from hessmpi.optim.secant import GRAM_BLOCK_BYTES, Secant, secant_options

    threadpool_limits(limits=threads, user_api="blas")
    xp, dtype = np, np.dtype(np.float32)
    comm = Communicator(MPI.COMM_SELF)
    model = DenseNet(SIZES, ACTIVATION, L2, xp=xp, dtype=dtype)
    n = model.n_params
    theta = xp.asarray(model.init_params(SEED))
    theta_step = theta.copy()   # the steps move a copy: the gradients stay at one point
    rng = np.random.default_rng(SEED)
    batches = {b: (rng.random((b, SIZES[0]), dtype=np.float32), rng.integers(0, SIZES[-1], b))
               for b in BATCHES}
    grad = xp.zeros(n, dtype=dtype)
    flush = Flusher(FLUSH_BYTES)
    h = rng.uniform(0.5, 2.0, n).astype(np.float32)   # curvature of the initial random pairs

    optim = config.defaults()["optim"]
    pinned = {k: v for k, v in PINNED.items() if k in optim}   # keys this version knows
    secs = {}
    for m in MS:
        opts = secant_options({**optim, **pinned, "pairs_per_rank": 1, "memory": m})
        sec = Secant(theta, model=model, comm=comm, draw_batch=None, seed=SEED, opts=opts)
        assert sec.m == m and sec.W.shape == (2 * m + 1, n), (sec.m, sec.W.shape)
        fill_ring(sec, rng, h)
        secs[m] = sec
    timed = {m: Timed(secs[m], secant_module, flush) for m in MS}
    default_block = {m: secs[m].gram_block for m in MS}
    samples = Samples()

    def one_step(m: int, regime: str, record: bool) -> None:
        """As in training: the gradient at theta, observe() (the probe gradient and this
        rank's pair, written into W), then step(); the cold regime flushes the cache after
        observe() and inside step()."""
        b = 64 if regime == "cold" else int(regime[1:])
        x, y = batches[b]
        t0 = now()
        model.loss_grad(theta, x, y, grad)
        t1 = now()
        secs[m].observe(theta, grad, LR, x, y)
        t2 = now()
        timed[m].cold = regime == "cold"
        parts = timed[m].step(theta_step, grad)
        if record and parts is not None:
            samples.add(f"grad {b}", span(t0, t1))
            samples.add(f"observe {b}", span(t1, t2))
            for p in PARTS:
                samples.add(f"m{m} {regime} {p}", parts[p])

    # streaming-read references
    big = np.ones(STREAM_BYTES // 4, dtype=np.float32)
    big2d = big.reshape(-1, 4096)
    ones = np.ones(4096, dtype=np.float32)
    streams = {"numpy a.sum() (1 core)": lambda: big.sum(),
               f"BLAS sdot(a, a) ({threads} thread(s))": lambda: np.dot(big, big),
               f"BLAS sgemv a @ ones ({threads} thread(s))": lambda: big2d @ ones}
    for f in streams.values():
        f()
    for m in MS:                      # warm-up; also replaces the random pairs of m slots
        for _ in range(m):
            one_step(m, "b64", record=False)
        one_step(m, "b512", record=False)

    # main loop: the parts of the step in three cache states, interleaved
    t_main = time.perf_counter()
    reps = 0
    while reps < args.reps and (reps < MIN_REPS
                                or time.perf_counter() - t_main < args.budget):
        reps += 1
        for name, f in streams.items():
            t0 = now()
            f()
            samples.add(f"stream {name}", STREAM_BYTES / span(t0, now()))
        for m in MS:
            for regime in REGIMES:
                one_step(m, regime, record=True)
    main_seconds = time.perf_counter() - t_main

    # Gram variants, cache flushed
    variants = {"full W@W.T": None, "incremental, unblocked": n}
    variants.update({f"blocked {nb >> 10} KiB" + (" (default)" if nb == GRAM_BLOCK_BYTES
                                                   else ""): nb for nb in BLOCK_BYTES})
    variant_block = {m: {} for m in MS}
    spent = {m: dict.fromkeys(variants, 0.0) for m in MS}
    t_var = time.perf_counter()
    variant_reps = 0
    while variant_reps < args.variant_reps and (
            variant_reps < MIN_VARIANT_REPS
            or time.perf_counter() - t_var < args.budget * VARIANT_SHARE):
        variant_reps += 1
        for m in MS:
            sec = secs[m]
            rows = sec.W.shape[0]
            for name, spec in variants.items():
                if variant_reps > 1 and spent[m][name] > VARIANT_CAP_S:
                    continue   # a pathological case: its first samples show it
                flush()
                if spec is None:
                    Wa = sec.W[:rows]
                    t0 = now()
                    np.matmul(Wa, Wa.T)
                else:
                    block = spec if name.startswith("incremental") else max(1, spec // (rows * 4))
                    variant_block[m][name] = block
                    sec.gram_block = block
                    t0 = now()
                    Secant._update_gram(sec, sec.next_slot)
                t = span(t0, now())
                samples.add(f"variant m{m} {name}", t)
                spent[m][name] += t[0]
            sec.gram_block = default_block[m]
    variant_seconds = time.perf_counter() - t_var

    blas = [{k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
            for i in threadpool_info() if i.get("user_api") == "blas"]
    return dict(threads=threads, n=n, blas=blas, reps=reps, variant_reps=variant_reps,
                gram_block_bytes_default=GRAM_BLOCK_BYTES,
                default_block=default_block, variant_block=variant_block,
                variant_names=list(variants), stream_names=list(streams),
                main_seconds=main_seconds, variant_seconds=variant_seconds,
                counts={m: json.loads(secs[m].counters()) for m in MS},
                samples=samples.stats())


def summarise(raw: dict, clock: str) -> dict:
    """Medians of one clock, and what they imply."""
    n, item, smp = raw["n"], 4, raw["samples"]

    def med(key):
        return smp[key][clock]["median"]

    streams = {name: med(f"stream {name}") for name in raw["stream_names"]}
    if clock == "cpu" and raw["threads"] > 1:   # a multi-threaded BLAS read: wall only
        streams = {k: v for k, v in streams.items() if k.startswith("numpy")}
    bw_name, bw = max(streams.items(), key=lambda t: t[1])
    grads = {b: med(f"grad {b}") for b in BATCHES}
    g64, g512 = grads[64], grads[512]
    rows = {}
    for m in MS:
        a = 2 * m + 1
        gram_bytes, comb_bytes = a * n * item, (a + 1) * n * item
        per = {}
        for r in REGIMES:
            sec = {p: med(f"m{m} {r} {p}") for p in PARTS}
            per[r] = dict(seconds=sec,
                          over_grad64=sec["total"] / g64, over_grad512=sec["total"] / g512,
                          gram_gbs=gram_bytes / sec["gram"] / 1e9,
                          comb_gbs=comb_bytes / sec["comb"] / 1e9,
                          gram_fraction=gram_bytes / sec["gram"] / bw,
                          comb_fraction=comb_bytes / sec["comb"] / bw)
        floor = (gram_bytes + comb_bytes) / bw
        rows[m] = dict(rows=a, gram_bytes=gram_bytes, comb_bytes=comb_bytes,
                       floor_seconds=floor, floor_over_grad64=floor / g64, regimes=per)
    aim = rows[AIM_M]["regimes"]
    verdicts = {
        r: dict(grad_fraction=aim[r]["over_grad64"],
                grad_met=aim[r]["over_grad64"] <= AIM_GRAD_FRACTION,
                gram_fraction=aim[r]["gram_fraction"], comb_fraction=aim[r]["comb_fraction"],
                bandwidth_met=min(aim[r]["gram_fraction"], aim[r]["comb_fraction"])
                >= AIM_BW_FRACTION)
        for r in REGIMES}
    variants = {}
    for m in MS:
        a = 2 * m + 1
        full = med(f"variant m{m} full W@W.T")
        variants[m] = {}
        for v in raw["variant_names"]:
            t = med(f"variant m{m} {v}")
            variants[m][v] = dict(seconds=t, block=raw["variant_block"][m].get(v),
                                  samples=len(smp[f"variant m{m} {v}"][clock]["values"]),
                                  gbs=a * n * item / t / 1e9, fraction=a * n * item / t / bw,
                                  speedup_over_full=full / t)
    best = {m: min((v for v in variants[m] if v.startswith("blocked")),
                   key=lambda v: variants[m][v]["seconds"]) for m in MS}
    return dict(clock=clock, streams=streams, bandwidth_name=bw_name, bandwidth=bw,
                grad=grads, observe={b: med(f"observe {b}") for b in BATCHES}, rows=rows,
                verdicts=verdicts, variants=variants, best_block=best)


def us(s: float) -> str:
    return f"{s * 1e6:6.0f}"


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return dict(cores=len(os.sched_getaffinity(0)), cpu=cpu, host=platform.node(),
                python=platform.python_version(), numpy=np.__version__)


CLOCK_TITLE = {"wall": "wall-clock time",
               "cpu": "CPU time of this thread (leaves out the time other processes held "
                      "the core)"}


def report(raw: dict, summ: dict) -> None:
    clock = summ["clock"]
    print()
    print(f"=== BLAS threads {raw['threads']}, {CLOCK_TITLE[clock]} ===")
    print(f"    ({raw['reps']} interleaved repetitions, Gram variants {raw['variant_reps']}; "
          f"load average {raw['load_before']:.1f} "
          f"before, {raw['load_after']:.1f} after; medians)")
    print("streaming read of a 256 MiB float32 array, GB/s: " + ", ".join(
        f"{name} {v / 1e9:.1f}" + (" <- reference" if name == summ["bandwidth_name"] else "")
        for name, v in summ["streams"].items()))
    print("one gradient model.loss_grad: " + ", ".join(
        f"batch {b} {summ['grad'][b] * 1e6:.0f} us" for b in BATCHES)
        + "; observe() (probe gradient + pair): " + ", ".join(
        f"batch {b} {summ['observe'][b] * 1e6:.0f} us" for b in BATCHES))
    print()
    print("secant step, us                                    | total over | GB/s (fraction "
          "of streaming) | floor")
    print("  m rows cache |  other   Gram  m x m   comb  total | g64   g512 | Gram         "
          "combination   | us   /g64")
    for m in MS:
        row = summ["rows"][m]
        for r in REGIMES:
            x = row["regimes"][r]
            s = x["seconds"]
            floor = (f"{row['floor_seconds'] * 1e6:5.0f} {row['floor_over_grad64']:.2f}"
                     if r == "cold" else "")
            print(f"{m:3d} {row['rows']:4d} {r:5s} | {us(s['other'])} {us(s['gram'])} "
                  f"{us(s['qn'])} {us(s['comb'])} {us(s['total'])} | {x['over_grad64']:4.2f} "
                  f"{x['over_grad512']:5.2f} | {x['gram_gbs']:5.1f} ({x['gram_fraction']:4.2f})"
                  f" {x['comb_gbs']:5.1f} ({x['comb_fraction']:4.2f})  | {floor}")
    print()
    print("Gram rows of the 3 new rows, cache flushed: us, GB/s of the (2m+1)*n*4 bytes, "
          "speed-up over the full W@W.T")
    names = raw["variant_names"]
    print(f"  {'':28s}" + "".join(f"{'m = ' + str(m):>22s}" for m in MS))
    for v in names:
        cells = [f"{x['seconds'] * 1e6:7.0f} {x['gbs']:5.1f} x{x['speedup_over_full']:5.1f}"
                 .rjust(22) for x in (summ["variants"][m][v] for m in MS)]
        print(f"  {v:28s}" + "".join(cells))
    print("  fastest blocking: " + ", ".join(
        f"m={m}: {summ['best_block'][m].removeprefix('blocked ').removesuffix(' (default)')}"
        for m in MS))


def report_notes(raw: dict) -> None:
    print()
    print("cache: b64 / b512: right after the gradient and observe() at that batch, as in "
          "training; cold: cache")
    print("  flushed after observe(), before the Gram update and before the combination. "
          "other: damping,")
    print("  Allgather, W[0] = g, row indices. comb: all after direction(): coefficients, "
          "coef @ W[:active],")
    print("  the clip on ||u||, momentum, theta -= v;")
    print("  total: median of the per-step sums. Steps that fell back to SGD (not timed): "
          + ", ".join(f"m={m} {sum(v for k, v in raw['counts'][m].items() if k != 'clipped')}"
                      for m in MS) + ".")
    print("  floor: (2m+1)*n*4 bytes for the Gram update + (2m+2)*n*4 for the combination at "
          "the reference read")
    print("  bandwidth. Gram variants: blocks of GRAM_BLOCK_BYTES / ((2m+1)*4) columns, "
          f"default {raw['gram_block_bytes_default'] >> 10} KiB;")
    print("  columns: " + "; ".join(
        f"m={m}: " + ",".join(str(raw["variant_block"][m][v]) for v in raw["variant_names"][2:])
        for m in MS))


def contention(runs: list) -> None:
    """Mark each wall-clock summary with how much slower its batch-64 gradient ran than the
    CPU time of one thread doing it (from the 1-thread run, if there is one): on a quiet
    machine about 1 with one thread and below 1 with more; far above 1 means other
    processes held the cores and the wall-clock verdicts say little."""
    cpu = [s["grad"][64] for run in runs for s in run["summaries"] if s["clock"] == "cpu"]
    for run in runs:
        for summ in run["summaries"]:
            summ["slowdown"] = (summ["grad"][64] / cpu[0] if cpu and summ["clock"] == "wall"
                                else None)


def report_aims(runs: list) -> None:
    print()
    print(f"aims at m = {AIM_M}: machinery <= {AIM_GRAD_FRACTION} x one batch-64 gradient; Gram "
          f"update and combination >= {AIM_BW_FRACTION} x streaming bandwidth")
    for run in runs:
        for summ in run["summaries"]:
            row = summ["rows"][AIM_M]
            head = f"  threads {run['raw']['threads']} {summ['clock']:4s}"
            for r in REGIMES:
                v = summ["verdicts"][r]
                print(f"{head} {r:5s}: machinery {v['grad_fraction']:.2f} x gradient "
                      f"({'met' if v['grad_met'] else 'NOT met'}); Gram "
                      f"{v['gram_fraction']:.2f}, combination {v['comb_fraction']:.2f} of "
                      f"streaming ({'met' if v['bandwidth_met'] else 'NOT met'})")
            print(f"{head} memory floor {row['floor_seconds'] * 1e6:.0f} us = "
                  f"{row['floor_over_grad64']:.2f} x gradient")
            slow = summ.get("slowdown")
            if slow is not None and slow > CONTENTION_LIMIT:
                print(f"{head} UNRELIABLE: its batch-64 gradient took {slow:.1f} x the CPU time "
                      "of one thread doing it: other processes held the cores")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=31,
                    help="most repetitions of the step in each cache state (default 31)")
    ap.add_argument("--variant-reps", type=int, default=11,
                    help="most repetitions of the Gram variants (default 11)")
    ap.add_argument("--budget", type=float, default=30.0,
                    help="seconds per BLAS thread count after which the step repetitions stop "
                         f"(at least {MIN_REPS}); the Gram variants get {VARIANT_SHARE} of it "
                         "more (default 30)")
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="BLAS thread counts to run (default: 1 and the cores of this process, "
                         "which is what the trainer gives one rank alone on a node)")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    machine = machine_info()
    threads_list = args.threads or sorted({1, machine["cores"]})
    print(f"hessmpi secant step machinery: DenseNet {'-'.join(map(str, SIZES))}, float32, one "
          f"process (P = 1), k = 1, memory = m; {machine['cores']} cores ({machine['cpu']}), "
          f"numpy {np.__version__}", flush=True)
    runs = []
    for threads in threads_list:
        load_before = os.getloadavg()[0]
        raw = measure(threads, args)
        raw.update(load_before=load_before, load_after=os.getloadavg()[0])
        clocks = ("wall", "cpu") if threads == 1 else ("wall",)
        summaries = [summarise(raw, c) for c in clocks]
        if raw["blas"] and not runs:
            b = raw["blas"][0]
            print(f"BLAS: {b.get('internal_api')} {b.get('version')} ({b.get('architecture')})")
        for summ in summaries:
            report(raw, summ)
        runs.append(dict(summaries=summaries, raw=raw))
    report_notes(runs[0]["raw"])
    contention(runs)
    report_aims(runs)
    if max(r["raw"]["load_after"] for r in runs) > machine["cores"]:
        print(f"\nWARNING: load average above {machine['cores']} during the run: other "
              "processes shared the cores; medians are robust to some of it, not to all.")
    results = dict(benchmark="secant_step",
                   date=datetime.now(UTC).isoformat(timespec="seconds"), machine=machine,
                   model=dict(sizes=SIZES, activation=ACTIVATION, l2=L2, dtype="float32"),
                   ms=list(MS), batches=list(BATCHES), lr=LR,
                   aims=dict(m=AIM_M, grad_fraction=AIM_GRAD_FRACTION,
                             bandwidth_fraction=AIM_BW_FRACTION),
                   runs=runs)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nsaved {RESULTS.relative_to(ROOT)} ({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
