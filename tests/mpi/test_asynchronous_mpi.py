"""The asynchronous parameter server (optim.name asgd, dcasgd) in process, under
``mpiexec -n 2`` and ``-n 3``, against references written out by hand in numpy: sequential
SGD for one worker, the delay-compensated recursion for a replayed order of arrivals.

Rank 0 serves while the others compute, so the ranks do different things: every verdict is
made collective at the end of the test (tests/mpi/mpicheck.py), on COMM_WORLD, also by the
ranks a test leaves out of its run.
"""

from __future__ import annotations

import math
import signal
from collections import Counter

import numpy as np
import pytest
from harness import read_split, run_config
from mpi4py import MPI
from mpicheck import assert_all, check_all, raises_everywhere

from hessmpi.backend import make_backend
from hessmpi.checkpoint import checkpoint_path, list_checkpoints, read_checkpoint
from hessmpi.comm import Communicator
from hessmpi.data import Sampler, shard_bounds
from hessmpi.errors import RunFailed, RunStopped
from hessmpi.metrics import read_metrics
from hessmpi.models.dense import DenseNet
from hessmpi.trainer import make_run

pytestmark = pytest.mark.timeout(60)

MLP = ["model.name=mlp", "model.hidden=[5]", "train.batch_size=4", "train.seed=3"]


def first_ranks(comm, size: int) -> Communicator | None:
    """A Communicator over the first ``size`` ranks of ``comm``; None on the others."""
    sub = comm.comm.Split(0 if comm.rank < size else MPI.UNDEFINED, comm.rank)
    if sub == MPI.COMM_NULL:
        return None
    c = Communicator(sub)
    sub.Free()
    return c


def start(cfg, comm, out):
    b = cfg["backend"]
    return make_run(cfg, comm, make_backend(b["device"], b["dtype"], b["threads"]), out)


def worker_data(dataset, workers: int, cfg):
    """[(x, y, sampler)] of each worker (ranks 1..workers) as the run shards them, and the
    model of cfg, float as the run's dtype."""
    x, y, classes = read_split(dataset, "train")
    m, t = cfg["model"], cfg["train"]
    dtype = np.dtype(cfg["backend"]["dtype"])
    model = DenseNet([x.shape[1], *m["hidden"], classes], m["activation"], m["l2"], xp=np,
                     dtype=dtype)
    parts = []
    for k in range(workers):
        lo, hi = shard_bounds(len(y), k, workers, equal=True)
        parts.append((x[lo:hi].astype(dtype), y[lo:hi],
                      Sampler(hi - lo, t["batch_size"], t["seed"], k)))
    return model, parts


def gradient(model, theta, part):
    x, y, sampler = part
    rows = sampler.next()
    g = np.empty_like(theta)
    loss = float(model.loss_grad(theta, x[rows], y[rows], g))
    return loss, g


# ----- one worker, lambda = 0: sequential SGD ------------------------------------------------
@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_one_worker_asgd_is_sequential_sgd_bitwise(comm, shared_dir, dataset, dtype):
    steps, lr = 15, 0.3
    cfg = run_config(dataset, *MLP, "optim.name=asgd", f"optim.lr={lr}",
                     f"train.steps={steps}", "train.log_every=1", "train.eval_every=5",
                     f"backend.dtype={dtype}")
    sub = first_ranks(comm, 2)
    result = {}
    if sub is not None:
        run = start(cfg, sub, shared_dir / "run")
        result = dict(summary=run.run(), run=run)

    def check():
        if comm.rank != 0:
            return
        model, (part,) = worker_data(dataset, 1, cfg)
        theta = model.init_params(cfg["train"]["seed"])
        losses, thetas = [], []
        for _ in range(steps):                  # sequential SGD, by hand
            loss, g = gradient(model, theta, part)
            theta -= lr * g
            losses.append(loss)
            thetas.append(theta.copy())
        run = result["run"]
        assert run.theta.dtype == dtype and run.theta.tobytes() == theta.tobytes(), \
            "the server's parameters are not sequential SGD's bit for bit"
        _, cols = read_metrics(shared_dir / "run" / "metrics.h5")
        np.testing.assert_array_equal(cols["step"], np.arange(1, steps + 1))
        np.testing.assert_array_equal(cols["train_loss"], losses)
        np.testing.assert_array_equal(cols["grad_evals"], cols["step"])
        assert (cols["staleness_mean"] == 0).all() and (cols["staleness_max"] == 0).all()
        x_test, y_test, _ = read_split(dataset, "test")
        for i in (4, 9, 14):
            loss_sum, correct = model.evaluate(thetas[i], x_test.astype(dtype), y_test)
            assert cols["test_acc"][i] == correct / len(y_test)
            assert math.isclose(cols["test_loss"][i], loss_sum / len(y_test), rel_tol=1e-6)
        assert np.isnan(cols["test_acc"][0])
        assert run.staleness.tolist() == [steps] and run.discarded == 0

    check_all(comm, check)


