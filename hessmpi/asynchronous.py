"""Asynchronous training with a parameter server: ASGD and DC-ASGD (``optim.name`` asgd,
dcasgd; Zheng et al. 2017).

Rank 0 is the server: it holds the parameters w and the optimizer
(:class:`~hessmpi.optim.dcasgd.DelayCompensation`), and writes every file (metrics,
checkpoints). Ranks 1..P-1 are the workers: worker k holds the (k-1)-th of P-1 equal shards
of the training rows and the sampler of rank k-1 of a synchronous run on P-1 ranks. The
workers never wait for each other:

- worker k receives w (its ``w_bak[k]``), draws its next minibatch, computes its gradient
  there and pushes it; then waits for the reply;
- the server takes the pushes in the order they arrive (or, in the test mode
  ``optim.async_replay``, in a fixed order), applies each at once as one update,
  w <- w - eta (g + lambda g*g*(w - w_bak[k])), and replies with the new w.

``train.steps`` counts the server's updates; the staleness of an update is the number of
updates applied between the worker's fetch and its push.

Messages (point to point, on preallocated byte buffers, no collective in the loop; one
receive at a time on the server, from any source):

========  ==============  ================================================================
tag       direction       content
========  ==============  ================================================================
PUSH      worker->server  ints [signal, epoch, position, pushes], floats [loss, gradient
                          seconds, epochs done], then the gradient (n,)
REPLY     server->worker  ints [kind, version], then for kind PARAMS the parameters (n,);
                          kinds FINISHED, STOPPED, FAILED end the worker (exit 0, 75, 1)
========  ==============  ================================================================

A worker's signal (SIGTERM, SIGUSR1) travels with its next push; the server's own stops the
wait for pushes. Either way the server applies nothing more, checkpoints, answers each
worker's next push with STOPPED, and every rank exits 75. A worker that raises ends the job
through the command line's MPI_Abort; one that dies is ended by the launcher; one that sends
nothing for ``optim.async_timeout`` seconds is named by the server, which then ends the job
(exit 1). Waiting ranks poll with short sleeps (MPICH's blocking waits spin and would take
the core from the computing ranks), which also lets signals through.

Asynchrony makes a run non-deterministic: which worker's gradient arrives first depends on
timing, so two runs (or a run and its resumed continuation) differ; with
``optim.async_replay`` the order is fixed and a run, resumed or not, is reproducible bit for
bit.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from mpi4py import MPI

from hessmpi import __version__
from hessmpi import config as config_mod
from hessmpi.backend import Backend
from hessmpi.checkpoint import BackgroundWriter, CheckpointError, checkpoint_path, write_checkpoint
from hessmpi.comm import Communicator
from hessmpi.data import Sampler, read_shard
from hessmpi.errors import RankLost, RunFailed, RunStopped, UsageError
from hessmpi.metrics import MetricsFile
from hessmpi.models import build_model
from hessmpi.objective import Objective
from hessmpi.optim.dcasgd import DelayCompensation
from hessmpi.optim.schedule import Schedule
from hessmpi.progress import Progress
from hessmpi.trainer import log, model_signature, prepare_output, run_attributes
from hessmpi.watch import Watch

PUSH, REPLY = 71, 72                                 # message tags
PARAMS, FINISHED, STOPPED, FAILED = 0, 1, 2, 3       # kinds of reply
PUSH_INTS, PUSH_FLOATS, REPLY_INTS = 4, 3, 2
#: Polling: tests without pause first, then sleeps doubling from PAUSE_MIN to PAUSE_MAX s.
SPINS, PAUSE_MIN, PAUSE_MAX = 50, 20e-6, 500e-6
#: A worker past its timeout is declared lost only if, this many seconds later, still no
#: message of it is waiting (a push being received at that instant is not a hang).
GRACE = 0.5


class Message:
    """One preallocated message: ``ints`` (int64), ``floats`` (float64) and ``payload`` (n,)
    of ``dtype``, views of the contiguous byte buffer ``raw`` (header first, so every view
    is aligned)."""

    def __init__(self, n: int, dtype, ints: int, floats: int = 0):
        head = 8 * (ints + floats)
        self.raw = np.zeros(head + n * np.dtype(dtype).itemsize, dtype=np.uint8)
        self.ints = self.raw[:8 * ints].view(np.int64)
        self.floats = self.raw[8 * ints:head].view(np.float64)
        self.payload = self.raw[head:].view(dtype)
        self.header_bytes = head



class Mirror:
    """A host payload (n,) and the array of the backend's module that computes with it:
    the same memory with NumPy; with CuPy a device array, copied by ``pull`` (host to
    device) and ``push`` (device to host)."""

    def __init__(self, xp, host: np.ndarray):
        self.host = host
        self.array = host if xp is np else xp.empty(host.shape, host.dtype)

    def pull(self) -> None:
        if self.array is not self.host:
            self.array.set(self.host)

    def push(self) -> None:
        if self.array is not self.host:
            self.array.get(out=self.host)


def copy_to_host(dst: np.ndarray, src) -> None:
    """``dst`` (host) <- ``src`` (an array of either module)."""
    if isinstance(src, np.ndarray):
        np.copyto(dst, src)
    else:
        src.get(out=dst)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this node runs (a zombie does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def processes_in_words(processes: list[tuple[str, int]], most: int = 8) -> str:
    """Which process each rank is (``processes``: (host, pid) by rank), for the messages
    that the launcher's own (naming a pid) must be matched with."""
    if len(processes) > most:
        return "the ranks' host:pid are the root attribute 'processes' of metrics.h5"
    return "pids " + " ".join(f"{rank}:{pid}" for rank, (_, pid) in enumerate(processes))


