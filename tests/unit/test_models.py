"""DenseNet: loss, gradient, Gauss-Newton product, evaluation and initialisation, each checked
against an independent numpy reference (own forward pass, finite differences, dense formulas)."""

from __future__ import annotations

import numpy as np
import pytest

from hessmpi.models import DenseNet, build_model

# (id, layer sizes, activation): softmax regression and two 2-hidden-layer MLPs.
CASES = [
    ("softmax", [5, 4], "relu"),
    ("mlp-relu", [5, 7, 6, 4], "relu"),
    ("mlp-tanh", [5, 7, 6, 4], "tanh"),
]
IDS = [c[0] for c in CASES]
B = 12


# ----- independent reference implementation ------------------------------------------------
def ref_layers(sizes, theta):
    """The documented layout: per layer W (fan_in, fan_out) row-major, then b (fan_out,)."""
    out, off = [], 0
    for fi, fo in zip(sizes[:-1], sizes[1:], strict=True):
        w = theta[off:off + fi * fo].reshape(fi, fo)
        off += fi * fo
        b = theta[off:off + fo]
        off += fo
        out.append((w, b))
    assert off == len(theta)
    return out


def ref_logits(sizes, activation, theta, x):
    a = np.asarray(x, dtype=np.float64)
    layers = ref_layers(sizes, np.asarray(theta, dtype=np.float64))
    for k, (w, b) in enumerate(layers):
        z = a @ w + b
        if k < len(layers) - 1:
            z = np.maximum(z, 0.0) if activation == "relu" else np.tanh(z)
        a = z
    return a


def ref_ce_per_sample(logits, y):
    """Cross-entropy of each row, written sample by sample."""
    out = np.empty(len(y))
    for i in range(len(y)):
        row = logits[i]
        m = row.max()
        out[i] = m + np.log(np.sum(np.exp(row - m))) - row[y[i]]
    return out


def ref_softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def ref_objective(sizes, activation, l2, theta, x, y):
    logits = ref_logits(sizes, activation, theta, x)
    return ref_ce_per_sample(logits, y).mean() + 0.5 * l2 * float(theta @ theta)


def problem(sizes, activation, l2=0.01, seed=0):
    """A model, parameters with nonzero biases, a batch (x, y) in float64."""
    rng = np.random.default_rng(seed)
    model = DenseNet(sizes, activation, l2)
    if len(sizes) == 2:
        theta = 0.5 * rng.standard_normal(model.n_params)
    else:
        theta = model.init_params(seed) + 0.1 * rng.standard_normal(model.n_params)
    x = rng.standard_normal((B, sizes[0]))
    y = rng.integers(0, sizes[-1], B)
    return model, theta, x, y


def fd_gradient(f, theta, eps=1e-5):
    g = np.empty_like(theta)
    for i in range(len(theta)):
        tp, tm = theta.copy(), theta.copy()
        tp[i] += eps
        tm[i] -= eps
        g[i] = (float(f(tp)) - float(f(tm))) / (2 * eps)
    return g


def rel_err(a, b):
    return np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b))


def dense_curvature(model, theta, x, y):
    """G built column by column from curvature_product on unit vectors."""
    n = model.n_params
    cols = []
    for i in range(n):
        e = np.zeros(n)
        e[i] = 1.0
        cols.append(model.curvature_product(theta, e, x, y))
    return np.stack(cols, axis=1)


# ----- layout and objective ------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_views_follow_documented_layout(case):
    _, sizes, act = case
    model = DenseNet(sizes, act, 0.0)
    n = sum(fi * fo + fo for fi, fo in zip(sizes[:-1], sizes[1:], strict=True))
    assert model.n_params == n
    theta = np.arange(n, dtype=np.float64)
    views, ref = model.views(theta), ref_layers(sizes, theta)
    assert len(views) == len(ref)
    for (w, b), (rw, rb) in zip(views, ref, strict=True):
        np.testing.assert_array_equal(w, rw)
        np.testing.assert_array_equal(b, rb)
    # views, not copies: writing through them changes the flat vector
    views[0][0][...] = -1.0
    assert (theta[:sizes[0] * sizes[1]] == -1.0).all()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_loss_matches_reference_objective(case):
    _, sizes, act = case
    model, theta, x, y = problem(sizes, act, l2=0.05)
    expected = ref_objective(sizes, act, 0.05, theta, x, y)
    assert float(model.loss(theta, x, y)) == pytest.approx(expected, rel=1e-12)


