"""The distributed objective (hessmpi.objective.Objective) on one rank (COMM_SELF), against
the model called directly: loss, gradient, forward value, curvature product and evaluation
equal the model's on the same rows; the counters count what was evaluated (r / B for a
gradient on r of the batch's B rows); a non-finite loss raises NonFiniteLoss; the stop flag
travels with the gradient's reduction. (On P ranks: tests/mpi/test_objective_mpi.py.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from toymodels import Recorder, SoftmaxProblem

from hessmpi.data import Sampler
from hessmpi.errors import NonFiniteLoss, RunFailed
from hessmpi.objective import Objective

B = 32


@pytest.fixture
def problem():
    """Softmax regression [5, 3] on 200 random rows, float64; batches of 32."""
    return SoftmaxProblem(7, d=5, classes=3, rows=200, batch=B, l2=1e-3)


def on_batch(problem, comm):
    """(Objective on one rank with the next batch of the problem's stream, x, y)."""
    x, y = problem.draw()
    objective = Objective(problem.model, comm)
    objective.use_batch(x, y)
    return objective, x, y


def test_gradient_equals_the_model_on_the_batch(problem, comm):
    objective, x, y = on_batch(problem, comm)
    theta = problem.theta
    g = np.empty(problem.model.n_params)
    want = float(problem.model.loss_grad(theta, x, y, g))
    assert objective.batch_rows == B
    local = objective.local_gradient(theta)
    assert local == want
    np.testing.assert_array_equal(objective.grad, g)
    # one rank: the reduction returns the loss and leaves the gradient as it is
    assert objective.reduce_gradient(local) == want
    np.testing.assert_array_equal(objective.grad, g)
    objective.grad[...] = 0
    assert objective.gradient(theta) == want
    np.testing.assert_array_equal(objective.grad, g)
    assert objective.grad_evals == 2 and objective.forward_evals == 0
    assert objective.seconds > 0


def test_gradient_into_out_and_on_rows_of_the_batch(problem, comm):
    """``out`` leaves ``grad`` alone; ``rows`` differentiates only those rows and counts
    rows / B gradient evaluations."""
    objective, x, y = on_batch(problem, comm)
    theta = problem.theta
    objective.local_gradient(theta)
    grad = objective.grad.copy()
    out = np.empty_like(grad)
    loss = objective.local_gradient(0.5 * theta, out, rows=slice(0, 8))
    g = np.empty_like(grad)
    assert loss == float(problem.model.loss_grad(0.5 * theta, x[:8], y[:8], g))
    np.testing.assert_array_equal(out, g)
    np.testing.assert_array_equal(objective.grad, grad)
    assert objective.grad_evals == 1 + 8 / B
    objective.local_gradient(theta, out, rows=slice(8, 11))
    assert objective.grad_evals == 1 + 11 / B


@pytest.mark.parametrize("cuts", [[(0, 8), (24, 32)], [(0, 16), (16, 32)], [(5, 9)],
                                  [(24, 32)]])
def test_a_gradient_in_pieces_is_the_batchs_and_each_pieces(problem, comm, cuts):
    """``pieces``: the batch's loss and gradient are the one-pass ones (to round-off), each
    piece's gradient is the model's on its rows alone, and the work counted is one
    gradient."""
    objective, x, y = on_batch(problem, comm)
    theta = problem.theta
    want = np.empty(problem.model.n_params)
    want_loss = float(problem.model.loss_grad(theta, x, y, want))
    outs = [np.full_like(want, np.nan) for _ in cuts]
    loss = objective.local_gradient(theta, pieces=[(slice(a, b), out) for (a, b), out
                                                   in zip(cuts, outs, strict=True)])
    assert loss == pytest.approx(want_loss, rel=1e-14)
    np.testing.assert_allclose(objective.grad, want, rtol=1e-13, atol=1e-16)
    for (a, b), out in zip(cuts, outs, strict=True):
        g = np.empty_like(want)
        problem.model.loss_grad(theta, x[a:b], y[a:b], g)
        np.testing.assert_array_equal(out, g)
    assert objective.grad_evals == pytest.approx(1.0, abs=1e-15)


def test_mean_gradient_at_another_point(problem, comm):
    objective, x, y = on_batch(problem, comm)
    objective.local_gradient(problem.theta)
    grad = objective.grad.copy()
    point = problem.theta + 0.1
    out = np.empty_like(grad)
    objective.mean_gradient_at(point, out)
    np.testing.assert_array_equal(out, problem.grad(point, x, y))
    np.testing.assert_array_equal(objective.grad, grad)            # grad is not touched
    assert objective.grad_evals == 2


def test_value_is_a_counted_forward_pass(problem, comm):
    objective, x, y = on_batch(problem, comm)
    model = Recorder(problem.model)
    objective.model = model
    point = problem.theta * 0.7
    assert objective.value(point) == float(problem.model.loss(point, x, y))
    assert objective.forward_evals == 1 and objective.grad_evals == 0
    assert len(model.trials) == 1 and model.grad_rows == []
    np.testing.assert_array_equal(model.trials[0], point)
    model.spoil_loss = lambda call, value: math.nan     # a NaN value is returned, not raised
    assert math.isnan(objective.value(point))
    assert objective.forward_evals == 2


def test_curvature_product_is_counted_and_equals_the_model(problem, comm):
    objective, x, y = on_batch(problem, comm)
    v = np.random.default_rng(3).standard_normal(problem.model.n_params)
    out = np.empty_like(v)
    objective.curvature_product(problem.theta, v, out)
    np.testing.assert_array_equal(out, problem.model.curvature_product(problem.theta, v, x, y))
    assert objective.curvature_evals == 1
    assert objective.grad_evals == 0 and objective.forward_evals == 0


def test_evaluate_is_the_mean_loss_and_accuracy_and_is_not_counted(problem, comm):
    objective, _, _ = on_batch(problem, comm)
    x, y = problem.x[:37], problem.y[:37]
    loss_sum, correct = problem.model.evaluate(problem.theta, x, y)
    loss, accuracy = objective.evaluate(problem.theta, x, y)
    assert loss == pytest.approx(loss_sum / 37, rel=1e-15) and accuracy == correct / 37
    assert objective.counters() == {"grad_evals": 0.0, "forward_evals": 0,
                                    "curvature_evals": 0}


def test_next_batch_takes_the_samplers_rows(problem, comm):
    objective = Objective(problem.model, comm, problem.x, problem.y, Sampler(200, B, 5, 0))
    twin = Sampler(200, B, 5, 0)
    for _ in range(3):
        objective.next_batch()
        idx = twin.next()
        np.testing.assert_array_equal(objective.x, problem.x[idx])
        np.testing.assert_array_equal(objective.y, problem.y[idx])
        assert objective.batch_rows == B


def test_counters_restore_and_continue(problem, comm):
    objective, _, _ = on_batch(problem, comm)
    objective.restore_counters({"grad_evals": 2.5, "forward_evals": 4, "curvature_evals": 1})
    objective.gradient(problem.theta)
    objective.value(problem.theta)
    assert objective.counters() == {"grad_evals": 3.5, "forward_evals": 5,
                                    "curvature_evals": 1}
    objective.restore_counters({"grad_evals": 1.0})             # an older checkpoint
    assert objective.counters() == {"grad_evals": 1.0, "forward_evals": 0,
                                    "curvature_evals": 0}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_loss_raises(problem, comm, bad):
    objective, _, _ = on_batch(problem, comm)
    with pytest.raises(NonFiniteLoss, match="the training loss is") as caught:
        objective.reduce_gradient(bad)
    assert isinstance(caught.value, RunFailed)
    assert caught.value.value == bad or (math.isnan(bad) and math.isnan(caught.value.value))


def test_a_nan_in_the_batch_raises_from_gradient(problem, comm):
    objective, x, y = on_batch(problem, comm)
    x = x.copy()
    x[3, 1] = np.nan
    objective.use_batch(x, y)
    with np.errstate(all="ignore"), pytest.raises(NonFiniteLoss):
        objective.gradient(problem.theta)


def test_the_stop_flag_travels_with_the_gradient(problem, comm):
    objective, x, y = on_batch(problem, comm)
    g = problem.grad(problem.theta, x, y)
    assert not objective.stop_requested
    objective.stop_flag = 15                                     # SIGTERM on this rank
    objective.gradient(problem.theta)
    assert objective.stop_requested
    np.testing.assert_array_equal(objective.grad, g)             # the flag is not in grad
    objective.stop_flag = 0
    objective.gradient(problem.theta)
    assert not objective.stop_requested