def wait(request: MPI.Request, status: MPI.Status | None = None, idle=None) -> bool:
    """Poll ``request`` until it completes (True). Between polls ``idle()`` is called: it may
    raise, or return True to give up (False is returned; the request stays pending). After
    SPINS polls the caller sleeps, doubling the pause up to PAUSE_MAX seconds."""
    spins, pause = 0, PAUSE_MIN
    while not request.Test(status):
        if idle is not None and idle():
            return False
        spins += 1
        if spins > SPINS:
            time.sleep(pause)
            pause = min(2 * pause, PAUSE_MAX)
    return True


@dataclass(frozen=True)
class Replay:
    """The test mode's schedule: ``order``, the worker ranks whose pushes the server takes,
    one per update, cyclically (others wait in MPI's queue); empty: as they arrive."""

    order: tuple[int, ...] = ()

    def source(self, update: int) -> int:
        """The rank whose push update number ``update`` (0-based) applies."""
        return self.order[update % len(self.order)] if self.order else MPI.ANY_SOURCE


def check_layout(opts, size: int) -> None:
    """The asynchronous options against the MPI size: UsageError naming the problem."""
    if size < 2:
        raise UsageError(f"optim.name = {opts.name!r} needs at least 2 ranks (rank 0 serves the "
                         f"parameters, the others compute gradients); this run has {size}: "
                         "launch it with mpiexec -n 2 or more")
    workers = range(1, size)
    stray = sorted({r for r in opts.async_replay if r not in workers})
    if stray:
        raise UsageError(f"optim.async_replay = {opts.async_replay} names rank(s) {stray}: the "
                         f"workers of {size} ranks are 1..{size - 1}")
    absent = [r for r in workers if opts.async_replay and r not in opts.async_replay]
    if absent:
        raise UsageError(f"optim.async_replay = {opts.async_replay} never takes a push of "
                         f"rank(s) {absent}, which would wait for ever: name every worker")
    if len(opts.async_delay) not in (0, 1, size - 1):
        raise UsageError(f"optim.async_delay = {opts.async_delay} has {len(opts.async_delay)} "
                         f"values: give one for every worker or one per worker ({size - 1})")


@dataclass
class Tally:
    """Sums over the updates since the last metrics row (seconds, bytes sent by the server,
    staleness)."""

    updates: int = 0
    loss: float = 0.0
    stale: int = 0
    stale_max: int = 0
    t_grad: float = 0.0
    t_comm: float = 0.0
    t_solve: float = 0.0
    bytes_sent: int = 0

    def mean(self, name: str) -> float:
        return getattr(self, name) / self.updates if self.updates else math.nan


