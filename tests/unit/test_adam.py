"""Adam against its recursion written out scalar by scalar, through the objective."""

from __future__ import annotations

import math

import numpy as np
from harness import build
from toymodels import Quadratic, spd

from hessmpi.objective import Objective


def test_adam_follows_its_recursion_and_resumes(comm):
    n, lr, b1, b2, eps = 4, 0.05, 0.8, 0.99, 1e-6
    A, b, rng = spd(n, 0)
    theta = rng.standard_normal(n)
    obj = Objective(Quadratic(A, b), comm)
    obj.use_batch(np.zeros((1, 1)), np.zeros(1, dtype=np.int64))
    opt = build(theta, obj, name="adam", momentum=b1, adam_beta2=b2, adam_eps=eps)
    want, m, v = [float(t) for t in theta], [0.0] * n, [0.0] * n
    for t in range(1, 6):
        g = A @ np.array(want) - b
        for i in range(n):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            want[i] -= lr * (m[i] / (1 - b1 ** t)) / (math.sqrt(v[i] / (1 - b2 ** t)) + eps)
        opt.step(theta, obj, lr)
        np.testing.assert_allclose(theta, want, rtol=1e-12)
        if t == 3:
            state = {k: np.array(a, copy=True) for k, a in opt.state().items()}
            again = build(theta, obj, name="adam", momentum=b1, adam_beta2=b2, adam_eps=eps)
            again.load_state(state, same_layout=True)
            copy = theta.copy()
    again.step(copy, obj, lr)
    again.step(copy, obj, lr)
    np.testing.assert_array_equal(copy, theta)
