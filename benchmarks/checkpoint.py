"""Time writing and reading a checkpoint, against plain NumPy files and a training step.

    .venv/bin/python benchmarks/checkpoint.py
    .venv/bin/python benchmarks/checkpoint.py --sizes 1e5 1e6 --reps 9 --dir /scratch/me

For n = 1e5, 1e6, 1e7 float32 parameters (and the MLP's 269,322): write_checkpoint (its
seal, a digest of the file's bytes, included) and read_checkpoint (cold page cache where the
kernel allows) against numpy.save/load of the same arrays, interleaved, medians; an fsync
of as many bytes and checksum() timed apart; one MLP training step; then the cost of
``checkpoint.every = 100`` through the BackgroundWriter, as side-by-side pairs of 100-step
blocks (aim: under 2 %). Saves bench-results/checkpoint.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from hessmpi.bench import tables

ROOT = Path(__file__).resolve().parent.parent
SIZES, BATCH, LR, EVERY, TARGET_OVERHEAD = [784, 256, 256, 10], 64, 0.01, 100, 2.0
perf = time.perf_counter


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


def fsync_seconds(path: Path, arrays: dict) -> float:
    """Seconds to fsync a file just written with the arrays' bytes, and its directory."""
    with open(path, "wb") as f:
        for a in arrays.values():
            f.write(a.tobytes())
        f.flush()
        t = perf()
        os.fsync(f.fileno())
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = perf() - t
    path.unlink()
    return seconds


def checkpoint_arrays(n: int) -> tuple[dict, dict]:
    """(arrays, attrs) shaped like the trainer's checkpoint for n parameters on 2 ranks."""
    from hessmpi import config

    rng = np.random.default_rng(0)
    arrays = {"params": rng.standard_normal(n, dtype=np.float32),
              "sampler": np.array([[3, 128], [3, 128]], dtype=np.int64),
              "optim/velocity": rng.standard_normal(n, dtype=np.float32)}
    attrs = {"step": 1000, "epoch": 3.5, "grad_evals": 1000, "wall_time": 12.5,
             "config": config.to_toml(config.defaults()), "mpi_size": 2,
             "hessmpi_version": "0.1.0", "signature": f'{{"n_params": {n}}}'}
    return arrays, attrs


def bench_size(n: int, reps: int, where: Path) -> dict:
    from hessmpi.checkpoint import checkpoint_path, checksum, read_checkpoint, write_checkpoint

    arrays, attrs = checkpoint_arrays(n)
    rec = {k: [] for k in ("write", "fsync", "checksum", "read", "np_save", "np_load")}
    cold = True
    npy = [where / f"np_{i}.npy" for i in range(len(arrays))]

    def timed(name, fn, *args):
        t = perf()
        out = fn(*args)
        rec[name].append(perf() - t)
        return out

    for rep in range(reps):
        path = checkpoint_path(where, rep)
        timed("write", write_checkpoint, path, arrays, attrs)
        rec["fsync"].append(fsync_seconds(where / "fsync.bin", arrays))
        timed("checksum", checksum, arrays)
        cold &= drop_cache(path)
        got, _ = timed("read", read_checkpoint, path)
        assert got["params"].tobytes() == arrays["params"].tobytes()
        timed("np_save", lambda: [np.save(f, a) for f, a in zip(npy, arrays.values(),
                                                                strict=True)])
        cold &= all([drop_cache(f) for f in npy])
        timed("np_load", lambda: [np.load(f) for f in npy])
        for f in (path, *npy):
            f.unlink()
    return dict(n=n, bytes=sum(a.nbytes for a in arrays.values()), reps=reps, cold_read=cold,
                seconds=rec, median={k: statistics.median(v) for k, v in rec.items()})


def mlp_stepper(seed: int):
    """(step(k) -> seconds for k MLP training steps, theta, the SGD optimizer)."""
    from hessmpi.models import DenseNet
    from hessmpi.optim import SGD

    model = DenseNet(SIZES, "relu", 1e-4, xp=np, dtype=np.float32)
    theta = model.init_params(0)
    grad = np.zeros_like(theta)
    opt = SGD(theta, momentum=0.9, weight_decay=0.0, nesterov=False)
    rng = np.random.default_rng(seed)
    x, y = rng.random((16 * BATCH, SIZES[0]), dtype=np.float32), rng.integers(0, 10, 16 * BATCH)

    def steps(k: int) -> float:
        t = perf()
        for i in range(k):
            rows = slice((i % 16) * BATCH, (i % 16 + 1) * BATCH)
            model.loss_grad(theta, x[rows], y[rows], grad)
            opt.update(theta, grad, LR)
        return perf() - t

    return steps, theta, opt


