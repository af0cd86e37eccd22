"""The quasi-Newton direction on the Gram matrix (hessmpi.optim.quasi_newton) against dense
n x n formulas, the exact Newton step of a quadratic, and the facts of ALGORITHM.md s.3.

Every test builds W = [g; S^T; Y^T] in plain numpy, hands direction() only its Gram matrix,
combines the returned coefficients over n, and compares the vector with something computed
independently (np.linalg.solve with A, the dense H+ of the block-BFGS formula, a projector
from a QR factorisation, ...).
"""

from __future__ import annotations

import numpy as np
import pytest
from harness import bfgs_matrix, rel

from hessmpi.optim.quasi_newton import FALLBACK_REASONS, Direction, direction

RULES = ("bfgs", "lsq", "subspace")


# ----- helpers -------------------------------------------------------------------------------
def spd(rng, n: int, cond: float = 10.0) -> np.ndarray:
    """A random symmetric positive definite n x n matrix with condition number ``cond``."""
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.logspace(0.0, np.log10(cond), n)) @ q.T


def gram_of(g, S, Y):
    """(Gram of W = [g; S^T; Y^T], s_idx, y_idx, g_idx)."""
    m = S.shape[1]
    W = np.vstack([g[None, :], S.T, Y.T])
    return W @ W.T, np.arange(1, m + 1), np.arange(m + 1, 2 * m + 1), 0


def qn(g, S, Y, *, eta=0.1, curvature="bfgs", curvature_tol=1e-6, h0="lr", lsq_mu=0.0,
       max_step_ratio=1e12) -> tuple[Direction, np.ndarray]:
    """direction() on the Gram of [g; S^T; Y^T] and the vector d it describes."""
    G, s_idx, y_idx, g_idx = gram_of(g, S, Y)
    res = direction(G, s_idx, y_idx, g_idx, eta=eta, curvature=curvature,
                    curvature_tol=curvature_tol, h0=h0, lsq_mu=lsq_mu,
                    max_step_ratio=max_step_ratio, xp=np)
    d = res.coef_g * g + S @ res.coef_s + Y @ res.coef_y
    return res, d


def projector(S):
    """Orthogonal projector on span(S) from a QR factorisation (S of full column rank)."""
    q, _ = np.linalg.qr(S)
    return q @ q.T


def dense_direction(g, S, Y, *, curvature, h, lsq_mu_abs=0.0):
    """The step rules of ALGORITHM.md s.2 written with n x n matrices (no filter, no clip)."""
    if curvature == "bfgs":
        return bfgs_matrix(S, Y, h) @ g
    if curvature == "lsq":
        m = S.shape[1]
        b = np.linalg.solve(Y.T @ Y + lsq_mu_abs * np.eye(m), Y.T @ g)
        return S @ b + h * (g - Y @ b)
    D = 0.5 * (S.T @ Y + Y.T @ S)
    return S @ np.linalg.solve(D, S.T @ g) + h * (g - projector(S) @ g)


def bb_h0(S, Y):
    return np.trace(S.T @ Y) / np.trace(Y.T @ Y)


def noisy_pairs(rng, n, m, noise=0.05):
    """Pairs of a quadratic with noise on y: S^T Y is not symmetric, sym(S^T Y) still > 0."""
    A = spd(rng, n)
    S = rng.standard_normal((n, m))
    Y = A @ S + noise * rng.standard_normal((n, m))
    assert np.linalg.eigvalsh(0.5 * (S.T @ Y + Y.T @ S)).min() > 0
    return A, S, Y


# ----- exact Newton step on a quadratic, m = n ------------------------------------------------
@pytest.mark.parametrize("h0", ["lr", "bb"])
@pytest.mark.parametrize("curvature", RULES)
def test_full_rank_exact_pairs_give_the_newton_step(curvature, h0):
    rng = np.random.default_rng(1)
    n = 8
    A = spd(rng, n, cond=30.0)
    S = rng.standard_normal((n, n))
    Y = A @ S
    assert 1e-6 * np.linalg.cond(S.T @ A @ S) < 1    # the stated condition: nothing dropped
    theta, b = rng.standard_normal(n), rng.standard_normal(n)
    g = A @ theta - b
    res, d = qn(g, S, Y, curvature=curvature, h0=h0, lsq_mu=0.0)
    assert res.reason is None and res.kept == n and not res.clipped
    newton = np.linalg.solve(A, g)
    assert rel(d, newton) < 1e-9
    # one full step lands on the minimiser A^-1 b
    assert rel(theta - d, np.linalg.solve(A, b)) < 1e-9