class AsyncRun:
    """One rank's part of an asynchronous run (rank 0 the server, the others workers), with
    its run directory: built by every rank with the same ``cfg``, collectively (UsageError
    on every rank alike for bad input, before any work); ``run()`` trains and returns a
    summary dict on every rank (the server's figures; NaN on workers).

    ``resume``: (arrays, attrs) of a verified checkpoint. ``on_update``: if set, the server
    calls ``on_update(done, wall)`` after each update (a benchmark's snapshots of ``theta``).
    After ``run()``: ``pushes`` (a worker's pushes); on the server ``updates``,
    ``received`` (pushes taken per rank), ``discarded`` (pushes answered with an end) and
    ``staleness`` (counts by staleness).
    """

    def __init__(self, cfg: dict, comm: Communicator, backend: Backend, out: Path, *,
                 resume: tuple[dict, dict] | None = None):
        self.cfg, self.comm, self.backend, self.out = cfg, comm, backend, Path(out)
        self.opts = config_mod.options(cfg, "optim")
        comm.collectively(check_layout, self.opts, comm.size)
        self.server = comm.rank == 0
        self.workers = comm.size - 1
        self.local = Communicator(MPI.COMM_SELF)   # the rank's own evaluations: no collective
        xp, dtype = backend.xp, backend.dtype
        tcfg = cfg["train"]
        path, seed = cfg["data"]["path"], tcfg["seed"]

        def read():  # the server: every test row; worker k: train shard k-1 of P-1
            if self.server:
                return read_shard(path, "test", 0, 1, equal=False), None
            shard = read_shard(path, "train", comm.rank - 1, self.workers, equal=True)
            return shard, Sampler(len(shard.y), tcfg["batch_size"] or len(shard.y), seed,
                                  comm.rank - 1)

        shard, self.sampler = comm.collectively(read)
        self.model = build_model(cfg["model"], shard.x.shape[1], shard.n_classes, xp=xp,
                                 dtype=dtype)
        n = self.model.n_params
        self.signature = model_signature(cfg, shard.x.shape[1], shard.n_classes, n)
        self.processes = comm.allgather((socket.gethostname(), os.getpid()))
        self.stop_signal = 0
        self.on_update = None
        self.pushes = 0
        if self.server:
            self.x_test, self.y_test = xp.asarray(shard.x, dtype=dtype), xp.asarray(shard.y)
            self.objective = Objective(self.model, self.local)
            self.theta = xp.asarray(self.model.init_params(seed))
            dc = self.opts.name == config_mod.DCASGD
            self.optimizer = DelayCompensation(
                self.theta, self.workers, xp=xp, lam0=self.opts.dc_lambda if dc else 0.0,
                adaptive=dc and self.opts.dc_adaptive,
                decay=self.opts.dc_decay if dc and self.opts.dc_adaptive else 0.95,
                eps=self.opts.dc_epsilon if dc and self.opts.dc_adaptive else 1e-7)
            self.schedule = Schedule.from_config(cfg)
            self.replay = Replay(tuple(self.opts.async_replay))
            self.watch = Watch(max_loss_ratio=tcfg["max_loss_ratio"],
                               chance_window=tcfg["chance_window"],
                               n_classes=shard.n_classes)
            self.push = Message(n, dtype, PUSH_INTS, PUSH_FLOATS)
            self.grad = Mirror(xp, self.push.payload)
            self.replies = [Message(n, dtype, REPLY_INTS) for _ in range(self.workers)]
            self.sends = [MPI.REQUEST_NULL] * self.workers
            self.sent_at = [0.0] * self.workers
            self.positions = np.zeros((comm.size, 2), dtype=np.int64)   # (epoch, position)
            self.epochs = np.zeros(comm.size)
            self.received = np.zeros(comm.size, dtype=np.int64)
            self.staleness = np.zeros(1, dtype=np.int64)
            self.updates = self.discarded = 0
            self.grad_evals = 0.0
        else:
            x, y = xp.asarray(shard.x, dtype=dtype), xp.asarray(shard.y)
            self.objective = Objective(self.model, self.local, x, y, self.sampler,
                                       full_batch=self.sampler.batch_size == len(shard.y))
            delays = self.opts.async_delay
            self.delay = delays[0] if len(delays) == 1 else (
                delays[comm.rank - 1] if delays else 0.0)
        comm.collectively(prepare_output, comm, self.out, resume is not None)
        self.start_step = 0
        self.wall_offset = 0.0
        self.fetched_restored = False
        if resume is not None:
            comm.collectively(self.restore, *resume)
            if self.start_step >= tcfg["steps"]:
                raise UsageError(f"{out} already holds {self.start_step} steps; to continue, "
                                 f"--set train.steps=N with N > {self.start_step}")
        self.metrics = self.writer = None
        if self.server:
            self.writer = BackgroundWriter(self.out, cfg["checkpoint"]["keep"])
            attrs = run_attributes(cfg, comm, backend, n, shard.source)
            attrs["workers"] = self.workers
            attrs["processes"] = json.dumps({rank: f"{host}:{pid}" for rank, (host, pid)
                                             in enumerate(self.processes)})
            path = self.out / "metrics.h5"
            self.metrics = (MetricsFile.reopen(path, self.start_step, attrs) if resume
                            else MetricsFile(path, attrs))

    # ----- checkpoints ----------------------------------------------------------------------
    def checkpoint_state(self, wall: float) -> tuple[dict, dict]:
        """(arrays, attrs) of the server's state now: parameters, the optimizer's state
        (backups, fetch versions, MeanSquare), every worker's sampler position after its
        last applied push, the staleness counts and the pushes taken per rank."""
        def host(a):
            return np.array(self.backend.to_host(a), copy=True)

        arrays = {"params": host(self.theta), "sampler": self.positions.copy(),
                  "async/staleness": self.staleness.copy(), "async/epochs": self.epochs.copy(),
                  "async/received": self.received.copy()}
        arrays.update({f"optim/{k}": host(v) for k, v in self.optimizer.state().items()})
        first = self.watch.first_loss
        attrs = {"step": self.updates, "epoch": self.epoch, "grad_evals": self.grad_evals,
                 "forward_evals": 0, "curvature_evals": 0.0, "wall_time": wall,
                 "first_loss": math.nan if first is None else first,
                 "discarded": self.discarded, "config": config_mod.to_toml(self.cfg),
                 "mpi_size": self.comm.size, "hessmpi_version": __version__,
                 "signature": self.signature}
        return arrays, attrs

    def restore(self, arrays: dict, attrs: dict) -> None:
        """Load a verified checkpoint (CheckpointError if foreign). With the same number of
        ranks every worker continues from its sampler position and is sent its backup again
        (it recomputes the gradient it was computing when the run stopped); with another,
        the parameters and MeanSquare are kept, the backups dropped, the data re-sharded."""
        name = f"checkpoint of step {attrs.get('step')}"
        if attrs.get("signature") != self.signature:
            raise CheckpointError(f"{name} was written by a different model, data or "
                                  f"optimizer ({attrs.get('signature')}); this run is "
                                  f"{self.signature}")
        same = int(attrs["mpi_size"]) == self.comm.size
        self.start_step = int(attrs["step"])
        self.wall_offset = float(attrs["wall_time"])
        if not self.server:
            if same:
                epoch, position = arrays["sampler"][self.comm.rank]
            else:
                epoch, position = int(np.floor(attrs["epoch"])) + 1, 0
            self.sampler.restore(int(epoch), int(position))
            return
        if not same:
            log(f"warning: resuming on {self.comm.size} ranks a run checkpointed on "
                f"{attrs['mpi_size']}: parameters (and MeanSquare) restored, the workers' "
                "backups dropped (each fetches the parameters anew), the data re-sharded; "
                "the sample order changed")
        self.theta[...] = self.backend.xp.asarray(arrays["params"])
        state = {k.removeprefix("optim/"): v for k, v in arrays.items()
                 if k.startswith("optim/")}
        self.optimizer.load_state(state, same_layout=same)
        self.fetched_restored = same
        self.updates = self.start_step
        self.grad_evals = float(attrs["grad_evals"])
        self.discarded = int(attrs.get("discarded", 0))
        self.staleness = np.array(arrays["async/staleness"], dtype=np.int64)
        first = float(attrs.get("first_loss", math.nan))
        self.watch.first_loss = None if math.isnan(first) else first
        if same:
            self.positions[...] = arrays["sampler"]
            self.epochs[...] = arrays["async/epochs"]
            self.received[...] = arrays["async/received"]
        else:
            self.epochs[1:] = float(attrs["epoch"])

    @property
    def epoch(self) -> float:
        """Passes over its shard, the mean over the workers (as of their last applied push)."""
        return float(np.mean(self.epochs[1:]))

    def save_checkpoint(self, wall: float) -> Path:
        path = checkpoint_path(self.out, self.updates)
        self.writer.submit(path, *self.checkpoint_state(wall))
        return path

    def _finish_writing(self) -> None:
        try:
            self.writer.wait()
        except Exception as e:  # noqa: BLE001 - reported, not raised over the failure
            log(f"warning: the last checkpoint could not be written: {e}")

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum

    # ----- the run ------------------------------------------------------------------------
    def run(self) -> dict:
        """Train to ``train.steps`` server updates; returns steps, train_loss, test_loss,
        test_acc, wall_time (seconds). A signal on any rank: checkpoint, RunStopped on every
        rank. A failure the server sees (non-finite or diverged loss, collapse): RunFailed
        on every rank, the results file marked failed, the offending parameters in
        OUT/failed_state_step_N.h5. A worker past its timeout: RankLost on the server."""
        handlers = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            if not self.server:
                return self._work()
            try:
                return self._serve()
            except RunStopped:
                raise
            except RunFailed as e:
                self._finish_writing()
                if not isinstance(e, RankLost):
                    failed = self.out / f"failed_state_step_{self.updates + 1:09d}.h5"
                    write_checkpoint(failed, {"params": self.backend.to_host(
                        self.failed_params)}, {"step": self.updates + 1, "failure": str(e)})
                    log(f"the parameters at the failure are in {failed}")
                self.metrics.append([], status="failed", failure=str(e))
                raise
            except BaseException as e:
                self._finish_writing()
                self.metrics.record_crash(e)
                raise
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    # ----- the worker ---------------------------------------------------------------------
    def _work(self) -> dict:
        """Fetch, compute, push, until the server answers with an end."""
        comm, xp, n = self.comm, self.backend.xp, self.model.n_params
        dtype = self.backend.dtype
        reply = Message(n, dtype, REPLY_INTS)
        push = Message(n, dtype, PUSH_INTS, PUSH_FLOATS)
        theta, grad = Mirror(xp, reply.payload), Mirror(xp, push.payload)
        objective, sampler = self.objective, self.sampler
        wait(comm.irecv(reply.raw, source=0, tag=REPLY))
        while reply.ints[0] == PARAMS:
            theta.pull()
            objective.next_batch()
            before = objective.seconds
            loss = objective.local_gradient(theta.array, out=grad.array)
            seconds = objective.seconds - before
            if self.delay:
                time.sleep(self.delay)
            grad.push()
            self.pushes += 1
            push.ints[:] = (self.stop_signal, sampler.epoch, sampler.position, self.pushes)
            push.floats[:] = (loss, seconds, sampler.epochs_done)
            receive = comm.irecv(reply.raw, source=0, tag=REPLY)
            send = comm.isend(push.raw, dest=0, tag=PUSH)
            wait(receive)
            send.Wait()
        kind = int(reply.ints[0])
        if kind == STOPPED:
            raise RunStopped("stopped by the server after a signal")
        if kind == FAILED:
            raise RunFailed("the server ended the run")
        return dict(steps=int(reply.ints[1]), train_loss=math.nan, test_loss=math.nan,
                    test_acc=math.nan, wall_time=math.nan)

    # ----- the server ---------------------------------------------------------------------
    def _reply(self, rank: int, kind: int) -> None:
        """Answer worker ``rank``: PARAMS sends its backup (what it fetched) with the version
        it was fetched at; any other kind ends it."""
        k = rank - 1
        self.sends[k].Wait()          # the last reply to it has left (it pushed since)
        message = self.replies[k]
        if kind == PARAMS:
            copy_to_host(message.payload, self.optimizer.backups[k])
        message.ints[:] = (kind, self.optimizer.fetched[k] if kind == PARAMS else self.updates)
        self.sends[k] = self.comm.isend(message.raw, rank, REPLY, count=None if kind == PARAMS
                                        else message.header_bytes)
        self.sent_at[k] = time.perf_counter()

    def _receive(self, source: int) -> int | None:
        """The rank of the next push, now in ``self.push`` (from ``source``, or any); None
        if this rank's own signal came first (the receive stays posted)."""
        if self._pending is None:
            self._pending = self.comm.irecv(self.push.raw, source=source, tag=PUSH)
        started = time.perf_counter()
        try:
            done = wait(self._pending, self._status, idle=self._idle)
        except MPI.Exception as e:      # a worker died in the middle of a push
            cause = e.Get_error_string().splitlines()[-1].strip()
            raise RankLost(f"receiving a gradient failed ({cause}): {self._dead_workers()}; "
                           "ending every rank (the last checkpoint is kept)") from None
        self.tally.t_comm += time.perf_counter() - started
        if not done:
            return None
        self._pending = None
        return self._status.Get_source()

    def _dead_workers(self) -> str:
        """The workers on this node whose process is gone, in words."""
        host = socket.gethostname()
        dead = [f"rank {rank} (pid {pid})" for rank, (where, pid) in enumerate(self.processes)
                if rank and where == host and not process_alive(pid)]
        return ("worker " + ", ".join(dead) + " died" if dead else
                "a worker died or cannot be reached (the launcher names its pid; "
                + processes_in_words(self.processes) + ")")

    def _idle(self) -> bool:
        """While the server waits: give up on its own signal; RankLost for a worker that
        owes a push for longer than optim.async_timeout and has none waiting."""
        if self.stop_signal and self.ending is None:
            return True
        timeout = self.opts.async_timeout
        now = time.perf_counter()
        if not timeout or now < self._next_check:
            return False
        self._next_check = now + min(0.1, timeout / 10)
        for rank in sorted(self.active):
            silent = now - self.sent_at[rank - 1]
            if silent <= timeout or self.comm.iprobe(rank, PUSH):
                self._suspect.pop(rank, None)
                continue
            since = self._suspect.setdefault(rank, now)
            if now - since >= GRACE:
                raise RankLost(f"worker rank {rank} sent no gradient for {silent:.1f} s "
                               f"(optim.async_timeout = {timeout:g}): it hangs or its node is "
                               "lost; ending every rank (the last checkpoint is kept)")
        return False

    def _serve(self) -> dict:
        tcfg, opts = self.cfg["train"], self.opts
        steps, every = tcfg["steps"], self.cfg["checkpoint"]["every"]
        progress = Progress(steps, first=self.start_step)
        log(f"{self.cfg['model']['name']} with {self.model.n_params:,} parameters, "
            f"{opts.name} on {self.comm.size} ranks (rank 0 serves {self.workers} worker(s)"
            + (f", replaying the order {list(self.replay.order)}" if self.replay.order else "")
            + f"; {processes_in_words(self.processes)}"
            + f"), batch {tcfg['batch_size']} per worker, {self.backend.name}/"
            f"{self.backend.dtype}; "
            + (f"resuming at update {self.start_step}; " if self.start_step else "")
            + f"results in {self.out}")
        self.tally, self.ending, self._pending = Tally(), None, None
        self._status, self._next_check, self._suspect = MPI.Status(), 0.0, {}
        self.failure, self.failed_params = None, self.theta
        self.active = set(range(1, self.comm.size))
        for rank in sorted(self.active):
            if not self.fetched_restored:   # else: its backup again, as if never stopped
                self.optimizer.fetch(rank - 1, self.theta, self.updates)
            self._reply(rank, PARAMS)
        xp = self.backend.xp
        bytes_mark = self.comm.bytes_sent
        test_loss = test_acc = last_loss = math.nan
        checkpoint = None
        started = time.perf_counter() - self.wall_offset
        while self.active:
            source = MPI.ANY_SOURCE if self.ending else self.replay.source(self.updates)
            rank = self._receive(source)
            if rank is None:                        # this rank's own signal
                self.ending = STOPPED
                checkpoint = self.save_checkpoint(time.perf_counter() - started)
                continue
            self.received[rank] += 1
            if self.ending is not None:
                self._reply(rank, self.ending)
                self.active.discard(rank)
                self.discarded += 1
                continue
            t0 = time.perf_counter()
            k = rank - 1
            signum, epoch, position, _ = (int(v) for v in self.push.ints)
            loss, t_grad, epochs = (float(v) for v in self.push.floats)
            try:
                if not math.isfinite(loss):
                    raise RunFailed(f"the training loss is {loss} at step {self.updates + 1} "
                                    f"(pushed by worker rank {rank}; the run diverged: lower "
                                    "optim.lr)")
                self.watch.step(self.updates + 1, loss)
            except RunFailed as e:
                self.failure, self.failed_params = e, self.optimizer.backups[k]
                self.ending = FAILED
                self._reply(rank, FAILED)
                self.active.discard(rank)
                continue
            self.grad.pull()
            stale = self.optimizer.staleness(k, self.updates)
            self.optimizer.update(self.theta, self.grad.array, k, self.schedule(self.updates))
            self.updates += 1
            done = self.updates
            # the worker's next parameters (sent now, or after a resume if the run ends here)
            self.optimizer.fetch(k, self.theta, done)
            self.grad_evals += 1
            if stale >= len(self.staleness):
                self.staleness = np.concatenate([self.staleness, np.zeros(
                    stale + 1 - len(self.staleness), dtype=np.int64)])
            self.staleness[stale] += 1
            self.positions[rank] = epoch, position
            self.epochs[rank] = epochs
            last = done == steps
            if signum or self.stop_signal:
                self.ending = STOPPED
            answered = not last and self.ending is None
            if answered:                    # at once: the worker goes on while we log
                self._reply(rank, PARAMS)
            t = self.tally
            t.updates += 1
            t.loss += loss
            t.stale += stale
            t.stale_max = max(t.stale_max, stale)
            t.t_grad += t_grad
            t.t_solve += time.perf_counter() - t0
            wall = time.perf_counter() - started
            if self.on_update is not None:
                self.on_update(done, wall)
            if done % tcfg["log_every"] == 0 or last:
                evaluated = last or (tcfg["eval_every"] and done % tcfg["eval_every"] == 0)
                if evaluated:
                    test_loss, test_acc = self.objective.evaluate(self.theta, self.x_test,
                                                                  self.y_test)
                last_loss = t.mean("loss")
                t.bytes_sent, bytes_mark = self.comm.bytes_sent - bytes_mark, self.comm.bytes_sent
                row = {
                    "step": done, "epoch": self.epoch, "batch": tcfg["batch_size"] or math.nan,
                    "wall_time": wall,
                    "train_loss": last_loss, "grad_evals": self.grad_evals,
                    "forward_evals": 0, "curvature_evals": 0.0, "cg_iters": math.nan,
                    "hf_lambda": math.nan, "staleness_mean": t.mean("stale"),
                    "staleness_max": float(t.stale_max),
                    "grad_norm": float(xp.linalg.norm(self.grad.array)),
                    "step_norm": self.optimizer.last_step_norm, "fallback": 0,
                    "rank_kept": 0, "t_grad": t.mean("t_grad"), "t_comm": t.mean("t_comm"),
                    "t_solve": t.mean("t_solve"), "bytes_sent": round(t.mean("bytes_sent")),
                    "test_loss": test_loss if evaluated else math.nan,
                    "test_acc": test_acc if evaluated else math.nan,
                }
                self.tally = Tally()
                self.metrics.append([row], steps_done=done, staleness_histogram=self.staleness,
                                    pushes_discarded=self.discarded)
                progress.update(done, f"loss {last_loss:.4g} staleness {row['staleness_mean']:.2f}"
                                + (f" test_acc {test_acc:.4f}" if evaluated else ""))
                if evaluated:
                    try:
                        self.watch.evaluation(done, test_acc, last_loss)
                    except RunFailed as e:
                        if self.ending is None:
                            self.failure, self.ending = e, FAILED
            if last and self.ending is None:
                self.ending = FINISHED
            if (every and done % every == 0) or last or self.ending == STOPPED:
                checkpoint = self.save_checkpoint(time.perf_counter() - started)
            if not answered:
                self._reply(rank, PARAMS if self.ending is None else self.ending)
                if self.ending is not None:
                    self.active.discard(rank)
        wall = time.perf_counter() - started
        for request in self.sends:
            request.Wait()
        self.writer.wait()
        progress.close()
        self.metrics.append([], staleness_histogram=self.staleness,
                            pushes_discarded=self.discarded)
        if self.ending == FAILED:
            raise self.failure
        if self.ending == STOPPED:
            self.metrics.append([], status="stopped")
            raise RunStopped(f"stopped by a signal after step {self.updates}; checkpoint "
                             f"{checkpoint}; continue with: hessmpi train --resume {self.out} "
                             "(asynchronous: the continuation differs from a run that never "
                             "stopped)")
        self.metrics.append([], status="finished", wall_time_total=wall,
                            finished=datetime.now(UTC).isoformat(timespec="seconds"))
        return dict(steps=steps, train_loss=last_loss, test_loss=test_loss, test_acc=test_acc,
                    wall_time=wall)