# ----- a replayed order of arrivals: the compensation by hand --------------------------------
def replayed_reference(dataset, cfg, order, steps, *, lam0, adaptive, decay=0.95, eps=1e-7):
    """The server's recursion written out for workers 1..W taking turns as ``order`` says:
    (theta, backups, staleness counts, per-update staleness, pushes taken per rank)."""
    workers = max(order)
    model, parts = worker_data(dataset, workers, cfg)
    lr = cfg["optim"]["lr"]
    w = model.init_params(cfg["train"]["seed"])
    backup = {k: w.copy() for k in range(1, workers + 1)}
    fetched = dict.fromkeys(backup, 0)
    mean_square = np.zeros_like(w)
    stale = []
    for update in range(steps):
        k = order[update % len(order)]
        _, g = gradient(model, backup[k], parts[k - 1])
        if adaptive:
            mean_square = decay * mean_square + (1 - decay) * g * g
            lam = lam0 / np.sqrt(mean_square + eps)
        else:
            lam = lam0
        w = w - lr * (g + lam * g * g * (w - backup[k]))
        stale.append(update - fetched[k])
        backup[k], fetched[k] = w.copy(), update + 1
    taken = Counter(order[u % len(order)] for u in range(steps))
    return w, backup, Counter(stale), stale, taken


@pytest.mark.mpi(min_size=3)
@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "constant"])
@pytest.mark.parametrize("order", [(1, 2, 2), (2, 1, 1, 1)], ids=["1-2-2", "2-1-1-1"])
def test_compensation_under_a_replayed_order_matches_the_hand_computation(
        comm, shared_dir, dataset, adaptive, order):
    steps, lam0 = 17, (2.0 if adaptive else 5.0)
    sets = [*MLP, "optim.name=dcasgd", "optim.lr=0.3", f"optim.dc_lambda={lam0}",
            f"optim.dc_adaptive={str(adaptive).lower()}", f"optim.async_replay={list(order)}",
            f"train.steps={steps}", "train.log_every=3", "train.eval_every=0"]
    cfg = run_config(dataset, *sets)
    sub = first_ranks(comm, 3)
    result = {}
    if sub is not None:
        run = start(cfg, sub, shared_dir / "run")
        run.run()
        result["run"] = run

    def check():
        if comm.rank != 0:
            return
        run = result["run"]
        w, backup, counts, stale, taken = replayed_reference(
            dataset, cfg, order, steps, lam0=lam0, adaptive=adaptive)
        plain = replayed_reference(dataset, cfg, order, steps, lam0=0.0, adaptive=False)[0]
        # the compensation moved the run: a server that left it out would fail below
        assert np.linalg.norm(w - plain) > 1e-4 * np.linalg.norm(w)
        scale = np.abs(w).max()
        assert np.abs(run.theta - w).max() <= 1e-12 * scale, "parameters differ"
        for k, b in backup.items():
            assert np.abs(run.optimizer.backups[k - 1] - b).max() <= 1e-12 * scale, k
        assert run.staleness.tolist() == [counts[s] for s in range(max(counts) + 1)]
        assert max(counts) >= 2, "the order gives no delay"
        last = order[(steps - 1) % len(order)]      # its push ended the run: no other
        assert [run.received[k] for k in (1, 2)] == [taken[k] + (k != last) for k in (1, 2)]
        _, cols = read_metrics(shared_dir / "run" / "metrics.h5")
        rows = [stale[i:i + 3] for i in range(0, steps, 3)]
        np.testing.assert_array_equal(cols["staleness_mean"], [np.mean(r) for r in rows])
        np.testing.assert_array_equal(cols["staleness_max"], [max(r) for r in rows])

    check_all(comm, check)


