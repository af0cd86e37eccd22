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

import numpy as np
import pytest
from harness import build, counted, gathered, read_split, rel, run_config, start_run, step_on
from mpicheck import assert_all, assert_identical, check_all
from toymodels import rank_rows

from hessmpi.data import Sampler, shard_bounds
from hessmpi.models.dense import DenseNet
from hessmpi.objective import Objective

pytestmark = pytest.mark.timeout(60)

LBFGS = dict(pairs="history", line_search="armijo", newton_lr=1.0, momentum=0.0,
             damping=0.0, h0="bb", max_step_ratio=1e4)
LR, STEPS, TOL = 0.5, 10, 1e-10


# ----- helpers -------------------------------------------------------------------------------
def shard(comm):
    """This rank's own 24 rows (rank-dependent features and labels)."""
    return rank_rows(comm.rank, seed=21, label_seed=4, spread=0.5)


def model_for(d=5, classes=3, l2=1e-2):
    return DenseNet([d, classes], "relu", l2, xp=np, dtype=np.float64)


def make(model, theta, comm, *, full_batch, seed=1, **keys):
    """(Secant with L-BFGS history pairs and ``keys``, its Objective) on comm."""
    objective = Objective(model, comm, full_batch=full_batch)
    return build(theta, objective, seed=seed, **LBFGS, **keys), objective


def drive(opt, objective, theta, x, y, lr=LR):
    """One step as the trainer takes it on this rank's rows; (StepInfo, forward passes,
    gradient evaluations counted)."""
    with counted(objective) as used:
        info = step_on(opt, objective, theta, lr, x, y)
    return info, used["forward_evals"], used["grad_evals"]


def compare_ring(par, ser) -> list[str]:
    """What differs between the parallel and the serial optimizer's pair memory."""
    bad = []
    ring_par = (par.memory.filled, par.memory.next_slot, par.source.pending, par.steps)
    ring_ser = (ser.memory.filled, ser.memory.next_slot, ser.source.pending, ser.steps)
    if ring_par != ring_ser:
        bad.append(f"ring {ring_par} vs {ring_ser}")
    W, W_ser = par.memory.W, ser.memory.W
    if W.shape != W_ser.shape:
        bad.append(f"W shape {W.shape} vs {W_ser.shape}")
        return bad
    for r in range(1, W.shape[0]):
        if rel(W[r], W_ser[r]) > TOL and np.linalg.norm(W_ser[r]) > 0:
            bad.append(f"W row {r}: rel {rel(W[r], W_ser[r]):.2e}")
    return bad


def compare_steps(t, par_step, ser_step, theta, ref_theta, par, ser, want_evals) -> list[str]:
    """What differs at step t between P ranks and the serial reference; ``want_evals``: the
    gradient evaluations the step should count (None: as many as the reference's)."""
    (info, forward, evals), (ref, ref_forward, ref_evals) = par_step, ser_step
    want_evals = ref_evals if want_evals is None else want_evals
    bad = []
    if (info.reason, forward) != (ref.reason, ref_forward):
        bad.append(f"step {t}: {info}, {forward} forward vs serial {ref}, {ref_forward}")
    if rel(theta, ref_theta) > TOL:
        bad.append(f"step {t}: theta rel {rel(theta, ref_theta):.2e}")
    bad += [f"step {t}: {b}" for b in compare_ring(par, ser)]
    if evals != want_evals:
        bad.append(f"step {t}: {evals} gradient evaluations, not {want_evals}")
    return bad


# ----- the optimizer on COMM_WORLD against one rank on the union -----------------------------
@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("memory", [3, 5])
def test_full_batch_equals_one_rank_on_the_union_of_the_shards(comm, solo, memory):
    """Each rank's batch is its whole shard (full_batch): 10 steps of L-BFGS with history
    pairs on P ranks against one rank on the P shards' rows, free pairs on both."""
    x, y = shard(comm)
    x_all, y_all = gathered(comm, x, y)
    model = model_for()
    theta0 = 0.3 * np.random.default_rng(9).standard_normal(model.n_params)
    theta, ref_theta = theta0.copy(), theta0.copy()
    par, objective = make(model, theta, comm, full_batch=True, memory=memory)
    ser, ser_objective = make(model, ref_theta, solo, full_batch=True, memory=memory)
    bad, reasons = [], []
    for t in range(STEPS):
        par_step = drive(par, objective, theta, x, y)
        ser_step = drive(ser, ser_objective, ref_theta, x_all, y_all)
        reasons.append(par_step[0].reason)
        # at full batch the line search's trials are gradients, the accepted one the next
        # step's: as many evaluations as the reference's (its own gradient at step 0 only)
        bad += compare_steps(t, par_step, ser_step, theta, ref_theta, par, ser, None)
    assert_all(comm, not bad, "; ".join(bad[:4]))
    assert_all(comm, reasons[0] == "no_pairs" and reasons.count(None) >= STEPS - 2,
               f"reasons {reasons}")
    assert_all(comm, par.memory.filled == memory, f"filled {par.memory.filled}")
    assert_identical(comm, theta=theta, W=par.memory.W, gram=par.memory.gram,
                     velocity=par.velocity)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("T", [1, 2])