def test_loss_is_stable_for_huge_logits():
    model = DenseNet([2, 3], "relu", 0.0)
    theta = np.zeros(model.n_params)
    theta[model.n_params - 3:] = [1000.0, 0.0, -1000.0]  # biases
    x, y = np.zeros((2, 2)), np.array([0, 1])
    # CE of sample 0 is ~0, of sample 1 is ~1000: mean 500
    assert float(model.loss(theta, x, y)) == pytest.approx(500.0, rel=1e-12)


# ----- gradient -------------------------------------------------------------------------------
@pytest.mark.parametrize("l2", [0.0, 0.01])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradient_matches_finite_differences(case, l2):
    _, sizes, act = case
    model, theta, x, y = problem(sizes, act, l2=l2, seed=1)
    grad = np.empty(model.n_params)
    model.loss_grad(theta, x, y, grad)
    fd = fd_gradient(lambda t: model.loss(t, x, y), theta)
    assert rel_err(grad, fd) < 1e-6


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_loss_grad_returns_loss_and_overwrites_grad(case):
    _, sizes, act = case
    model, theta, x, y = problem(sizes, act, l2=0.02, seed=2)
    theta0, x0, y0 = theta.copy(), x.copy(), y.copy()
    grad = np.full(model.n_params, np.nan)  # every entry must be written
    value = model.loss_grad(theta, x, y, grad)
    assert np.isfinite(grad).all()
    assert float(value) == pytest.approx(float(model.loss(theta, x, y)), rel=1e-13)
    assert float(value) == pytest.approx(ref_objective(sizes, act, 0.02, theta, x, y), rel=1e-12)
    np.testing.assert_array_equal(theta, theta0)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(y, y0)
    # a second call into a dirty buffer gives the same gradient (no accumulation)
    again = grad * 3.0 + 1.0
    model.loss_grad(theta, x, y, again)
    np.testing.assert_array_equal(again, grad)


# ----- curvature product ----------------------------------------------------------------------
def test_softmax_curvature_is_exact_hessian():
    model, theta, x, y = problem([6, 4], "relu", l2=0.03, seed=3)
    n = model.n_params

    def grad_at(t):
        g = np.empty(n)
        model.loss_grad(t, x, y, g)
        return g

    eps = 1e-5
    hess = np.empty((n, n))
    for i in range(n):
        tp, tm = theta.copy(), theta.copy()
        tp[i] += eps
        tm[i] -= eps
        hess[:, i] = (grad_at(tp) - grad_at(tm)) / (2 * eps)
    g_dense = dense_curvature(model, theta, x, y)
    assert rel_err(g_dense, hess) < 1e-6
    v = np.random.default_rng(0).standard_normal(n)
    assert rel_err(model.curvature_product(theta, v, x, y), hess @ v) < 1e-6


def logits_jacobian(sizes, act, theta, x, eps=1e-6):
    """J (B*C, n) of the flattened logits, column by column by central differences."""
    cols = []
    for i in range(len(theta)):
        tp, tm = theta.copy(), theta.copy()
        tp[i] += eps
        tm[i] -= eps
        diff = ref_logits(sizes, act, tp, x) - ref_logits(sizes, act, tm, x)
        cols.append(diff.ravel() / (2 * eps))
    return np.stack(cols, axis=1)


def ce_logit_hessian(logits):
    """Hessian of mean_i CE(softmax(z_i), y_i) in the flattened logits: block diagonal with
    blocks (diag(p_i) - p_i p_i^T) / B."""
    p = ref_softmax(logits)
    b, c = p.shape
    h = np.zeros((b * c, b * c))
    for i in range(b):
        h[i * c:(i + 1) * c, i * c:(i + 1) * c] = (np.diag(p[i]) - np.outer(p[i], p[i])) / b
    return h


