"""The Armijo line search (ALGORITHM.md s.8) and the deflated variant (s.7) on P ranks
(run under ``mpiexec -n P python -m pytest --with-mpi``).

Checks: a NaN in one rank's shard loss at a trial point rejects that trial on every rank, and
the parameters stay bitwise identical; every accept/reject decision is the Armijo test on the
global objective, recomputed here independently at every point the optimizer tried; the
trainer counts the forward passes the model really made (forward_evals) and the fractional
gradient evaluations of a probe schedule; the deflated variant keeps the ranks in step and
lowers the objective. Every verdict is collective (mpicheck) so that all ranks assert the
same thing.
"""

from __future__ import annotations

import numpy as np
import pytest
from harness import build, counted, read_split, run_config, start_run, step_on
from mpi4py import MPI
from mpicheck import assert_all, assert_checks, assert_identical
from toymodels import Recorder, rank_rows

from hessmpi.metrics import read_metrics
from hessmpi.models.dense import DenseNet
from hessmpi.objective import Objective
from hessmpi.optim.linesearch import FALLBACK_TRIALS

C1, LR = 1e-4, 0.2


# ----- helpers ----------------------------------------------------------------------------------
def global_loss(comm, model, theta, x, y) -> float:
    """The global objective at theta, evaluated independently of the optimizer."""
    return comm.comm.allreduce(float(model.loss(theta, x, y)), op=MPI.SUM) / comm.size


def softmax_problem(comm, **keys):
    """(Recorder of softmax regression, theta, Secant with line search, its Objective,
    this rank's own rows x, y)."""
    x, y = rank_rows(comm.rank, seed=11, label_seed=5, spread=1.0)
    model = Recorder(DenseNet([x.shape[1], 3], "relu", 1e-3, xp=np, dtype=np.float64))
    theta = 0.2 * np.random.default_rng(3).standard_normal(model.n_params)
    objective = Objective(model, comm)
    opt = build(theta, objective, seed=1, line_search="armijo", ls_c1=C1, **keys)
    return model, theta, opt, objective, x, y


def drive(opt, objective, theta, x, y, lr=LR):
    """One step as the trainer takes it on this rank's rows. Returns (info, the averaged
    gradient, F(theta), forward passes counted)."""
    with counted(objective) as used:
        info = step_on(opt, objective, theta, lr, x, y)
    return info, objective.grad.copy(), info.loss, used["forward_evals"]


# ----- NaN on one rank ----------------------------------------------------------------------------
@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
@pytest.mark.parametrize("who", ["first", "last"])
def test_nan_on_one_rank_rejects_every_trial_on_every_rank(comm, who):
    beta = 0.9
    model, theta, opt, objective, x, y = softmax_problem(comm, ls_max_trials=3,
                                                         momentum=beta)
    spoiled = 0 if who == "first" else comm.size - 1
    info0, *_ = drive(opt, objective, theta, x, y)                # a good step: velocity != 0
    before, v_before = theta.copy(), opt.velocity.copy()
    if comm.rank == spoiled:
        model.spoil_loss = lambda call, value: np.float64(np.nan)
    model.trials.clear()
    info, g, _, forward = drive(opt, objective, theta, x, y)
    model.spoil_loss = None
    # the 3 quasi-Newton trials and every trial of the searched SGD fallback are rejected
    # everywhere: no step is taken, the momentum is dropped (issue 15)
    trials = 3 + FALLBACK_TRIALS
    assert_checks(comm, [
        (info0.fallback == 0 and np.linalg.norm(v_before) > 0, f"first step {info0}"),
        (info.reason == "line_search" and info.fallback == 1, f"step reported {info}"),
        (forward == trials and len(model.trials) == trials, f"{len(model.trials)} trials"),
        (opt.counts["line_search"] == 1 and opt.counts["no_decrease"] == 1,
         f"counts {opt.counts}"),
        (not opt.velocity.any(), "the velocity was not dropped"),
        (np.array_equal(theta, before), "a step was taken"),
    ])
    assert_identical(comm, parameters=theta, counters=opt.counters())
    info, *_ = drive(opt, objective, theta, x, y)                 # the loss is good again
    assert_all(comm, info.fallback == 0 and np.isfinite(theta).all(), f"then {info}")
    assert_identical(comm, parameters_after_recovery=theta)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_nan_at_the_first_trial_only_halves_the_step_on_every_rank(comm):
    model, theta, opt, objective, x, y = softmax_problem(comm, momentum=0.0)
    before = theta.copy()
    if comm.rank == comm.size - 1:
        model.spoil_loss = lambda call, value: np.float64(np.nan) if call == 0 else value
    info, g, F0, forward = drive(opt, objective, theta, x, y)
    model.spoil_loss = None
    full = before - model.trials[0]                               # u of the first trial
    assert_checks(comm, [
        (info.fallback == 0 and forward == 2, f"step reported {info}, {forward} forward"),
        (len(model.trials) == 2, f"{len(model.trials)} trials"),
        (np.array_equal(theta, model.trials[-1]), "theta is not the accepted trial point"),
        (np.allclose(before - theta, full / 2, rtol=0, atol=1e-14 * np.abs(before).max()),
         "not the halved step"),
    ])
    F1 = global_loss(comm, model.inner, theta, x, y)
    assert_all(comm, F1 <= F0 - C1 * float(g @ (before - theta)), f"F {F0} -> {F1}")
    assert_identical(comm, parameters=theta)


