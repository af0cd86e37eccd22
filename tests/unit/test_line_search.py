"""The secant optimizer's Armijo line search (ALGORITHM.md s.8) and its probe schedule
(``probe_every``, ``probe_batch``), on one rank (a Communicator over MPI.COMM_SELF).

Independent references: closed-form quadratics and a separable pseudo-Huber objective
written here (their minimiser, Newton step and objective are known exactly), the objective
re-evaluated by the test at every point the optimizer tried, a Gram matrix recomputed from
scratch, gradients recomputed with model.loss_grad on the rows the probe may read, and the
number of rows the model was actually asked to differentiate.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from mpi4py import MPI
from toymodels import Quadratic, Recorder

from hessmpi import config
from hessmpi.comm import Communicator
from hessmpi.errors import UsageError
from hessmpi.models.dense import DenseNet
from hessmpi.optim.secant import Secant, secant_options

C1 = 1e-4


# ----- fixtures and small "models" ---------------------------------------------------------------
@pytest.fixture
def comm():
    c = Communicator(MPI.COMM_SELF)
    yield c
    c.comm.Free()


class PseudoHuber:
    """F(theta) = sum_i sqrt(1 + theta_i^2): convex, with a Hessian that vanishes far from 0,
    so the Newton step from |theta_i| ~ 3 overshoots by a factor ~ theta_i^2."""

    xp = np

    @staticmethod
    def loss(theta, x, y):
        return float(np.sqrt(1.0 + theta * theta).sum())

    def loss_grad(self, theta, x, y, grad):
        grad[...] = theta / np.sqrt(1.0 + theta * theta)
        return self.loss(theta, x, y)


def F_huber(theta) -> float:
    """The pseudo-Huber objective, evaluated independently of the model object."""
    return float(sum(math.sqrt(1.0 + t * t) for t in theta))


def options(**overrides) -> dict:
    o = config.defaults()["optim"]
    o["name"] = "secant"
    o.update(overrides)
    return secant_options(o)


def make(model, theta, comm, **overrides) -> Secant:
    return Secant(theta, model=model, comm=comm, draw_batch=None, seed=3,
                  opts=options(**overrides))


DUMMY_X, DUMMY_Y = np.zeros((4, 1)), np.zeros(4)


def spd(n, seed, low=1.0, high=10.0):
    rng = np.random.default_rng(seed)
    R = np.linalg.qr(rng.standard_normal((n, n)))[0]
    return R @ np.diag(np.linspace(low, high, n)) @ R.T, rng.standard_normal(n)


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b))


# Newton-like pairs: k = n random probes on the whole space, no damping, no clip.
NEWTON = dict(probe="random", damping=0.0, memory=1, curvature="bfgs", curvature_tol=1e-12,
              max_step_ratio=1e6, line_search="armijo", ls_c1=C1)


# ----- the line search ------------------------------------------------------------------------
def test_exact_newton_step_is_accepted_at_the_first_trial(comm):
    n = 5
    A, b = spd(n, seed=0)
    model = Recorder(Quadratic(A, b))
    theta = np.random.default_rng(1).standard_normal(n)
    opt = make(model, theta, comm, **NEWTON, pairs_per_rank=n, probe_sigma=0.5, newton_lr=1.0,
               momentum=0.0)
    grad = np.empty(n)
    loss = model.loss_grad(theta, DUMMY_X, DUMMY_Y, grad)
    opt.observe(theta, grad, 0.05, DUMMY_X, DUMMY_Y)
    info = opt.step(theta, grad, 0.05, DUMMY_X, DUMMY_Y, loss)
    assert info.fallback == 0 and info.reason is None and info.rank_kept == n
    assert info.forward_evals == 1 and len(model.trials) == 1
    assert rel(theta, np.linalg.solve(A, b)) < 1e-9            # the minimiser, in one step
    np.testing.assert_array_equal(model.trials[0], theta)        # the point tried is the step
    assert opt.counts["line_search"] == 0


def test_line_search_none_evaluates_no_trial(comm):
    n = 5
    A, b = spd(n, seed=2)
    model = Recorder(Quadratic(A, b))
    theta = np.ones(n)
    opt = make(model, theta, comm, **(NEWTON | {"line_search": "none"}), pairs_per_rank=n,
               probe_sigma=0.5, newton_lr=1.0, momentum=0.0)
    grad = np.empty(n)
    loss = model.loss_grad(theta, DUMMY_X, DUMMY_Y, grad)
    opt.observe(theta, grad, 0.05, DUMMY_X, DUMMY_Y)
    info = opt.step(theta, grad, 0.05, DUMMY_X, DUMMY_Y, loss)
    assert info.forward_evals == 0 and model.trials == []
    assert rel(theta, np.linalg.solve(A, b)) < 1e-9


@pytest.mark.parametrize("scale", [0.5, 1e-8])
def test_armijo_rejects_every_trial_of_an_ascent_direction(comm, scale):
    """_armijo called directly with u = -scale * g: theta - t u climbs for every t, so each of
    the ls_max_trials halvings is rejected; u is halved in place each time; theta is left."""
    n = 6
    A, b = spd(n, seed=3)
    model = Recorder(Quadratic(A, b))
    theta = np.random.default_rng(4).standard_normal(n)
    opt = make(model, theta, comm, line_search="armijo", ls_max_trials=4, momentum=0.0)
    grad = np.empty(n)
    loss = model.loss_grad(theta, DUMMY_X, DUMMY_Y, grad)
    u0 = -scale * grad
    u = u0.copy()
    before = theta.copy()
    accepted, evals = opt._armijo(theta, grad, u, loss, DUMMY_X, DUMMY_Y)
    assert (accepted, evals) == (False, 4)
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
    assert opt._armijo(theta, grad, u, loss, DUMMY_X, DUMMY_Y) == (True, 1)
    np.testing.assert_array_equal(u, 1e-3 * grad)


def huber_step(comm, trials, momentum, velocity=None, lr=0.05):
    """One secant step with Newton-like pairs on the pseudo-Huber objective from
    theta = (3, 3.2, 2.8): the full step t = 1 overshoots to ~ -theta^3; halving reaches a
    decrease only at t = 1/8 (the 4th trial). Returns (theta before, after, g, v before,
    opt, info, model)."""
    theta = np.array([3.0, 3.2, 2.8])
    model = Recorder(PseudoHuber())
    opt = make(model, theta, comm, **NEWTON, pairs_per_rank=3, probe_sigma=1e-4,
               newton_lr=1.0, momentum=momentum, ls_max_trials=trials)
    if velocity is not None:
        opt.velocity[...] = velocity
    v_before = opt.velocity.copy()
    grad = np.empty(3)
    loss = model.loss_grad(theta, DUMMY_X, DUMMY_Y, grad)
    before = theta.copy()
    opt.observe(theta, grad, lr, DUMMY_X, DUMMY_Y)
    info = opt.step(theta, grad, lr, DUMMY_X, DUMMY_Y, loss)
    return before, theta, grad, v_before, opt, info, model


def newton_huber(theta):
    """The exact Newton step of the pseudo-Huber objective: g_i / h_i = theta_i (1 + theta_i^2)."""
    return theta * (1.0 + theta * theta)


def test_accepted_step_satisfies_armijo_and_every_larger_trial_did_not(comm):
    before, theta, g, _, opt, info, model = huber_step(comm, trials=5, momentum=0.0)
    assert info.fallback == 0 and info.forward_evals == 4 and len(model.trials) == 4
    newton = newton_huber(before)
    F0 = F_huber(before)
    for j, point in enumerate(model.trials):
        t_d = before - point                                     # t d of this trial
        assert rel(t_d, newton / 2**j) < 1e-2                    # halving of the Newton step
        armijo = F_huber(point) <= F0 - C1 * float(g @ t_d)
        assert armijo == (j == 3), f"trial {j}: F = {F_huber(point)}, F0 = {F0}"
    np.testing.assert_array_equal(theta, model.trials[-1])       # the accepted point is taken
    assert F_huber(theta) <= F0 - C1 * float(g @ (before - theta))
    assert F_huber(theta) < 0.5 * F0
    assert opt.counts["line_search"] == 0


def test_rejected_line_search_falls_back_to_the_sgd_step_with_momentum(comm):
    beta, lr = 0.5, 0.05
    v0 = np.array([0.01, -0.02, 0.005])
    before, theta, g, v_before, opt, info, model = huber_step(comm, trials=3, momentum=beta,
                                                              velocity=v0, lr=lr)
    assert info.fallback == 1 and info.reason == "line_search"
    assert info.forward_evals == 3 and len(model.trials) == 3
    assert opt.counts["line_search"] == 1
    np.testing.assert_array_equal(v_before, v0)
    # every trial was theta - (beta v + t d) and failed the Armijo test the code states
    F0 = F_huber(before)
    for j, point in enumerate(model.trials):
        u_j = before - point - beta * v0
        assert rel(u_j, newton_huber(before) / 2**j) < 1e-2
        assert F_huber(point) > F0 - C1 * float(g @ u_j)
    # the SGD step with momentum semantics, bitwise: v <- beta v + lr g, theta <- theta - v
    v = beta * v0 + lr * g
    np.testing.assert_array_equal(opt.velocity, v)
    np.testing.assert_array_equal(theta, before - v)


def test_fallback_before_the_line_search_costs_no_forward_pass(comm):
    """A concave quadratic: every pair has negative curvature, the filter keeps none, the
    step is the SGD step and the line search never runs."""
    n = 4
    A, b = spd(n, seed=5)
    model = Recorder(Quadratic(-A, b))
    theta = np.ones(n)
    opt = make(model, theta, comm, **NEWTON, pairs_per_rank=2, probe_sigma=0.1, momentum=0.0)
    grad = np.empty(n)
    loss = model.loss_grad(theta, DUMMY_X, DUMMY_Y, grad)
    before = theta.copy()
    opt.observe(theta, grad, 0.1, DUMMY_X, DUMMY_Y)
    info = opt.step(theta, grad, 0.1, DUMMY_X, DUMMY_Y, loss)
    assert info.reason == "no_curvature" and info.forward_evals == 0 and model.trials == []
    np.testing.assert_array_equal(theta, before - 0.1 * grad)


# ----- the probe schedule ------------------------------------------------------------------------
class Softmax:
    """Softmax regression (DenseNet [d, C], float64) on a random dataset, batches drawn from a
    seeded stream."""

    def __init__(self, seed=0, d=5, classes=3, rows=200, batch=32, l2=1e-3):
        rng = np.random.default_rng(seed)
        self.model = DenseNet([d, classes], "relu", l2, xp=np, dtype=np.float64)
        self.x = rng.standard_normal((rows, d))
        self.y = rng.integers(0, classes, rows)
        self.theta = 0.3 * rng.standard_normal(self.model.n_params)
        self.batch = batch
        self._rng = np.random.default_rng(seed + 1)

    def draw(self):
        idx = self._rng.choice(len(self.y), self.batch, replace=False)
        return self.x[idx], self.y[idx]

    def grad(self, theta, x, y):
        out = np.empty(self.model.n_params)
        self.model.loss_grad(theta, x, y, out)
        return out


@pytest.mark.parametrize("T, K", [(3, 1), (2, 2)])
def test_new_pairs_only_every_probe_every_steps(comm, T, K):
    p = Softmax(seed=1)
    eta_p, lr = 1e-2, 0.1
    opt = Secant(p.theta, model=p.model, comm=comm, draw_batch=None, seed=0,
                 opts=options(probe_every=T, memory=K, probe_lr=eta_p, damping=0.0))
    theta = p.theta.copy()
    rows = opt.slot_rows
    W_prev = opt.W.copy()
    for t in range(3 * T + 1):
        x, y = p.draw()
        g = p.grad(theta, x, y)
        loss = float(p.model.loss(theta, x, y))
        opt.observe(theta, g, lr, x, y)
        probing = t % T == 0
        assert opt.probing == probing
        assert opt.grad_evals_per_step == (2.0 if probing else 1.0)
        info = opt.step(theta, g, lr, x, y, loss)
        slot = (t // T) % K
        for s in range(K):
            block = slice(1 + s * rows, 1 + (s + 1) * rows)
            if probing and s == slot:                            # the new pair, from this step
                np.testing.assert_array_equal(opt.W[block][0], -eta_p * g)
            else:                                                # the memory stays where it is
                np.testing.assert_array_equal(opt.W[block], W_prev[block])
        np.testing.assert_array_equal(opt.W[0], g)
        active = 1 + opt.filled * rows
        assert opt.filled == min(t // T + 1, K)
        Wa = opt.W[:active]
        fresh = Wa @ Wa.T
        assert np.abs(opt.gram[:active, :active] - fresh).max() <= 1e-13 * np.abs(fresh).max()
        assert np.isfinite(theta).all() and info.fallback == 0
        W_prev = opt.W.copy()


@pytest.mark.parametrize("probe, k, f", [("sgd", 1, 1.0), ("sgd", 1, 0.25), ("sgd", 2, 1.0),
                                         ("sgd", 2, 0.25), ("random", 3, 1.0),
                                         ("random", 2, 0.25)])
def test_grad_evals_per_step_counts_the_rows_the_probe_reads(comm, probe, k, f):
    """grad_evals_per_step = 1 + (rows the model differentiated in observe) / B on probing
    steps, 1 otherwise; = 1 + k f (+ f if f < 1) (+ 1 for the k > 1 sgd sub-batches)."""
    p = Softmax(seed=2, batch=32)
    model = Recorder(p.model)
    T = 2
    opt = Secant(p.theta, model=model, comm=comm, draw_batch=None, seed=0,
                 opts=options(probe=probe, pairs_per_rank=k, probe_batch=f, probe_every=T))
    theta = p.theta.copy()
    formula = 1 + k * f + (f if f < 1 else 0) + (1 if probe == "sgd" and k > 1 else 0)
    for t in range(2 * T):
        x, y = p.draw()
        g = p.grad(theta, x, y)
        model.grad_rows.clear()
        opt.observe(theta, g, 0.05, x, y)
        read = sum(model.grad_rows) / len(y)
        if t % T == 0:
            assert opt.grad_evals_per_step == pytest.approx(1 + read, rel=1e-15)
            assert opt.grad_evals_per_step == pytest.approx(formula, rel=1e-15)
            if f < 1:
                assert set(model.grad_rows[-k:]) == {math.ceil(f * len(y))}
        else:
            assert opt.grad_evals_per_step == 1.0 and read == 0
        opt.step(theta, g, 0.05, x, y, float(p.model.loss(theta, x, y)))


@pytest.mark.parametrize("probe, k, f, B, rows", [("sgd", 1, 0.25, 32, 8), ("random", 2, 0.3, 7, 3),
                                                  ("sgd", 1, 0.01, 10, 1)])
def test_probe_batch_differences_gradients_on_the_first_rows(comm, probe, k, f, B, rows):
    p = Softmax(seed=3, batch=B)
    eta_p = 1e-2
    opt = Secant(p.theta, model=p.model, comm=comm, draw_batch=None, seed=0,
                 opts=options(probe=probe, pairs_per_rank=k, probe_batch=f, probe_lr=eta_p,
                              probe_sigma=1e-2, damping=0.0))
    x, y = p.draw()
    theta = p.theta.copy()
    g = p.grad(theta, x, y)
    opt.observe(theta, g, 0.05, x, y)
    S, Y = opt.W[1:1 + k], opt.W[1 + k:1 + 2 * k]
    if probe == "sgd":
        np.testing.assert_array_equal(S[0], -eta_p * g)          # from the whole batch
    base = p.grad(theta, x[:rows], y[:rows])
    for j in range(k):
        want = p.grad(theta + S[j], x[:rows], y[:rows]) - base
        np.testing.assert_allclose(Y[j], want, rtol=1e-13, atol=1e-15 * np.abs(want).max())
        whole = p.grad(theta + S[j], x, y) - g                   # what f = 1 would give
        assert rel(Y[j], whole) > 1e-2


def test_probe_batch_rows_are_the_exact_ceiling(comm):
    p = Softmax(seed=4, batch=100)
    model = Recorder(p.model)
    opt = Secant(p.theta, model=model, comm=comm, draw_batch=None, seed=0,
                 opts=options(probe_batch=0.07))
    x, y = p.draw()
    opt.observe(p.theta.copy(), p.grad(p.theta, x, y), 0.05, x, y)
    assert model.grad_rows == [7, 7]                             # base and probe, 7 rows each


@pytest.mark.parametrize("override", [
    "optim.probe_every=0", "optim.probe_batch=0", "optim.probe_batch=1.5",
    "optim.ls_c1=0", "optim.ls_c1=1.5", "optim.ls_max_trials=0", "optim.line_search=wolfe",
])
def test_bad_schedule_and_line_search_options_are_usage_errors(override):
    with pytest.raises(UsageError, match=override.split("=")[0]):
        config.load(None, ["optim.name=secant", override])


def test_local_pairs_refuse_a_probe_schedule():
    for override in ("optim.probe_every=2", "optim.probe_batch=0.5"):
        with pytest.raises(UsageError, match="pairs = 'local'"):
            config.load(None, ["optim.name=secant", "optim.pairs=local", override])
    cfg = config.load(None, ["optim.name=secant", "optim.line_search=armijo",
                             "optim.probe_every=4", "optim.probe_batch=0.5"])
    assert cfg["optim"]["probe_every"] == 4 and cfg["optim"]["ls_c1"] == 1e-4
