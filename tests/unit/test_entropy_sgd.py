"""Entropy-SGD (``optim.name = "entropy_sgd"``) on one rank: without noise on a quadratic
its running average mu reaches the closed-form minimiser of the local-entropy inner problem,
the outer step is Nesterov's on gamma (x - mu) written out by hand, gamma is scoped, the
noise is the seeded generator's, and the inner steps are the gradient evaluations."""

from __future__ import annotations

import numpy as np
import pytest
from harness import build
from toymodels import Quadratic, spd

from hessmpi.objective import Objective

DUMMY_X, DUMMY_Y = np.zeros((4, 1)), np.zeros(4, dtype=np.int64)


class Batches:
    """A sampler of nothing: Entropy-SGD asks the objective for fresh batches."""

    def next(self):
        return np.arange(4)


def esgd(model, theta, comm, **keys):
    objective = Objective(model, comm, DUMMY_X, DUMMY_Y, Batches())
    objective.use_batch(DUMMY_X, DUMMY_Y)
    return build(theta, objective, name="entropy_sgd", **keys), objective


def test_without_noise_mu_is_the_minimiser_of_the_inner_problem(comm):
    """f quadratic, eps = 0: the inner loop is gradient descent on
    f(x') + gamma/2 ||x - x'||^2 from x' = x, whose minimiser is (A + gamma I)^-1 (b + gamma x);
    with L large mu (a running average of x') is there, and the outer step with momentum 0
    is lr gamma (x - mu)."""
    n, gamma, lr = 5, 0.5, 0.3
    A, b, rng = spd(n, 0, high=4.0)
    x = rng.standard_normal(n)
    opt, obj = esgd(Quadratic(A, b), x.copy(), comm, entropy_noise=0.0, entropy_steps=600,
                    entropy_gamma=gamma, entropy_scoping=0.0, entropy_lr=0.1, momentum=0.0)
    theta = x.copy()
    opt.step(theta, obj, lr)
    inner = np.linalg.solve(A + gamma * np.eye(n), b + gamma * x)
    np.testing.assert_allclose(opt._mu, inner, rtol=1e-10)
    np.testing.assert_allclose(theta, x - lr * gamma * (x - inner), rtol=1e-10)
    assert obj.grad_evals == 600


def test_outer_step_is_nesterov_and_gamma_is_scoped(comm):
    """Two outer steps with L = 1 (mu = (1 - alpha) x + alpha x', x' one inner step):
    v <- m v + g, x <- x - lr (g + m v), g = gamma (x - mu); gamma *= 1 + gamma_1."""
    n, lr, m, alpha, eta = 4, 0.2, 0.9, 0.25, 0.1
    A, b, rng = spd(n, 1)
    x = rng.standard_normal(n)
    keys = dict(entropy_noise=0.0, entropy_steps=1, entropy_gamma=0.7, entropy_scoping=0.5,
                entropy_lr=eta, entropy_alpha=alpha, momentum=m)
    opt, obj = esgd(Quadratic(A, b), x.copy(), comm, **keys)
    theta, v, gamma = x.copy(), np.zeros(n), 0.7
    want = x.copy()
    for _ in range(2):
        opt.step(theta, obj, lr)
        inner = want - eta * (A @ want - b)                    # gamma (x - x') = 0 at x' = x
        mu = (1 - alpha) * want + alpha * inner
        g = gamma * (want - mu)
        v = m * v + g
        want = want - lr * (g + m * v)
        gamma *= 1.5
        np.testing.assert_allclose(theta, want, rtol=1e-12)
    assert opt.gamma == pytest.approx(gamma)


def test_noise_is_the_seeded_generators_and_the_state_resumes(comm):
    n = 6
    A, b, rng = spd(n, 2)
    x = rng.standard_normal(n)
    keys = dict(entropy_noise=0.5, entropy_steps=3, momentum=0.9)
    opt, obj = esgd(Quadratic(A, b), x, comm, **keys)
    a, b_ = x.copy(), x.copy()
    opt.step(a, obj, 0.1)
    again, obj2 = esgd(Quadratic(A, b), x, comm, **keys)
    again.step(b_, obj2, 0.1)
    np.testing.assert_array_equal(a, b_)                        # same seed: same noise
    quiet, obj3 = esgd(Quadratic(A, b), x, comm, **(keys | {"entropy_noise": 0.0}))
    c = x.copy()
    quiet.step(c, obj3, 0.1)
    assert not np.allclose(a, c)                                # the noise does move x'
    # a resumed optimizer continues bitwise
    state = {k: np.array(v, copy=True) for k, v in opt.state().items()}
    resumed, obj4 = esgd(Quadratic(A, b), x, comm, **keys)
    resumed.load_state(state, same_layout=True)
    d = a.copy()
    opt.step(a, obj, 0.1)
    resumed.step(d, obj4, 0.1)
    np.testing.assert_array_equal(a, d)