# ----- decisions on the global objective ---------------------------------------------------------
@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_every_decision_is_the_armijo_test_on_the_global_objective(comm):
    """newton_lr = 6 overshoots, so trials are rejected and halved. At every trial point the
    test recomputes the global objective; the optimizer must accept exactly the first trial
    that passes F(theta - t d) <= F(theta) - c1 t g^T d, on every rank, even where a rank's
    own shard would have decided otherwise."""
    model, theta, opt, objective, x, y = softmax_problem(
        comm, newton_lr=6.0, momentum=0.0, max_step_ratio=1e3, ls_max_trials=6, memory=2)
    ok, detail, backtracked, local_differs = True, "", 0, 0
    for t in range(8):
        before = theta.copy()
        model.trials.clear()
        info, g, F0, forward = drive(opt, objective, theta, x, y)
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
            got = (forward, info.reason == "line_search")
            if len(trials) != forward or want != got:
                ok, detail = False, f"step {t}: verdicts {verdicts}, step {info}"
                break
            if first is not None and not np.array_equal(theta, trials[first]):
                ok, detail = False, f"step {t}: theta is not the accepted trial point"
                break
        backtracked += forward > 1
    assert_all(comm, ok, detail)
    assert_identical(comm, parameters=theta)
    assert_all(comm, backtracked > 0, "no step backtracked: the test is too easy")
    any_differs = comm.sum(local_differs) > 0
    assert_all(comm, any_differs, "no rank's own verdict ever differed from the global one: "
               "the test does not tell local from global decisions")


# ----- through the trainer -----------------------------------------------------------------------
def make_run(comm, path, out, steps, *overrides):
    cfg = run_config(path, f"train.steps={steps}", "train.batch_size=8", "train.seed=2",
                     "train.log_every=4", "train.eval_every=0", f"optim.lr={LR}",
                     "optim.check_every=4", *overrides)
    return start_run(cfg, comm, out)


