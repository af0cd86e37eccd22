"""Time one data-parallel training step of the MLP 784-256-256-10, split into its parts.

    .venv/bin/python benchmarks/step_time.py            (what `make bench` runs)
    .venv/bin/python benchmarks/step_time.py --ranks 1 2 --reps 7 --steps 200

The parent process launches itself under mpiexec (``--worker``) once per rank count. Each
worker does what hessmpi/trainer.py does each step -- gather a batch, ``model.loss_grad``
into the first n entries of the (n+2) buffer [gradient, loss, stop flag],
``Communicator.allreduce_sum_`` of that buffer, divide by the rank count, ``SGD.step`` -- and
times every part. Interleaved with the step
repetitions it times the gradient's own 8 matrix products alone (same shapes, transposes,
threads, and ranks running at once), which is the rate the gradient is measured against.
Each rank uses BLAS threads = cores / ranks (threadpoolctl), chosen as hessmpi.cli does.

Prints a table and writes every figure, per rank and per repetition, to
bench-results/step_time.json. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench-results" / "step_time.json"
REPO_DATA = ROOT / "data" / "mnist-t10k.h5"
SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist-t10k"
MNIST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
MNIST_TRAIN_ROWS = 8000  # the ../shared/data convention: first 8,000 of t10k train

SIZES = [784, 256, 256, 10]
ACTIVATION, L2, BATCH, SEED = "relu", 1e-4, 64, 0
LR, MOMENTUM = 0.01, 0.9
PEAK_N = 1024                # the square float32 matmul of the peak-rate reference
BANDWIDTH_BYTES = 256 << 20  # the array that the memory-bandwidth reference reads

TARGET_RATIO = 0.70          # gradient GFLOP/s >= 70% of its matmuls' own GFLOP/s
TARGET_COMM_SHARE = 0.10     # Allreduce < 10% of the step at 2 ranks
BUSY_WARN = 0.10             # CPUs busier than this before a run: the figures are suspect
QUIET_RUN_DELAY = 0.05       # a repetition is disturbed when some rank's threads waited for a
                             # CPU (runnable, not running) for more than this x its wall time


def gradient_flops(sizes: list[int], batch: int) -> dict:
    """Exact matmul FLOPs of one loss_grad: forward x@W_l, weight gradients a_l^T delta,
    input gradients delta W_l^T for every layer but the first (2 per multiply-add)."""
    layers = list(zip(sizes[:-1], sizes[1:], strict=True))
    forward = sum(2 * batch * fi * fo for fi, fo in layers)
    weight_grads = forward
    input_grads = sum(2 * batch * fi * fo for fi, fo in layers[1:])
    return dict(forward=forward, weight_grads=weight_grads, input_grads=input_grads,
                total=forward + weight_grads + input_grads)


# ----- worker: one MPI rank ----------------------------------------------------------------

def run_delay() -> float:
    """Seconds that this process's threads have spent runnable but waiting for a CPU (the
    second field of /proc/self/task/*/schedstat), or nan where the kernel does not say."""
    total = 0
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return float("nan")
    return total * 1e-9


def load_train(rank: int, size: int) -> tuple[np.ndarray, np.ndarray, str, bool]:
    """This rank's equal shard of a real training split, else random inputs of the right
    shape: (x, y, description, real)."""
    from hessmpi.data import read_shard, shard_bounds

    if REPO_DATA.is_file():
        shard = read_shard(REPO_DATA, "train", rank, size, equal=True)
        return shard.x, shard.y, f"{REPO_DATA.relative_to(ROOT)}: {shard.source}", True
    images, labels = (SHARED_MNIST / name for name in MNIST_FILES)
    if images.is_file() and labels.is_file():
        from hessmpi.importers import mnist

        (x, y), _, _ = mnist(images, labels, n_train=MNIST_TRAIN_ROWS)
        start, stop = shard_bounds(len(y), rank, size, equal=True)
        return (x[start:stop], y[start:stop],
                f"MNIST t10k IDX files in {SHARED_MNIST} via hessmpi.importers.mnist "
                f"(first {MNIST_TRAIN_ROWS} rows, the train split), equal shards", True)
    rng = np.random.default_rng([SEED, rank])
    rows = MNIST_TRAIN_ROWS // size
    return (rng.random((rows, SIZES[0]), dtype=np.float32),
            rng.integers(0, SIZES[-1], rows),
            f"RANDOM inputs (uniform [0,1) pixels, random labels): neither {REPO_DATA} nor "
            f"{SHARED_MNIST} exists", False)


def rank_blas_threads(world) -> int:
    """BLAS threads of this rank as hessmpi.cli / hessmpi.backend choose them: the cores the
    node offers the job (union of the local ranks' CPU affinities) shared evenly by the
    local ranks, never more than the rank's own affinity set."""
    from mpi4py import MPI

    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        affinities = node.allgather(sorted(os.sched_getaffinity(0)))
        local = node.Get_rank()
    finally:
        node.Free()
    union = set().union(*map(set, affinities))
    return max(1, min(len(affinities[local]), len(union) // len(affinities)))


def worker(args) -> None:
    from mpi4py import MPI
    from threadpoolctl import threadpool_limits

    from hessmpi.comm import Communicator
    from hessmpi.data import Sampler
    from hessmpi.models import DenseNet
    from hessmpi.optim.sgd import SGD

    comm = Communicator(MPI.COMM_WORLD)
    threads = rank_blas_threads(MPI.COMM_WORLD)
    threadpool_limits(limits=threads, user_api="blas")
    xp, dtype = np, np.dtype(np.float32)
    x_host, y_host, source, real = load_train(comm.rank, comm.size)
    x_train, y_train = xp.asarray(x_host, dtype=dtype), xp.asarray(y_host)

    model = DenseNet(SIZES, ACTIVATION, L2, xp=xp, dtype=dtype)
    n = model.n_params
    theta = model.init_params(SEED)
    comm.bcast_(theta)
    theta = xp.asarray(theta)
    opt = SGD(theta, momentum=MOMENTUM, weight_decay=0.0, nesterov=False)
    # one Allreduce of [gradient, loss, stop flag], as hessmpi.trainer.Run.step does
    buf = xp.zeros(n + 2, dtype=dtype)
    grad = buf[:n]
    sampler = Sampler(len(y_train), BATCH, SEED, comm.rank)
    perf = time.perf_counter

    def steps(k: int) -> dict:
        """k training steps exactly as Run.step; mean seconds per step of each part."""
        t_batch = t_grad = t_comm = t_avg = t_upd = 0.0
        loss = 0.0
        delay = run_delay()
        start = perf()
        for _ in range(k):
            t0 = perf()
            idx = sampler.next()
            xb, yb = x_train[idx], y_train[idx]
            t1 = perf()
            buf[n] = model.loss_grad(theta, xb, yb, grad)
            buf[n + 1] = 0.0  # the stop flag
            t2 = perf()
            comm.allreduce_sum_(buf)
            t3 = perf()
            xp.divide(buf, comm.size, out=buf)  # the trainer's buf /= size
            loss = float(buf[n])
            t4 = perf()
            opt.step(theta, grad, LR, xb, yb)
            t5 = perf()
            t_batch += t1 - t0
            t_grad += t2 - t1
            t_comm += t3 - t2
            t_avg += t4 - t3
            t_upd += t5 - t4
        wall = perf() - start
        delay = run_delay() - delay
        if not np.isfinite(loss):
            raise SystemExit(f"step_time: the training loss is {loss}: lower LR")
        return dict(batch=t_batch / k, grad=t_grad / k, allreduce=t_comm / k,
                    average=t_avg / k, update=t_upd / k, wall=wall / k,
                    steps_run_delay=delay / wall, loss=loss)

    # The gradient's 8 matmuls on real activations and output sensitivities, with the same
    # transposes, allocations and out= targets as DenseNet._forward / _backward.
    layers = model.views(theta)
    (w0, b0), (w1, b1), (w2, b2) = layers
    idx = sampler.next()
    xb, yb = x_train[idx], y_train[idx]
    a1 = xp.maximum(xb @ w0 + b0, 0)
    a2 = xp.maximum(a1 @ w1 + b1, 0)
    logits = a2 @ w2 + b2
    p = xp.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[xp.arange(BATCH), yb] -= 1
    d3 = p / BATCH
    d2 = (d3 @ w2.T) * (a2 > 0)
    d1 = (d2 @ w1.T) * (a1 > 0)
    ref_grad = xp.zeros(n, dtype=dtype)
    (g0, _), (g1, _), (g2, _) = model.views(ref_grad)
    matmul = xp.matmul

    def matmuls(k: int) -> tuple[float, float]:
        """Seconds per set of the 8 matmuls; run delay (see run_delay) / wall time."""
        delay = run_delay()
        start = perf()
        for _ in range(k):
            matmul(xb, w0)
            matmul(a1, w1)
            matmul(a2, w2)
            matmul(a2.T, d3, out=g2)
            matmul(d3, w2.T)
            matmul(a1.T, d2, out=g1)
            matmul(d2, w1.T)
            matmul(xb.T, d1, out=g0)
        wall = perf() - start
        return wall / k, (run_delay() - delay) / wall

    abuf = xp.zeros_like(buf)

    def allreduce_alone(k: int) -> float:
        """The Allreduce of the step's buffer right after a Barrier: transfer and reduction
        without the wait for the slowest rank's gradient."""
        total = 0.0
        for _ in range(k):
            comm.barrier()
            t0 = perf()
            comm.allreduce_sum_(abuf)
            total += perf() - t0
        return total / k

    # warm-up, then repetitions; ranks start each block together (a Barrier), so at 2 ranks
    # the matmul reference runs under the same contention as the gradient does.
    warm = perf()
    steps(args.warmup)
    matmuls(max(args.warmup // 2, 1))
    allreduce_alone(max(args.warmup // 2, 1))
    # a busy machine can make a step 10x slower: shorten the repetitions to fit the budget
    per_step = comm.max((perf() - warm) / args.warmup)
    k = args.steps
    if per_step * k * args.reps > args.budget:
        k = max(20, int(args.budget / (per_step * args.reps)))
    reps = []
    for _ in range(args.reps):
        comm.barrier()
        rep = steps(k)
        comm.barrier()
        rep["matmuls"], rep["matmuls_run_delay"] = matmuls(k)
        rep["allreduce_alone"] = allreduce_alone(max(k // 2, 10))
        reps.append(rep)

    # context: peak rate of one large square matmul, and memory bandwidth of a read-and-sum
    rng = np.random.default_rng([SEED, comm.rank])
    a = rng.standard_normal((PEAK_N, PEAK_N), dtype=np.float32)
    b = rng.standard_normal((PEAK_N, PEAK_N), dtype=np.float32)
    c = np.empty_like(a)
    np.matmul(a, b, out=c)
    peak = []
    comm.barrier()
    for _ in range(7):
        t0 = perf()
        for _ in range(3):
            np.matmul(a, b, out=c)
        peak.append(2 * PEAK_N**3 * 3 / (perf() - t0))
    del a, b, c
    big = np.ones(BANDWIDTH_BYTES // 4, dtype=np.float32)
    big.sum()
    bandwidth = []
    comm.barrier()
    for _ in range(5):
        t0 = perf()
        big.sum()
        bandwidth.append(big.nbytes / (perf() - t0))
    del big

    mine = dict(rank=comm.rank, threads=threads, reps=reps, peak_matmul_flops=peak,
                read_sum_bytes_per_s=bandwidth)
    everyone = comm.allgather(mine)
    if comm.rank == 0:
        from threadpoolctl import threadpool_info

        out = dict(ranks=comm.size, data_source=source, real_data=real, n_params=n,
                   steps_per_rep=k,
                   allreduce_bytes=buf.nbytes,
                   mpi_library=comm.library_version(),
                   blas=[{k: i.get(k) for k in ("internal_api", "version", "architecture",
                                                 "num_threads", "threading_layer")}
                         for i in threadpool_info() if i.get("user_api") == "blas"],
                   per_rank=everyone)
        Path(args.result).write_text(json.dumps(out))


# ----- parent: launch the workers, summarise, print, save -------------------------------------

def mpiexec_command() -> list[str]:
    """HESSMPI_MPIEXEC (the Makefile exports it), else the mpiexec beside this Python."""
    launcher = os.environ.get("HESSMPI_MPIEXEC")
    if launcher:
        return shlex.split(launcher)
    return [str(Path(sys.executable).parent / "mpiexec")]


def cpu_busy(seconds: float) -> float:
    """Fraction of all CPUs' time spent not idle over ``seconds`` (from /proc/stat), or nan."""
    def sample():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return float("nan")
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_for_idle(limit: float) -> float:
    """Wait up to ``limit`` seconds for other processes to leave the CPUs (< 10% busy);
    returns the last busy fraction measured."""
    deadline = time.perf_counter() + limit
    busy = cpu_busy(0.5)
    if busy >= BUSY_WARN and limit > 0:
        print(f"step_time: the CPUs are {busy:.0%} busy with other work; waiting up to "
              f"{limit:.0f} s for them to quieten ...", flush=True)
        while busy >= BUSY_WARN and time.perf_counter() < deadline:
            busy = cpu_busy(1.0)
    return busy


def launch(ranks: int, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="hessmpi-bench-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [*mpiexec_command(), "-n", str(ranks), sys.executable, str(Path(__file__).resolve()),
               "--worker", "--result", str(result), "--reps", str(args.reps),
               "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--budget", str(args.budget)]
        proc = subprocess.run(cmd, cwd=ROOT, timeout=args.timeout, check=False)
        if proc.returncode != 0 or not result.is_file():
            raise SystemExit(f"step_time: the {ranks}-rank worker failed "
                             f"(exit {proc.returncode}): {shlex.join(cmd)}")
        return json.loads(result.read_text())


def stats(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return dict(median=float(np.median(v)), min=float(v.min()), max=float(v.max()),
                values=[float(x) for x in v])


def summarise(raw: dict, flops: dict) -> dict:
    """Per repetition, average each part over the ranks (they move in lockstep through the
    Allreduce); then median and range over the repetitions."""
    per_rank = raw["per_rank"]
    n_reps = len(per_rank[0]["reps"])
    parts = ("batch", "grad", "allreduce", "average", "update", "wall", "matmuls",
             "allreduce_alone")

    def over_ranks(name, rep):
        return float(np.mean([r["reps"][rep][name] for r in per_rank]))

    series = {p: [over_ranks(p, i) for i in range(n_reps)] for p in parts}
    for name in ("steps_run_delay", "matmuls_run_delay"):
        series[name] = [max(r["reps"][i][name] for r in per_rank) for i in range(n_reps)]
    quiet = [not max(series["steps_run_delay"][i], series["matmuls_run_delay"][i])
             > QUIET_RUN_DELAY for i in range(n_reps)]
    series["step"] = [series["batch"][i] + series["grad"][i] + series["allreduce"][i]
                      + series["average"][i] + series["update"][i] for i in range(n_reps)]
    series["other"] = [series["batch"][i] + series["average"][i] for i in range(n_reps)]
    series["grad_gflops"] = [flops["total"] / t / 1e9 for t in series["grad"]]
    series["matmul_gflops"] = [flops["total"] / t / 1e9 for t in series["matmuls"]]
    series["ratio"] = [m / g for m, g in zip(series["matmuls"], series["grad"], strict=True)]
    series["allreduce_share"] = [c / s for c, s in
                                 zip(series["allreduce"], series["step"], strict=True)]
    peak = [float(np.median(r["peak_matmul_flops"])) for r in per_rank]
    bw = [float(np.median(r["read_sum_bytes_per_s"])) for r in per_rank]
    summary = {k: stats(v) for k, v in series.items()}
    summary["quiet_reps"] = quiet
    summary["reliable"] = 2 * sum(quiet) > n_reps
    summary["samples_per_s"] = raw["ranks"] * BATCH / summary["step"]["median"]
    summary["threads_per_rank"] = per_rank[0]["threads"]
    summary["peak_matmul_gflops_per_rank"] = [p / 1e9 for p in peak]
    summary["peak_matmul_gflops_best_per_rank"] = [max(r["peak_matmul_flops"]) / 1e9
                                                   for r in per_rank]
    summary["read_sum_gb_per_s_per_rank"] = [b / 1e9 for b in bw]
    return summary


def us(s: dict) -> str:
    return f"{s['median'] * 1e6:7.0f} [{s['min'] * 1e6:.0f}-{s['max'] * 1e6:.0f}]"


def report(results: dict) -> None:
    flops = results["flops"]
    runs = results["runs"]
    first = runs[0]["raw"]
    print()
    print(f"hessmpi step time: DenseNet {'-'.join(map(str, SIZES))} ({first['n_params']:,} "
          f"parameters), {ACTIVATION}, l2 {L2:g}, float32, batch {BATCH} per rank, SGD "
          f"momentum {MOMENTUM}")
    print(f"data: {first['data_source']}")
    blas = first["blas"][0] if first["blas"] else {}
    print(f"machine: {results['machine']['cores']} cores ({results['machine']['cpu']}), "
          f"numpy {np.__version__}, {blas.get('internal_api')} {blas.get('version')} "
          f"({blas.get('architecture')}), {first['mpi_library']}")
    done = sorted({run["raw"]["steps_per_rep"] for run in runs})
    print(f"{results['reps']} repetitions x {'/'.join(map(str, done))} steps after "
          f"{results['warmup']} warm-up steps; times are per step in microseconds, "
          "median [min-max over repetitions], mean over ranks")
    if done != [results["steps"]]:
        print(f"  (shortened from {results['steps']} steps to fit --budget "
              f"{results['budget']:g} s: the machine was slow)")
    print()
    print("ranks thr |   step               gradient           Allreduce        "
          "update         other*       | samples/s  quiet**")
    for run in runs:
        s = run["summary"]
        print(f"{run['ranks']:5d} {s['threads_per_rank']:3d} | {us(s['step'])}  "
              f"{us(s['grad'])}  {us(s['allreduce'])}  {us(s['update'])}  "
              f"{us(s['other'])} | {s['samples_per_s']:9.0f}  {sum(s['quiet_reps'])}/"
              f"{len(s['quiet_reps'])}")
    print("  * other = batch gather x[idx], y[idx] + averaging buf /= size + loss read-back")
    print(f"  ** repetitions in which no rank's threads waited for a CPU more than "
          f"{QUIET_RUN_DELAY:.0%} of the wall time (run delay, /proc/self/task/*/schedstat); "
          "with half or fewer quiet, the verdicts below are marked UNRELIABLE")
    print()
    print(f"gradient matmul FLOPs per step: {flops['total'] / 1e6:.2f} M (forward "
          f"{flops['forward'] / 1e6:.2f} M, weight grads {flops['weight_grads'] / 1e6:.2f} M, "
          f"input grads {flops['input_grads'] / 1e6:.2f} M)")
    print("ranks |  gradient GFLOP/s     its 8 matmuls alone  ratio             "
          f"matmuls alone (us)   target ratio >= {TARGET_RATIO:.2f}")
    for run in runs:
        s = run["summary"]
        g, m, r = s["grad_gflops"], s["matmul_gflops"], s["ratio"]
        verdict = "met" if r["median"] >= TARGET_RATIO else "NOT met"
        if not s["reliable"]:
            verdict += " (UNRELIABLE: machine busy)"
        print(f"{run['ranks']:5d} | {g['median']:6.1f} [{g['min']:.1f}-{g['max']:.1f}]"
              f"   {m['median']:6.1f} [{m['min']:.1f}-{m['max']:.1f}]"
              f"   {r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}]"
              f"   {us(s['matmuls'])}   {verdict}")
    print("  (per rank; at 2 ranks both ranks run at once, gradient and reference alike)")
    print()
    for run in runs:
        s = run["summary"]
        sh = s["allreduce_share"]
        line = (f"Allreduce at {run['ranks']} rank(s): {sh['median'] * 100:.1f}% of the step "
                f"[{sh['min'] * 100:.1f}-{sh['max'] * 100:.1f}%]; alone after a Barrier "
                f"{s['allreduce_alone']['median'] * 1e6:.0f} us "
                f"({first['allreduce_bytes'] / 1e6:.2f} MB)")
        if run["ranks"] > 1:
            verdict = "met" if sh["median"] < TARGET_COMM_SHARE else "NOT met"
            if not s["reliable"]:
                verdict += " (UNRELIABLE: machine busy)"
            line += f"; target < {TARGET_COMM_SHARE:.0%}: {verdict}"
        print(line)
    print()
    print("context (per rank; ranks measured at once):")
    for run in runs:
        s = run["summary"]
        peak = s["peak_matmul_gflops_per_rank"]
        bw = s["read_sum_gb_per_s_per_rank"]
        print(f"  {run['ranks']} rank(s) x {s['threads_per_rank']} thread(s): float32 "
              f"{PEAK_N}^3 matmul {', '.join(f'{p:.1f}' for p in peak)} GFLOP/s (median; best "
              f"{', '.join(f'{p:.1f}' for p in s['peak_matmul_gflops_best_per_rank'])}), "
              f"sum {sum(peak):.1f}; read-and-sum of {BANDWIDTH_BYTES >> 20} MiB "
              f"{', '.join(f'{b:.1f}' for b in bw)} GB/s, sum {sum(bw):.1f} GB/s")
    busy = [run["busy_before"] for run in runs]
    if any(not b < BUSY_WARN for b in busy):
        print(f"\nWARNING: other processes kept the CPUs {max(busy):.0%} busy just before a "
              "run: on this 2-core machine the figures above are then inflated and noisy; "
              "rerun on a quiet machine.")
    if not first["real_data"]:
        print("\nWARNING: random inputs were used; the data files were not found (see above).")


