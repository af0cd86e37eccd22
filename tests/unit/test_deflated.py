"""The deflated variant (ALGORITHM.md s.7) on one rank: block power iteration over the
secant probes, Rayleigh-Ritz with the safeguard lam >= alpha / eta_c, the step
d = U diag(alpha / lam_c) U^T g + eta_c (I - U U^T) g with momentum on the complement only,
and the pure function quasi_newton.deflation on adversarial Gram matrices.

Independent references: quadratics with a known Hessian A (exact Hessian-vector products
A v, eigenvalues from numpy), softmax regression whose Hessian is formed densely from
DenseNet.curvature_product, Gram matrices built from explicit vectors with a prescribed
sym(V^T Y), and the dense n x n formula of the step.
"""

from __future__ import annotations

import numpy as np
import pytest
from harness import build, counted, form_pairs, rel
from toymodels import Quadratic, Recorder, SoftmaxProblem, bare, spd

import hessmpi.optim.deflated as deflated_module
from hessmpi import config
from hessmpi.errors import UsageError
from hessmpi.objective import Objective
from hessmpi.optim import build_optimizer
from hessmpi.optim.deflated import Deflated
from hessmpi.optim.quasi_newton import deflation

DUMMY_X, DUMMY_Y = np.zeros((4, 1)), np.zeros(4)


# ----- fixtures and helpers ---------------------------------------------------------------------
@pytest.fixture
def ritz_log(monkeypatch):
    """Every Deflation the optimizer computes, in order (deflation itself is not changed)."""
    log = []

    def recording(*args, **kwargs):
        log.append(deflation(*args, **kwargs))
        return log[-1]

    monkeypatch.setattr(deflated_module, "deflation", recording)
    return log


def quadratic(n, eigs, seed):
    """(Recorder of a quadratic with Hessian spectrum ``eigs``, the generator after it)."""
    A, b, rng = spd(n, seed, eigs)
    return Recorder(Quadratic(A, b)), rng


def make(model, theta, comm, seed=0, x=DUMMY_X, y=DUMMY_Y, **keys):
    """(Deflated with ``keys``, its Objective on the batch (x, y))."""
    objective = Objective(model, comm)
    objective.use_batch(x, y)
    return build(theta, objective, "deflated", seed=seed, **keys), objective


def step(opt, objective, theta, lr):
    """One step on the objective's batch. Returns (g, info, what the objective counted), g
    the batch gradient at theta recomputed here (on the bare model: nothing recorded)."""
    g = np.empty_like(theta)
    bare(objective.model).loss_grad(theta, objective.x, objective.y, g)
    with counted(objective) as used:
        info = opt.step(theta, objective, lr)
    return g, info, used


def basis(opt):
    """(V (n, m), Y (n, m)) of the slot, as columns."""
    v_idx, y_idx = opt.memory.pair_indices()
    return opt.memory.W[v_idx].T.copy(), opt.memory.W[y_idx].T.copy()


def dense_step(A, V, g, eta_c, alpha):
    """(u_newton, u_comp) of ALGORITHM.md s.7 from the exact Hessian A on span(V)."""
    lam, Q = np.linalg.eigh(V.T @ A @ V)
    U = V @ Q
    lam_c = np.maximum(lam, alpha / eta_c)
    return U @ (alpha / lam_c * (U.T @ g)), eta_c * (g - U @ (U.T @ g))


# ----- configuration ----------------------------------------------------------------------------
@pytest.mark.parametrize("override", ["optim.memory=2", "optim.pairs=local",
                                      "optim.probe_batch=0.5", "optim.line_search=armijo"])
def test_deflated_refuses_what_would_need_more_than_one_basis(override):
    key = override.split("=")[0]
    with pytest.raises(UsageError, match=f"{key} = .* does not apply with optim.name = "
                                         "'deflated'.*'secant'"):
        config.load(None, ["optim.name=deflated", override])


