"""The Python API on one rank: DistributedOptimizer steps are the optimizer's steps written
out (SGD on a quadratic in closed form), its options are validated like a file's, and its
state continues a run bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from toymodels import Quadratic, SoftmaxProblem, spd

import hessmpi
from hessmpi.errors import UsageError


def quadratic_model(n=6, seed=0):
    A, b, _ = spd(n, seed)
    quad = Quadratic(A, b)
    return quad, hessmpi.FunctionModel(n, quad.loss_grad, loss=quad.loss,
                                       curvature_product=quad.curvature_product)


def test_sgd_steps_are_the_written_out_recursion(solo):
    quad, model = quadratic_model()
    theta0 = np.linspace(-1, 1, 6)
    opt = hessmpi.DistributedOptimizer(model, comm=solo, theta=theta0,
                                       optim={"name": "sgd", "lr": 0.05, "momentum": 0.5})
    theta, velocity = theta0.copy(), np.zeros(6)
    for _ in range(5):
        info = opt.step(np.zeros((1, 1)), np.zeros(1, np.int64))
        g = quad.A @ theta - quad.b
        assert info.loss == pytest.approx(quad.loss(theta, None, None), rel=1e-12)
        velocity = 0.5 * velocity + g
        theta = theta - 0.05 * velocity
    np.testing.assert_allclose(opt.theta, theta, rtol=1e-12)
    assert opt.steps == 5 and opt.rank == 0 and opt.size == 1


def test_function_model_defaults(solo):
    quad, _ = quadratic_model()
    model = hessmpi.FunctionModel(6, quad.loss_grad)
    theta = np.ones(6)
    assert model.loss(theta, None, np.zeros(3)) == pytest.approx(quad.loss(theta, None, None))
    loss_sum, correct = model.evaluate(theta, None, np.zeros(3))
    assert loss_sum == pytest.approx(3 * quad.loss(theta, None, None)) and np.isnan(correct)
    assert not hasattr(model, "curvature_product")
    np.testing.assert_array_equal(model.init_params(3), np.zeros(6))


def test_options_are_validated_like_a_file(solo):
    _, model = quadratic_model()
    with pytest.raises(UsageError, match="optim.nesterov"):
        hessmpi.DistributedOptimizer(model, comm=solo, optim={"name": "secant",
                                                              "nesterov": True})
    with pytest.raises(UsageError, match="optim.lrr"):
        hessmpi.DistributedOptimizer(model, comm=solo, optim={"lrr": 0.1})
    with pytest.raises(UsageError, match="batch_test .* full_batch=True"):
        hessmpi.DistributedOptimizer(model, comm=solo, full_batch=True,
                                     optim={"batch_test": "inner_product"})
    with pytest.raises(ValueError, match=r"theta has shape \(5,\)"):
        hessmpi.DistributedOptimizer(model, comm=solo, theta=np.zeros(5))


def test_state_continues_a_secant_run_bit_for_bit(solo):
    problem = SoftmaxProblem(seed=3, rows=120, batch=16)
    batches = [problem.draw() for _ in range(12)]
    optim = {"name": "secant", "lr": 0.2, "memory": 3}
    whole = hessmpi.DistributedOptimizer(problem.model, comm=solo, optim=optim,
                                         theta=problem.theta)
    for x, y in batches:
        whole.step(x, y)
    first = hessmpi.DistributedOptimizer(problem.model, comm=solo, optim=optim,
                                         theta=problem.theta)
    for x, y in batches[:5]:
        first.step(x, y)
    saved = first.state()
    second = hessmpi.DistributedOptimizer(problem.model, comm=solo, optim=optim)
    second.load_state(saved)
    for x, y in batches[5:]:
        second.step(x, y)
    np.testing.assert_array_equal(second.theta, whole.theta)
    assert second.steps == 12
    second.check_consistency()


def test_requested_batch_is_the_variance_test_on_the_rows_given(solo):
    """Least squares F = mean (x^T theta - y)^2 / 2 over 12 rows in 3 pieces of 4: the
    piece gradients X_j^T (X_j theta - y_j) / 4 written out, the inner-product test's batch
    from its definition (theta = 0.5 alone: the orthogonality test never binds at nu 1e9)."""
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((12, 3)), rng.standard_normal(12)

    def loss_grad(theta, xb, yb, grad):
        r = xb @ theta - yb
        grad[...] = xb.T @ r / len(yb)
        return float(r @ r / (2 * len(yb)))

    opt = hessmpi.DistributedOptimizer(
        hessmpi.FunctionModel(3, loss_grad), comm=solo, theta=np.ones(3),
        optim={"name": "sgd", "lr": 0.1, "batch_test": "inner_product", "batch_pieces": 3,
               "batch_theta": 0.5, "batch_nu": 1e9})
    assert opt.requested_batch == 0
    opt.step(x, y)
    pieces = [x[j:j + 4].T @ (x[j:j + 4] @ np.ones(3) - y[j:j + 4]) / 4 for j in (0, 4, 8)]
    g = np.mean(pieces, axis=0)
    var = sum(4 * (p @ g - g @ g) ** 2 for p in pieces) / 2
    assert opt.requested_batch == pytest.approx(var / (0.25 * (g @ g) ** 2), rel=1e-9)
