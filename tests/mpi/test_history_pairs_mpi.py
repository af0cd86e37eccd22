"""History pairs (``optim.pairs = "history"``) on P ranks against a serial one-rank
reference on the union of the ranks' rows (run under ``mpiexec -n P python -m pytest
--with-mpi``).

A history pair is one global pair, s = the step taken and y = the change of the rank-averaged
gradient on the same global batch, so it does not depend on how the rows are split: P ranks
with equal shards (or equal batches) must take the same steps, to round-off, as one process
with the concatenated rows. The reference is a Secant on a Communicator over COMM_SELF,
computed in-process on every rank from rows gathered here (for the trainer: the dataset read
with h5py and batches rebuilt from the ranks' deterministic samplers). Parameters, pair
memory and Gram matrix must also be bitwise identical across the ranks. Every verdict is
collective (mpicheck), so all ranks assert the same thing.
"""

from __future__ import annotations

import hashlib
import json

import h5py
import numpy as np
import pytest
from mpi4py import MPI
from mpicheck import assert_all, check_all

from hessmpi import config
from hessmpi.backend import make_backend
from hessmpi.comm import Communicator
from hessmpi.data import Sampler, shard_bounds
from hessmpi.models.dense import DenseNet
from hessmpi.optim.secant import Secant, secant_options
from hessmpi.trainer import Run

pytestmark = pytest.mark.timeout(60)

LBFGS = dict(pairs="history", line_search="armijo", newton_lr=1.0, momentum=0.0,
             damping=0.0, h0="bb", max_step_ratio=1e4)
LR, STEPS, TOL = 0.5, 10, 1e-10


# ----- helpers -------------------------------------------------------------------------------
def options(**overrides) -> dict:
    o = config.defaults()["optim"] | {"name": "secant"}
    return secant_options(o | overrides)


def digest(a) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).digest()


def assert_same_on_every_rank(comm: Communicator, **arrays) -> None:
    for name, a in arrays.items():
        assert_all(comm, len(set(comm.allgather(digest(a)))) == 1,
                   f"{name} differs across ranks")


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / max(np.linalg.norm(b), 1e-300))


def shard(comm, rows=24, d=5, classes=3):
    """This rank's own rows: rank-seeded features and labels, so that the ranks' objectives
    differ (a missing average over ranks shows)."""
    rng = np.random.default_rng([21, comm.rank])
    x = rng.standard_normal((rows, d)) * (1.0 + 0.5 * comm.rank)
    w = np.random.default_rng(4).standard_normal((d, classes))
    y = np.argmax(x @ w + (1.0 + comm.rank) * rng.standard_normal((rows, classes)), axis=1)
    return x, y


def model_for(d=5, classes=3, l2=1e-2):
    return DenseNet([d, classes], "relu", l2, xp=np, dtype=np.float64)


def drive(opt, model, comm, theta, x, y, lr=LR):
    """One step as the trainer takes it: local gradient and loss, observe, one Allreduce of
    both (the mean over ranks), step with the global objective. Returns the StepInfo."""
    n = len(theta)
    buf = np.empty(n + 1)
    g = buf[:n]
    buf[n] = model.loss_grad(theta, x, y, g)
    opt.observe(theta, g, lr, x, y)
    comm.allreduce_sum_(buf)
    buf /= comm.size
    return opt.step(theta, g, lr, x, y, float(buf[n]))


def gathered(comm, x, y):
    """The ranks' rows concatenated in rank order, on every rank."""
    parts = comm.allgather((x, y))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def compare_ring(par: Secant, ser: Secant) -> list[str]:
    """What differs between the parallel and the serial optimizer's pair memory."""
    bad = []
    if (par.filled, par.next_slot, par.pending, par.steps) != (ser.filled, ser.next_slot,
                                                               ser.pending, ser.steps):
        bad.append(f"ring {par.state()['ring']} vs {ser.state()['ring']}")
    if par.W.shape != ser.W.shape:
        bad.append(f"W shape {par.W.shape} vs {ser.W.shape}")
        return bad
    for r in range(1, par.W.shape[0]):
        if rel(par.W[r], ser.W[r]) > TOL and np.linalg.norm(ser.W[r]) > 0:
            bad.append(f"W row {r}: rel {rel(par.W[r], ser.W[r]):.2e}")
    return bad


