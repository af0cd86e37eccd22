"""The deep autoencoder (ALGORITHM.md s.9): DenseNet with per-layer activations (logistic
hidden units, a linear code layer), the sigmoid cross-entropy reconstruction output whose
targets are the inputs, Martens' sparse initialisation, and build_model for
``model.name = "autoencoder"``.

Every check compares against something written here independently of hessmpi.models.dense:
a forward pass from the documented parameter layout, the summed binary cross-entropy written
with np.logaddexp, central finite differences (of the loss, of the logits, of the gradient)
and the dense Gauss-Newton matrix J^T H J + l2 I.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from hessmpi import config
from hessmpi.errors import UsageError
from hessmpi.models import DenseNet, build_model

# d -> 5 (logistic) -> 3 (linear code) -> 5 (logistic) -> d, sigmoid output
SIZES = [6, 5, 3, 5, 6]
ACTS = ["sigmoid", "linear", "sigmoid"]
B, L2 = 7, 1e-3


# ----- independent reference -------------------------------------------------------------------
def ref_logits(sizes, acts, theta, x):
    """Logits from the documented layout: per layer W (fan_in, fan_out) row-major, then b."""
    a, off = np.asarray(x, dtype=np.float64), 0
    for l, (fi, fo) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        w = theta[off:off + fi * fo].reshape(fi, fo)
        off += fi * fo
        b = theta[off:off + fo]
        off += fo
        z = a @ w + b
        if l < len(sizes) - 2:
            z = {"sigmoid": lambda v: 1.0 / (1.0 + np.exp(-v)), "linear": lambda v: v,
                 "tanh": np.tanh}[acts[l]](z)
        a = z
    assert off == len(theta)
    return a


def ref_bce_per_sample(logits, x):
    """sum_j BCE(sigmoid(z_ij), x_ij) = sum_j log(1 + e^z) - x z, for each row i."""
    return (np.logaddexp(0.0, logits) - x * logits).sum(axis=1)


def ref_objective(sizes, acts, l2, theta, x):
    return ref_bce_per_sample(ref_logits(sizes, acts, theta, x), x).mean() \
        + 0.5 * l2 * float(theta @ theta)


def problem(sizes=SIZES, acts=ACTS, l2=L2, seed=0):
    rng = np.random.default_rng(seed)
    model = DenseNet(sizes, "sigmoid", l2, activations=acts, output="sigmoid", xp=np,
                     dtype=np.float64)
    theta = 0.7 * rng.standard_normal(model.n_params)
    x = rng.uniform(0.0, 1.0, (B, sizes[0]))     # targets in [0, 1], like pixel intensities
    y = np.zeros(B, dtype=np.int64)              # labels: ignored by the sigmoid output
    return model, theta, x, y


def central(f, theta, h):
    """Central differences of f (scalar or array valued) along each coordinate: (n, *f.shape)."""
    out = []
    for i in range(len(theta)):
        tp, tm = theta.copy(), theta.copy()
        tp[i] += h
        tm[i] -= h
        out.append((np.asarray(f(tp)) - np.asarray(f(tm))) / (2 * h))
    return np.stack(out)


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b))


def dense_curvature(model, theta, x, y):
    eye = np.eye(model.n_params)
    return np.stack([model.curvature_product(theta, e, x, y) for e in eye], axis=1)


def grad_of(model, theta, x, y):
    out = np.empty(model.n_params)
    model.loss_grad(theta, x, y, out)
    return out


# ----- objective and gradient ------------------------------------------------------------------
def test_loss_is_the_mean_summed_bce_plus_l2():
    model, theta, x, y = problem()
    want = ref_objective(SIZES, ACTS, L2, theta, x)
    assert rel(float(model.loss(theta, x, y)), want) < 1e-13
    grad = np.full(model.n_params, np.nan)
    assert rel(float(model.loss_grad(theta, x, y, grad)), want) < 1e-13
    # the labels play no part: the targets are the inputs
    assert float(model.loss(theta, x, y + 3)) == float(model.loss(theta, x, y))
    # BCE against the probabilities, written the textbook way
    p = 1.0 / (1.0 + np.exp(-ref_logits(SIZES, ACTS, theta, x)))
    textbook = -(x * np.log(p) + (1 - x) * np.log(1 - p)).sum(axis=1).mean()
    assert rel(float(model.loss(theta, x, y)) - 0.5 * L2 * theta @ theta, textbook) < 1e-12


def test_loss_is_finite_and_exact_for_huge_logits():
    model = DenseNet([3, 3], "sigmoid", 0.0, activations=[], output="sigmoid")
    theta = np.zeros(model.n_params)
    theta[-3:] = [900.0, -900.0, 40.0]            # biases: logits +-900 and 40 on every row
    x = np.array([[0.0, 1.0, 0.25], [1.0, 0.0, 0.5]])
    want = ref_bce_per_sample(np.tile(theta[-3:], (2, 1)), x).mean()
    got = float(model.loss(theta, x, np.zeros(2, dtype=np.int64)))
    assert math.isfinite(got) and rel(got, want) < 1e-14


def test_gradient_matches_central_differences():
    model, theta, x, y = problem()
    grad = grad_of(model, theta, x, y)
    fd = central(lambda t: ref_objective(SIZES, ACTS, L2, t, x), theta, 1e-6)
    assert rel(grad, fd) < 1e-6
    # each layer's block, so that a small layer's error is not hidden by a large one's
    for (gw, gb), (fw, fb) in zip(model.views(grad), model.views(fd), strict=True):
        assert rel(gw, fw) < 1e-6 and rel(gb, fb) < 1e-6


@pytest.mark.parametrize("acts", [["linear", "linear", "linear"], ["sigmoid"] * 3,
                                  ["tanh", "linear", "sigmoid"]])
def test_gradient_of_other_per_layer_activations(acts):
    model, theta, x, y = problem(acts=acts, seed=1)
    fd = central(lambda t: ref_objective(SIZES, acts, L2, t, x), theta, 1e-6)
    assert rel(grad_of(model, theta, x, y), fd) < 1e-6


# ----- curvature --------------------------------------------------------------------------------
def test_curvature_product_is_the_dense_gauss_newton_matrix():
    """G = J^T H J + l2 I, with J the Jacobian of the logits (B*d, n) by central differences
    of the reference forward pass and H = diag(p (1 - p)) / B."""
    model, theta, x, y = problem(seed=2)
    logits = ref_logits(SIZES, ACTS, theta, x)
    p = 1.0 / (1.0 + np.exp(-logits))
    J = central(lambda t: ref_logits(SIZES, ACTS, t, x).ravel(), theta, 1e-6).T
    G = J.T @ np.diag((p * (1 - p)).ravel() / B) @ J + L2 * np.eye(model.n_params)
    got = dense_curvature(model, theta, x, y)
    assert rel(got, G) < 1e-7
    v = np.random.default_rng(3).standard_normal(model.n_params)
    assert rel(model.curvature_product(theta, v, x, y), G @ v) < 1e-7


def test_without_hidden_layer_the_curvature_is_the_exact_hessian():
    """[d, d] with the sigmoid output is d independent logistic regressions: G = Hessian,
    here the central difference of analytic gradients. With hidden layers it is not."""
    model, theta, x, y = problem(sizes=[6, 6], acts=[], seed=4)
    hess = central(lambda t: grad_of(model, t, x, y), theta, 1e-5).T
    G = dense_curvature(model, theta, x, y)
    assert rel(G, hess) < 1e-7
    assert np.abs(G - G.T).max() <= 1e-15 * np.abs(G).max()
    deep, theta, x, y = problem(seed=4)
    hess = central(lambda t: grad_of(deep, t, x, y), theta, 1e-5).T
    assert rel(dense_curvature(deep, theta, x, y), hess) > 1e-3   # the test discriminates


# ----- initialisation ---------------------------------------------------------------------------
def test_sparse_init_has_min_15_fan_in_nonzeros_per_unit_and_zero_biases():
    sizes = [20, 10, 4, 10, 20]                   # fan_in 20 -> 15, 10 -> 10, 4 -> 4, 10 -> 10
    model = DenseNet(sizes, "sigmoid", 0.0, activations=["sigmoid", "linear", "sigmoid"],
                     output="sigmoid", init="sparse")
    theta = model.init_params(5)
    values = []
    for (w, b), fan_in in zip(model.views(theta), sizes[:-1], strict=True):
        assert w.shape[0] == fan_in
        np.testing.assert_array_equal(np.count_nonzero(w, axis=0),
                                      np.full(w.shape[1], min(15, fan_in)))
        np.testing.assert_array_equal(b, 0.0)
        values.append(w[w != 0])
    values = np.concatenate(values)               # 15*10 + 10*4 + 4*10 + 10*20 = 430
    assert len(values) == 430
    assert abs(values.mean()) < 0.2 and 0.8 < values.std() < 1.2    # unit Gaussian weights
    np.testing.assert_array_equal(model.init_params(5), theta)      # seeded
    assert not np.array_equal(model.init_params(6), theta)
    # which inputs feed a unit differs from unit to unit (not the same 15 rows each time)
    w0 = model.views(theta)[0][0]
    assert len({tuple(np.flatnonzero(w0[:, j])) for j in range(w0.shape[1])}) > 1


def test_sparse_init_in_float32():
    model = DenseNet([30, 8, 30], "sigmoid", 0.0, activations=["linear"], output="sigmoid",
                     init="sparse", dtype=np.float32)
    theta = model.init_params(0)
    assert theta.dtype == np.float32
    for w, b in model.views(theta):
        assert (np.count_nonzero(w, axis=0) == min(15, w.shape[0])).all() and not b.any()


# ----- build_model and evaluate -----------------------------------------------------------------
@pytest.mark.parametrize("encoder, sizes, acts", [
    ([8, 4, 2], [12, 8, 4, 2, 4, 8, 12], ["sigmoid", "sigmoid", "linear", "sigmoid", "sigmoid"]),
    ([9, 3], [12, 9, 3, 9, 12], ["sigmoid", "linear", "sigmoid"]),
    ([3], [12, 3, 12], ["linear"]),
])
def test_build_model_autoencoder(encoder, sizes, acts):
    cfg = config.defaults()["model"] | {"name": "autoencoder", "encoder": encoder, "l2": 1e-5}
    model = build_model(cfg, 12, 10, xp=np, dtype=np.float64)
    assert model.sizes == sizes and model.activations == acts
    assert model.output == "sigmoid" and model.init == "sparse" and model.l2 == 1e-5
    assert model.n_params == sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    theta = model.init_params(0)
    for w, b in model.views(theta):
        assert (np.count_nonzero(w, axis=0) == min(15, w.shape[0])).all() and not b.any()


def test_autoencoder_config_is_accepted_and_built():
    cfg = config.load(None, ["model.name=autoencoder", "model.encoder=[7, 2]", "model.l2=0"])
    model = build_model(cfg["model"], 5, 3, xp=np, dtype=np.float32)
    assert model.sizes == [5, 7, 2, 7, 5] and model.dtype == np.float32
    with pytest.raises(UsageError, match="encoder"):
        config.load(None, ["model.name=autoencoder", "model.encoder=[7, 0]"])


def test_empty_encoder_is_a_usage_error():
    with pytest.raises(UsageError, match="encoder"):
        config.load(None, ["model.name=autoencoder", "model.encoder=[]"])


@pytest.mark.parametrize("chunk", [3, 4096])
def test_evaluate_returns_summed_bce_and_nan_accuracy(chunk):
    model, theta, x, y = problem(seed=6)
    loss_sum, correct = model.evaluate(theta, x, y, chunk=chunk)
    want = ref_bce_per_sample(ref_logits(SIZES, ACTS, theta, x), x).sum()   # no L2 term
    assert rel(loss_sum, want) < 1e-13
    assert isinstance(correct, float) and math.isnan(correct)
