"""What the micro-benchmarks share to time things on a shared machine: clocks, medians,
whether other processes hold the cores, and the machine's limits (the matrix-product rate
and the streaming-read bandwidth) to put beside every figure."""

from __future__ import annotations

import os
import time

import numpy as np


def now() -> np.ndarray:
    """[wall s, CPU s of this thread]: the thread's CPU time leaves out the time other
    processes held the core (with one BLAS thread, the cost of the work itself)."""
    return np.array([time.perf_counter(), time.thread_time()])


def stats(values) -> dict:
    """median, q1, q3, min, max and the values of a sample."""
    v = np.asarray(list(values), dtype=np.float64)
    return dict(median=float(np.median(v)), q1=float(np.percentile(v, 25)),
                q3=float(np.percentile(v, 75)), min=float(v.min()), max=float(v.max()),
                values=v.tolist())


def run_delay() -> float:
    """Seconds this process's threads have been runnable but waiting for a CPU (the second
    field of /proc/self/task/*/schedstat); nan where the kernel does not say."""
    total = 0
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return float("nan")
    return total * 1e-9


def cpu_busy(seconds: float) -> float:
    """Fraction of all CPUs' time not idle over ``seconds`` (/proc/stat), or nan."""
    def sample():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]   # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return float("nan")
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_for_idle(limit: float, busy_at: float = 0.10, log=print) -> float:
    """Wait up to ``limit`` seconds for the CPUs to be less than ``busy_at`` busy with
    other work; returns the last busy fraction measured."""
    deadline = time.perf_counter() + limit
    busy = cpu_busy(0.5)
    if busy >= busy_at and limit > 0:
        log(f"the CPUs are {busy:.0%} busy with other work; waiting up to {limit:.0f} s ...")
        while busy >= busy_at and time.perf_counter() < deadline:
            busy = cpu_busy(1.0)
    return busy


def matmul_rate(n: int = 1024, reps: int = 7, inner: int = 3, seed: int = 0) -> list[float]:
    """FLOP/s of a float32 n x n x n ``np.matmul`` with the current BLAS threads, one
    sample per repetition of ``inner`` products: the peak the gradients are held to."""
    rng = np.random.default_rng(seed)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    c = np.empty_like(a)
    np.matmul(a, b, out=c)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            np.matmul(a, b, out=c)
        out.append(2 * n ** 3 * inner / (time.perf_counter() - t0))
    return out


def streams(nbytes: int = 256 << 20) -> dict:
    """Plain streaming reads of a float32 array of ``nbytes`` (larger than any cache):
    {name: function}; bytes / seconds of a call is the read bandwidth it reaches."""
    big = np.ones(nbytes // 4, dtype=np.float32)
    wide, ones = big.reshape(-1, 4096), np.ones(4096, dtype=np.float32)
    return {"numpy a.sum() (1 core)": big.sum, "BLAS sdot(a, a)": lambda: np.dot(big, big),
            "BLAS sgemv a @ ones": lambda: wide @ ones}


def read_bandwidth(nbytes: int = 256 << 20, reps: int = 5) -> list[float]:
    """Bytes/s of ``a.sum()`` over a float32 array of ``nbytes``, one sample a repetition."""
    read = streams(nbytes)["numpy a.sum() (1 core)"]
    read()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        read()
        out.append(nbytes / (time.perf_counter() - t0))
    return out


class Flusher:
    """Calling it writes ``nbytes`` (more than the last-level cache), evicting it."""

    def __init__(self, nbytes: int = 64 << 20):
        self.buf = np.ones(nbytes // 4, dtype=np.float32)

    def __call__(self, *_args) -> None:
        self.buf.fill(1.0)
