"""Distributed Hessian-free (``optim.name = "hessian_free"``) on one rank, against closed
forms and hand-run references: Newton's step on a quadratic, CG iterates and the save
schedule recomputed in plain numpy, the Levenberg-Marquardt rule on constructed reduction
ratios, the backtracking choice, Martens' stopping rule, and the Fisher diagonal of the
preconditioner against per-row gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
from harness import build, counted
from toymodels import Quadratic, Recorder, SoftmaxProblem, spd

from hessmpi.models import DenseNet
from hessmpi.objective import Objective
from hessmpi.optim.hessian_free import martens_stop, save_schedule

DUMMY_X, DUMMY_Y = np.zeros((4, 1)), np.zeros(4, dtype=np.int64)


def hf(model, theta, comm, **keys):
    objective = Objective(model, comm, full_batch=True)
    objective.use_batch(DUMMY_X, DUMMY_Y)
    return build(theta, objective, name="hessian_free", **keys), objective


def cg_reference(A, g, lam, iters, x0=None):
    """Plain CG on (A + lam I) x = -g from x0: the iterates x_1..x_iters."""
    M = A + lam * np.eye(len(g))
    x = np.zeros_like(g) if x0 is None else x0.copy()
    r = -g - M @ x
    p = r.copy()
    out = []
    for _ in range(iters):
        alpha = (r @ r) / (p @ M @ p)
        x = x + alpha * p
        r_new = r - alpha * (M @ p)
        p = r_new + (r_new @ r_new) / (r @ r) * p
        r = r_new
        out.append(x)
    return out


def test_save_schedule_is_ceil_of_powers_of_1_3():
    assert save_schedule(10) == [1, 2, 3, 4, 5, 7, 9]
    assert save_schedule(1) == [1]


def test_martens_rule_on_hand_made_model_values():
    phis = [0.0] + [-(1 - 0.5 ** i) for i in range(1, 40)]       # progress halves each step
    stop = [i for i in range(1, 40) if martens_stop(phis, i)]
    # k = 10: stop once (phi_i - phi_{i-10}) / phi_i < 10 * 5e-4
    want = [i for i in range(11, 40)
            if phis[i] < 0 and (phis[i] - phis[i - 10]) / phis[i] < 10 * 5e-4]
    assert stop == want and stop[0] == 18      # 0.5^8 (1 - 0.5^10) / (1 - 0.5^18) < 0.005
    assert not martens_stop([0.0, 1.0] + [0.5] * 20, 15)          # phi >= 0: never


@pytest.mark.parametrize("n", [3, 6])
def test_one_step_on_a_quadratic_is_newtons_step(comm, n):
    A, b, rng = spd(n, n, high=50.0)
    theta = rng.standard_normal(n)
    opt, obj = hf(Quadratic(A, b), theta, comm, hf_damping=1e-12, hf_max_cg=n)
    info = opt.step(theta, obj, 0.1)
    assert info.fallback == 0 and info.diagnostics["cg_iters"] == n
    np.testing.assert_allclose(theta, np.linalg.solve(A, b), rtol=1e-9)
    # the products: one for A x0 (x0 = 0 at the first step), n in CG, one for rho
    assert obj.curvature_evals == n + 2


def test_cg_iterates_saved_and_the_last_taken_on_a_quadratic(comm):
    """5 CG iterations with lam = 0.5 on a quadratic: every saved iterate is the plain CG
    reference's; the model is exact, so the last one is best and taken whole (t = 1)."""
    n = 8
    A, b, rng = spd(n, 1, high=100.0)
    theta = rng.standard_normal(n)
    model = Recorder(Quadratic(A, b))
    opt, obj = hf(model, theta, comm, hf_damping=0.5, hf_max_cg=5)
    g = A @ theta - b
    start = theta.copy()
    opt.step(theta, obj, 0.1)
    want = cg_reference(A, g, 0.5, 5)
    for k, i in enumerate(save_schedule(5)):
        np.testing.assert_allclose(opt._saved[k], want[i - 1], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(theta, start + want[-1], rtol=1e-10)
    # backtracking evaluated the last saved iterate, then one more (worse: it stopped)
    np.testing.assert_allclose(model.trials[0], start + want[-1], rtol=1e-12)
    assert len(model.trials) == 2


def test_backtracking_takes_the_best_saved_iterate(comm):
    """The last two saved iterates are made to look worse (their forward values spoiled):
    going back from the last, the first whose predecessor is no better is taken."""
    n = 8
    A, b, rng = spd(n, 2, high=100.0)
    theta = rng.standard_normal(n)
    model = Recorder(Quadratic(A, b))
    opt, obj = hf(model, theta, comm, hf_damping=0.5, hf_max_cg=5)
    model.spoil_loss = lambda call, v: v + 1e6 if call < 2 else v
    start = theta.copy()
    g = A @ theta - b
    opt.step(theta, obj, 0.1)
    want = cg_reference(A, g, 0.5, 5)
    schedule = save_schedule(5)                     # [1, 2, 3, 4, 5]
    chosen = schedule[-3]                           # the 3rd from last: iterate 3
    # the chosen direction, possibly shortened by the line search (t = 0.8^j)
    step = theta - start
    t = float(step @ want[chosen - 1] / (want[chosen - 1] @ want[chosen - 1]))
    np.testing.assert_allclose(step, t * want[chosen - 1], rtol=1e-10)
    assert any(abs(t - 0.8 ** j) < 1e-12 for j in range(5))


def test_levenberg_marquardt_lambda_follows_rho(comm):
    n = 6
    A, b, rng = spd(n, 3, high=10.0)
    theta = rng.standard_normal(n)
    opt, obj = hf(Quadratic(A, b), theta.copy(), comm, hf_damping=2.0, hf_max_cg=3)
    opt.step(theta.copy(), obj, 0.1)
    assert opt.lam == pytest.approx(2.0 * 2 / 3)     # an exact model: rho = 1 > 3/4
    model = Recorder(Quadratic(A, b))
    opt, obj = hf(model, theta.copy(), comm, hf_damping=2.0, hf_max_cg=3)
    g = A @ theta - b
    # every forward value made to show a tenth of the reduction the model predicts
    f0 = float(model.inner.loss(theta, None, None))
    model.spoil_loss = lambda call, v: f0 + 0.1 * (v - f0)
    opt.step(theta.copy(), obj, 0.1)
    assert opt.lam == pytest.approx(2.0 * 1.5)       # rho = 0.1 < 1/4
    assert g @ g > 0


def test_no_descent_direction_falls_back_to_the_searched_gradient_step(comm):
    """Every forward value spoiled upward: no saved iterate improves F, the step is the
    searched SGD step, and since no trial decreases F either, no step at all."""
    n = 5
    A, b, rng = spd(n, 4)
    theta = rng.standard_normal(n)
    model = Recorder(Quadratic(A, b))
    model.spoil_loss = lambda call, v: v + 1e9
    opt, obj = hf(model, theta, comm, hf_max_cg=4)
    start = theta.copy()
    info = opt.step(theta, obj, 0.1)
    assert info.reason == "not_descent" and opt.counts["no_decrease"] == 1
    np.testing.assert_array_equal(theta, start)


def test_fisher_diagonal_is_the_mean_of_squared_per_row_gradients():
    p = SoftmaxProblem(3, d=5, classes=3, rows=40, batch=40, l2=0.0)
    model = DenseNet([5, 7, 3], "tanh", 0.0, dtype=np.float64)
    theta = model.init_params(1) + 0.1
    want = np.zeros(model.n_params)
    g = np.empty(model.n_params)
    for i in range(40):
        model.loss_grad(theta, p.x[i:i + 1], p.y[i:i + 1], g)
        want += g * g / 40
    got = np.empty(model.n_params)
    model.fisher_diagonal(theta, p.x, p.y, got)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_preconditioned_hf_trains_an_mlp_and_counts_its_products(comm):
    p = SoftmaxProblem(5, d=5, classes=3, rows=60, batch=60, l2=1e-3)
    model = DenseNet([5, 8, 3], "tanh", 1e-3, dtype=np.float64)
    theta = model.init_params(2)
    obj = Objective(model, comm, full_batch=True)
    obj.use_batch(p.x, p.y)
    opt = build(theta, obj, name="hessian_free", hf_precondition=True, hf_max_cg=20,
                hf_curvature_batch=0.5)
    values = [float(model.loss(theta, p.x, p.y))]
    for _ in range(10):
        with counted(obj) as used:
            info = opt.step(theta, obj, 0.5)
        # products on half the rows count 0.5 each: CG's, A x0's and rho's
        assert used["curvature_evals"] == pytest.approx(
            0.5 * (info.diagnostics["cg_iters"] + 1 + (info.reason is None)))
        assert used["grad_evals"] == pytest.approx(1.5)      # gradient + Fisher on half
        values.append(float(model.loss(theta, p.x, p.y)))
    assert max(np.diff(values)) < 0 and values[-1] < 0.8 * values[0]   # labels are noise
    assert math.isfinite(opt.lam)
