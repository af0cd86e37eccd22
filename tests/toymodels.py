"""The toy models and problems of the unit and MPI suites, each defined once here.

Models follow hessmpi's model protocol (n_params, xp, dtype, loss, loss_grad, and
curvature_product where it is cheap), so that :class:`hessmpi.objective.Objective` takes
them: a recorder of what a model was asked, a closed-form quadratic, a separable
pseudo-Huber objective; problems: softmax regression on random data with a seeded stream
of minibatches, the rank-dependent rows of the MPI tests, and random SPD matrices.
"""

from __future__ import annotations

import math

import numpy as np

from hessmpi.models.dense import DenseNet


class Recorder:
    """Wraps a model: records the points at which ``loss`` is evaluated (the forward
    passes: line-search trials below full batch), the number of rows of every ``loss_grad``
    call, and in ``points`` every point evaluated either way, in order (at full batch the
    line-search trials are gradients).

    ``spoil_loss(call, value)``: if set, the value this process reports for ``loss`` call
    number ``call`` (from 0). ``nan_grad_at``: the ``loss_grad`` calls (numbered from 0)
    whose gradient gets a NaN. Every other attribute (n_params, xp, dtype, ...) is the
    wrapped model's."""

    def __init__(self, model):
        self.inner = model
        self.trials, self.grad_rows, self.points = [], [], []
        self.spoil_loss, self.nan_grad_at = None, set()

    def __getattr__(self, name):
        if name == "inner":          # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def loss(self, theta, x, y):
        self.trials.append(np.array(theta, copy=True))
        self.points.append(self.trials[-1])
        value = self.inner.loss(theta, x, y)
        if self.spoil_loss is not None:
            value = self.spoil_loss(len(self.trials) - 1, value)
        return value

    def loss_grad(self, theta, x, y, grad):
        call = len(self.grad_rows)
        self.grad_rows.append(len(y))
        self.points.append(np.array(theta, copy=True))
        value = self.inner.loss_grad(theta, x, y, grad)
        if call in self.nan_grad_at:
            grad[0] = np.nan
        return value


def bare(model):
    """The model inside a :class:`Recorder` (one that records nothing), else ``model``."""
    return model.inner if isinstance(model, Recorder) else model


class Quadratic:
    """F(theta) = 1/2 theta^T A theta - b^T theta, float64 (the batch is ignored). ``A``:
    (n, n), or (n,) for a diagonal A, whose gradient is formed in place (no array of
    size n allocated: the allocation test relies on it)."""

    xp, dtype = np, np.float64

    def __init__(self, A, b):
        self.A, self.b = A, b
        self.n_params = len(b)

    def _times_A(self, v, out):
        if self.A.ndim == 1:
            np.multiply(self.A, v, out=out)
        else:
            np.matmul(self.A, v, out=out)
        return out

    def loss(self, theta, x, y):
        if self.A.ndim == 1:
            return 0.5 * float(theta @ (self.A * theta)) - float(self.b @ theta)
        return 0.5 * theta @ self.A @ theta - self.b @ theta

    def loss_grad(self, theta, x, y, grad):
        if self.A.ndim == 1:
            value = 0.5 * float(theta @ self._times_A(theta, grad)) - float(self.b @ theta)
            grad -= self.b
            return value
        grad[...] = self.A @ theta - self.b
        return self.loss(theta, x, y)

    def curvature_product(self, theta, v, x, y, out=None):
        return self._times_A(v, np.empty_like(v) if out is None else out)


