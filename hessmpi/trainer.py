"""The SPMD training loop: batch -> gradient -> one Allreduce -> optimizer step -> metrics.

Every rank runs :func:`train` with the same configuration. Decisions that must be the same
everywhere (stop on a non-finite loss, parameters drifting apart) are taken on reduced
values, so no rank takes a branch the others do not.
"""

from __future__ import annotations

import hashlib
import math
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from hessmpi import __version__
from hessmpi import config as config_mod
from hessmpi.backend import Backend
from hessmpi.comm import Communicator
from hessmpi.data import Sampler, read_shard
from hessmpi.errors import RunFailed, UsageError
from hessmpi.metrics import MetricsFile
from hessmpi.models import build_model
from hessmpi.optim import StepInfo, build_optimizer
from hessmpi.optim.schedule import learning_rate
from hessmpi.progress import Progress


def parameter_digest(theta) -> bytes:
    """A 16-byte hash of the parameter vector's bytes."""
    return hashlib.blake2b(np.ascontiguousarray(theta).tobytes(), digest_size=16).digest()


@dataclass
class Interval:
    """Sums over the steps since the last metrics row (seconds, bytes, counts)."""

    steps: int = 0
    t_grad: float = 0.0
    t_comm: float = 0.0
    t_solve: float = 0.0
    bytes_sent: int = 0

    def mean(self, name: str) -> float:
        return getattr(self, name) / max(self.steps, 1)


def prepare_output(comm: Communicator, out: Path) -> None:
    """Create the run directory on rank 0; refuse to overwrite an earlier run's results."""
    if comm.rank == 0:
        if (out / "metrics.h5").exists():
            raise UsageError(f"{out} already holds a run (metrics.h5); choose another --out")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create output directory {out}: {e.strerror}") from None


def evaluate(model, comm: Communicator, theta, x, y) -> tuple[float, float]:
    """(mean test cross-entropy, test accuracy) over every rank's test shard."""
    loss_sum, correct = model.evaluate(theta, x, y)
    totals = np.array([loss_sum, correct, len(y)], dtype=np.float64)
    comm.allreduce_sum_(totals)
    return totals[0] / totals[2], totals[1] / totals[2]


