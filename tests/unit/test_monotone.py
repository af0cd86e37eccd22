"""Issue 15's guarantees on one rank: the line searches' conditions checked against closed
forms, the searched SGD fallback never raising the objective (a poisoned pair memory, a
model on which no trial decreases F), and the full-batch objective non-increasing step by
step for every step rule and line search, over several seeds."""

from __future__ import annotations

import numpy as np
import pytest
from harness import build
from toymodels import Quadratic, Recorder, spd

from hessmpi.models import DenseNet
from hessmpi.objective import Objective
from hessmpi.optim.linesearch import Armijo, StrongWolfe


def quadratic(seed, n=6, high=100.0) -> Quadratic:
    A, b, _ = spd(n, seed, high=high)
    return Quadratic(A, b)


def objective_on(model, comm, full_batch=True):
    obj = Objective(model, comm, full_batch=full_batch)
    obj.use_batch(np.zeros((1, 1)), np.zeros(1, dtype=np.int64))
    return obj


def secant(theta, obj, **optim):
    return build(theta, obj, **optim)


# ----- the line searches' conditions ---------------------------------------------------------
def test_armijo_descend_takes_the_first_halving_with_sufficient_decrease(comm):
    model = quadratic(0)
    obj = objective_on(model, comm, full_batch=False)     # forward-pass trials
    theta = np.ones(model.n_params)
    f0 = obj.local_gradient(theta)
    g = obj.grad.copy()
    u = 1e3 * g
    assert Armijo(c1=1e-4, max_trials=5, like=theta).descend(obj, theta, g, u, f0)
    t = 1e3                                          # the same halvings, by hand
    while model.loss(theta - t * g, None, None) > f0 - 1e-4 * t * (g @ g):
        t /= 2
    np.testing.assert_array_equal(u, t * g)
    assert obj.forward_evals == round(np.log2(1e3 / t)) + 1


@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])
def test_strong_wolfe_meets_both_conditions(comm, scale):
    rng = np.random.default_rng(1)
    model = quadratic(1, high=1e3)
    obj = objective_on(model, comm)
    theta = rng.standard_normal(model.n_params)
    f0 = obj.local_gradient(theta)
    g = obj.grad.copy()
    u = scale * np.linalg.solve(model.A + np.diag(rng.uniform(0, 50, model.n_params)), g)
    d = u.copy()
    ws = StrongWolfe(c1=1e-4, c2=0.9, max_trials=20, like=theta)
    assert ws.search(obj, theta, g, u, f0, None, 0.0)
    t = float(u @ d / (d @ d))
    new = theta - t * d
    g_new = model.A @ new - model.b
    assert model.loss(new, None, None) <= f0 - 1e-4 * t * (g @ d) + 1e-12
    assert abs(g_new @ d) <= 0.9 * abs(g @ d) + 1e-12


# ----- the searched fallback ------------------------------------------------------------------
def test_a_poisoned_memory_never_raises_the_objective(comm):
    """A pair that claims almost no curvature along a random s makes the quasi-Newton step
    enormous; the search fails and the searched SGD step still decreases F."""
    rng = np.random.default_rng(2)
    model = quadratic(2)
    obj = objective_on(model, comm)
    theta = rng.standard_normal(model.n_params)
    opt = secant(theta, obj, pairs="history", line_search="armijo", ls_max_trials=2,
                 memory=2, momentum=0.0, damping=0.0, lr=10.0, max_step_ratio=1e6,
                 newton_lr=1.0)
    s_rows, y_rows = opt.memory.own_rows(0)
    s_rows[0] = rng.standard_normal(model.n_params)
    y_rows[0] = 1e-9 * s_rows[0]
    opt.memory.update_gram(opt.memory.commit())
    before = float(model.loss(theta, None, None))
    info = opt.step(theta, obj, 10.0)
    assert info.reason == "line_search"
    assert float(model.loss(theta, None, None)) < before


def test_no_trial_decreases_f_then_no_step_is_taken(comm):
    rng = np.random.default_rng(3)
    model = Recorder(quadratic(3))
    model.spoil_loss = lambda call, value: value + 1e9   # every trial looks worse than F
    obj = objective_on(model, comm, full_batch=False)
    theta = rng.standard_normal(model.n_params)
    start = theta.copy()
    opt = secant(theta, obj, pairs="history", line_search="armijo", momentum=0.5, lr=0.1)
    opt.velocity[...] = 1.0                  # momentum is dropped by the fallback too
    info = opt.step(theta, obj, 0.1)
    assert info.reason == "no_pairs" and opt.counts["no_decrease"] == 1
    np.testing.assert_array_equal(theta, start)
    assert not opt.velocity.any()


# ----- monotone at full batch ---------------------------------------------------------------
RULES = [dict(curvature="lbfgs", line_search="armijo"),
         dict(curvature="lbfgs", line_search="wolfe", ls_max_trials=10),
         dict(curvature="lbfgs", powell=True, line_search="armijo"),
         dict(curvature="bfgs", line_search="armijo")]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: "-".join(map(str, r.values())))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_batch_mlp_objective_never_rises(comm, rule, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((120, 8))
    y = (x[:, 0] + 0.5 * x[:, 1] ** 2 > 0.3).astype(np.int64) + (x[:, 2] > 1)
    model = DenseNet([8, 16, 3], "tanh", 1e-3, dtype=np.float64)
    theta = model.init_params(seed)
    obj = Objective(model, comm, full_batch=True)
    obj.use_batch(x, y)
    opt = secant(theta, obj, pairs="history", memory=8, newton_lr=1.0, momentum=0.0,
                 damping=0.0, h0="bb", max_step_ratio=1e4, lr=5.0, **rule)
    values = [float(model.loss(theta, x, y))]
    for _ in range(60):
        opt.step(theta, obj, 5.0)          # lr 5: far too long for a blind SGD step
        values.append(float(model.loss(theta, x, y)))
    rises = np.diff(values)
    assert rises.max() <= 0.0, (rises.max(), opt.counts)
    assert values[-1] < 0.5 * values[0]


def test_at_full_batch_the_accepted_trials_gradient_is_the_next_steps(comm):
    """The trials are gradients; the accepted one is adopted: the next step's gradient is
    not evaluated again (one evaluation per step), yet equals the gradient at the new
    point, and the stop flag still travels."""
    model = Recorder(quadratic(4))
    obj = objective_on(model, comm)
    theta = np.ones(model.n_params)
    opt = secant(theta, obj, pairs="history", line_search="armijo", curvature="lbfgs",
                 memory=3, momentum=0.0, damping=0.0, newton_lr=1.0, h0="bb", lr=0.01)
    for step in range(6):
        before = obj.grad_evals
        model.points.clear()
        obj.stop_flag = step == 5
        opt.step(theta, obj, 0.01)
        evals = obj.grad_evals - before
        assert evals == (2 if step == 0 else 1) and obj.forward_evals == 0, (step, evals)
        assert not any(np.array_equal(p, model.points[-1]) for p in model.points[:-1])
    np.testing.assert_array_equal(model.points[-1], theta)   # the last trial: theta now
    loss = obj.gradient(theta)                                 # adopted: no evaluation
    assert obj.grad_evals - before == 1 and obj.stop_requested
    want = np.empty_like(theta)
    assert loss == model.inner.loss_grad(theta, None, None, want)
    np.testing.assert_array_equal(obj.grad, want)