def test_deflated_config_builds_a_deflated_optimizer(comm):
    cfg = config.load(None, ["optim.name=deflated", "optim.pairs_per_rank=3",
                             "optim.probe_every=5", "optim.memory=1"])
    model, _ = quadratic(6, np.linspace(1, 2, 6), seed=0)
    opt = build_optimizer(config.options(cfg, "optim"), np.zeros(6), Objective(model, comm),
                          seed=0)
    assert isinstance(opt, Deflated) and opt.memory.m == 3 and opt.o.probe_every == 5
    assert opt.source.cost() == 3.0


# ----- the pure function: safeguard on adversarial Ritz values ----------------------------------
def gram_with_ritz(lam, n=12, seed=0):
    """W = [g; V^T; Y^T] with V orthonormal (n, m) and sym(V^T Y) = Q0 diag(lam) Q0^T exactly
    (plus an antisymmetric part and a component of Y outside span(V), which Rayleigh-Ritz must
    ignore). Returns (gram, W, V, Q0, g, v_idx, y_idx)."""
    m = len(lam)
    rng = np.random.default_rng(seed)
    V = np.linalg.qr(rng.standard_normal((n, m)))[0]
    Q0 = np.linalg.qr(rng.standard_normal((m, m)))[0]
    K = rng.standard_normal((m, m))
    R = rng.standard_normal((n, m))
    Y = V @ (Q0 @ np.diag(lam) @ Q0.T + (K - K.T)) + (R - V @ (V.T @ R))
    g = rng.standard_normal(n)
    W = np.vstack([g, V.T, Y.T])
    return W @ W.T, W, V, Q0, g, np.arange(1, 1 + m), np.arange(1 + m, 1 + 2 * m)


@pytest.mark.parametrize("lam", [
    [-3.0, 1e-14, 0.5, 40.0],          # negative, tiny, below the floor, above it
    [-100.0, -5.0, -2.0, -1e-3],       # all negative (a convex problem measured noisily)
    [1e-300, 1.9, 2.1, 50.0],          # around the floor alpha / eta_c = 2
    [3.0, 7.0, 11.0, 300.0],           # all above: the pure Newton step on span(V)
])
def test_deflation_never_moves_a_ritz_direction_more_than_the_complement(lam):
    eta_c, alpha = 0.1, 0.2
    floor = alpha / eta_c
    gram, W, V, Q0, g, v_idx, y_idx = gram_with_ritz(lam)
    d = deflation(gram, v_idx, y_idx, 0, eta_c=eta_c, alpha=alpha)
    assert d.reason is None
    scale = max(abs(v) for v in lam)
    np.testing.assert_allclose(np.sort(d.ritz), np.sort(lam), rtol=0, atol=1e-11 * scale)
    assert d.kept == sum(v > floor for v in lam)
    u_newton = W[v_idx].T @ d.coef_newton
    u_comp = d.coef_g * g + W[v_idx].T @ d.coef_comp
    assert np.isfinite(u_newton).all() and np.isfinite(u_comp).all()
    # along each Ritz direction u_i = V Q0 e_i: coefficient alpha / max(lam_i, floor)
    U = V @ Q0
    c, ug = U.T @ u_newton, U.T @ g
    assert (np.abs(c) <= eta_c * np.abs(ug) * (1 + 1e-12) + 1e-15 * np.linalg.norm(g)).all()
    want = np.where(np.array(lam) > floor, alpha / np.maximum(lam, floor), eta_c) * ug
    np.testing.assert_allclose(c, want, rtol=1e-9, atol=1e-14 * np.linalg.norm(g))
    # the whole step against the dense formula
    lam_c = np.maximum(lam, floor)
    dense = U @ (alpha / lam_c * ug) + eta_c * (g - U @ ug)
    assert rel(u_newton + u_comp, dense) < 1e-10
    assert rel(u_comp, eta_c * (g - V @ (V.T @ g))) < 1e-12
    # the next basis orth(Y Q) = Y C: orthonormal columns
    Z = W[y_idx].T @ d.next_basis
    assert np.abs(Z.T @ Z - np.eye(len(lam))).max() < 1e-8