class PseudoHuber:
    """F(theta) = sum_i sqrt(1 + theta_i^2) on R^n: convex, with a Hessian that vanishes far
    from 0, so the Newton step from |theta_i| ~ 3 overshoots by a factor ~ theta_i^2."""

    xp, dtype = np, np.float64

    def __init__(self, n: int):
        self.n_params = n

    @staticmethod
    def loss(theta, x, y):
        return float(np.sqrt(1.0 + theta * theta).sum())

    def loss_grad(self, theta, x, y, grad):
        grad[...] = theta / np.sqrt(1.0 + theta * theta)
        return self.loss(theta, x, y)

    @staticmethod
    def value(theta) -> float:
        """F, evaluated independently of the model's own arithmetic."""
        return float(sum(math.sqrt(1.0 + t * t) for t in theta))

    @staticmethod
    def newton_step(theta):
        """The exact Newton step g_i / h_i = theta_i (1 + theta_i^2)."""
        return theta * (1.0 + theta * theta)


class SoftmaxProblem:
    """Softmax regression (DenseNet [d, classes], float64, penalty ``l2``) on ``rows``
    random rows: features standard normal (times ``feature_scale``), labels uniform; a
    starting point theta = theta_scale * N(0, I); and a seeded stream of minibatches of
    ``batch`` rows without replacement (seed ``draw_seed``, default seed + 1).

    ``next()`` makes the problem a sampler, so :meth:`objective` can draw batches from the
    same stream (``Objective.next_batch``, which the drift of pairs = "local" calls)."""

    def __init__(self, seed=0, *, d=5, classes=3, rows=200, batch=32, l2=1e-3,
                 theta_scale=0.3, feature_scale=1.0, draw_seed=None):
        rng = np.random.default_rng(seed)
        self.model = DenseNet([d, classes], "relu", l2, xp=np, dtype=np.float64)
        self.x = rng.standard_normal((rows, d)) * feature_scale
        self.y = rng.integers(0, classes, rows)
        self.theta = theta_scale * rng.standard_normal(self.model.n_params)
        self.batch = batch
        self._rng = np.random.default_rng(seed + 1 if draw_seed is None else draw_seed)

    def next(self):
        """Row indices of the next minibatch of the stream."""
        return self._rng.choice(len(self.y), self.batch, replace=False)

    def draw(self):
        """(x, y) of the next minibatch of the stream."""
        idx = self.next()
        return self.x[idx], self.y[idx]

    def grad(self, theta, x, y):
        """The model's gradient at theta on rows (x, y), recomputed by the test."""
        out = np.empty(self.model.n_params)
        self.model.loss_grad(theta, x, y, out)
        return out

    def objective(self, comm, model=None, *, full_batch=False):
        """The Objective of ``model`` (default: the problem's) on comm, with this problem's
        rows and batch stream for ``next_batch``."""
        from hessmpi.objective import Objective

        return Objective(self.model if model is None else model, comm, self.x, self.y,
                         sampler=self, full_batch=full_batch)


def rank_rows(rank: int, *, seed: int, label_seed: int, spread: float, rows=24, d=5,
              classes=3):
    """This rank's own rows of the MPI tests: features N(0, 1) * (1 + spread * rank),
    labels of a fixed linear rule (seed ``label_seed``) with noise growing with the rank,
    so that the ranks' objectives differ (a missing average over ranks shows)."""
    rng = np.random.default_rng([seed, rank])
    x = rng.standard_normal((rows, d)) * (1.0 + spread * rank)
    w = np.random.default_rng(label_seed).standard_normal((d, classes))
    y = np.argmax(x @ w + (1.0 + rank) * rng.standard_normal((rows, classes)), axis=1)
    return x, y


def spd(n: int, seed: int, eigs=None, *, low=1.0, high=10.0):
    """(A, b, rng): a random symmetric positive definite A = R diag(eigs) R^T (eigs default
    linspace(low, high, n)), a random b, and the generator, which the caller may go on
    drawing from."""
    rng = np.random.default_rng(seed)
    R = np.linalg.qr(rng.standard_normal((n, n)))[0]
    eigs = np.linspace(low, high, n) if eigs is None else np.asarray(eigs)
    return R @ np.diag(eigs) @ R.T, rng.standard_normal(n), rng


# ----- model plug-ins: model.name = f"python:{PLUGINS}:FACTORY" or f"torch:{PLUGINS}:..." -------
#: This file as a plug-in MODULE (a path to a .py file).
PLUGINS = __file__