@pytest.mark.parametrize("case", CASES[1:], ids=IDS[1:])
def test_mlp_curvature_is_gauss_newton(case):
    _, sizes, act = case
    l2 = 0.03
    model, theta, x, y = problem(sizes, act, l2=l2, seed=4)
    jac = logits_jacobian(sizes, act, theta, x)
    h = ce_logit_hessian(ref_logits(sizes, act, theta, x))
    expected = jac.T @ h @ jac + l2 * np.eye(model.n_params)
    g_dense = dense_curvature(model, theta, x, y)
    assert rel_err(g_dense, expected) < 1e-6
    v = np.random.default_rng(1).standard_normal(model.n_params)
    assert rel_err(model.curvature_product(theta, v, x, y), expected @ v) < 1e-6


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_curvature_is_symmetric_and_psd(case):
    _, sizes, act = case
    model, theta, x, y = problem(sizes, act, l2=0.0, seed=5)
    rng = np.random.default_rng(2)
    for _ in range(5):
        u, v = rng.standard_normal((2, model.n_params))
        ugv = u @ model.curvature_product(theta, v, x, y)
        vgu = v @ model.curvature_product(theta, u, x, y)
        assert ugv == pytest.approx(vgu, rel=1e-10, abs=1e-14)
        assert v @ model.curvature_product(theta, v, x, y) >= -1e-14
    g_dense = dense_curvature(model, theta, x, y)
    np.testing.assert_allclose(g_dense, g_dense.T, atol=1e-12 * np.abs(g_dense).max())
    eig = np.linalg.eigvalsh(0.5 * (g_dense + g_dense.T))
    assert eig.min() >= -1e-10 * eig.max()
    assert eig.max() > 0


def test_curvature_product_writes_out_and_keeps_inputs():
    model, theta, x, y = problem([5, 7, 6, 4], "tanh", l2=0.1, seed=6)
    v = np.random.default_rng(3).standard_normal(model.n_params)
    theta0, v0, x0 = theta.copy(), v.copy(), x.copy()
    expected = model.curvature_product(theta, v, x, y)
    out = np.full(model.n_params, np.nan)
    ret = model.curvature_product(theta, v, x, y, out=out)
    assert ret is out
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(theta, theta0)
    np.testing.assert_array_equal(v, v0)
    np.testing.assert_array_equal(x, x0)
    # linear in v
    w = np.random.default_rng(4).standard_normal(model.n_params)
    lhs = model.curvature_product(theta, 2.0 * v - w, x, y)
    rhs = 2.0 * expected - model.curvature_product(theta, w, x, y)
    assert rel_err(lhs, rhs) < 1e-12


# ----- evaluate -------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 3, 7, 10, 4096])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_evaluate_matches_sample_loop(case, chunk):
    _, sizes, act = case
    rng = np.random.default_rng(7)
    model = DenseNet(sizes, act, 0.5)  # the L2 term must not be included
    theta = rng.standard_normal(model.n_params)
    n = 10
    x = rng.standard_normal((n, sizes[0]))
    logits = ref_logits(sizes, act, theta, x)
    # half the labels agree with the prediction, the other half are shifted away from it
    pred = logits.argmax(axis=1)
    y = np.where(np.arange(n) % 2 == 0, pred, (pred + 1) % sizes[-1]).astype(np.int64)
    loss_sum, correct = 0.0, 0
    for i in range(n):
        row = logits[i]
        m = row.max()
        loss_sum += m + np.log(np.exp(row - m).sum()) - row[y[i]]
        best = max(range(len(row)), key=lambda k, row=row: row[k])
        correct += int(best == y[i])
    assert correct == 5
    got_loss, got_correct = model.evaluate(theta, x, y, chunk=chunk)
    assert isinstance(got_correct, int)
    assert got_correct == correct
    assert got_loss == pytest.approx(loss_sum, rel=1e-12)