def test_lsq_default_mu_is_newton_only_up_to_its_regularisation():
    rng = np.random.default_rng(2)
    n = 6
    A = spd(rng, n, cond=10.0)
    S = rng.standard_normal((n, n))
    Y = A @ S
    g = rng.standard_normal(n)
    _, d0 = qn(g, S, Y, curvature="lsq", lsq_mu=0.0)
    _, d1 = qn(g, S, Y, curvature="lsq", lsq_mu=1e-4)
    newton = np.linalg.solve(A, g)
    mu = 1e-4 * np.trace(Y.T @ Y) / n
    bound = mu * np.linalg.norm(np.linalg.inv(Y.T @ Y), 2)
    assert rel(d0, newton) < 1e-10
    assert 1e-3 * bound < rel(d1, newton) < 10 * bound
    # and it is exactly the dense regularised formula
    assert rel(d1, dense_direction(g, S, Y, curvature="lsq", h=0.1, lsq_mu_abs=mu)) < 1e-12


# ----- m < n ----------------------------------------------------------------------------------
def test_bfgs_with_exact_pairs_satisfies_the_secant_equations():
    rng = np.random.default_rng(3)
    n, m = 12, 4
    A = spd(rng, n)
    S = rng.standard_normal((n, m))
    Y = A @ S
    g = rng.standard_normal(n)
    eta = 0.05
    H = bfgs_matrix(S, Y, eta)
    assert rel(H @ Y, S) < 1e-12                      # H+ Y = S
    res, d = qn(g, S, Y, eta=eta)
    assert res.reason is None and res.kept == m
    assert rel(d, H @ g) < 1e-12


def test_bfgs_with_noisy_pairs_is_the_dense_formula_but_not_secant():
    rng = np.random.default_rng(4)
    n, m = 12, 4
    _, S, Y = noisy_pairs(rng, n, m, noise=0.3)
    g = rng.standard_normal(n)
    H = bfgs_matrix(S, Y, 0.05)
    res, d = qn(g, S, Y, eta=0.05)
    assert res.reason is None
    assert rel(d, H @ g) < 1e-12
    # only sym(S^T Y) enters: the secant equations no longer hold
    assert rel(H @ Y, S) > 1e-3


@pytest.mark.parametrize("h0", ["lr", "bb"])
@pytest.mark.parametrize("curvature", RULES)
def test_compact_formula_equals_the_dense_formula(curvature, h0):
    rng = np.random.default_rng(5)
    n, m = 15, 5
    _, S, Y = noisy_pairs(rng, n, m, noise=0.2)
    g = rng.standard_normal(n)
    eta = 0.07
    h = eta if h0 == "lr" else bb_h0(S, Y)
    mu = 1e-3
    res, d = qn(g, S, Y, eta=eta, curvature=curvature, h0=h0, lsq_mu=mu)
    assert res.reason is None and res.kept == m
    want = dense_direction(g, S, Y, curvature=curvature, h=h,
                           lsq_mu_abs=mu * np.trace(Y.T @ Y) / m)
    assert rel(d, want) < 1e-12


def test_subspace_newton_part_minimises_F_over_the_span_of_S():
    rng = np.random.default_rng(6)
    n, m = 10, 3
    A = spd(rng, n)
    b = rng.standard_normal(n)
    S = rng.standard_normal((n, m))
    Y = A @ S
    theta = rng.standard_normal(n)
    g = A @ theta - b
    eta = 0.1

    def F(t):
        return 0.5 * t @ A @ t - b @ t

    res, d = qn(g, S, Y, eta=eta, curvature="subspace")
    assert res.reason is None
    outside = eta * (g - projector(S) @ g)          # h0 (I - P_S) g, from a QR projector
    newton = d - outside
    # the Newton part lies in span(S) ...
    assert rel(projector(S) @ newton, newton) < 1e-12
    # ... and theta - newton is stationary for F restricted to theta - span(S)
    grad_there = A @ (theta - newton) - b
    assert np.linalg.norm(S.T @ grad_there) < 1e-10 * np.linalg.norm(S.T @ g)
    # ... so no other point of theta - span(S) is lower
    f_best = F(theta - newton)
    for _ in range(20):
        z = rng.standard_normal(m) * 1e-3
        assert F(theta - newton - S @ z) > f_best
    # the minimiser from an independent solve of min_z F(theta - S z)
    z_star = np.linalg.solve(S.T @ A @ S, S.T @ g)
    assert rel(newton, S @ z_star) < 1e-11


# ----- the curvature filter -------------------------------------------------------------------
@pytest.mark.parametrize("curvature", RULES)
@pytest.mark.parametrize("kind", ["negative", "zero"])
def test_all_pairs_dropped_gives_no_curvature(curvature, kind):
    rng = np.random.default_rng(7)
    n, m = 9, 3
    A = spd(rng, n)
    S = rng.standard_normal((n, m))
    Y = -A @ S if kind == "negative" else np.zeros((n, m))
    res, _ = qn(rng.standard_normal(n), S, Y, curvature=curvature)
    assert res.reason == "no_curvature"
    assert res.kept == 0