class DensePlugin:
    """A model of the protocol as a user writes one: a DenseNet inside, only n_params and
    the methods on the outside (no xp or dtype attributes; hessmpi supplies those).
    ``fail``: (rank, call): loss_grad call number ``call`` (from 1) on MPI rank ``rank``
    raises RuntimeError("injected plug-in failure")."""

    def __init__(self, sizes, activation, l2, xp, dtype, fail=None):
        self._net = DenseNet(sizes, activation, l2, xp=xp, dtype=dtype)
        self.n_params = self._net.n_params
        self._fail, self._calls = fail, 0

    def init_params(self, seed):
        return self._net.init_params(seed)

    def loss(self, theta, x, y):
        return self._net.loss(theta, x, y)

    def loss_grad(self, theta, x, y, grad):
        self._calls += 1
        if self._fail is not None and self._calls == self._fail[1]:
            from mpi4py import MPI

            if MPI.COMM_WORLD.rank == self._fail[0]:
                raise RuntimeError("injected plug-in failure")
        return self._net.loss_grad(theta, x, y, grad)

    def evaluate(self, theta, x, y):
        return self._net.evaluate(theta, x, y)


class CurvatureDensePlugin(DensePlugin):
    """DensePlugin with the optional curvature_product."""

    def curvature_product(self, theta, v, x, y, out=None):
        return self._net.curvature_product(theta, v, x, y, out)


def dense_plugin(n_features, n_classes, *, xp, dtype, hidden=(8,), activation="relu",
                 l2=1e-4, fail=None, curvature=False):
    """FACTORY of the DensePlugin [n_features, *hidden, n_classes] (the built-in mlp's
    network: a run with it must equal model.name = "mlp")."""
    cls = CurvatureDensePlugin if curvature else DensePlugin
    return cls([n_features, *hidden, n_classes], activation, l2, xp, dtype,
               None if fail is None else tuple(fail))


def raising_plugin(n_features, n_classes, *, xp, dtype, width=3):
    raise ValueError(f"width {width} must be even")


def not_a_model(n_features, n_classes, *, xp, dtype):
    return {"n_params": 3}


def wrong_length_plugin(n_features, n_classes, *, xp, dtype):
    """init_params gives one value too many."""
    model = dense_plugin(n_features, n_classes, xp=xp, dtype=dtype)
    model.init_params = lambda seed: np.zeros(model.n_params + 1)
    return model


def nan_loss_plugin(n_features, n_classes, *, xp, dtype):
    """A loss that is NaN at the initial parameters."""
    model = dense_plugin(n_features, n_classes, xp=xp, dtype=dtype)
    model.loss_grad = lambda theta, x, y, grad: float("nan")
    return model


def wrong_shape_plugin(n_features, n_classes, *, xp, dtype):
    """A model built for one feature less than the data has: its products fail."""
    return dense_plugin(n_features - 1, n_classes, xp=xp, dtype=dtype)


def torch_mlp(n_features, n_classes, hidden=8, activation="relu"):
    """A torch.nn.Module twin of DenseNet [n_features, hidden, n_classes]."""
    import torch

    act = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}[activation]
    return torch.nn.Sequential(torch.nn.Linear(n_features, hidden), act(),
                               torch.nn.Linear(hidden, n_classes))


def torch_not_a_module(n_features, n_classes):
    return "a string"


def torch_with_buffers(n_features, n_classes):
    import torch

    return torch.nn.Sequential(torch.nn.Linear(n_features, 4), torch.nn.BatchNorm1d(4),
                               torch.nn.Linear(4, n_classes))


def torch_theta_from_dense(net: DenseNet, theta) -> np.ndarray:
    """DenseNet parameters theta as the flat vector of its torch.nn.Sequential twin
    (Linear weights are (fan_out, fan_in): the transposes)."""
    parts = []
    for w, b in net.views(np.asarray(theta)):
        parts += [w.T.ravel(), b]
    return np.concatenate(parts)