def parent(args) -> None:
    started = time.perf_counter()
    flops = gradient_flops(SIZES, BATCH)
    runs = []
    for ranks in args.ranks:
        busy = wait_for_idle(args.wait_idle)
        print(f"step_time: {ranks} rank(s) (CPUs {busy:.0%} busy with other work "
              "just before) ...", flush=True)
        raw = launch(ranks, args)
        runs.append(dict(ranks=ranks, busy_before=busy, summary=summarise(raw, flops),
                         raw=raw))
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    results = dict(
        benchmark="step_time", date=datetime.now(UTC).isoformat(timespec="seconds"),
        host=platform.node(), model=dict(sizes=SIZES, activation=ACTIVATION, l2=L2,
                                         dtype="float32"),
        batch_per_rank=BATCH, reps=args.reps, steps=args.steps, warmup=args.warmup,
        budget=args.budget,
        machine=dict(cores=len(os.sched_getaffinity(0)), cpu=cpu, python=platform.python_version(),
                     numpy=np.__version__),
        flops=flops,
        targets=dict(gradient_over_matmul_rate=TARGET_RATIO,
                     allreduce_share_at_2_ranks=TARGET_COMM_SHARE),
        runs=runs)
    report(results)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nsaved {RESULTS.relative_to(ROOT)} ({time.perf_counter() - started:.0f} s in all)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2],
                    help="rank counts to run (default: 1 2)")
    ap.add_argument("--reps", type=int, default=7, help="repetitions (default 7)")
    ap.add_argument("--steps", type=int, default=200, help="steps per repetition (default 200)")
    ap.add_argument("--warmup", type=int, default=50, help="warm-up steps (default 50)")
    ap.add_argument("--budget", type=float, default=40,
                    help="seconds of timed repetitions per rank count; on a busy machine the "
                         "repetitions are shortened to fit (default 40)")
    ap.add_argument("--wait-idle", type=float, default=30,
                    help="seconds to wait for a quiet machine before each run (default 30)")
    ap.add_argument("--timeout", type=float, default=300,
                    help="seconds before a worker launch is abandoned (default 300)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
