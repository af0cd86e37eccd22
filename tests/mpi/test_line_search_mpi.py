"""The Armijo line search (ALGORITHM.md s.8) and the deflated variant (s.7) on P ranks
(run under ``mpiexec -n P python -m pytest --with-mpi``).

Checks: a NaN in one rank's shard loss at a trial point rejects that trial on every rank, and
the parameters stay bitwise identical; every accept/reject decision is the Armijo test on the
global objective, recomputed here independently at every point the optimizer tried; the
trainer counts the forward passes (forward_evals) and fractional gradient evaluations of a
probe schedule; the deflated variant keeps the ranks in step and lowers the objective. Every
verdict is reduced over the ranks (MPI.LAND) so that all ranks assert the same thing.
"""

from __future__ import annotations

import hashlib
import json

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from hessmpi import config
from hessmpi.backend import make_backend
from hessmpi.comm import Communicator
from hessmpi.metrics import read_metrics
from hessmpi.models.dense import DenseNet
from hessmpi.optim.secant import Secant, secant_options
from hessmpi.trainer import Run

C1, LR = 1e-4, 0.2


# ----- collective verdicts and helpers ----------------------------------------------------------
def assert_everywhere(comm: Communicator, ok: bool, detail: str = "") -> None:
    """Every rank asserts the same value: the logical AND of the ranks' ``ok``."""
    all_ok = comm.comm.allreduce(bool(ok), op=MPI.LAND)
    details = comm.comm.allgather("" if ok else detail or "failed")
    assert all_ok, "; ".join(f"rank {r}: {d}" for r, d in enumerate(details) if d)


def digest(a) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).digest()


def same_everywhere(comm: Communicator, a) -> bool:
    return len(set(comm.allgather(digest(a)))) == 1


class Recorder:
    """Wraps a model: records every point at which ``loss`` is evaluated (the trials); a
    function ``spoil(call number, value)`` may replace the loss this rank reports."""

    def __init__(self, model):
        self.inner, self.xp = model, model.xp
        self.trials, self.spoil = [], None

    def loss(self, theta, x, y):
        self.trials.append(np.array(theta, copy=True))
        value = self.inner.loss(theta, x, y)
        return value if self.spoil is None else self.spoil(len(self.trials) - 1, value)

    def loss_grad(self, theta, x, y, grad):
        return self.inner.loss_grad(theta, x, y, grad)


def shard(comm, rows=24, d=5, classes=3):
    """This rank's own data: rank-seeded features, labels from a rank-dependent linear rule
    with noise, so that the ranks' objectives differ."""
    rng = np.random.default_rng([11, comm.rank])
    x = rng.standard_normal((rows, d)) * (1.0 + comm.rank)
    w = np.random.default_rng(5).standard_normal((d, classes))
    y = np.argmax(x @ w + (1.0 + comm.rank) * rng.standard_normal((rows, classes)), axis=1)
    return x, y


def optimizer(comm, model, theta, **overrides) -> Secant:
    o = config.defaults()["optim"] | {"name": "secant", "line_search": "armijo", "ls_c1": C1}
    return Secant(theta, model=model, comm=comm, draw_batch=None, seed=1,
                  opts=secant_options(o | overrides))


def drive(opt, model, comm, theta, x, y, lr=LR):
    """One step as the trainer takes it: local gradient and loss, observe, one Allreduce of
    both, step with the global objective. Returns (info, g_bar, F(theta))."""
    n = len(theta)
    buf = np.empty(n + 1)
    g = buf[:n]
    buf[n] = model.loss_grad(theta, x, y, g)
    opt.observe(theta, g, lr, x, y)
    comm.allreduce_sum_(buf)
    buf /= comm.size
    return opt.step(theta, g, lr, x, y, float(buf[n])), g.copy(), float(buf[n])


def global_loss(comm, model, theta, x, y) -> float:
    """The global objective at theta, evaluated independently of the optimizer."""
    return comm.comm.allreduce(float(model.loss(theta, x, y)), op=MPI.SUM) / comm.size


def softmax_problem(comm, **overrides):
    x, y = shard(comm)
    model = Recorder(DenseNet([x.shape[1], 3], "relu", 1e-3, xp=np, dtype=np.float64))
    theta = 0.2 * np.random.default_rng(3).standard_normal(model.inner.n_params)
    return model, theta, optimizer(comm, model, theta, **overrides), x, y