# ----- the optimizer on COMM_WORLD against one rank on the union -----------------------------
@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("memory", [3, 5])
def test_full_batch_equals_one_rank_on_the_union_of_the_shards(comm, memory):
    """Each rank's batch is its whole shard (full_batch): 10 steps of L-BFGS with history
    pairs on P ranks against one rank on the P shards' rows, free pairs on both."""
    x, y = shard(comm)
    x_all, y_all = gathered(comm, x, y)
    model = model_for()
    theta0 = 0.3 * np.random.default_rng(9).standard_normal(model.n_params)
    theta, ref_theta = theta0.copy(), theta0.copy()
    par = Secant(theta, model=model, comm=comm, draw_batch=None, seed=1,
                 opts=options(**LBFGS, memory=memory), full_batch=True)
    solo = Communicator(MPI.COMM_SELF)
    try:
        ser = Secant(ref_theta, model=model, comm=solo, draw_batch=None, seed=1,
                     opts=options(**LBFGS, memory=memory), full_batch=True)
        bad, reasons = [], []
        for t in range(STEPS):
            info = drive(par, model, comm, theta, x, y)
            ref = drive(ser, model, solo, ref_theta, x_all, y_all)
            reasons.append(info.reason)
            if (info.reason, info.forward_evals) != (ref.reason, ref.forward_evals):
                bad.append(f"step {t}: {info} vs serial {ref}")
            if rel(theta, ref_theta) > TOL:
                bad.append(f"step {t}: theta rel {rel(theta, ref_theta):.2e}")
            bad += [f"step {t}: {b}" for b in compare_ring(par, ser)]
            if par.grad_evals_per_step != 1.0:
                bad.append(f"step {t}: grad_evals_per_step {par.grad_evals_per_step}")
        assert_all(comm, not bad, "; ".join(bad[:4]))
        assert_all(comm, reasons[0] == "no_pairs" and reasons.count(None) >= STEPS - 2,
                   f"reasons {reasons}")
        assert_all(comm, par.filled == memory, f"filled {par.filled}")
        assert_same_on_every_rank(comm, theta=theta, W=par.W, gram=par.gram,
                                  velocity=par.velocity)
    finally:
        solo.comm.Free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("T", [1, 2])
def test_minibatch_equals_one_rank_on_the_union_of_the_batches(comm, T):
    """Batches of 6 of each rank's 24 rows, new each step: the pair of step t is measured on
    the global batch of step t, so P ranks equal one rank whose batch at step t is the
    concatenation of the ranks' batches (gathered here), probe_every T."""
    x, y = shard(comm)
    rng = np.random.default_rng([7, comm.rank])
    model = model_for()
    theta0 = 0.3 * np.random.default_rng(9).standard_normal(model.n_params)
    theta, ref_theta = theta0.copy(), theta0.copy()
    par = Secant(theta, model=model, comm=comm, draw_batch=None, seed=1,
                 opts=options(**LBFGS, memory=4, probe_every=T), full_batch=False)
    solo = Communicator(MPI.COMM_SELF)
    try:
        ser = Secant(ref_theta, model=model, comm=solo, draw_batch=None, seed=1,
                     opts=options(**LBFGS, memory=4, probe_every=T), full_batch=False)
        bad = []
        for t in range(STEPS):
            idx = rng.choice(len(y), 6, replace=False)
            xb, yb = x[idx], y[idx]
            xg, yg = gathered(comm, xb, yb)
            info = drive(par, model, comm, theta, xb, yb)
            ref = drive(ser, model, solo, ref_theta, xg, yg)
            if (info.reason, info.forward_evals) != (ref.reason, ref.forward_evals):
                bad.append(f"step {t}: {info} vs serial {ref}")
            if rel(theta, ref_theta) > TOL:
                bad.append(f"step {t}: theta rel {rel(theta, ref_theta):.2e}")
            bad += [f"step {t}: {b}" for b in compare_ring(par, ser)]
            want = 2.0 if t % T == 0 else 1.0
            if par.grad_evals_per_step != want:
                bad.append(f"step {t}: grad_evals_per_step {par.grad_evals_per_step}")
        assert_all(comm, not bad, "; ".join(bad[:4]))
        assert_all(comm, par.pending == ((STEPS - 1) % T == 0) and par.filled >= 3,
                   f"ring {par.state()['ring']}")
        assert_same_on_every_rank(comm, theta=theta, W=par.W, gram=par.gram,
                                  velocity=par.velocity)
    finally:
        solo.comm.Free()