def bench_step(reps: int, steps: int) -> list[float]:
    """Seconds per MLP training step, one sample per block of ``steps`` steps."""
    run, _, _ = mlp_stepper(1)
    run(max(steps // 4, 5))
    return [run(steps) / steps for _ in range(reps)]


def bench_cadence(rounds: int, where: Path) -> dict:
    """What checkpoint.every = EVERY costs the trainer: ``rounds`` pairs of EVERY-step blocks,
    plain and starting with a checkpoint handed to the BackgroundWriter (copy of params and
    velocity, then write, checksum, fsync and prune on its thread while the steps go on),
    alternated; the cost is the median over pairs of (checkpointed - plain) / plain."""
    from hessmpi.checkpoint import BackgroundWriter, checkpoint_path

    run, theta, opt = mlp_stepper(2)
    _, attrs = checkpoint_arrays(len(theta))
    writer = BackgroundWriter(where, 3)

    def block(step: int, checkpoint: bool) -> float:
        t = perf()
        if checkpoint:
            arrays = {"params": theta.copy(), "sampler": np.zeros((2, 2), np.int64),
                      "optim/velocity": opt.velocity.copy()}
            writer.submit(checkpoint_path(where, step), arrays, {**attrs, "step": step})
        run(EVERY)
        if checkpoint:
            writer.wait()    # normally overlapped by the next block; counted here to be safe
        return perf() - t

    plain, ckpt = [], []
    for r in range(rounds + 1):              # round 0 warms up
        p, c = block(2 * r * EVERY, False), block((2 * r + 1) * EVERY, True)
        if r:
            plain.append(p)
            ckpt.append(c)
    return dict(rounds=rounds, plain_seconds=plain, checkpoint_seconds=ckpt,
                percent_per_round=[100 * (c - p) / p for c, p in zip(ckpt, plain,
                                                                      strict=True)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[1e5, 1e6, 1e7])
    p.add_argument("--reps", type=int, default=5, help="repetitions (3 at most for >= 1e7)")
    p.add_argument("--step-reps", type=int, default=5)
    p.add_argument("--step-steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--dir", type=Path, help="where to write (default: under bench-results/)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    started = perf()
    before = bench_step(args.step_reps, args.step_steps)
    n_mlp = sum(a * b + b for a, b in zip(SIZES[:-1], SIZES[1:], strict=True))
    base = args.dir or ROOT / "bench-results"
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-", dir=base) as tmp:
        results = [bench_size(n, min(args.reps, 3) if n >= 10**7 else args.reps, Path(tmp))
                   for n in sorted({int(s) for s in args.sizes} | {n_mlp})]
        cadence = bench_cadence(args.rounds, Path(tmp) / "cadence")
    after = bench_step(args.step_reps, args.step_steps)   # the machine is shared
    t_step, t_fast = statistics.median(before + after), min(before + after)
    rows = []
    for r in results:
        m, mb = r["median"], r["bytes"] / 1e6
        rows.append([f"{r['n']:,}", f"{mb:.1f}", f"{m['write'] * 1e3:.2f}",
                     f"{mb / m['write']:.0f}", f"{m['fsync'] / m['write']:.0%}",
                     f"{m['checksum'] / m['write']:.0%}", f"{m['np_save'] * 1e3:.2f}",
                     f"{m['write'] / m['np_save']:.1f}", f"{m['read'] * 1e3:.2f}",
                     f"{mb / m['read']:.0f}", f"{m['np_load'] * 1e3:.2f}",
                     f"{m['read'] / m['np_load']:.1f}", f"{m['write'] / t_step:.1f}",
                     f"{m['read'] / t_step:.1f}"])
    print(tables.table(["params", "MB", "write ms", "MB/s", "fsync", "csum", "np.save ms",
                        "ratio", "read ms", "MB/s", "np.load ms", "ratio", "wr/step",
                        "rd/step"], rows))
    cold = all(r["cold_read"] for r in results)
    print(f"\nwrite = write_checkpoint (HDF5 + BLAKE2b checksum + fsync of file and directory "
          f"+ rename); fsync (an fsync of as many freshly written bytes, timed apart) and csum"
          f": their shares of it. ratio: over numpy.save/numpy.load of the same arrays. Reads "
          f"from a {'cold' if cold else 'WARM'} page cache. wr/step, rd/step: in training "
          "steps.")
    write_mlp = next(r for r in results if r["n"] == n_mlp)["median"]["write"]
    overhead, overhead_fast = (100 * write_mlp / (EVERY * t) for t in (t_step, t_fast))
    print(f"training step, MLP {'-'.join(map(str, SIZES))} batch {BATCH} ({n_mlp:,} params, "
          f"loss_grad + SGD update): {t_step * 1e3:.2f} ms median "
          f"({statistics.median(before) * 1e3:.2f} before, "
          f"{statistics.median(after) * 1e3:.2f} after)")
    print(f"checkpoint.every = {EVERY} for that MLP if written synchronously (an upper bound): "
          f"{write_mlp * 1e3:.2f} ms per checkpoint every {EVERY * t_step * 1e3:.0f} ms of "
          f"training = {overhead:.2f} %; against the fastest block of steps: "
          f"{overhead_fast:.2f} %")
    per_round = cadence["percent_per_round"]
    measured = statistics.median(per_round)
    print(f"the trainer's path, measured side by side ({cadence['rounds']} pairs of "
          f"{EVERY}-step blocks, plain vs starting with a checkpoint written by the background "
          f"writer): median cost {measured:.2f} % of training time (per pair "
          + ", ".join(f"{v:.1f}" for v in per_round) + f" %): "
          f"{'meets' if measured < TARGET_OVERHEAD else 'MISSES'} the {TARGET_OVERHEAD:g} % "
          f"aim\n({perf() - started:.0f} s; files under {base}; load average "
          f"{os.getloadavg()[0]:.1f} at the end: on a shared machine the figures move)")
    path = tables.save("checkpoint", dict(
        directory=str(base), cold_read=cold, sizes=results,
        step=dict(sizes=SIZES, batch=BATCH, n_params=n_mlp, median_seconds=t_step,
                  before=before, after=after),
        overhead=dict(every=EVERY, write_seconds=write_mlp, percent=overhead,
                      percent_vs_fastest_step=overhead_fast, target_percent=TARGET_OVERHEAD,
                      side_by_side=cadence)), ROOT, args.out)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
