"""The secant optimizer's Armijo line search (ALGORITHM.md s.8) and its probe schedule
(``probe_every``, ``probe_batch``), on one rank (a Communicator over MPI.COMM_SELF).

Independent references: closed-form quadratics and a separable pseudo-Huber objective
(tests/toymodels.py: their minimiser, Newton step and objective are known exactly), the
objective re-evaluated by the test at every point the optimizer tried, a Gram matrix
recomputed from scratch, gradients recomputed with model.loss_grad on the rows the probe
may read, and the number of rows the model was actually asked to differentiate.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from harness import build, counted, form_pairs, optim_options, rel, step_on
from toymodels import PseudoHuber, Quadratic, Recorder, SoftmaxProblem, spd

from hessmpi import config
from hessmpi.errors import UsageError
from hessmpi.objective import Objective

C1 = 1e-4
DUMMY_X, DUMMY_Y = np.zeros((4, 1)), np.zeros(4)

# Newton-like pairs: k = n random probes on the whole space, no damping, no clip.
NEWTON = dict(probe="random", damping=0.0, memory=1, curvature="bfgs", curvature_tol=1e-12,
              max_step_ratio=1e6, line_search="armijo", ls_c1=C1)


def make(model, theta, comm, **keys):
    """(Secant, its Objective on the dummy batch) for ``model``."""
    objective = Objective(model, comm)
    objective.use_batch(DUMMY_X, DUMMY_Y)
    return build(theta, objective, seed=3, **keys), objective


def step(opt, objective, theta, lr):
    """One step on the objective's batch; (StepInfo, what the objective counted)."""
    with counted(objective) as used:
        info = opt.step(theta, objective, lr)
    return info, used


# ----- the line search ------------------------------------------------------------------------
def test_exact_newton_step_is_accepted_at_the_first_trial(comm):
    n = 5
    A, b, _ = spd(n, seed=0)
    model = Recorder(Quadratic(A, b))
    theta = np.random.default_rng(1).standard_normal(n)
    opt, objective = make(model, theta, comm, **NEWTON, pairs_per_rank=n, probe_sigma=0.5,
                          newton_lr=1.0, momentum=0.0)
    info, used = step(opt, objective, theta, 0.05)
    assert info.fallback == 0 and info.reason is None and info.rank_kept == n
    assert used["forward_evals"] == 1 and len(model.trials) == 1
    assert rel(theta, np.linalg.solve(A, b)) < 1e-9            # the minimiser, in one step
    np.testing.assert_array_equal(model.trials[0], theta)        # the point tried is the step
    assert opt.counts["line_search"] == 0


def test_line_search_none_evaluates_no_trial(comm):
    n = 5
    A, b, _ = spd(n, seed=2)
    model = Recorder(Quadratic(A, b))
    theta = np.ones(n)
    opt, objective = make(model, theta, comm, **(NEWTON | {"line_search": "none"}),
                          pairs_per_rank=n, probe_sigma=0.5, newton_lr=1.0, momentum=0.0)
    info, used = step(opt, objective, theta, 0.05)
    assert opt.line_search is None
    assert used["forward_evals"] == 0 and model.trials == []
    assert rel(theta, np.linalg.solve(A, b)) < 1e-9


@pytest.mark.parametrize("scale", [0.5, 1e-8])
def test_armijo_rejects_every_trial_of_an_ascent_direction(comm, scale):
    """The line search called directly with u = -scale * g: theta - t u climbs for every t,
    so each of the ls_max_trials halvings is rejected; u is halved in place each time;
    theta is left."""
    n = 6
    A, b, _ = spd(n, seed=3)
    model = Recorder(Quadratic(A, b))
    theta = np.random.default_rng(4).standard_normal(n)
    opt, objective = make(model, theta, comm, line_search="armijo", ls_max_trials=4,
                          momentum=0.0)
    loss = objective.gradient(theta)
    grad = objective.grad.copy()
    u0 = -scale * grad
    u = u0.copy()
    before = theta.copy()
    with counted(objective) as used:
        accepted = opt.line_search.search(objective, theta, grad, u, loss, opt.velocity, 0.0)
    assert (accepted, used["forward_evals"]) == (False, 4)
    np.testing.assert_array_equal(u, u0 / 16)                    # halved exactly, 4 times
    np.testing.assert_array_equal(theta, before)
    assert len(model.trials) == 4
    for j, point in enumerate(model.trials):
        np.testing.assert_allclose(point, before - u0 / 2**j, rtol=0, atol=1e-15)
        t_u = before - point
        assert Quadratic(A, b).loss(point, None, None) > loss - C1 * grad @ t_u
    # the control: a short descent step is accepted at once, u untouched
    model.trials.clear()
    u = 1e-3 * grad
    with counted(objective) as used:
        accepted = opt.line_search.search(objective, theta, grad, u, loss, opt.velocity, 0.0)
    assert (accepted, used["forward_evals"]) == (True, 1)
    np.testing.assert_array_equal(u, 1e-3 * grad)