def test_next_basis_is_orthonormal_when_the_ritz_values_spread_widely():
    gram, W, _, _, _, v_idx, y_idx = gram_with_ritz([3.0, 7.0, 11.0, 1e5])
    d = deflation(gram, v_idx, y_idx, 0, eta_c=0.1, alpha=0.2)
    Z = W[y_idx].T @ d.next_basis
    assert np.abs(Z.T @ Z - np.eye(4)).max() < 1e-6


@pytest.mark.parametrize("where", ["g", "v", "y"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_deflation_of_a_non_finite_gram_is_not_finite(where, bad):
    gram, _, _, _, _, v_idx, y_idx = gram_with_ritz([1.0, 5.0, 9.0])
    i = {"g": 0, "v": v_idx[1], "y": y_idx[2]}[where]
    gram[i, i] = bad
    d = deflation(gram, v_idx, y_idx, 0, eta_c=0.1, alpha=0.2)
    assert d.reason == "not_finite"
    assert not np.any(d.coef_newton) and not np.any(d.coef_comp) and d.coef_g == 0.0


@pytest.mark.parametrize("pattern", ["off_diagonal", "one_row"])
def test_deflation_with_overflowing_ritz_values_gives_a_finite_bounded_step(pattern):
    """A finite Gram whose sym(V^T Y) overflows to inf (NaN Ritz values): either a fallback
    reason, or finite coefficients no larger than the complement's along span(V)."""
    m, eta_c, alpha = 2, 0.1, 0.2
    rng = np.random.default_rng(0)
    gram = np.eye(1 + 2 * m)
    v_idx, y_idx = np.array([1, 2]), np.array([3, 4])
    gram[0, v_idx] = gram[v_idx, 0] = rng.standard_normal(m)
    if pattern == "off_diagonal":
        gram[1, 4] = gram[4, 1] = gram[2, 3] = gram[3, 2] = 1e308
    else:
        gram[1, 3] = gram[3, 1] = gram[1, 4] = gram[4, 1] = 1.5e308
    with np.errstate(all="ignore"):
        d = deflation(gram, v_idx, y_idx, 0, eta_c=eta_c, alpha=alpha)
    assert not np.isfinite(d.ritz).all()
    if d.reason is None:
        coefs = np.concatenate([[d.coef_g], d.coef_comp, d.coef_newton, d.next_basis.ravel()])
        assert np.isfinite(coefs).all()
        vg = gram[v_idx, 0]
        assert np.linalg.norm(d.coef_newton) <= eta_c * np.linalg.norm(vg) * (1 + 1e-12)


# ----- the optimizer against the dense formula -------------------------------------------------
def test_deflated_steps_equal_the_dense_formula_with_momentum_on_the_complement(comm,
                                                                                ritz_log):
    """Quadratic with exact products (eps = 1: finite differences of a quadratic are exact),
    k = 4, refresh every 2 steps, momentum 0.5: step 0 refreshes, step 1 reuses the basis."""
    n, k, lr, alpha, beta = 10, 4, 0.1, 0.2, 0.5
    model, rng = quadratic(n, np.geomspace(0.05, 30, n), seed=0)
    theta = rng.standard_normal(n)
    opt, objective = make(model, theta, comm, pairs_per_rank=k, probe_every=2,
                          momentum=beta, newton_lr=alpha, probe_sigma=1.0)
    A = model.A
    t0 = theta.copy()
    g0, info, used = step(opt, objective, theta, lr)
    assert info.fallback == 0 and used["grad_evals"] == 1 + k == 1 + opt.source.cost()
    V, Y = basis(opt)
    assert np.abs(V.T @ V - np.eye(k)).max() < 1e-12                # orthonormal start
    assert rel(Y, A @ V) < 1e-12                                     # y = H v
    ritz = np.sort(ritz_log[-1].ritz)
    assert ritz[0] < alpha / lr < ritz[-1]                           # both branches exercised
    np.testing.assert_allclose(ritz, np.linalg.eigvalsh(V.T @ A @ V), rtol=1e-12)
    un0, uc0 = dense_step(A, V, g0, lr, alpha)
    v1 = uc0
    assert rel(t0 - theta, un0 + v1) < 1e-12
    assert rel(opt.velocity, v1) < 1e-12                              # momentum: complement only
    t1 = theta.copy()
    g1, info, used = step(opt, objective, theta, lr)
    assert info.fallback == 0 and used["grad_evals"] == 1 and not opt.source.forming
    np.testing.assert_array_equal(basis(opt)[0], V)                  # no refresh at step 1
    un1, uc1 = dense_step(A, V, g1, lr, alpha)
    v2 = beta * v1 + uc1
    assert rel(t1 - theta, un1 + v2) < 1e-11
    assert rel(opt.velocity, v2) < 1e-11
    assert opt.last_step_norm == pytest.approx(np.linalg.norm(t1 - theta), rel=1e-12)


# ----- block power iteration ---------------------------------------------------------------------
def test_power_iteration_finds_the_top_eigenvalues_of_a_quadratic(comm, ritz_log):
    n, k = 40, 3
    top = np.array([10.0, 7.0, 5.0])
    eigs = np.concatenate([top, np.linspace(0.1, 4.0, n - k)])
    model, rng = quadratic(n, eigs, seed=1)
    theta = rng.standard_normal(n)
    opt, objective = make(model, theta, comm, pairs_per_rank=k, probe_every=1, lr=1e-4)
    R_top = np.linalg.eigh(model.A)[1][:, -k:]
    errors = []
    for _ in range(25):
        step(opt, objective, theta, 1e-4)
        errors.append(np.abs(np.sort(ritz_log[-1].ritz)[::-1] - top).max() / top.min())
        V, _ = basis(opt)
        assert np.abs(V.T @ V - np.eye(k)).max() < 1e-8              # Cholesky-QR stays orthonormal
    assert errors[0] > 5e-2                                          # a random start is far off
    assert errors[-1] < 1e-2
    assert errors[-1] < 1e-3 * errors[0]
    V, _ = basis(opt)
    assert np.linalg.norm(V - R_top @ (R_top.T @ V)) < 1e-2          # the top eigenspace


def test_power_iteration_on_softmax_regression_matches_the_dense_hessian(comm, ritz_log):
    """Softmax regression (full batch, l2 1e-3) with tiny lr: after 30 refreshes the two Ritz
    values match the top of the spectrum of the Hessian formed with curvature_product."""
    k, lr = 2, 1e-6
    p = SoftmaxProblem(1, d=6, classes=2, rows=200, l2=1e-3, theta_scale=0.5,
                       feature_scale=np.linspace(0.5, 2.5, 6))
    model, x, y, theta = p.model, p.x, p.y, p.theta.copy()
    theta0 = theta.copy()
    opt, objective = make(model, theta, comm, x=x, y=y, pairs_per_rank=k, probe_every=1,
                          lr=lr)
    for _ in range(30):
        step(opt, objective, theta, lr)
    assert np.linalg.norm(theta - theta0) < 1e-3 * np.linalg.norm(theta0)
    H = np.stack([model.curvature_product(theta, e, x, y) for e in np.eye(model.n_params)], 1)
    lam = np.linalg.eigvalsh(H)[::-1]
    assert lam[k] < 0.8 * lam[k - 1]                                  # separated: a fair test
    np.testing.assert_allclose(np.sort(ritz_log[-1].ritz)[::-1], lam[:k], rtol=1e-2)


# ----- the refresh schedule ----------------------------------------------------------------------
def test_refresh_only_every_probe_every_steps(comm):
    n, k, T = 12, 2, 3
    model, rng = quadratic(n, np.geomspace(0.1, 10, n), seed=2)
    theta = rng.standard_normal(n)
    opt, objective = make(model, theta, comm, pairs_per_rank=k, probe_every=T, lr=0.05)
    memory = opt.memory
    previous = None
    for t in range(3 * T + 1):
        calls = len(model.grad_rows)
        g, info, used = step(opt, objective, theta, 0.05)
        refresh = t % T == 0
        assert len(model.grad_rows) - calls == 1 + (k if refresh else 0)   # grad + k probes
        assert used["grad_evals"] == (1 + k if refresh else 1)
        assert opt.source.forming == refresh
        V, Y = basis(opt)
        np.testing.assert_array_equal(memory.W[0], g)
        Wa = memory.W[:1 + 2 * k]
        fresh = Wa @ Wa.T
        assert np.abs(memory.gram[:1 + 2 * k, :1 + 2 * k] - fresh).max() \
            <= 1e-13 * np.abs(fresh).max()
        assert np.abs(V.T @ V - np.eye(k)).max() < 1e-10
        if previous is not None:
            V_old, Y_old = previous
            if refresh:     # the next basis spans the last products Y: block power iteration
                coef = np.linalg.lstsq(Y_old, V, rcond=None)[0]
                assert np.linalg.norm(Y_old @ coef - V) < 1e-10
                assert np.linalg.norm(V - V_old) > 1e-3
            else:
                np.testing.assert_array_equal(V, V_old)
                np.testing.assert_array_equal(Y, Y_old)
        assert info.fallback == 0
        previous = V, Y


def test_initial_basis_is_seeded_and_orthonormal(comm):
    """The basis the first refresh probes (this rank's k rows of the slot, before the
    exchange): orthonormal, a function of the seed."""
    model, _ = quadratic(9, np.ones(9), seed=3)
    bases = []
    for seed in (4, 4, 5):
        theta = np.zeros(9)
        opt, objective = make(model, theta, comm, seed=seed, pairs_per_rank=3)
        form_pairs(opt, objective, theta, 0.1, DUMMY_X, DUMMY_Y)
        bases.append(opt.memory.own_rows(0)[0].copy())
        assert np.abs(bases[-1] @ bases[-1].T - np.eye(3)).max() < 1e-12
    np.testing.assert_array_equal(bases[0], bases[1])
    assert not np.allclose(bases[0], bases[2])


# ----- non-finite probes -------------------------------------------------------------------------
def nan_refresh_run(comm, steps):
    """probe_every = 1, k = 2: the probe gradients of refresh 2 (step 2) are NaN. Returns
    (infos, thetas before each step, grads, velocities before each step, lr, beta, opt)."""
    n, k, lr, beta = 8, 2, 0.05, 0.5
    model, rng = quadratic(n, np.geomspace(0.1, 10, n), seed=6)
    model.nan_grad_at = {2 * (1 + k) + 1}                            # step 2's first probe
    theta = rng.standard_normal(n)
    opt, objective = make(model, theta, comm, pairs_per_rank=k, probe_every=1, lr=lr,
                          momentum=beta)
    infos, thetas, grads, velocities = [], [], [], []
    for _ in range(steps):
        thetas.append(theta.copy())
        velocities.append(opt.velocity.copy())
        with np.errstate(all="ignore"):
            g, info, _ = step(opt, objective, theta, lr)
        grads.append(g)
        infos.append(info)
    return infos, thetas, grads, velocities, lr, beta, opt, theta


def test_a_non_finite_refresh_takes_the_sgd_step(comm):
    infos, thetas, grads, velocities, lr, beta, opt, theta = nan_refresh_run(comm, 3)
    assert [i.reason for i in infos] == [None, None, "not_finite"]
    assert opt.counts["not_finite"] == 1
    v = beta * velocities[2] + lr * grads[2]
    np.testing.assert_array_equal(opt.velocity, v)
    np.testing.assert_array_equal(theta, thetas[2] - v)
    assert np.isfinite(theta).all()


def test_deflated_recovers_after_a_non_finite_refresh(comm):
    infos, *_, opt, theta = nan_refresh_run(comm, 6)
    assert [i.reason for i in infos[3:]] == [None, None, None]
    assert np.isfinite(opt.memory.W).all() and np.isfinite(theta).all()