# ----- NaN on one rank ----------------------------------------------------------------------------
@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
@pytest.mark.parametrize("who", ["first", "last"])
def test_nan_on_one_rank_rejects_every_trial_on_every_rank(comm, who):
    beta = 0.9
    model, theta, opt, x, y = softmax_problem(comm, ls_max_trials=3, momentum=beta)
    spoiled = 0 if who == "first" else comm.size - 1
    info0, _, _ = drive(opt, model, comm, theta, x, y)          # a good step: velocity != 0
    before, v_before = theta.copy(), opt.velocity.copy()
    if comm.rank == spoiled:
        model.spoil = lambda call, value: np.float64(np.nan)
    model.trials.clear()
    info, g, _ = drive(opt, model, comm, theta, x, y)
    model.spoil = None
    v = beta * v_before + LR * g                                  # the SGD step, momentum on
    checks = [
        (info0.fallback == 0 and np.linalg.norm(v_before) > 0, f"first step {info0}"),
        (info.reason == "line_search" and info.fallback == 1, f"step reported {info}"),
        (info.forward_evals == 3 and len(model.trials) == 3, f"{len(model.trials)} trials"),
        (opt.counts["line_search"] == 1, f"counts {opt.counts}"),
        (np.array_equal(opt.velocity, v), "velocity is not beta v + lr g"),
        (np.array_equal(theta, before - v), "theta is not the SGD step with momentum"),
    ]
    ok, detail = next(((False, what) for good, what in checks if not good), (True, ""))
    assert_everywhere(comm, ok, detail)
    assert_everywhere(comm, same_everywhere(comm, theta), "parameters differ across ranks")
    assert_everywhere(comm, len(set(comm.allgather(opt.counters()))) == 1, "counters differ")
    info, _, _ = drive(opt, model, comm, theta, x, y)             # the loss is good again
    assert_everywhere(comm, info.fallback == 0 and np.isfinite(theta).all(), f"then {info}")
    assert_everywhere(comm, same_everywhere(comm, theta), "parameters differ after recovery")


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_nan_at_the_first_trial_only_halves_the_step_on_every_rank(comm):
    model, theta, opt, x, y = softmax_problem(comm, momentum=0.0)
    before = theta.copy()
    if comm.rank == comm.size - 1:
        model.spoil = lambda call, value: np.float64(np.nan) if call == 0 else value
    info, g, F0 = drive(opt, model, comm, theta, x, y)
    model.spoil = None
    full = before - model.trials[0]                               # u of the first trial
    checks = [
        (info.fallback == 0 and info.forward_evals == 2, f"step reported {info}"),
        (len(model.trials) == 2, f"{len(model.trials)} trials"),
        (np.array_equal(theta, model.trials[-1]), "theta is not the accepted trial point"),
        (np.allclose(before - theta, full / 2, rtol=0, atol=1e-14 * np.abs(before).max()),
         "not the halved step"),
    ]
    ok, detail = next(((False, what) for good, what in checks if not good), (True, ""))
    assert_everywhere(comm, ok, detail)
    F1 = global_loss(comm, model.inner, theta, x, y)
    assert_everywhere(comm, F1 <= F0 - C1 * float(g @ (before - theta)), f"F {F0} -> {F1}")
    assert_everywhere(comm, same_everywhere(comm, theta), "parameters differ across ranks")


# ----- decisions on the global objective ---------------------------------------------------------
@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_every_decision_is_the_armijo_test_on_the_global_objective(comm):
    """newton_lr = 6 overshoots, so trials are rejected and halved. At every trial point the
    test recomputes the global objective; the optimizer must accept exactly the first trial
    that passes F(theta - t d) <= F(theta) - c1 t g^T d, on every rank, even where a rank's
    own shard would have decided otherwise."""
    model, theta, opt, x, y = softmax_problem(comm, newton_lr=6.0, momentum=0.0,
                                              max_step_ratio=1e3, ls_max_trials=6, memory=2)
    ok, detail, backtracked, local_differs = True, "", 0, 0
    for t in range(8):
        before = theta.copy()
        model.trials.clear()
        info, g, F0 = drive(opt, model, comm, theta, x, y)
        trials = list(model.trials)
        counts = comm.allgather(len(trials))
        if len(set(counts)) != 1:
            ok, detail = False, f"step {t}: trial counts differ {counts}"
            break
        F0_local = float(model.inner.loss(before, x, y))
        verdicts = []
        for point in trials:
            u = before - point
            verdicts.append(global_loss(comm, model.inner, point, x, y)
                            <= F0 - C1 * float(g @ u))
            local = float(model.inner.loss(point, x, y)) <= F0_local - C1 * float(g @ u)
            local_differs += local != verdicts[-1]
        first = next((j for j, v in enumerate(verdicts) if v), None)
        if info.reason is None or info.reason == "line_search":
            want = (len(trials) if first is None else first + 1, first is None)
            got = (info.forward_evals, info.reason == "line_search")
            if len(trials) != info.forward_evals or want != got:
                ok, detail = False, f"step {t}: verdicts {verdicts}, step {info}"
                break
            if first is not None and not np.array_equal(theta, trials[first]):
                ok, detail = False, f"step {t}: theta is not the accepted trial point"
                break
        backtracked += info.forward_evals > 1
    assert_everywhere(comm, ok, detail)
    assert_everywhere(comm, same_everywhere(comm, theta), "parameters differ across ranks")
    assert_everywhere(comm, backtracked > 0, "no step backtracked: the test is too easy")
    any_differs = comm.comm.allreduce(local_differs, op=MPI.SUM) > 0
    assert_everywhere(comm, any_differs, "no rank's own verdict ever differed from the "
                      "global one: the test does not tell local from global decisions")