# ----- free-running workers ------------------------------------------------------------------
@pytest.mark.mpi(min_size=2)
def test_no_push_is_lost(comm, shared_dir, dataset):
    """Every push a worker made was taken by the server: applied as one update each, or
    answered with the end (every worker but the one whose push was the last update)."""
    steps = 60
    delay = [0.0] + [0.002] * (comm.size - 2)          # one fast worker, the others slower
    cfg = run_config(dataset, *MLP, "optim.name=dcasgd", "optim.lr=0.1",
                     f"optim.async_delay={delay}", f"train.steps={steps}",
                     "train.log_every=7", "train.eval_every=0")
    run = start(cfg, comm, shared_dir / "run")
    run.run()
    pushes = comm.allgather(run.pushes)

    def check():
        if comm.rank != 0:
            return
        workers = comm.size - 1
        assert run.updates == steps and run.grad_evals == steps
        assert run.received[1:].tolist() == pushes[1:], (run.received, pushes)
        assert sum(pushes) == run.updates + run.discarded and run.discarded == workers - 1
        assert run.staleness.sum() == steps
        attrs, cols = read_metrics(shared_dir / "run" / "metrics.h5")
        assert attrs["pushes_discarded"] == workers - 1
        np.testing.assert_array_equal(attrs["staleness_histogram"], run.staleness)
        assert cols["staleness_max"].max() == len(run.staleness) - 1
        np.testing.assert_array_equal(cols["step"], [*range(7, steps, 7), steps])

    check_all(comm, check)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("who", ["server", "last worker"])
def test_a_signal_on_one_rank_checkpoints_and_stops_every_rank(comm, shared_dir, dataset, who):
    """The flag of a signal (as the handler sets it) on one rank: every rank raises
    RunStopped, the server's checkpoint holds the state at the update it stopped at."""
    cfg = run_config(dataset, *MLP, "optim.name=dcasgd", "optim.lr=0.1", "train.steps=500",
                     "train.log_every=1")
    run = start(cfg, comm, shared_dir / "run")
    if comm.rank == (0 if who == "server" else comm.size - 1):
        run.stop_signal = signal.SIGUSR1
    raises_everywhere(comm, RunStopped, run.run)

    def check():
        if comm.rank != 0:
            return
        if who == "server":                       # at its first wait, or after one update
            assert run.updates <= 1, run.updates
        else:                                     # the flagged push was the last applied
            assert run.received[comm.size - 1] == 1, run.received
        (step, path), *_ = list_checkpoints(shared_dir / "run")
        assert step == run.updates and path == checkpoint_path(shared_dir / "run", step)
        arrays, attrs = read_checkpoint(path)
        assert attrs["step"] == run.updates and attrs["grad_evals"] == run.updates
        assert arrays["optim/backups"].shape == (comm.size - 1, run.model.n_params)
        assert arrays["optim/mean_square"].shape == (run.model.n_params,)
        np.testing.assert_array_equal(arrays["params"], run.theta)
        assert read_metrics(shared_dir / "run" / "metrics.h5")[0]["status"] == "stopped"

    check_all(comm, check)


@pytest.mark.mpi(min_size=2)
def test_a_non_finite_loss_fails_every_rank(comm, shared_dir, dataset):
    cfg = run_config(dataset, *MLP, "optim.name=asgd", "optim.lr=1e8", "train.steps=500",
                     "train.max_loss_ratio=0", "train.log_every=1")
    run = start(cfg, comm, shared_dir / "run")
    error = raises_everywhere(comm, RunFailed, run.run)

    def check():
        if comm.rank != 0:
            return
        assert "training loss is" in str(error) and "pushed by worker rank" in str(error)
        attrs, cols = read_metrics(shared_dir / "run" / "metrics.h5")
        assert attrs["status"] == "failed" and np.isfinite(cols["train_loss"]).all()
        failed = sorted((shared_dir / "run").glob("failed_state_step_*.h5"))
        assert len(failed) == 1, failed
        state, _ = read_checkpoint(failed[0])
        assert any(np.array_equal(state["params"], b) for b in run.optimizer.backups)

    check_all(comm, check)
    assert_all(comm, True)
