"""Time writing and reading a checkpoint, against plain NumPy files and a training step.

    .venv/bin/python benchmarks/checkpoint.py
    .venv/bin/python benchmarks/checkpoint.py --sizes 1e5 1e6 --reps 9 --dir /scratch/me

For n = 1e5, 1e6, 1e7 float32 parameters, a checkpoint like the trainer's (``params`` and
``optim/velocity`` of n each, the (P, 2) sampler state, the root attributes with the
config TOML) is written with ``hessmpi.checkpoint.write_checkpoint`` and read back with
``read_checkpoint``; the same two arrays are written with ``numpy.save`` to two .npy files
and read with ``numpy.load``, in the same run, interleaved with the checkpoint
repetitions. Medians over the repetitions.

- write: the whole of write_checkpoint: HDF5 to a temporary file, the BLAKE2b checksum of
  the arrays, the seal (a digest of the file's bytes), fsync of the file and of its
  directory, rename. ``fsync`` is the time spent in
  os.fsync inside those calls (timed by wrapping os.fsync); ``checksum`` the time of
  ``checksum()`` of the same arrays alone. numpy.save has no checksum and no fsync.
- read: read_checkpoint (open, read every array, verify the checksum) and numpy.load,
  both from a cold page cache where the kernel allows it (posix_fadvise DONTNEED on the
  file after it was fsynced), else warm.
- step: one training step of the MLP 784-256-256-10 at batch 64 (the convergence
  benchmark's model): ``DenseNet.loss_grad`` on a random batch plus ``SGD.step``, BLAS
  threads = the cores of this process (a faster step than a 2-rank run's 1 thread each,
  so the overhead below errs high). Measured in this run.
- overhead: the write time of that MLP's own checkpoint (n = 269,322) over 100 steps, in %
  of training time, if the write were synchronous (an upper bound); then the cost of
  ``checkpoint.every = 100`` on the trainer's actual path (aim: under 2 %): rank 0 copies
  the state and a BackgroundWriter thread writes it while training goes on, measured as
  pairs of 100-step blocks, plain and starting with a checkpoint, side by side; the
  verdict is the median over the pairs.
- the page cache: "cold" reads are cold for this kernel; a virtual disk may still be
  cached by the host.

Writes to a temporary directory under bench-results/ (the file system of the runs) unless
--dir; prints a table; saves every repetition to bench-results/checkpoint.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench-results" / "checkpoint.json"
SIZES = [784, 256, 256, 10]
BATCH, LR, MOMENTUM, L2 = 64, 0.01, 0.9, 1e-4
EVERY = 100
TARGET_OVERHEAD = 2.0   # percent

perf = time.perf_counter


class FsyncTimer:
    """Wraps os.fsync (as hessmpi.checkpoint calls it) to add up the seconds spent in it."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0
        self._fsync = os.fsync

    def __enter__(self):
        def timed(fd):
            t = perf()
            try:
                return self._fsync(fd)
            finally:
                self.seconds += perf() - t
                self.calls += 1
        os.fsync = timed
        return self

    def __exit__(self, *exc):
        os.fsync = self._fsync


def drop_cache(path: Path) -> bool:
    """Ask the kernel to drop ``path``'s (clean) pages; True if it could be asked."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def checkpoint_arrays(n: int, seed: int = 0) -> tuple[dict, dict]:
    """(arrays, attrs) shaped like Run.checkpoint_state's for n parameters on 2 ranks."""
    from hessmpi import config

    rng = np.random.default_rng(seed)
    arrays = {"params": rng.standard_normal(n, dtype=np.float32),
              "sampler": np.array([[3, 128], [3, 128]], dtype=np.int64),
              "optim/velocity": rng.standard_normal(n, dtype=np.float32)}
    attrs = {"step": 1000, "epoch": 3.5, "grad_evals": 1000, "wall_time": 12.5,
             "config": config.to_toml(config.defaults()), "mpi_size": 2,
             "hessmpi_version": "0.1.0", "signature": f'{{"n_params": {n}}}'}
    return arrays, attrs


