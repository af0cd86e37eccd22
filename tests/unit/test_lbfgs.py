"""The L-BFGS step rule (``curvature = "lbfgs"``): the two-loop recursion run on the Gram
matrix against the dense n x n BFGS recursion, its skip and Powell-damping rules, and
positive definiteness where the block rule's implied matrix is not."""

from __future__ import annotations

import numpy as np
import pytest

from hessmpi.optim.memory import PairMemory
from hessmpi.optim.quasi_newton import direction, two_loop


def gram_of(g, S, Y):
    """(Gram of W = [g; S^T; Y^T], s_idx, y_idx): pairs oldest first."""
    m = S.shape[1]
    W = np.vstack([g[None, :], S.T, Y.T])
    return W @ W.T, np.arange(1, m + 1), np.arange(m + 1, 2 * m + 1)


def dense_lbfgs(g, S, Y, h, *, tol=0.0, powell=False):
    """H g with H from h I by the BFGS inverse update, one pair at a time, as n x n
    matrices; pairs skipped or Powell-damped (with B0 = I / h) as documented."""
    n = len(g)
    H = h * np.eye(n)
    for s, y in zip(S.T, Y.T, strict=True):
        if powell:
            sbs = s @ s / h
            if s @ y < 0.2 * sbs:
                theta = 0.8 * sbs / (sbs - s @ y)
                y = theta * y + (1 - theta) * s / h
        elif not s @ y > tol * np.linalg.norm(s) * np.linalg.norm(y):
            continue
        rho = 1.0 / (s @ y)
        V = np.eye(n) - rho * np.outer(y, s)
        H = V.T @ H @ V + rho * np.outer(s, s)
    return H @ g, H


def combine(res, g, S, Y):
    return res.coef_g * g + S @ res.coef_s + Y @ res.coef_y


def lbfgs(g, S, Y, **kw):
    G, s_idx, y_idx = gram_of(g, S, Y)
    opts = dict(eta=0.1, curvature="lbfgs", curvature_tol=1e-6, h0="lr", lsq_mu=0.0,
                max_step_ratio=1e12, xp=np, powell=False) | kw
    return direction(G, s_idx, y_idx, 0, **opts)


@pytest.mark.parametrize("h0", ["lr", "bb"])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_two_loop_on_the_gram_is_the_dense_bfgs_recursion(m, h0):
    rng = np.random.default_rng(m)
    n = 12
    A = rng.standard_normal((n, n))
    A = A @ A.T + np.eye(n)                       # SPD: every pair has s^T y > 0
    S = rng.standard_normal((n, m))
    Y = A @ S + 0.01 * rng.standard_normal((n, m))
    g = rng.standard_normal(n)
    res = lbfgs(g, S, Y, h0=h0)
    h = 0.1 if h0 == "lr" else (S[:, -1] @ Y[:, -1]) / (Y[:, -1] @ Y[:, -1])
    want, _ = dense_lbfgs(g, S, Y, h)
    got = combine(res, g, S, Y)
    assert res.reason is None and res.kept == m
    np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-13)
    assert res.g_dot_d == pytest.approx(g @ want, rel=1e-11)


def test_newest_pair_satisfies_its_secant_equation():
    rng = np.random.default_rng(5)
    n, m = 9, 4
    S = rng.standard_normal((n, m))
    Y = S + 0.3 * rng.standard_normal((n, m))
    assert (np.einsum("ij,ij->j", S, Y) > 0).all()
    g = Y[:, -1]                       # H y_new = s_new, whatever the older pairs
    res = lbfgs(g, S, Y, curvature_tol=0.0)
    assert res.kept == m
    np.testing.assert_allclose(combine(res, g, S, Y), S[:, -1], rtol=1e-10, atol=1e-12)