def record_steps(run) -> list:
    """Wrap the optimizer's step so that every step's (StepInfo, forward passes, gradient
    evaluations counted by the objective) is kept."""
    steps, real, objective = [], run.optimizer.step, run.objective

    def step(*args, **kwargs):
        with counted(objective) as used:
            info = real(*args, **kwargs)
        steps.append((info, used["forward_evals"], used["grad_evals"]))
        return info

    run.optimizer.step = step
    return steps


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_trainer_counts_forward_and_fractional_gradient_evaluations(comm, shared_dir, dataset):
    """Line search with memory 3, new pairs every 2nd step on half of each batch of 16:
    gradient evaluations per rank 1 + (1 * 0.5 + 0.5) on probing steps, 1 otherwise; the
    forward passes counted are those the model really made (the trials of the line
    search), in the run's counters and in its metrics."""
    steps = 12
    run = make_run(comm, dataset, shared_dir / "out-ls", steps, "train.batch_size=16",
                   "optim.name=secant", "optim.line_search=armijo", "optim.memory=3",
                   "optim.probe_every=2", "optim.probe_batch=0.5", "optim.newton_lr=1.0",
                   "optim.momentum=0.5")
    x, y, _ = read_split(dataset)
    before = float(run.model.loss(run.theta, x, y))
    model = run.objective.model = Recorder(run.model)
    recorded = record_steps(run)
    run.run()
    after = float(run.model.loss(run.theta, x, y))
    forward = len(model.trials)
    per_step = [g for _, _, g in recorded]
    ok = (len(recorded) == steps and run.objective.forward_evals == forward >= 1
          and sum(f for _, f, _ in recorded) == forward
          and per_step == [2.0, 1.0] * (steps // 2)
          and 1 + run.optimizer.source.cost() == 2.0
          and run.objective.grad_evals == (steps // 2) * 2.0 + (steps - steps // 2) * 1.0)
    assert_all(comm, ok, f"forward_evals {run.objective.forward_evals} vs {forward} passes, "
               f"grad_evals {run.objective.grad_evals}, per step {per_step}")
    assert_all(comm, after < 0.9 * before, f"objective {before:.6g} -> {after:.6g}")
    assert_identical(comm, parameters=run.theta,
                     line_search_decisions=[(info.reason, f) for info, f, _ in recorded])
    if comm.rank == 0:
        _, cols = read_metrics(shared_dir / "out-ls" / "metrics.h5")
        ok = (list(cols["step"]) == [4, 8, 12]
              and int(cols["forward_evals"][-1]) == forward
              and float(cols["grad_evals"][-1]) == run.objective.grad_evals)
        detail = f"metrics forward_evals {list(cols['forward_evals'])}"
    else:
        ok, detail = True, ""
    assert_all(comm, ok, detail)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_deflated_run_stays_identical_and_reduces_the_objective(comm, shared_dir, dataset):
    steps, k, T = 20, 2, 2
    run = make_run(comm, dataset, shared_dir / "out-deflated", steps, "optim.name=deflated",
                   f"optim.pairs_per_rank={k}", f"optim.probe_every={T}", "optim.momentum=0.5",
                   "optim.lr=0.3")
    x, y, _ = read_split(dataset)
    before = float(run.model.loss(run.theta, x, y))
    recorded = record_steps(run)
    run.run()                                 # includes the trainer's own consistency checks
    theta, opt = run.theta, run.optimizer
    after = float(run.model.loss(theta, x, y))
    assert_all(comm, bool(np.isfinite(theta).all()), "non-finite parameters")
    assert_all(comm, after < 0.9 * before, f"objective {before:.6g} -> {after:.6g}")
    assert_identical(comm, theta=theta, velocity=opt.velocity, W=opt.memory.W,
                     gram=opt.memory.gram, newton_step=opt.newton_step)
    assert_all(comm, run.objective.grad_evals == steps + (steps // T) * k
               and opt.source.cost() == k, f"grad evals {run.objective.grad_evals}")
    assert_all(comm, sum(info.fallback for info, _, _ in recorded) == 0
               and opt.memory.m == comm.size * k,
               f"fallbacks {[info.reason for info, _, _ in recorded]}, m = {opt.memory.m}")
    # the exchanged basis: P*k orthonormal columns, every rank's own k among them
    V = opt.memory.W[opt.memory.pair_indices()[0]]
    assert_all(comm, np.abs(V @ V.T - np.eye(comm.size * k)).max() < 1e-8,
               "the shared basis is not orthonormal")