def test_filter_keeps_exactly_the_eigenvalues_above_tau_times_the_largest():
    rng = np.random.default_rng(8)
    n, m = 10, 5
    q, _ = np.linalg.qr(rng.standard_normal((m, m)))
    # sym(S^T Y) = Q diag(lam) Q^T with two negative and one tiny eigenvalue
    lam = np.array([1.0, 0.3, 2e-7, -0.2, -1.0])
    S = np.linalg.qr(rng.standard_normal((n, m)))[0]            # S^T S = I
    Y = S @ (q * lam) @ q.T                                      # S^T Y = Q diag Q^T
    g = rng.standard_normal(n)
    for tau, kept in ((1e-6, 2), (1e-7, 3), (0.5, 1)):
        res, d = qn(g, S, Y, curvature_tol=tau)
        assert res.kept == kept == int(np.sum(lam > tau * lam.max()))
        assert res.reason is None
        # the kept directions: BFGS on the rotated, kept pairs only
        keep = np.argsort(lam)[::-1][:kept]
        Sk, Yk = S @ q[:, keep], Y @ q[:, keep]
        assert rel(d, bfgs_matrix(Sk, Yk, 0.1) @ g) < 1e-8    # cond(D) up to 5e6
        # h0 = bb is taken over the kept, rotated pairs only
        res, d = qn(g, S, Y, curvature_tol=tau, h0="bb")
        assert res.kept == kept
        assert rel(d, bfgs_matrix(Sk, Yk, bb_h0(Sk, Yk)) @ g) < 1e-8


# ----- invariances ----------------------------------------------------------------------------
@pytest.mark.parametrize("h0", ["lr", "bb"])
@pytest.mark.parametrize("curvature", RULES)
def test_direction_does_not_depend_on_the_order_of_the_pairs(curvature, h0):
    rng = np.random.default_rng(9)
    n, m = 14, 6
    _, S, Y = noisy_pairs(rng, n, m, noise=0.2)
    g = rng.standard_normal(n)
    _, d = qn(g, S, Y, curvature=curvature, h0=h0, lsq_mu=1e-6)
    for _ in range(5):
        p = rng.permutation(m)
        _, dp = qn(g, S[:, p], Y[:, p], curvature=curvature, h0=h0, lsq_mu=1e-6)
        assert rel(dp, d) < 1e-12


@pytest.mark.parametrize("curvature", RULES)
def test_scaling_F_leaves_the_newton_part_unchanged(curvature):
    """F -> c F: g -> c g, Y -> c Y. With h0 = lr, d = N + eta R is affine in eta: N (the
    Newton part) must not change and R must scale with c; with h0 = bb, d must not change."""
    rng = np.random.default_rng(10)
    n, m = 12, 4
    _, S, Y = noisy_pairs(rng, n, m, noise=0.1)
    g = rng.standard_normal(n)

    def parts(c):
        _, d1 = qn(c * g, S, c * Y, eta=0.1, curvature=curvature, lsq_mu=1e-6)
        _, d2 = qn(c * g, S, c * Y, eta=0.3, curvature=curvature, lsq_mu=1e-6)
        R = (d2 - d1) / 0.2
        return d1 - 0.1 * R, R

    N1, R1 = parts(1.0)
    # N is the h-free part of the dense formula (e.g. S D^-1 S^T g for bfgs and subspace)
    assert rel(N1, dense_direction(g, S, Y, curvature=curvature, h=0.0,
                                   lsq_mu_abs=1e-6 * np.trace(Y.T @ Y) / m)) < 1e-10
    for c in (1e-3, 7.0, 250.0):
        Nc, Rc = parts(c)
        assert rel(Nc, N1) < 1e-9
        assert rel(Rc, c * R1) < 1e-9
        _, d_bb = qn(g, S, Y, curvature=curvature, h0="bb", lsq_mu=1e-6)
        _, d_bb_c = qn(c * g, S, c * Y, curvature=curvature, h0="bb", lsq_mu=1e-6)
        assert rel(d_bb_c, d_bb) < 1e-10