def huber_step(comm, trials, momentum, velocity=None, lr=0.05):
    """One secant step with Newton-like pairs on the pseudo-Huber objective from
    theta = (3, 3.2, 2.8): the full step t = 1 overshoots to ~ -theta^3; halving reaches a
    decrease only at t = 1/8 (the 4th trial). Returns (theta before, after, g, v before,
    opt, info, forward passes, model)."""
    theta = np.array([3.0, 3.2, 2.8])
    model = Recorder(PseudoHuber(3))
    opt, objective = make(model, theta, comm, **NEWTON, pairs_per_rank=3, probe_sigma=1e-4,
                          newton_lr=1.0, momentum=momentum, ls_max_trials=trials)
    if velocity is not None:
        opt.velocity[...] = velocity
    v_before = opt.velocity.copy()
    grad = np.empty(3)
    model.inner.loss_grad(theta, DUMMY_X, DUMMY_Y, grad)
    before = theta.copy()
    info, used = step(opt, objective, theta, lr)
    return before, theta, grad, v_before, opt, info, used["forward_evals"], model


def test_accepted_step_satisfies_armijo_and_every_larger_trial_did_not(comm):
    before, theta, g, _, opt, info, forward, model = huber_step(comm, trials=5, momentum=0.0)
    assert info.fallback == 0 and forward == 4 and len(model.trials) == 4
    newton = PseudoHuber.newton_step(before)
    F0 = PseudoHuber.value(before)
    for j, point in enumerate(model.trials):
        t_d = before - point                                     # t d of this trial
        assert rel(t_d, newton / 2**j) < 1e-2                    # halving of the Newton step
        armijo = PseudoHuber.value(point) <= F0 - C1 * float(g @ t_d)
        assert armijo == (j == 3), f"trial {j}: F = {PseudoHuber.value(point)}, F0 = {F0}"
    np.testing.assert_array_equal(theta, model.trials[-1])       # the accepted point is taken
    assert PseudoHuber.value(theta) <= F0 - C1 * float(g @ (before - theta))
    assert PseudoHuber.value(theta) < 0.5 * F0
    assert opt.counts["line_search"] == 0


def test_rejected_line_search_falls_back_to_a_searched_sgd_step(comm):
    """Three rejected trials of the quasi-Newton step; then the SGD step, searched too
    (issue 15): momentum dropped, the first trial t g no longer than the last step
    (t = min(lr, ||v|| / ||g||)), halved until F(theta - t g) <= F0 - c1 t ||g||^2."""
    beta, lr = 0.5, 0.05
    v0 = np.array([0.01, -0.02, 0.005])
    before, theta, g, v_before, opt, info, forward, model = huber_step(
        comm, trials=3, momentum=beta, velocity=v0, lr=lr)
    assert info.fallback == 1 and info.reason == "line_search"
    assert opt.counts["line_search"] == 1 and opt.counts["no_decrease"] == 0
    np.testing.assert_array_equal(v_before, v0)
    # the first three trials were theta - (beta v + t d) and failed the Armijo test
    F0 = PseudoHuber.value(before)
    for j, point in enumerate(model.trials[:3]):
        u_j = before - point - beta * v0
        assert rel(u_j, PseudoHuber.newton_step(before) / 2**j) < 1e-2
        assert PseudoHuber.value(point) > F0 - C1 * float(g @ u_j)
    # the fallback's trials, by hand
    t = min(lr, float(np.linalg.norm(v0) / np.linalg.norm(g)))
    halvings = 0
    while PseudoHuber.value(before - t * g) > F0 - C1 * t * float(g @ g):
        t, halvings = t / 2, halvings + 1
    assert forward == 3 + halvings + 1 and len(model.trials) == forward
    np.testing.assert_array_equal(opt.velocity, t * g)          # v <- 0 * beta + u
    np.testing.assert_array_equal(theta, before - t * g)
    assert PseudoHuber.value(theta) < F0


