"""SGD with momentum: the update recursion, its bookkeeping, and convergence on a quadratic."""

from __future__ import annotations

import numpy as np
import pytest

from hessmpi.optim import SGD


def reference_trajectory(theta0, grads, lrs, momentum, weight_decay, nesterov):
    """The documented recursion, one scalar component at a time."""
    theta = [float(t) for t in theta0]
    vel = [0.0] * len(theta)
    out = []
    for grad, lr in zip(grads, lrs, strict=True):
        for i in range(len(theta)):
            g = grad[i] + weight_decay * theta[i]
            vel[i] = momentum * vel[i] + g
            d = g + momentum * vel[i] if nesterov else vel[i]
            theta[i] -= lr * d
        out.append(list(theta))
    return out


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 0.0), (0.5, 0.01),
                                                        (0.99, 0.3)])
def test_step_matches_reference_recursion(momentum, weight_decay, nesterov):
    rng = np.random.default_rng(0)
    n, steps = 6, 7
    theta = rng.standard_normal(n)
    grads = [rng.standard_normal(n) for _ in range(steps)]
    lrs = [0.1, 0.05, 0.2, 0.2, 0.01, 0.3, 0.15]
    expected = reference_trajectory(theta, grads, lrs, momentum, weight_decay, nesterov)
    opt = SGD(theta, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    for k in range(steps):
        before = theta.copy()
        grad = grads[k].copy()
        opt.update(theta, grad, lrs[k])
        np.testing.assert_array_equal(grad, grads[k])  # grad not modified
        np.testing.assert_allclose(theta, expected[k], rtol=1e-13, atol=1e-15)
        assert opt.last_step_norm == pytest.approx(np.linalg.norm(theta - before), rel=1e-12)


def test_first_step_and_velocity_state():
    theta = np.array([1.0, -2.0])
    opt = SGD(theta, momentum=0.5, weight_decay=0.0, nesterov=False)
    assert not opt.state()["velocity"].any()
    opt.update(theta, np.array([1.0, 1.0]), 0.1)  # v = g; theta -= 0.1 * g
    np.testing.assert_allclose(theta, [0.9, -2.1], rtol=1e-15)
    opt.update(theta, np.array([0.0, 2.0]), 0.1)  # v = [0.5, 2.5]
    np.testing.assert_allclose(opt.state()["velocity"], [0.5, 2.5], rtol=1e-15)
    np.testing.assert_allclose(theta, [0.85, -2.35], rtol=1e-15)
    assert opt.last_step_norm == pytest.approx(0.1 * np.hypot(0.5, 2.5), rel=1e-14)


def test_nesterov_first_step():
    theta = np.array([1.0])
    opt = SGD(theta, momentum=0.9, weight_decay=0.0, nesterov=True)
    opt.update(theta, np.array([2.0]), 0.1)  # v = 2; d = 2 + 0.9*2 = 3.8
    assert theta[0] == pytest.approx(1.0 - 0.38, rel=1e-15)
    assert opt.last_step_norm == pytest.approx(0.38, rel=1e-14)


def test_float32_state():
    theta = np.ones(3, np.float32)
    opt = SGD(theta, momentum=0.9, weight_decay=0.1, nesterov=True)
    opt.update(theta, np.full(3, 0.5, np.float32), 0.1)
    assert theta.dtype == np.float32 and opt.velocity.dtype == np.float32
    np.testing.assert_allclose(theta, 1 - 0.1 * (0.6 + 0.9 * 0.6), rtol=1e-6)


def quadratic(n=8, cond=20.0, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = q @ np.diag(np.geomspace(1.0, cond, n)) @ q.T
    return a, rng.standard_normal(n)


@pytest.mark.parametrize(("momentum", "nesterov", "weight_decay"),
                         [(0.9, False, 0.0), (0.9, True, 0.0), (0.5, False, 0.0),
                          (0.8, True, 0.5)])
def test_converges_on_quadratic(momentum, nesterov, weight_decay):
    """f = 1/2 (theta - t*)^T A (theta - t*); with weight decay w the fixed point solves
    (A + w I) theta = A t*."""
    a, target = quadratic()
    lmax = np.linalg.eigvalsh(a).max() + weight_decay
    minimum = np.linalg.solve(a + weight_decay * np.eye(len(target)), a @ target)
    theta = np.zeros_like(target)
    opt = SGD(theta, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    start = np.linalg.norm(theta - minimum)
    for _ in range(1500):
        opt.update(theta, a @ (theta - target), 0.5 / lmax)
    assert np.linalg.norm(theta - minimum) < 1e-8 * start
    assert opt.last_step_norm < 1e-8