def test_minibatch_equals_one_rank_on_the_union_of_the_batches(comm, solo, T):
    """Batches of 6 of each rank's 24 rows, new each step: the pair of step t is measured on
    the global batch of step t, so P ranks equal one rank whose batch at step t is the
    concatenation of the ranks' batches (gathered here), probe_every T."""
    x, y = shard(comm)
    rng = np.random.default_rng([7, comm.rank])
    model = model_for()
    theta0 = 0.3 * np.random.default_rng(9).standard_normal(model.n_params)
    theta, ref_theta = theta0.copy(), theta0.copy()
    par, objective = make(model, theta, comm, full_batch=False, memory=4, probe_every=T)
    ser, ser_objective = make(model, ref_theta, solo, full_batch=False, memory=4,
                              probe_every=T)
    bad = []
    for t in range(STEPS):
        idx = rng.choice(len(y), 6, replace=False)
        xb, yb = x[idx], y[idx]
        xg, yg = gathered(comm, xb, yb)
        par_step = drive(par, objective, theta, xb, yb)
        ser_step = drive(ser, ser_objective, ref_theta, xg, yg)
        bad += compare_steps(t, par_step, ser_step, theta, ref_theta, par, ser,
                             2.0 if t % T == 0 else 1.0)
    assert_all(comm, not bad, "; ".join(bad[:4]))
    assert_all(comm, par.source.pending == ((STEPS - 1) % T == 0) and par.memory.filled >= 3,
               f"ring {par.state()['ring']}")
    assert_identical(comm, theta=theta, W=par.memory.W, gram=par.memory.gram,
                     velocity=par.velocity)


# ----- the whole trainer ---------------------------------------------------------------------
def train_rows(path, size):
    """The training rows the P equal shards cover (shard_bounds equal=True), from the file."""
    x, y, _ = read_split(path)
    return [(x[a:b], y[a:b]) for a, b in (shard_bounds(len(y), r, size, True)
                                          for r in range(size))]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("full_batch", [True, False], ids=["full-batch", "minibatch"])
def test_trainer_equals_a_serial_reference_on_the_same_rows(comm, solo, shared_dir, dataset,
                                                            full_batch):
    """``Run`` with history pairs on P ranks, the batch the whole shard (61 // P rows) or 5
    rows: the final parameters equal one rank stepping on the same global batches, rebuilt
    from the ranks' samplers (seed, rank) on rows read from the file; gradient evaluations
    per rank are 1 per step at full batch and 2 below it (probe_every 1)."""
    shards = train_rows(dataset, comm.size)
    rows = len(shards[0][1])
    batch = rows if full_batch else 5
    cfg = run_config(dataset, "model.name=softmax", "model.l2=1e-2", f"train.steps={STEPS}",
                     "train.seed=4", "train.log_every=5", "train.eval_every=0",
                     "optim.check_every=5", "optim.name=secant", "optim.pairs=history",
                     "optim.line_search=armijo", "optim.newton_lr=1", "optim.momentum=0",
                     "optim.damping=0", "optim.h0=bb", "optim.max_step_ratio=1e4",
                     "optim.memory=5", f"optim.lr={LR}", f"train.batch_size={batch}")
    run = start_run(cfg, comm, shared_dir / "out")
    run.run()
    d, classes = shards[0][0].shape[1], int(max(s[1].max() for s in shards)) + 1
    model = model_for(d, classes)
    ref_theta = model.init_params(4)
    ser, ser_objective = make(model, ref_theta, solo, full_batch=full_batch, seed=4,
                              memory=5)
    samplers = [Sampler(rows, batch, 4, r) for r in range(comm.size)]
    for _ in range(STEPS):
        idx = [s.next() for s in samplers]
        xg = np.concatenate([xs[i] for (xs, _), i in zip(shards, idx, strict=True)])
        yg = np.concatenate([ys[i] for (_, ys), i in zip(shards, idx, strict=True)])
        drive(ser, ser_objective, ref_theta, xg, yg)
    opt = run.optimizer

    def check():
        assert run.objective.full_batch == opt.source.full_batch == full_batch
        assert rel(run.theta, ref_theta) < TOL, rel(run.theta, ref_theta)
        assert not compare_ring(opt, ser), compare_ring(opt, ser)
        if full_batch:   # the trials (gradients, the accepted one adopted) and step 0's own
            trials = ser_objective.grad_evals - STEPS     # the reference adopts none
            assert run.objective.grad_evals == 1 + trials and run.objective.forward_evals == 0
        else:
            assert run.objective.grad_evals == STEPS * 2.0, run.objective.grad_evals
        assert opt.memory.filled == 5 and opt.counts == ser.counts, (opt.counters(),
                                                                     ser.counters())

    check_all(comm, check)
    assert_identical(comm, theta=run.theta, W=opt.memory.W, gram=opt.memory.gram)