def test_a_fallback_before_the_line_search_is_searched_too(comm):
    """A concave quadratic: every pair has negative curvature, the filter keeps none; the
    SGD step is then searched: its first trial (t = lr, no step taken before) decreases F
    and is taken, one forward pass."""
    n = 4
    A, b, _ = spd(n, seed=5)
    model = Recorder(Quadratic(-A, b))
    theta = np.ones(n)
    opt, objective = make(model, theta, comm, **NEWTON, pairs_per_rank=2, probe_sigma=0.1,
                          momentum=0.0)
    grad = np.empty(n)
    model.inner.loss_grad(theta, DUMMY_X, DUMMY_Y, grad)
    before = theta.copy()
    info, used = step(opt, objective, theta, 0.1)
    assert info.reason == "no_curvature" and used["forward_evals"] == 1
    np.testing.assert_array_equal(model.trials[0], before - 0.1 * grad)
    np.testing.assert_array_equal(theta, before - 0.1 * grad)


# ----- the probe schedule ------------------------------------------------------------------------
def softmax(seed, batch=32) -> SoftmaxProblem:
    """Softmax regression [5, 3] on 200 random rows."""
    return SoftmaxProblem(seed, d=5, classes=3, rows=200, batch=batch, l2=1e-3)


@pytest.mark.parametrize("T, K", [(3, 1), (2, 2)])
def test_new_pairs_only_every_probe_every_steps(comm, T, K):
    p = softmax(1)
    eta_p, lr = 1e-2, 0.1
    objective = p.objective(comm)
    opt = build(p.theta, objective, probe_every=T, memory=K, probe_lr=eta_p, damping=0.0)
    memory = opt.memory
    theta = p.theta.copy()
    rows = memory.slot_rows
    W_prev = memory.W.copy()
    for t in range(3 * T + 1):
        x, y = p.draw()
        g = p.grad(theta, x, y)
        with counted(objective) as used:
            info = step_on(opt, objective, theta, lr, x, y)
        probing = t % T == 0
        assert opt.source.forming == probing
        assert used["grad_evals"] == (2.0 if probing else 1.0)
        assert used["grad_evals"] == 1 + (opt.source.cost() if probing else 0)
        slot = (t // T) % K
        for s in range(K):
            block = slice(1 + s * rows, 1 + (s + 1) * rows)
            if probing and s == slot:                            # the new pair, from this step
                np.testing.assert_array_equal(memory.W[block][0], -eta_p * g)
            else:                                                # the memory stays where it is
                np.testing.assert_array_equal(memory.W[block], W_prev[block])
        np.testing.assert_array_equal(memory.W[0], g)
        active = 1 + memory.filled * rows
        assert memory.filled == min(t // T + 1, K)
        Wa = memory.W[:active]
        fresh = Wa @ Wa.T
        assert np.abs(memory.gram[:active, :active] - fresh).max() <= 1e-13 * np.abs(fresh).max()
        assert np.isfinite(theta).all() and info.fallback == 0
        W_prev = memory.W.copy()


@pytest.mark.parametrize("probe, k, f", [("sgd", 1, 1.0), ("sgd", 1, 0.25), ("sgd", 2, 1.0),
                                         ("sgd", 2, 0.25), ("random", 3, 1.0),
                                         ("random", 2, 0.25)])
def test_grad_evals_per_step_counts_the_rows_the_probe_reads(comm, probe, k, f):
    """The gradients the objective counts in a step = (rows the model differentiated in
    it) / B = 1 + source.cost() on probing steps, 1 otherwise; cost = k f (+ f if f < 1)
    (+ 1 for the k > 1 sgd sub-batches)."""
    p = softmax(2, batch=32)
    model = Recorder(p.model)
    T = 2
    objective = p.objective(comm, model)
    opt = build(p.theta, objective, probe=probe, pairs_per_rank=k, probe_batch=f,
                probe_every=T)
    theta = p.theta.copy()
    formula = 1 + k * f + (f if f < 1 else 0) + (1 if probe == "sgd" and k > 1 else 0)
    for t in range(2 * T):
        x, y = p.draw()
        model.grad_rows.clear()
        with counted(objective) as used:
            step_on(opt, objective, theta, 0.05, x, y)
        read = sum(model.grad_rows) / len(y)
        assert used["grad_evals"] == pytest.approx(read, rel=1e-15)
        if t % T == 0:
            assert 1 + opt.source.cost() == pytest.approx(read, rel=1e-15)
            assert 1 + opt.source.cost() == pytest.approx(formula, rel=1e-15)
            if f < 1:
                assert set(model.grad_rows[-k:]) == {math.ceil(f * len(y))}
        else:
            assert read == 1.0 and model.grad_rows == [len(y)]


@pytest.mark.parametrize("probe, k, f, B, rows", [("sgd", 1, 0.25, 32, 8), ("random", 2, 0.3, 7, 3),
                                                  ("sgd", 1, 0.01, 10, 1)])
def test_probe_batch_differences_gradients_on_the_first_rows(comm, probe, k, f, B, rows):
    p = softmax(3, batch=B)
    eta_p = 1e-2
    objective = p.objective(comm)
    keys = dict(probe_lr=eta_p) if probe == "sgd" else dict(probe_sigma=1e-2)
    opt = build(p.theta, objective, probe=probe, pairs_per_rank=k, probe_batch=f,
                damping=0.0, **keys)
    x, y = p.draw()
    theta = p.theta.copy()
    g = p.grad(theta, x, y)
    form_pairs(opt, objective, theta, 0.05, x, y)
    S, Y = opt.memory.W[1:1 + k], opt.memory.W[1 + k:1 + 2 * k]
    if probe == "sgd":
        np.testing.assert_array_equal(S[0], -eta_p * g)          # from the whole batch
    base = p.grad(theta, x[:rows], y[:rows])
    for j in range(k):
        want = p.grad(theta + S[j], x[:rows], y[:rows]) - base
        np.testing.assert_allclose(Y[j], want, rtol=1e-13, atol=1e-15 * np.abs(want).max())
        whole = p.grad(theta + S[j], x, y) - g                   # what f = 1 would give
        assert rel(Y[j], whole) > 1e-2


def test_probe_batch_rows_are_the_exact_ceiling(comm):
    p = softmax(4, batch=100)
    model = Recorder(p.model)
    objective = p.objective(comm, model)
    opt = build(p.theta, objective, probe_batch=0.07)
    x, y = p.draw()
    form_pairs(opt, objective, p.theta.copy(), 0.05, x, y)
    assert model.grad_rows == [100, 7, 7]       # the step's gradient, then base and probe


@pytest.mark.parametrize("override", [
    "optim.probe_every=0", "optim.probe_batch=0", "optim.probe_batch=1.5",
    "optim.ls_c1=0", "optim.ls_c1=1.5", "optim.ls_max_trials=0", "optim.line_search=wolfe",
])
def test_bad_schedule_and_line_search_options_are_usage_errors(override):
    with pytest.raises(UsageError, match=override.split("=")[0]):
        config.load(None, ["optim.name=secant", override])


def test_local_pairs_refuse_a_probe_schedule():
    for override, where in (("optim.probe_every=2",
                             "pairs = 'probe' or 'shared_probe' or 'history'"),
                            ("optim.probe_batch=0.5", "pairs = 'probe'")):
        key = override.split("=")[0]
        with pytest.raises(UsageError, match=f"{key} = .* does not apply") as caught:
            config.load(None, ["optim.name=secant", "optim.pairs=local", override])
        assert f"applies with optim.name = 'secant' with {where}" in str(caught.value)
    opts = optim_options(line_search="armijo", probe_every=4, probe_batch=0.5)
    assert opts.probe_every == 4 and opts.ls_c1 == 1e-4