def bench_size(n: int, reps: int, where: Path) -> dict:
    """Repetitions of checkpoint write/read, checksum, numpy save/load for n parameters."""
    from hessmpi.checkpoint import checkpoint_path, checksum, read_checkpoint, write_checkpoint

    arrays, attrs = checkpoint_arrays(n)
    nbytes = sum(a.nbytes for a in arrays.values())
    rec = {k: [] for k in ("write", "fsync", "checksum", "read", "np_save", "np_load")}
    cold = True
    for rep in range(reps):
        path = checkpoint_path(where, rep)
        with FsyncTimer() as timer:
            t = perf()
            write_checkpoint(path, arrays, attrs)
            rec["write"].append(perf() - t)
        rec["fsync"].append(timer.seconds)
        assert timer.calls == 2, timer.calls  # the file and its directory

        t = perf()
        checksum(arrays)
        rec["checksum"].append(perf() - t)

        cold &= drop_cache(path)
        t = perf()
        got, _ = read_checkpoint(path)
        rec["read"].append(perf() - t)
        assert got["params"].tobytes() == arrays["params"].tobytes()

        npy = [where / f"np_{rep}_{name.replace('/', '_')}.npy" for name in arrays]
        t = perf()
        for file, a in zip(npy, arrays.values(), strict=True):
            np.save(file, a)
        rec["np_save"].append(perf() - t)
        for file in npy:
            cold &= drop_cache(file)
        t = perf()
        loaded = [np.load(file) for file in npy]
        rec["np_load"].append(perf() - t)
        assert loaded[0].tobytes() == arrays["params"].tobytes()

        path.unlink()
        for file in npy:
            file.unlink()
    med = {k: statistics.median(v) for k, v in rec.items()}
    return dict(n=n, bytes=nbytes, reps=reps, cold_read=cold, seconds=rec, median=med)