class Run:
    """One training run on this rank: data shards, model, optimizer, buffers, metrics file.

    Built by every rank with the same ``cfg``; raises UsageError on every rank alike for
    bad input. ``run()`` trains and returns a summary dict.
    """

    def __init__(self, cfg: dict, comm: Communicator, backend: Backend, out: Path):
        self.cfg, self.comm, self.backend, self.out = cfg, comm, backend, out
        xp, dtype = backend.xp, backend.dtype
        tcfg = cfg["train"]
        comm.collectively(prepare_output, comm, out)
        path = cfg["data"]["path"]
        train = comm.collectively(read_shard, path, "train", comm.rank, comm.size, equal=True)
        test = comm.collectively(read_shard, path, "test", comm.rank, comm.size, equal=False)
        self.sampler = comm.collectively(Sampler, len(train.y), tcfg["batch_size"],
                                    tcfg["seed"], comm.rank)
        self.x_train, self.y_train = xp.asarray(train.x, dtype=dtype), xp.asarray(train.y)
        self.x_test, self.y_test = xp.asarray(test.x, dtype=dtype), xp.asarray(test.y)
        self.model = build_model(cfg["model"], train.x.shape[1], train.n_classes, xp=xp,
                                 dtype=dtype)
        theta = self.model.init_params(tcfg["seed"])
        comm.bcast_(theta)
        self.theta = xp.asarray(theta)
        self.optimizer = build_optimizer(cfg["optim"], self.theta, model=self.model, comm=comm,
                                         draw_batch=self.next_batch, seed=tcfg["seed"])
        n = self.model.n_params
        self.buf = xp.zeros(n + 1, dtype=dtype)  # averaged gradient and loss: one Allreduce
        self.grad = self.buf[:n]
        self.grad_evals = 0
        self.metrics = None
        if comm.rank == 0:
            self.metrics = MetricsFile(out / "metrics.h5", {
                "hessmpi_version": __version__,
                "config": config_mod.to_toml(cfg),
                "mpi_size": comm.size,
                "mpi_library": comm.library_version(),
                "backend": backend.name,
                "device": backend.device,
                "dtype": str(dtype),
                "blas_threads": backend.threads,
                "host": socket.gethostname(),
                "n_params": n,
                "dataset_source": train.source,
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            })

    def next_batch(self):
        """This rank's next minibatch (x (B, d), y (B,)) from the deterministic sampler."""
        idx = self.sampler.next()
        return self.x_train[idx], self.y_train[idx]

    def step(self, step: int, interval: Interval) -> tuple[float, StepInfo]:
        """Optimizer step number ``step`` (0-based): returns the global minibatch objective
        at the parameters it started from, and what the optimizer reported."""
        comm, n, ocfg = self.comm, self.model.n_params, self.cfg["optim"]
        lr = learning_rate(step, lr=ocfg["lr"], schedule=ocfg["schedule"],
                           warmup_steps=ocfg["warmup_steps"], decay_every=ocfg["decay_every"],
                           decay_factor=ocfg["decay_factor"], min_lr=ocfg["min_lr"],
                           total_steps=self.cfg["train"]["steps"])
        xb, yb = self.next_batch()
        comm_before, bytes_before = comm.seconds, comm.bytes_sent
        t0 = time.perf_counter()
        self.buf[n] = self.model.loss_grad(self.theta, xb, yb, self.grad)
        t1 = time.perf_counter()
        t_probe = self.optimizer.observe(self.theta, self.grad, lr, xb, yb)
        comm.allreduce_sum_(self.buf)
        self.buf /= comm.size
        loss = float(self.buf[n])
        if not math.isfinite(loss):
            raise RunFailed(f"the training loss is {loss} at step {step + 1} "
                            "(the run diverged: lower optim.lr)")
        info = self.optimizer.step(self.theta, self.grad, lr, xb, yb)
        t2 = time.perf_counter()
        self.grad_evals += self.optimizer.grad_evals_per_step
        comm_time = comm.seconds - comm_before
        interval.steps += 1
        interval.t_grad += (t1 - t0) + t_probe
        interval.t_comm += comm_time
        interval.t_solve += (t2 - t1) - t_probe - comm_time
        interval.bytes_sent += comm.bytes_sent - bytes_before
        return loss, info

    def optimizer_counters(self) -> dict:
        """Root attributes for the optimizer's counters (fallback reasons), if it has any."""
        counters = getattr(self.optimizer, "counters", None)
        return {"fallback_reasons": counters()} if counters else {}

    def check_consistency(self, done: int) -> None:
        """Stop on every rank if the ranks' parameter vectors are not bitwise identical."""
        digests = self.comm.allgather(parameter_digest(self.backend.to_host(self.theta)))
        if len(set(digests)) != 1:
            raise RunFailed(f"parameters differ across ranks at step {done}: the ranks are "
                            "no longer in step (a bug; please report it)")

    def run(self) -> dict:
        """Train to ``train.steps``; returns steps, train_loss, test_loss, test_acc,
        wall_time (seconds). On RunFailed the metrics file is marked failed first."""
        try:
            return self._run()
        except RunFailed as e:
            if self.metrics is not None:
                self.metrics.append([], status="failed", failure=str(e))
            raise

    def _run(self) -> dict:
        tcfg, check_every = self.cfg["train"], self.cfg["optim"]["check_every"]
        steps = tcfg["steps"]
        progress = Progress(steps) if self.comm.rank == 0 else None
        if progress:
            print(f"hessmpi: {self.cfg['model']['name']} with {self.model.n_params:,} "
                  f"parameters, {self.cfg['optim']['name']} on {self.comm.size} rank(s), "
                  f"batch {tcfg['batch_size']} per rank, {self.backend.name}/"
                  f"{self.backend.dtype} with {self.backend.threads} BLAS thread(s); "
                  f"results in {self.out}", flush=True)
        interval = Interval()
        test_loss = test_acc = math.nan
        started = time.perf_counter()
        for step in range(steps):
            loss, info = self.step(step, interval)
            done = step + 1
            last = done == steps
            if check_every and (done % check_every == 0 or last):
                self.check_consistency(done)
            if not (done % tcfg["log_every"] == 0 or last):
                continue
            evaluated = last or (tcfg["eval_every"] and done % tcfg["eval_every"] == 0)
            if evaluated:
                test_loss, test_acc = evaluate(self.model, self.comm, self.theta,
                                               self.x_test, self.y_test)
            row = {
                "step": done, "epoch": self.sampler.epochs_done,
                "wall_time": time.perf_counter() - started, "train_loss": loss,
                "grad_evals": self.grad_evals,
                "grad_norm": float(self.backend.xp.linalg.norm(self.grad)),
                "step_norm": self.optimizer.last_step_norm, "fallback": info.fallback,
                "rank_kept": info.rank_kept, "t_grad": interval.mean("t_grad"),
                "t_comm": interval.mean("t_comm"), "t_solve": interval.mean("t_solve"),
                "bytes_sent": round(interval.mean("bytes_sent")),
                "test_loss": test_loss if evaluated else math.nan,
                "test_acc": test_acc if evaluated else math.nan,
            }
            interval = Interval()
            if self.metrics is not None:
                self.metrics.append([row], steps_done=done, **self.optimizer_counters())
                progress.update(done, f"loss {loss:.4g}"
                                + (f" test_acc {test_acc:.4f}" if evaluated else ""))
        wall = time.perf_counter() - started
        if self.metrics is not None:
            progress.close()
            self.metrics.append([], status="finished", wall_time_total=wall,
                                finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        return dict(steps=steps, train_loss=loss, test_loss=test_loss, test_acc=test_acc,
                    wall_time=wall)
