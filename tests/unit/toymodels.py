"""Small models shared by the unit tests of the secant optimizer: a recorder of the points
and rows a model was asked about, and a closed-form quadratic."""

from __future__ import annotations

import numpy as np


class Recorder:
    """Wraps a model: records the points at which ``loss`` is evaluated (the line-search
    trials) and the number of rows of every ``loss_grad`` call."""

    def __init__(self, model):
        self.inner, self.xp = model, model.xp
        self.trials, self.grad_rows = [], []

    def loss(self, theta, x, y):
        self.trials.append(np.array(theta, copy=True))
        return self.inner.loss(theta, x, y)

    def loss_grad(self, theta, x, y, grad):
        self.grad_rows.append(len(y))
        return self.inner.loss_grad(theta, x, y, grad)


class Quadratic:
    """F(theta) = 1/2 theta^T A theta - b^T theta (the batch is ignored)."""

    xp = np

    def __init__(self, A, b):
        self.A, self.b = A, b

    def loss(self, theta, x, y):
        return 0.5 * theta @ self.A @ theta - self.b @ theta

    def loss_grad(self, theta, x, y, grad):
        grad[...] = self.A @ theta - self.b
        return self.loss(theta, x, y)