def bench_step(reps: int, steps: int) -> dict:
    """Median seconds of one MLP training step (loss_grad + SGD step) over ``reps`` blocks
    of ``steps`` steps, after a warm-up."""
    from hessmpi.models import DenseNet
    from hessmpi.optim.sgd import SGD

    model = DenseNet(SIZES, "relu", L2, xp=np, dtype=np.float32)
    theta = model.init_params(0)
    grad = np.zeros_like(theta)
    opt = SGD(theta, momentum=MOMENTUM, weight_decay=0.0, nesterov=False)
    rng = np.random.default_rng(1)
    x = rng.random((16 * BATCH, SIZES[0]), dtype=np.float32)
    y = rng.integers(0, SIZES[-1], 16 * BATCH)

    def block(k: int) -> float:
        t = perf()
        for i in range(k):
            rows = slice((i % 16) * BATCH, (i % 16 + 1) * BATCH)
            model.loss_grad(theta, x[rows], y[rows], grad)
            opt.step(theta, grad, LR)
        return (perf() - t) / k

    block(max(steps // 4, 5))
    per_step = [block(steps) for _ in range(reps)]
    return dict(n_params=model.n_params, seconds=per_step, median=statistics.median(per_step))


def bench_cadence(rounds: int, where: Path) -> dict:
    """What ``checkpoint.every = EVERY`` costs the trainer: ``rounds`` pairs of blocks of
    EVERY training steps of the MLP, alternated so that a shared machine's load weighs on
    both alike: a plain block, and a block that starts with the trainer's checkpoint (copy
    of params and velocity, handed to the BackgroundWriter, whose write, checksum, fsync
    and prune run on its thread while the block's steps go on). The cost is the median
    over pairs of (checkpointed block - plain block) / plain block."""
    from hessmpi.checkpoint import BackgroundWriter, checkpoint_path
    from hessmpi.models import DenseNet
    from hessmpi.optim.sgd import SGD

    model = DenseNet(SIZES, "relu", L2, xp=np, dtype=np.float32)
    theta = model.init_params(0)
    grad = np.zeros_like(theta)
    opt = SGD(theta, momentum=MOMENTUM, weight_decay=0.0, nesterov=False)
    rng = np.random.default_rng(2)
    x = rng.random((16 * BATCH, SIZES[0]), dtype=np.float32)
    y = rng.integers(0, SIZES[-1], 16 * BATCH)
    _, attrs = checkpoint_arrays(model.n_params)
    writer = BackgroundWriter(where, 3)

    def block(step0: int, checkpoint: bool) -> float:
        t = perf()
        if checkpoint:
            arrays = {"params": theta.copy(), "sampler": np.zeros((2, 2), np.int64),
                      "optim/velocity": opt.velocity.copy()}
            writer.submit(checkpoint_path(where, step0), arrays, {**attrs, "step": step0})
        for i in range(EVERY):
            rows = slice((i % 16) * BATCH, (i % 16 + 1) * BATCH)
            model.loss_grad(theta, x[rows], y[rows], grad)
            opt.step(theta, grad, LR)
        if checkpoint:
            writer.wait()   # normally overlapped by the next block; counted here to be safe
        return perf() - t

    plain_s, ckpt_s = [], []
    for r in range(rounds + 1):               # round 0 warms up
        p, c = block(2 * r * EVERY, False), block((2 * r + 1) * EVERY, True)
        if r:
            plain_s.append(p)
            ckpt_s.append(c)
    per_round = [100 * (c - p) / p for c, p in zip(ckpt_s, plain_s, strict=True)]
    return dict(rounds=rounds, every=EVERY, plain_seconds=plain_s, checkpoint_seconds=ckpt_s,
                percent_per_round=per_round)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[1e5, 1e6, 1e7],
                   help="parameter counts (float32 params + velocity)")
    p.add_argument("--reps", type=int, default=5, help="repetitions (3 at most for >= 1e7)")
    p.add_argument("--step-reps", type=int, default=5, help="blocks of training steps timed "
                   "before and after the checkpoints")
    p.add_argument("--step-steps", type=int, default=20, help="training steps per block")
    p.add_argument("--rounds", type=int, default=4, help=f"rounds of {EVERY} steps and a "
                   "checkpoint, timed side by side")
    p.add_argument("--dir", type=Path, help="where to write (default: under bench-results/)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()

    from threadpoolctl import threadpool_info

    started = perf()
    step = bench_step(args.step_reps, args.step_steps)
    n_mlp = step["n_params"]
    sizes = sorted({int(s) for s in args.sizes} | {n_mlp})
    base = args.dir or ROOT / "bench-results"
    base.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-", dir=base) as tmp:
        for n in sizes:
            reps = min(args.reps, 3) if n >= 10**7 else args.reps
            results.append(bench_size(n, reps, Path(tmp)))
        cadence_dir = Path(tmp) / "cadence"
        cadence = bench_cadence(args.rounds, cadence_dir)
    step_after = bench_step(args.step_reps, args.step_steps)   # the machine is shared
    t_step = statistics.median(step["seconds"] + step_after["seconds"])

    header = (f"{'params':>10} {'MB':>6} | {'write ms':>9} {'MB/s':>6} {'fsync':>6} "
              f"{'csum':>5} {'np.save':>8} {'ratio':>5} | {'read ms':>8} {'MB/s':>6} "
              f"{'np.load':>8} {'ratio':>5} | {'wr/step':>7} {'rd/step':>7}")
    lines = [header, "-" * len(header)]
    for r in results:
        m, mb = r["median"], r["bytes"] / 1e6
        lines.append(
            f"{r['n']:>10,} {mb:>6.1f} | {m['write'] * 1e3:>9.2f} {mb / m['write']:>6.0f} "
            f"{m['fsync'] / m['write']:>6.0%} {m['checksum'] / m['write']:>5.0%} "
            f"{m['np_save'] * 1e3:>8.2f} {m['write'] / m['np_save']:>5.1f} | "
            f"{m['read'] * 1e3:>8.2f} {mb / m['read']:>6.0f} {m['np_load'] * 1e3:>8.2f} "
            f"{m['read'] / m['np_load']:>5.1f} | {m['write'] / t_step:>7.1f} "
            f"{m['read'] / t_step:>7.1f}")
    mlp = next(r for r in results if r["n"] == n_mlp)
    write_mlp = mlp["median"]["write"]
    overhead = 100 * write_mlp / (EVERY * t_step)   # added time over training time
    t_fastest = min(step["seconds"] + step_after["seconds"])
    overhead_high = 100 * write_mlp / (EVERY * t_fastest)
    fsync_share = [r["median"]["fsync"] / r["median"]["write"] for r in results]
    cores = len(os.sched_getaffinity(0))
    blas = [(i.get("internal_api"), i.get("num_threads")) for i in threadpool_info()]
    cold = all(r["cold_read"] for r in results)
    print("\n".join(lines))
    print(f"\nwrite = write_checkpoint (HDF5 + BLAKE2b checksum + fsync of file and directory "
          f"+ rename); fsync and csum: their shares of it. ratio: over numpy.save/numpy.load "
          f"of the same arrays (no checksum, no fsync). Reads from a "
          f"{'cold' if cold else 'WARM'} page cache. wr/step, rd/step: in training steps.")
    print(f"fsync is {min(fsync_share):.0%} to {max(fsync_share):.0%} of the write time "
          f"(median write less its fsync, 1e7 or largest: "
          f"{(results[-1]['median']['write'] - results[-1]['median']['fsync']) * 1e3:.1f} ms).")
    print(f"training step, MLP {'-'.join(map(str, SIZES))} batch {BATCH} ({n_mlp:,} params, "
          f"loss_grad + SGD step, BLAS {blas}): {t_step * 1e3:.2f} ms median "
          f"({step['median'] * 1e3:.2f} before, {step_after['median'] * 1e3:.2f} after)")
    print(f"checkpoint.every = {EVERY} for that MLP if written synchronously (an upper "
          f"bound), estimated from the medians: "
          f"{write_mlp * 1e3:.2f} ms per checkpoint every {EVERY * t_step * 1e3:.0f} ms of "
          f"training = {overhead:.2f} %; against the fastest block of steps "
          f"({t_fastest * 1e3:.2f} ms/step): {overhead_high:.2f} %")
    per_round = cadence["percent_per_round"]
    measured = statistics.median(per_round)
    verdict = "meets" if measured < TARGET_OVERHEAD else "MISSES"
    print(f"the trainer's path, measured side by side ({cadence['rounds']} pairs of "
          f"{EVERY}-step blocks, plain vs starting with a checkpoint written by the background "
          f"writer): median cost {measured:.2f} % of training time (per pair "
          + ", ".join(f"{v:.1f}" for v in per_round)
          + f" %): {verdict} the {TARGET_OVERHEAD:g} % aim")
    load = os.getloadavg()
    print(f"({time.perf_counter() - started:.0f} s; files under {base}; {cores} core(s), "
          f"load average {load[0]:.1f} at the end: on a shared machine the figures move)")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(
        created=datetime.now(UTC).isoformat(timespec="seconds"), host=platform.node(),
        machine=dict(cores=cores, cpu=platform.processor() or platform.machine(),
                     python=platform.python_version(), numpy=np.__version__, blas=blas),
        directory=str(base), cold_read=cold, load_average=os.getloadavg(),
        step=dict(model=SIZES, batch=BATCH, n_params=n_mlp, median_seconds=t_step,
                  before=step, after=step_after),
        sizes=results,
        overhead=dict(every=EVERY, write_seconds=write_mlp, step_seconds=t_step,
                      percent=overhead, fastest_step_seconds=t_fastest,
                      percent_vs_fastest_step=overhead_high, target_percent=TARGET_OVERHEAD,
                      side_by_side=cadence),
    ), indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
