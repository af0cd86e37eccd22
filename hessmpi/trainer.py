"""The SPMD training loop: batch -> optimizer step on the distributed objective -> metrics
-> checkpoint.

Every rank builds a :class:`Run` with the same configuration and calls ``run()``.
Decisions that must be the same everywhere (stop on a non-finite loss or a signal,
parameters drifting apart) are taken on reduced values, so no rank takes a branch the
others do not.
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from hessmpi import __version__
from hessmpi import config as config_mod
from hessmpi.backend import Backend
from hessmpi.checkpoint import BackgroundWriter, CheckpointError, checkpoint_path, write_checkpoint
from hessmpi.comm import Communicator
from hessmpi.data import Sampler, overlap_rows, read_shard
from hessmpi.errors import NonFiniteLoss, RunFailed, RunStopped, UsageError
from hessmpi.metrics import DIAGNOSTICS, MetricsFile
from hessmpi.models import model_for, model_identity
from hessmpi.objective import Objective
from hessmpi.optim import StepInfo, build_optimizer, state_bytes
from hessmpi.optim.schedule import Schedule
from hessmpi.progress import Progress
from hessmpi.progressive import BatchTest
from hessmpi.watch import Watch


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


def prepare_output(comm: Communicator, out: Path, resuming: bool) -> None:
    """Create the run directory on rank 0; refuse to overwrite an earlier run's results."""
    if comm.rank == 0:
        if resuming:
            if not (out / "metrics.h5").is_file():
                raise UsageError(f"{out} holds no run to resume (no metrics.h5)")
            return
        if (out / "metrics.h5").exists():
            raise UsageError(f"{out} already holds a run (metrics.h5); choose another --out "
                             f"or continue it with --resume {out}")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create output directory {out}: {e.strerror}") from None


def shared_rows(cfg: dict, batch: int, shard: int) -> int:
    """O: rows each rank's consecutive batches share (``optim.pairs = "overlap"``; else 0).
    UsageError where there is nothing to share: a batch of the whole shard, or O < 1."""
    o = cfg["optim"]
    if o["name"] != "secant" or o["pairs"] != "overlap":
        return 0
    shared = overlap_rows(o["overlap"], batch)
    if batch == shard:
        raise UsageError(f"optim.pairs = 'overlap' is invalid with train.batch_size = {batch}"
                         f", each rank's whole shard of {shard} rows (full batch): use "
                         "optim.pairs = 'history'")
    if shared < 1:
        raise UsageError(f"optim.overlap = {o['overlap']} of train.batch_size = {batch} "
                         "is less than one row: raise either")
    return shared


def model_signature(cfg: dict, n_features: int, n_classes: int, n_params: int) -> str:
    """What a checkpoint must match to be loaded into this run: model, data shape, optimizer."""
    o = cfg["optim"]
    return json.dumps({"model": model_identity(cfg), "n_features": n_features,
                       "n_classes": n_classes, "n_params": n_params, "dtype":
                       cfg["backend"]["dtype"], "optim": o["name"]}, sort_keys=True)