# ----- initialisation -------------------------------------------------------------------------
def test_softmax_init_is_zero():
    model = DenseNet([30, 10], "relu", 0.0)
    theta = model.init_params(123)
    assert theta.shape == (model.n_params,) and theta.dtype == np.float64
    assert not theta.any()


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_mlp_init_is_seeded_with_fan_in_variance(act):
    sizes = [300, 200, 100, 50]
    model = DenseNet(sizes, act, 0.0)
    theta = model.init_params(0)
    assert theta.shape == (model.n_params,) and theta.dtype == np.float64
    np.testing.assert_array_equal(theta, model.init_params(0))
    assert not np.array_equal(theta, model.init_params(1))
    layers = ref_layers(sizes, theta)
    for k, (w, b) in enumerate(layers):
        hidden = k < len(layers) - 1
        gain = 2.0 if hidden and act == "relu" else 1.0
        expected = gain / sizes[k]
        assert not b.any()
        assert np.mean(w) == pytest.approx(0.0, abs=4 * np.sqrt(expected / w.size))
        assert np.var(w) == pytest.approx(expected, rel=0.1)


def test_init_params_in_float32():
    model = DenseNet([20, 10, 3], "relu", 0.0, dtype=np.float32)
    theta = model.init_params(0)
    assert theta.dtype == np.float32
    ref = DenseNet([20, 10, 3], "relu", 0.0).init_params(0)
    np.testing.assert_allclose(theta, ref, rtol=1e-6)


# ----- float32 --------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_float32_is_close_to_float64(case):
    _, sizes, act = case
    m64, theta, x, y = problem(sizes, act, l2=0.01, seed=8)
    m32 = DenseNet(sizes, act, 0.01, dtype=np.float32)
    t32, x32 = theta.astype(np.float32), x.astype(np.float32)
    # the float64 reference at the float32-rounded inputs
    t64, x64 = t32.astype(np.float64), x32.astype(np.float64)

    loss32 = m32.loss(t32, x32, y)
    assert loss32.dtype == np.float32
    assert float(loss32) == pytest.approx(float(m64.loss(t64, x64, y)), rel=1e-5)

    g32, g64 = np.empty(m32.n_params, np.float32), np.empty(m64.n_params)
    lg32 = m32.loss_grad(t32, x32, y, g32)
    m64.loss_grad(t64, x64, y, g64)
    assert lg32.dtype == np.float32
    assert rel_err(g32, g64) < 1e-5

    v = np.random.default_rng(9).standard_normal(m64.n_params)
    cv32 = m32.curvature_product(t32, v.astype(np.float32), x32, y)
    assert cv32.dtype == np.float32
    assert rel_err(cv32, m64.curvature_product(t64, v.astype(np.float32).astype(np.float64),
                                               x64, y)) < 1e-5

    s32, c32 = m32.evaluate(t32, x32, y, chunk=5)
    s64, c64 = m64.evaluate(t64, x64, y, chunk=5)
    assert s32 == pytest.approx(s64, rel=1e-5)
    assert c32 == c64


# ----- construction ---------------------------------------------------------------------------
def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="softsign"):
        DenseNet([3, 4, 2], "softsign", 0.0)
    with pytest.raises(ValueError, match="activations"):
        DenseNet([3, 4, 5, 2], "relu", 0.0, activations=["relu"])
    with pytest.raises(ValueError, match="reconstructs"):
        DenseNet([3, 4, 2], "relu", 0.0, output="sigmoid")


def test_build_model_layer_sizes():
    cfg = {"name": "softmax", "hidden": [64, 32], "activation": "tanh", "l2": 0.25}
    soft = build_model(cfg, 10, 3, xp=np, dtype=np.float64)
    assert soft.sizes == [10, 3] and soft.n_params == 10 * 3 + 3 and soft.l2 == 0.25
    mlp = build_model({**cfg, "name": "mlp"}, 10, 3, xp=np, dtype=np.float32)
    assert mlp.sizes == [10, 64, 32, 3]
    assert mlp.n_params == 10 * 64 + 64 + 64 * 32 + 32 + 32 * 3 + 3
    assert mlp.activations == ["tanh", "tanh"] and mlp.dtype == np.float32