# ----- through the trainer -----------------------------------------------------------------------
def make_run(comm, path, out, steps, *overrides) -> Run:
    cfg = config.load(None, [
        f"data.path={json.dumps(str(path))}", "backend.dtype=float64", "backend.device=cpu",
        "backend.threads=1", f"train.steps={steps}", "train.batch_size=8", "train.seed=2",
        "train.log_every=4", "train.eval_every=0", f"optim.lr={LR}", "optim.check_every=4",
        *overrides])
    return Run(cfg, comm, make_backend("cpu", "float64", 1), out)


def full_train_set(path):
    with h5py.File(path, "r") as f:
        return f["train/x"][()].astype(np.float64), f["train/y"][()]


def record_steps(run) -> list:
    """Wrap the optimizer's step so that every StepInfo is kept."""
    infos, real = [], run.optimizer.step

    def step(*args, **kwargs):
        infos.append(real(*args, **kwargs))
        return infos[-1]

    run.optimizer.step = step
    return infos


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_trainer_counts_forward_and_fractional_gradient_evaluations(comm, shared_dir, dataset):
    """Line search with memory 3, new pairs every 2nd step on half of each batch of 16:
    gradient evaluations per rank 1 + (1 * 0.5 + 0.5) on probing steps, 1 otherwise; the
    forward passes are the trials the line search took."""
    steps = 12
    run = make_run(comm, dataset, shared_dir / "out-ls", steps, "train.batch_size=16",
                   "optim.name=secant", "optim.line_search=armijo", "optim.memory=3",
                   "optim.probe_every=2", "optim.probe_batch=0.5", "optim.newton_lr=1.0",
                   "optim.momentum=0.5")
    x, y = full_train_set(dataset)
    before = float(run.model.loss(run.theta, x, y))
    infos = record_steps(run)
    run.run()
    after = float(run.model.loss(run.theta, x, y))
    forward = sum(i.forward_evals for i in infos)
    ok = (len(infos) == steps and run.forward_evals == forward and forward >= 1
          and run.grad_evals == (steps // 2) * 2.0 + (steps - steps // 2) * 1.0)
    assert_everywhere(comm, ok, f"forward_evals {run.forward_evals} vs {forward}, "
                      f"grad_evals {run.grad_evals}")
    assert_everywhere(comm, after < 0.9 * before, f"objective {before:.6g} -> {after:.6g}")
    assert_everywhere(comm, same_everywhere(comm, run.theta), "parameters differ across ranks")
    assert_everywhere(comm, len(set(comm.allgather(tuple((i.reason, i.forward_evals)
                                                         for i in infos)))) == 1,
                      "the ranks took different line-search decisions")
    if comm.rank == 0:
        _, cols = read_metrics(shared_dir / "out-ls" / "metrics.h5")
        ok = (list(cols["step"]) == [4, 8, 12]
              and int(cols["forward_evals"][-1]) == forward
              and float(cols["grad_evals"][-1]) == run.grad_evals)
        detail = f"metrics forward_evals {list(cols['forward_evals'])}"
    else:
        ok, detail = True, ""
    assert_everywhere(comm, ok, detail)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_deflated_run_stays_identical_and_reduces_the_objective(comm, shared_dir, dataset):
    steps, k, T = 20, 2, 2
    run = make_run(comm, dataset, shared_dir / "out-deflated", steps, "optim.name=deflated",
                   f"optim.pairs_per_rank={k}", f"optim.probe_every={T}", "optim.momentum=0.5",
                   "optim.lr=0.3")
    x, y = full_train_set(dataset)
    before = float(run.model.loss(run.theta, x, y))
    infos = record_steps(run)
    run.run()                                 # includes the trainer's own consistency checks
    theta, opt = run.theta, run.optimizer
    after = float(run.model.loss(theta, x, y))
    assert_everywhere(comm, bool(np.isfinite(theta).all()), "non-finite parameters")
    assert_everywhere(comm, after < 0.9 * before, f"objective {before:.6g} -> {after:.6g}")
    for name, a in (("theta", theta), ("velocity", opt.velocity), ("W", opt.W),
                    ("gram", opt.gram), ("newton step", opt.newton_step)):
        assert_everywhere(comm, same_everywhere(comm, a), f"{name} differs across ranks")
    assert_everywhere(comm, run.grad_evals == steps + (steps // T) * k,
                      f"grad evals {run.grad_evals}")
    assert_everywhere(comm, sum(i.fallback for i in infos) == 0 and opt.m == comm.size * k,
                      f"fallbacks {[i.reason for i in infos]}, m = {opt.m}")
    # the exchanged basis: P*k orthonormal columns, every rank's own k among them
    V = opt.W[opt._v_idx]
    assert_everywhere(comm, np.abs(V @ V.T - np.eye(comm.size * k)).max() < 1e-8,
                      "the shared basis is not orthonormal")