def run_attributes(cfg: dict, comm: Communicator, backend: Backend, n_params: int,
                   dataset_source: str) -> dict:
    """The root attributes a run (new or resumed) writes into its metrics.h5."""
    return {
        "hessmpi_version": __version__,
        "config": config_mod.to_toml(cfg),
        "mpi_size": comm.size,
        "mpi_library": comm.library_version(),
        "backend": backend.name,
        "device": backend.device,
        "mpi_device_path": comm.device_path if backend.name == "cupy" else "host",
        "dtype": str(backend.dtype),
        "blas_threads": backend.threads,
        "host": socket.gethostname(),
        "n_params": n_params,
        "dataset_source": dataset_source,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def make_run(cfg: dict, comm: Communicator, backend: Backend, out: Path, *,
             resume: tuple[dict, dict] | None = None):
    """This rank's part of the run of ``cfg``: a :class:`Run` (the synchronous SPMD loop),
    or for the asynchronous methods (``optim.name`` asgd, dcasgd) a
    :class:`hessmpi.asynchronous.AsyncRun` (a parameter server and its workers). Either
    has ``run()`` and ``stop_signal``."""
    if cfg["optim"]["name"] in config_mod.ASYNCHRONOUS:
        from hessmpi.asynchronous import AsyncRun

        return AsyncRun(cfg, comm, backend, out, resume=resume)
    return Run(cfg, comm, backend, out, resume=resume)


class Training:
    """One rank's part of a training run, in memory: data shards, model, the distributed
    objective, the optimizer and its learning-rate schedule; it writes no file.

    Built by every rank with the same ``cfg``; raises UsageError on every rank alike for
    bad input. ``shards``: (train, test) :class:`~hessmpi.data.Shard` of this rank, if
    already read (a benchmark running many trainings reads them once). ``step(k)`` takes
    step k; ``evaluate()`` gives the test loss and accuracy; ``objective.full_value(theta)``
    the training objective over every training row.
    """

    def __init__(self, cfg: dict, comm: Communicator, backend: Backend, *,
                 shards: tuple | None = None):
        self.cfg, self.comm, self.backend = cfg, comm, backend
        xp, dtype = backend.xp, backend.dtype
        tcfg = cfg["train"]
        if shards is None:
            path = cfg["data"]["path"]
            shards = (comm.collectively(read_shard, path, "train", comm.rank, comm.size,
                                        equal=True),
                      comm.collectively(read_shard, path, "test", comm.rank, comm.size,
                                        equal=False))
        train, test = shards
        self.train_shard = train
        batch = tcfg["batch_size"] or len(train.y)
        self.sampler = comm.collectively(Sampler, len(train.y), batch, tcfg["seed"],
                                         comm.rank, overlap=shared_rows(cfg, batch,
                                                                        len(train.y)))
        x_train, y_train = xp.asarray(train.x, dtype=dtype), xp.asarray(train.y)
        self.x_test, self.y_test = xp.asarray(test.x, dtype=dtype), xp.asarray(test.y)
        self.model = comm.collectively(model_for, cfg["model"], train, xp=xp, dtype=dtype,
                                       seed=tcfg["seed"])
        theta = self.model.init_params(tcfg["seed"])
        comm.bcast_(theta)
        self.theta = xp.asarray(theta)
        full_batch = self.sampler.batch_size == len(train.y)   # equal shards: on every rank
        self.objective = Objective(self.model, comm, x_train, y_train, self.sampler,
                                   full_batch=full_batch)
        self.optimizer = build_optimizer(config_mod.options(cfg, "optim"), self.theta,
                                         self.objective, seed=tcfg["seed"])
        self.schedule = Schedule.from_config(cfg)
        o = cfg["optim"]
        if o["batch_test"] != "none":
            self.objective.batch_test = BatchTest(comm, xp, dtype, self.model.n_params,
                                                  k=o["batch_pieces"], theta=o["batch_theta"],
                                                  nu=o["batch_nu"])

    def grow_batch(self, global_rows: float) -> None:
        """Draw each rank's part of a global batch of at least ``global_rows`` rows from the
        next step on (never fewer rows than now, at most the whole shard)."""
        shard = self.sampler.rows
        per_rank = (shard if not math.isfinite(global_rows)
                    else min(shard, math.ceil(global_rows / self.comm.size)))
        if per_rank > self.sampler.batch_size:
            self.sampler.resize(per_rank)

    def step(self, step: int, interval: Interval | None = None) -> StepInfo:
        """Optimizer step number ``step`` (0-based) on this rank's next minibatch; the step's
        seconds, split into model evaluations, collectives and the rest, and its bytes are
        added to ``interval``. RunFailed on every rank if the loss is not finite."""
        comm, objective = self.comm, self.objective
        objective.next_batch()
        comm_before, bytes_before = comm.seconds, comm.bytes_sent
        eval_before = objective.seconds
        started = time.perf_counter()
        try:
            info = self.optimizer.step(self.theta, objective, self.schedule(step))
        except NonFiniteLoss as e:
            raise RunFailed(f"the training loss is {e.value} at step {step + 1} "
                            "(the run diverged: lower optim.lr)") from None
        if objective.batch_test is not None:
            self.grow_batch(objective.requested_batch)
        self.backend.synchronize()
        if interval is not None:
            elapsed = time.perf_counter() - started
            t_eval, t_comm = objective.seconds - eval_before, comm.seconds - comm_before
            interval.steps += 1
            interval.t_grad += t_eval
            interval.t_comm += t_comm
            interval.t_solve += elapsed - t_eval - t_comm
            interval.bytes_sent += comm.bytes_sent - bytes_before
        return info

    def evaluate(self) -> tuple[float, float]:
        """(mean test loss, test accuracy) over every rank's test rows; a collective."""
        return self.objective.evaluate(self.theta, self.x_test, self.y_test)


class Run(Training):
    """One training run on this rank with its run directory: a Training plus the results
    file, checkpoints, resume, signals and the consistency check.

    ``resume``: (arrays, attrs) of a verified checkpoint to continue from. ``run()`` trains
    and returns a summary dict.
    """

    def __init__(self, cfg: dict, comm: Communicator, backend: Backend, out: Path, *,
                 resume: tuple[dict, dict] | None = None):
        super().__init__(cfg, comm, backend)
        self.out = out
        tcfg = cfg["train"]
        comm.collectively(prepare_output, comm, out, resume is not None)
        train = self.train_shard
        self.signature = model_signature(cfg, train.x.shape[1], train.n_classes,
                                         self.model.n_params)
        self.start_step = 0
        self.wall_offset = 0.0
        self.stop_signal = 0      # set by SIGTERM/SIGUSR1 on this rank
        self.stop_requested = False  # set on every rank once any rank has a signal
        self.failed_at = 0
        self.watch = Watch(max_loss_ratio=tcfg["max_loss_ratio"],
                           chance_window=tcfg["chance_window"], n_classes=train.n_classes)
        if resume is not None:
            comm.collectively(self.restore, *resume)
            if self.start_step >= tcfg["steps"]:
                raise UsageError(f"{out} already holds {self.start_step} steps; to continue, "
                                 f"--set train.steps=N with N > {self.start_step}")
        self.metrics = None
        self.writer = BackgroundWriter(out, cfg["checkpoint"]["keep"])
        held = comm.max(state_bytes(self.optimizer))   # the largest part's rank
        if comm.rank == 0:
            attrs = {**run_attributes(cfg, comm, backend, self.model.n_params, train.source),
                     "exchange": self.objective.exchange.name, "state_bytes_per_rank": held,
                     "gradient_collective": self.objective.gradient_collective}
            path = out / "metrics.h5"
            self.metrics = (MetricsFile.reopen(path, self.start_step, attrs) if resume
                            else MetricsFile(path, attrs))

    # ----- checkpoints --------------------------------------------------------------------
    def checkpoint_state(self, step: int, wall: float) -> tuple[dict, dict] | None:
        """(arrays, attrs) of a checkpoint after ``step`` steps on rank 0, None elsewhere;
        a collective (every rank's sampler position)."""
        samplers = self.comm.allgather((self.sampler.epoch, self.sampler.position))
        optim_state = self.optimizer.state()   # sharded: gathers the parts on rank 0
        if self.comm.rank != 0:
            return None
        def host(a):  # a copy the background writer may keep while training goes on
            return np.array(self.backend.to_host(a), copy=True)

        arrays = {"params": host(self.theta), "sampler": np.array(samplers, dtype=np.int64)}
        arrays.update({f"optim/{k}": host(v) for k, v in optim_state.items()})
        arrays.update({f"objective/{k}": host(v) for k, v in self.objective.state().items()})
        attrs = {"step": step, "epoch": self.sampler.epochs_done,
                 "batch_rows": self.sampler.batch_size, **self.objective.counters(),
                 "wall_time": wall, "first_loss": self.watch.first_loss,
                 "config": config_mod.to_toml(self.cfg),
                 "mpi_size": self.comm.size, "hessmpi_version": __version__,
                 "signature": self.signature}
        return arrays, attrs

    def restore(self, arrays: dict, attrs: dict) -> None:
        """Load a verified checkpoint's state into this run (CheckpointError if foreign)."""
        name = f"checkpoint of step {attrs.get('step')}"
        if attrs.get("signature") != self.signature:
            raise CheckpointError(f"{name} was written by a different model, data or "
                                  f"optimizer ({attrs.get('signature')}); this run is "
                                  f"{self.signature}")
        xp = self.backend.xp
        self.theta[...] = xp.asarray(arrays["params"])
        state = {k.removeprefix("optim/"): v for k, v in arrays.items()
                 if k.startswith("optim/")}
        same_size = int(attrs["mpi_size"]) == self.comm.size
        self.optimizer.load_state(state, same_layout=same_size)
        if same_size:
            self.objective.load_state({k.removeprefix("objective/"): v
                                       for k, v in arrays.items()
                                       if k.startswith("objective/")})
        if same_size:
            epoch, position = arrays["sampler"][self.comm.rank]
        else:
            epoch, position = int(np.floor(attrs["epoch"])) + 1, 0
            if self.comm.rank == 0:
                log(f"warning: resuming on {self.comm.size} ranks a run checkpointed on "
                    f"{attrs['mpi_size']}: parameters and momentum restored (secant pairs that "
                    f"depend on how the rows are split, the workers' and overlap pairs, are "
                    f"dropped, history pairs kept), the data re-sharded; the "
                    f"sample order changed "
                    f"(from epoch {epoch})")
        self.sampler.restore(int(epoch), int(position))
        if self.objective.batch_test is not None:   # the batch it had grown to
            self.grow_batch(int(attrs["batch_rows"]) * int(attrs["mpi_size"]))
        self.start_step = int(attrs["step"])
        self.objective.restore_counters(attrs)
        self.watch.first_loss = attrs.get("first_loss")
        self.wall_offset = float(attrs["wall_time"])

    def save_checkpoint(self, step: int, wall: float) -> Path:
        """Start writing the checkpoint of ``step``: rank 0 copies the state and its
        background writer writes it; every rank must call this (it gathers the samplers)."""
        state = self.checkpoint_state(step, wall)
        path = checkpoint_path(self.out, step)
        if state is not None:
            self.writer.submit(path, *state)
        return path

    def _finish_writing(self) -> None:
        """On a failure: let the checkpoint in flight (the last good state) reach the disk;
        an error of its own is reported, not raised over the failure being handled."""
        try:
            self.writer.wait()
        except Exception as e:  # noqa: BLE001
            log(f"warning: the last checkpoint could not be written: {e}")

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum

    def step(self, step: int, interval: Interval | None = None) -> StepInfo:
        """Training's step, with this rank's stop signal sent along its gradient's
        Allreduce; ``stop_requested`` afterwards on every rank if any rank had one."""
        self.objective.stop_flag = self.stop_signal
        info = super().step(step, interval)
        self.stop_requested = self.objective.stop_requested
        return info

    def optimizer_counters(self) -> dict:
        """Root attributes for the optimizer's counters (fallback reasons), if it has any."""
        counters = self.optimizer.counters()
        return {"fallback_reasons": json.dumps(counters)} if counters else {}

    def check_consistency(self, done: int) -> None:
        """Stop on every rank if the ranks' parameter vectors are not bitwise identical."""
        digests = self.comm.allgather(parameter_digest(self.backend.to_host(self.theta)))
        if len(set(digests)) != 1:
            raise RunFailed(f"parameters differ across ranks at step {done}: the ranks are "
                            "no longer in step (a bug; please report it)")

    def run(self) -> dict:
        """Train from ``start_step`` to ``train.steps``; returns steps, train_loss, test_loss,
        test_acc, wall_time (seconds). SIGTERM or SIGUSR1 on any rank: checkpoint at the
        current step and raise RunStopped. On RunFailed the metrics file is marked failed
        and the offending parameters are written to OUT/failed_state_step_N.h5."""
        handlers = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            return self._run()
        except RunFailed as e:
            self._finish_writing()
            if self.metrics is not None:
                failed = self.out / f"failed_state_step_{self.failed_at:09d}.h5"
                write_checkpoint(failed, {"params": self.backend.to_host(self.theta)},
                                 {"step": self.failed_at, "failure": str(e)})
                self.metrics.append([], status="failed", failure=str(e))
                log(f"the parameters at the failure are in {failed}")
            raise
        except RunStopped:
            raise
        except BaseException as e:
            self._finish_writing()
            if self.metrics is not None:  # rank 0 itself failed: say so before MPI_Abort
                self.metrics.record_crash(e)
            raise
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _run(self) -> dict:
        tcfg, check_every = self.cfg["train"], self.cfg["optim"]["check_every"]
        every = self.cfg["checkpoint"]["every"]
        steps = tcfg["steps"]
        progress = Progress(steps, first=self.start_step) if self.comm.rank == 0 else None
        growing = self.objective.batch_test is not None
        if progress:
            log(f"{self.cfg['model']['name']} with {self.model.n_params:,} parameters, "
                f"{self.cfg['optim']['name']} on {self.comm.size} rank(s), batch "
                f"{tcfg['batch_size']} per rank"
                + (" (grown by the inner-product test)" if growing else "")
                + f", {self.backend.name}/{self.backend.dtype} with "
                f"{self.backend.threads} BLAS thread(s); "
                + (f"resuming at step {self.start_step}; " if self.start_step else "")
                + f"results in {self.out}")
        interval = Interval()
        test_loss = test_acc = math.nan
        started = time.perf_counter() - self.wall_offset
        for step in range(self.start_step, steps):
            self.failed_at = step + 1
            info = self.step(step, interval)
            done = step + 1
            self.watch.step(done, info.loss)
            last = done == steps
            if check_every and (done % check_every == 0 or last):
                self.check_consistency(done)
            if done % tcfg["log_every"] == 0 or last:
                evaluated = last or (tcfg["eval_every"] and done % tcfg["eval_every"] == 0)
                if evaluated:
                    test_loss, test_acc = self.evaluate()
                row = {
                    "step": done, "epoch": self.sampler.epochs_done,
                    "batch": self.objective.batch_rows * self.comm.size,
                    "wall_time": time.perf_counter() - started, "train_loss": info.loss,
                    "grad_evals": self.objective.grad_evals,
                    "forward_evals": self.objective.forward_evals,
                    "curvature_evals": self.objective.curvature_evals,
                    **{k: info.diagnostics.get(k, math.nan) for k in DIAGNOSTICS},
                    "grad_norm": self.objective.grad_norm(),
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
                    progress.update(done, f"loss {info.loss:.4g}"
                                    + (f" batch {row['batch']:,}" if growing else "")
                                    + (f" test_acc {test_acc:.4f}" if evaluated else ""))
                if evaluated:
                    self.watch.evaluation(done, test_acc, info.loss)
            if (every and done % every == 0) or last or self.stop_requested:
                path = self.save_checkpoint(done, time.perf_counter() - started)
            if self.stop_requested and not last:
                self.writer.wait()
                if self.metrics is not None:
                    progress.close()
                    self.metrics.append([], status="stopped")
                raise RunStopped(f"stopped by a signal after step {done}; checkpoint {path}; "
                                 f"continue with: hessmpi train --resume {self.out}")
        wall = time.perf_counter() - started
        self.writer.wait()
        if self.metrics is not None:
            progress.close()
            self.metrics.append([], status="finished", wall_time_total=wall,
                                finished=datetime.now(UTC).isoformat(timespec="seconds"))
        return dict(steps=steps, train_loss=info.loss, test_loss=test_loss, test_acc=test_acc,
                    wall_time=wall)


def log(message: str) -> None:
    """A line from hessmpi on standard output (callers make sure only rank 0 speaks)."""
    print(f"hessmpi: {message}", flush=True)