def test_pairs_of_little_curvature_are_skipped_scale_invariantly():
    rng = np.random.default_rng(2)
    n = 8
    S = rng.standard_normal((n, 3))
    Y = S.copy()
    Y[:, 1] = -S[:, 1] + 1e-3 * rng.standard_normal(n)   # negative curvature: skipped
    g = rng.standard_normal(n)
    res = lbfgs(g, S, Y, curvature_tol=1e-6)
    assert res.kept == 2
    want, _ = dense_lbfgs(g, S, Y, 0.1, tol=1e-6)
    np.testing.assert_allclose(combine(res, g, S, Y), want, rtol=1e-11)
    # scale invariance: the same pairs times 1e-8 give the same kept set
    assert lbfgs(g, 1e-8 * S, 1e-8 * Y, curvature_tol=1e-6).kept == 2


def test_powell_damping_keeps_every_pair_with_the_damped_y():
    rng = np.random.default_rng(3)
    n = 8
    S = rng.standard_normal((n, 4))
    Y = rng.standard_normal((n, 4))                # curvature of any sign
    g = rng.standard_normal(n)
    res = lbfgs(g, S, Y, powell=True)
    assert res.kept == 4
    want, H = dense_lbfgs(g, S, Y, 0.1, powell=True)
    np.testing.assert_allclose(combine(res, g, S, Y), want, rtol=1e-10, atol=1e-12)
    assert np.linalg.eigvalsh(0.5 * (H + H.T)).min() > 0


def test_nonconvex_asymmetric_pairs_give_a_positive_definite_h_and_descent():
    """Pairs of a nonconvex problem, S^T Y far from symmetric (each pair from another
    nonsymmetric "Hessian"): the dense H the two-loop applies is positive definite and d is
    a descent direction, skipping or damping."""
    rng = np.random.default_rng(11)
    n, m = 10, 6
    used = 0
    for _ in range(50):
        S = rng.standard_normal((n, m))
        A = rng.standard_normal((n, n))
        Y = np.stack([(A + 0.5 * rng.standard_normal((n, n))) @ s for s in S.T], axis=1)
        assert np.abs(S.T @ Y - Y.T @ S).max() > 1.0          # far from symmetric
        g = rng.standard_normal(n)
        for powell in (False, True):
            res = lbfgs(g, S, Y, powell=powell, curvature_tol=1e-8)
            if res.reason == "no_curvature":
                continue
            assert res.reason is None, res.reason
            used += 1
            d, H = dense_lbfgs(g, S, Y, 0.1, tol=1e-8, powell=powell)
            assert np.linalg.eigvalsh(0.5 * (H + H.T)).min() > 0
            np.testing.assert_allclose(combine(res, g, S, Y), d, rtol=1e-9, atol=1e-12)
            assert g @ d > 0
    assert used >= 50


def test_no_usable_pair_falls_back():
    n = 5
    S, Y = np.eye(n)[:, :2], -np.eye(n)[:, :2]
    res = lbfgs(np.ones(n), S, Y)
    assert res.reason == "no_curvature"


def test_two_loop_returns_none_without_pairs_and_reads_only_the_gram():
    G = np.eye(3)
    assert two_loop(G, np.array([1]), np.array([2]), 0, eta=0.1, h0="lr", tol=0.5,
                    powell=False, xp=np) is None      # s^T y = 0: skipped


def test_chronological_order_after_the_ring_wraps():
    mem = PairMemory(4, contributors=2, k=1, slots=3, own=0, xp=np, dtype=np.float64)
    for _ in range(4):                 # slots 0, 1, 2, then 0 again: oldest is slot 1
        mem.commit()
    s, y = mem.pair_indices()
    assert s.tolist() == [1, 3, 5, 7, 9, 11] and y.tolist() == [2, 4, 6, 8, 10, 12]
    s, y = mem.pair_indices(chronological=True)
    assert s.tolist() == [5, 7, 9, 11, 1, 3] and y.tolist() == [6, 8, 10, 12, 2, 4]
    fresh = PairMemory(4, contributors=1, k=1, slots=3, own=0, xp=np, dtype=np.float64)
    fresh.commit()
    fresh.commit()                     # not yet full: slot order is the age order
    assert fresh.pair_indices(chronological=True)[0].tolist() == [1, 3]