# ----- the whole trainer ---------------------------------------------------------------------
def make_run(comm, path, out, *overrides) -> Run:
    cfg = config.load(None, [
        f"data.path={json.dumps(str(path))}", "backend.device=cpu", "backend.dtype=float64",
        "backend.threads=1", "model.name=softmax", "model.l2=1e-2", f"train.steps={STEPS}",
        "train.seed=4", "train.log_every=5", "train.eval_every=0", "optim.check_every=5",
        "optim.name=secant", "optim.pairs=history", "optim.line_search=armijo",
        "optim.newton_lr=1", "optim.momentum=0", "optim.damping=0", "optim.h0=bb",
        "optim.max_step_ratio=1e4", "optim.memory=5", f"optim.lr={LR}", *overrides])
    return Run(cfg, comm, make_backend("cpu", "float64", 1), out)


def train_rows(path, size):
    """The training rows the P equal shards cover (shard_bounds equal=True), from the file."""
    with h5py.File(path, "r") as f:
        x, y = f["train/x"][()].astype(np.float64), f["train/y"][()]
    return [(x[a:b], y[a:b]) for a, b in (shard_bounds(len(y), r, size, True)
                                          for r in range(size))]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("full_batch", [True, False], ids=["full-batch", "minibatch"])
def test_trainer_equals_a_serial_reference_on_the_same_rows(comm, shared_dir, dataset,
                                                            full_batch):
    """``Run`` with history pairs on P ranks, the batch the whole shard (61 // P rows) or 5
    rows: the final parameters equal one rank stepping on the same global batches, rebuilt
    from the ranks' samplers (seed, rank) on rows read from the file; gradient evaluations
    per rank are 1 per step at full batch and 2 below it (probe_every 1)."""
    shards = train_rows(dataset, comm.size)
    rows = len(shards[0][1])
    batch = rows if full_batch else 5
    run = make_run(comm, dataset, shared_dir / "out", f"train.batch_size={batch}")
    run.run()
    d, classes = shards[0][0].shape[1], int(max(s[1].max() for s in shards)) + 1
    model = model_for(d, classes)
    ref_theta = model.init_params(4)
    solo = Communicator(MPI.COMM_SELF)
    try:
        ser = Secant(ref_theta, model=model, comm=solo, draw_batch=None, seed=4,
                     opts=options(**LBFGS, memory=5), full_batch=full_batch)
        samplers = [Sampler(rows, batch, 4, r) for r in range(comm.size)]
        for _ in range(STEPS):
            idx = [s.next() for s in samplers]
            xg = np.concatenate([xs[i] for (xs, _), i in zip(shards, idx, strict=True)])
            yg = np.concatenate([ys[i] for (_, ys), i in zip(shards, idx, strict=True)])
            drive(ser, model, solo, ref_theta, xg, yg)
    finally:
        solo.comm.Free()
    opt = run.optimizer

    def check():
        assert opt.full_batch == full_batch
        assert rel(run.theta, ref_theta) < TOL, rel(run.theta, ref_theta)
        assert not compare_ring(opt, ser), compare_ring(opt, ser)
        assert run.grad_evals == STEPS * (1.0 if full_batch else 2.0), run.grad_evals
        assert opt.filled == 5 and opt.counts == ser.counts, (opt.counters(), ser.counters())

    check_all(comm, check)
    assert_same_on_every_rank(comm, theta=run.theta, W=opt.W, gram=opt.gram)