def test_bfgs_and_subspace_always_descend_after_the_filter():
    """Over many arbitrary (noisy, non-symmetric, indefinite) pair sets bfgs and subspace never
    need the not_descent fallback and g^T d > 0 on the dense vectors; lsq does need it on some
    of the same sets, which shows the check can fire."""
    rng = np.random.default_rng(11)
    n = 10
    outcome = {rule: {"ok": 0, "not_descent": 0, "no_curvature": 0} for rule in RULES}
    for _ in range(400):
        m = int(rng.integers(1, 7))
        S = rng.standard_normal((n, m))
        B = rng.standard_normal((n, n)) + rng.uniform(-1, 3) * np.eye(n)   # non-symmetric
        Y = B @ S + rng.uniform(0, 2) * rng.standard_normal((n, m))
        g = rng.standard_normal(n)
        for rule in RULES:
            res, d = qn(g, S, Y, curvature=rule, h0=str(rng.choice(["lr", "bb"])),
                        lsq_mu=1e-12)
            if res.reason is None:
                outcome[rule]["ok"] += 1
                assert g @ d > 0
                assert abs(res.g_dot_d - g @ d) <= 1e-9 * np.linalg.norm(g) * np.linalg.norm(d)
            else:
                outcome[rule][res.reason] += 1
    for rule in ("bfgs", "subspace"):
        assert outcome[rule]["not_descent"] == 0, outcome
        assert outcome[rule]["ok"] > 300, outcome
    assert outcome["lsq"]["not_descent"] > 0, outcome


# ----- the clip and the reported g^T d, ||d|| --------------------------------------------------
@pytest.mark.parametrize("curvature", RULES)
def test_clip_bounds_the_step_and_reports_dense_values(curvature):
    rng = np.random.default_rng(12)
    n, m = 12, 4
    _, S, Y = noisy_pairs(rng, n, m, noise=0.1)
    g = rng.standard_normal(n)
    eta = 0.01
    free, d_free = qn(g, S, Y, eta=eta, curvature=curvature, max_step_ratio=1e12)
    assert free.reason is None and not free.clipped
    assert np.isclose(free.d_norm, np.linalg.norm(d_free), rtol=1e-10)
    assert np.isclose(free.g_dot_d, g @ d_free, rtol=1e-10)
    ratio = 0.5 * np.linalg.norm(d_free) / np.linalg.norm(eta * g)
    assert ratio > 1.0                      # the clip below really bites
    res, d = qn(g, S, Y, eta=eta, curvature=curvature, max_step_ratio=ratio)
    assert res.reason is None and res.clipped
    limit = ratio * np.linalg.norm(eta * g)
    assert np.linalg.norm(d) <= limit * (1 + 1e-12)
    assert np.isclose(np.linalg.norm(d), limit, rtol=1e-10)
    assert rel(d, d_free * (limit / np.linalg.norm(d_free))) < 1e-12     # same direction
    assert np.isclose(res.d_norm, np.linalg.norm(d), rtol=1e-10)
    assert np.isclose(res.g_dot_d, g @ d, rtol=1e-10)
    # a clip that does not bite changes nothing
    loose, d_loose = qn(g, S, Y, eta=eta, curvature=curvature, max_step_ratio=4 * ratio)
    assert not loose.clipped and rel(d_loose, d_free) < 1e-15


# ----- fallbacks on bad input -----------------------------------------------------------------
def test_non_finite_gram_falls_back():
    rng = np.random.default_rng(13)
    n, m = 6, 2
    _, S, Y = noisy_pairs(rng, n, m)
    g = rng.standard_normal(n)
    with np.errstate(all="ignore"):
        for bad in (np.nan, np.inf):
            Yb = Y.copy()
            Yb[2, 1] = bad
            res, _ = qn(g, S, Yb)
            assert res.reason == "not_finite"
        G, s_idx, y_idx, g_idx = gram_of(g, S, 1e200 * Y)      # overflows to inf in the Gram
    res = direction(G, s_idx, y_idx, g_idx, eta=0.1, curvature="bfgs", curvature_tol=1e-6,
                    h0="lr", lsq_mu=0.0, max_step_ratio=10.0, xp=np)
    assert res.reason == "not_finite"


def test_no_pairs_and_bad_rule():
    G = np.ones((1, 1))
    empty = np.arange(0)
    res = direction(G, empty, empty, 0, eta=0.1, curvature="bfgs", curvature_tol=1e-6,
                    h0="lr", lsq_mu=0.0, max_step_ratio=10.0, xp=np)
    assert res.reason == "no_pairs"
    assert set(FALLBACK_REASONS) >= {"no_pairs", "no_curvature", "not_finite", "not_descent"}
    with pytest.raises(ValueError, match="curvature"):
        direction(G, empty, empty, 0, eta=0.1, curvature="newton", curvature_tol=1e-6,
                  h0="lr", lsq_mu=0.0, max_step_ratio=10.0, xp=np)


def test_zero_gradient_is_not_a_descent_direction():
    rng = np.random.default_rng(14)
    _, S, Y = noisy_pairs(rng, 6, 2)
    res, _ = qn(np.zeros(6), S, Y)
    assert res.reason == "not_descent"
