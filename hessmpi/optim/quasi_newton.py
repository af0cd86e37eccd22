"""The quasi-Newton direction from the small Gram matrix: a pure function (ALGORITHM.md s.2).

The direction d is a combination of the averaged gradient g and the pair columns S, Y:

    d = c_g * g + S c_s + Y c_y,

so everything but the final combination over n works on the Gram matrix of W = [g S Y]
alone, an (2m+1) x (2m+1) matrix. :func:`direction` returns the coefficients; the caller
combines them over n (one matrix-vector product with W). Written against the array module
``xp``; the small system is solved in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Why a step fell back to the SGD step u = eta * g.
FALLBACK_REASONS = ("no_pairs", "no_curvature", "not_finite", "not_descent", "solve_failed",
                    "line_search")
#: The step rules of ``optim.curvature``.
CURVATURES = ("bfgs", "lsq", "subspace", "lbfgs")


@dataclass
class Direction:
    """coef_g: scalar; coef_s, coef_y: (m,) float64 arrays; kept: directions kept by the
    curvature filter; reason: None, or why the SGD step must be taken instead (then the
    coefficients are meaningless); clipped: whether ||d|| was scaled down to the clip;
    g_dot_d, d_norm: g^T d and ||d|| after the clip, from the Gram matrix."""

    coef_g: float
    coef_s: Any
    coef_y: Any
    kept: int
    reason: str | None = None
    clipped: bool = False
    g_dot_d: float = 0.0
    d_norm: float = 0.0


def _fallback(xp, m: int, reason: str, kept: int = 0) -> Direction:
    zeros = xp.zeros(m, dtype=xp.float64)
    return Direction(0.0, zeros, zeros, kept, reason)


def direction(gram, s_idx, y_idx, g_idx: int, *, eta: float, curvature: str,
              curvature_tol: float, h0: str, lsq_mu: float, max_step_ratio: float,
              xp: Any, powell: bool = False) -> Direction:
    """The step direction of ALGORITHM.md section 2 from the Gram matrix of the rows of W.

    gram: (r, r) Gram matrix of W's rows; s_idx, y_idx: (m,) integer indices of the S and Y
    rows (pair j is rows s_idx[j], y_idx[j]; for "lbfgs" oldest first); g_idx: index of the
    g row. eta: the SGD learning rate (h0 = "lr" and the clip use it). curvature: "bfgs" |
    "lsq" | "subspace" (block rules on the whole of S^T Y) | "lbfgs" (the two-loop
    recursion, one pair at a time: see :func:`two_loop`). curvature_tol: tau of the filter
    (for "lbfgs": of the skip test). h0: "lr" | "bb". lsq_mu: mu of "lsq" relative to
    tr(Y^T Y)/m. max_step_ratio: clip ||d|| <= max_step_ratio * ||eta g||. powell: Powell
    damping of the "lbfgs" pairs instead of skipping.
    """
    if curvature not in CURVATURES:
        raise ValueError(f"unknown curvature rule {curvature!r}")
    m = len(s_idx)
    if m == 0:
        return _fallback(xp, 0, "no_pairs")
    s_idx, y_idx = xp.asarray(s_idx), xp.asarray(y_idx)
    G = xp.asarray(gram, dtype=xp.float64)
    if not bool(xp.isfinite(G).all()):
        return _fallback(xp, m, "not_finite")
    sg, yg, gg = G[s_idx, g_idx], G[y_idx, g_idx], float(G[g_idx, g_idx])
    if curvature == "lbfgs":
        coef = two_loop(G, s_idx, y_idx, g_idx, eta=eta, h0=h0, tol=curvature_tol,
                        powell=powell, xp=xp)
        if coef is None:
            return _fallback(xp, m, "no_curvature")
        coef_g, coef_s, coef_y, kept = coef
        return _finish(xp, G, s_idx, y_idx, g_idx, coef_g, coef_s, coef_y, kept, sg, yg, gg,
                       eta=eta, max_step_ratio=max_step_ratio)
    ss = G[s_idx[:, None], s_idx]
    sy = G[s_idx[:, None], y_idx]          # S^T Y
    yy = G[y_idx[:, None], y_idx]

    try:
        lam, Q = xp.linalg.eigh(0.5 * (sy + sy.T))
    except np.linalg.LinAlgError:
        return _fallback(xp, m, "solve_failed")
    top = float(lam.max())
    keep = (lam > curvature_tol * top) & (lam > 0)
    kept = int(keep.sum())
    if kept == 0:
        return _fallback(xp, m, "no_curvature")
    # rotated pairs S' = S Qk, Y' = Y Qk, so that sym(S'^T Y') = diag(lk)
    Qk, lk = Q[:, keep], lam[keep]
    sg_k, yg_k = Qk.T @ sg, Qk.T @ yg
    yy_k = Qk.T @ yy @ Qk
    h = eta if h0 == "lr" else float(lk.sum() / xp.trace(yy_k))
    try:
        if curvature == "bfgs":
            a = sg_k / lk
            c = (yg_k - yy_k @ a) / lk
            coef_s, coef_y = Qk @ (a - h * c), Qk @ (-h * a)
        elif curvature == "lsq":
            mu = lsq_mu * float(xp.trace(yy)) / m
            b = xp.linalg.solve(yy_k + mu * xp.eye(kept), yg_k)
            coef_s, coef_y = Qk @ b, Qk @ (-h * b)
        elif curvature == "subspace":
            ss_k = Qk.T @ ss @ Qk
            # (I - P_S) g with P_S the orthogonal projector on span(S'): a pseudo-inverse on
            # the eigenbasis of S'^T S' keeps it stable when S' is nearly rank-deficient.
            w, V = xp.linalg.eigh(ss_k)
            w_inv = xp.where(w > 1e-12 * float(w.max()), 1.0 / xp.where(w > 0, w, 1.0), 0.0)
            proj = V @ (w_inv * (V.T @ sg_k))
            coef_s, coef_y = Qk @ (sg_k / lk - h * proj), xp.zeros(m, dtype=xp.float64)
    except np.linalg.LinAlgError:  # CuPy raises NumPy's LinAlgError too
        return _fallback(xp, m, "solve_failed", kept)
    return _finish(xp, G, s_idx, y_idx, g_idx, h, coef_s, coef_y, kept, sg, yg, gg, eta=eta,
                   max_step_ratio=max_step_ratio)


def two_loop(G, s_idx, y_idx, g_idx: int, *, eta: float, h0: str, tol: float, powell: bool,
             xp: Any):
    """L-BFGS's two-loop recursion d = H g on the Gram matrix G of W's rows, every vector a
    coefficient vector over the rows (Nocedal & Wright, Alg. 7.4), pairs oldest first.

    Each pair updates H by itself, so H stays positive definite whatever S^T Y is: a pair
    enters only with s^T y > 0. Without ``powell`` a pair is skipped unless
    s^T y > tol * ||s|| ||y|| (scale-invariant); with it, y is damped towards B0 s,
    y <- theta y + (1 - theta) B0 s with theta chosen so that s^T y >= 0.2 s^T B0 s
    (Powell 1978; B0 = I / h). H0 = h I: h = eta (``h0 = "lr"``) or s^T y / y^T y of the
    newest pair with s^T y > 0 (``"bb"``, else eta). Returns (coef_g, coef_s (m,),
    coef_y (m,), pairs used), or None if no pair is used.
    """
    r = G.shape[0]
    h = eta
    if h0 == "bb":
        for s, y in zip(reversed(s_idx.tolist()), reversed(y_idx.tolist()), strict=True):
            if G[s, y] > 0 and G[y, y] > 0:
                h = float(G[s, y] / G[y, y])
                break
    pairs = []   # (s row, coefficient vector of the (damped) y, 1 / s^T y)
    for s, y in zip(s_idx.tolist(), y_idx.tolist(), strict=True):
        ss, sy, yy = float(G[s, s]), float(G[s, y]), float(G[y, y])
        y_coef = xp.zeros(r)
        y_coef[y] = 1.0
        if powell:
            sbs = ss / h
            if not sbs > 0:
                continue
            if sy < 0.2 * sbs:
                theta = 0.8 * sbs / (sbs - sy)
                y_coef[y] = theta
                y_coef[s] = (1.0 - theta) / h
                sy = theta * sy + (1.0 - theta) * sbs
        elif not sy > tol * (ss * yy) ** 0.5:
            continue
        pairs.append((s, y_coef, 1.0 / sy))
    if not pairs:
        return None
    q = xp.zeros(r)
    q[g_idx] = 1.0
    alphas = []
    for s, y_coef, rho in reversed(pairs):
        a = rho * float((G @ q)[s])
        q -= a * y_coef
        alphas.append(a)
    d = h * q
    for (s, y_coef, rho), a in zip(pairs, reversed(alphas), strict=True):
        b = rho * float(y_coef @ (G @ d))
        d[s] += a - b
    return float(d[g_idx]), d[s_idx], d[y_idx], len(pairs)


def _finish(xp, G, s_idx, y_idx, g_idx, coef_g, coef_s, coef_y, kept, sg, yg, gg, *,
            eta: float, max_step_ratio: float) -> Direction:
    """The checks and the clip shared by every rule: finite, a descent direction,
    ||d|| <= max_step_ratio * ||eta g|| (from the Gram matrix)."""
    m = len(s_idx)
    coef = xp.concatenate([xp.asarray([coef_g]), coef_s, coef_y])
    idx = xp.concatenate([xp.asarray([g_idx]), s_idx, y_idx])
    sub = G[idx[:, None], idx]
    d_norm2 = float(coef @ sub @ coef)
    g_dot_d = float(coef_g * gg + coef_s @ sg + coef_y @ yg)
    if not (bool(xp.isfinite(coef).all()) and math.isfinite(d_norm2)
            and math.isfinite(g_dot_d)):
        return _fallback(xp, m, "not_finite", kept)
    if g_dot_d <= 0:
        return _fallback(xp, m, "not_descent", kept)
    d_norm = max(d_norm2, 0.0) ** 0.5
    limit = max_step_ratio * eta * gg ** 0.5
    clipped = d_norm > limit
    if clipped:
        scale = limit / d_norm
        coef_g, coef_s, coef_y = coef_g * scale, coef_s * scale, coef_y * scale
        g_dot_d, d_norm = g_dot_d * scale, limit
    return Direction(coef_g, coef_s, coef_y, kept, None, clipped, g_dot_d, d_norm)


@dataclass
class Deflation:
    """The deflated step (ALGORITHM.md s.7) as coefficients over the rows of W = [g, V, Y]:
    u_newton = V coef_newton is the Newton-like part in the tracked eigenspace (no momentum),
    u_comp = coef_g g + V coef_comp the complement part (momentum applies), with
    coef_comp = -eta_c V^T g so that u_comp = eta_c (I - V V^T) g for orthonormal V.
    ritz: the Ritz values; kept: how many exceed the safeguard floor alpha / eta_c;
    next_basis: (m, m) C with orth(Y Q) = Y C, the basis of the next refresh; reason: None,
    or why the SGD step must be taken instead."""

    coef_g: float
    coef_comp: Any
    coef_newton: Any
    ritz: Any
    kept: int
    next_basis: Any
    reason: str | None = None


def deflation(gram, v_idx, y_idx, g_idx: int, *, eta_c: float, alpha: float) -> Deflation:
    """Rayleigh-Ritz on the tracked basis and the safeguarded deflated step, from the Gram
    matrix (host, float64) of W's rows: V rows ``v_idx`` (orthonormal basis, m), Y rows
    ``y_idx`` (Y ~ H V), g row ``g_idx``. Ritz values below alpha / eta_c (negative, tiny,
    NaN) are raised to it, so no direction moves more than the complement's SGD step."""
    G = np.asarray(gram, dtype=np.float64)
    m = len(v_idx)
    zeros = np.zeros(m)
    if not np.isfinite(G).all():
        return Deflation(0.0, zeros, zeros, zeros, 0, np.eye(m), "not_finite")
    vy = G[np.ix_(v_idx, y_idx)]
    lam, Q = np.linalg.eigh(0.5 * (vy + vy.T))
    floor = alpha / eta_c
    safe = np.isfinite(lam) & (lam > floor)
    lam_c = np.where(safe, lam, floor)
    vg = G[v_idx, g_idx]
    coef_newton = Q @ (alpha / lam_c * (Q.T @ vg))
    # next basis: orth(Y Q) by Cholesky-QR of its Gram Q^T (Y^T Y) Q
    zz = Q.T @ G[np.ix_(y_idx, y_idx)] @ Q
    try:
        R = np.linalg.cholesky(zz + 1e-12 * np.trace(zz) * np.eye(m)).T
        next_basis = Q @ np.linalg.inv(R)
        # a second pass (CholeskyQR2) restores the orthonormality the shift costs
        zz = next_basis.T @ G[np.ix_(y_idx, y_idx)] @ next_basis
        next_basis = next_basis @ np.linalg.inv(np.linalg.cholesky(zz).T)
    except np.linalg.LinAlgError:
        next_basis = None
    if next_basis is None or not np.isfinite(next_basis).all():
        return Deflation(0.0, zeros, zeros, lam, int(safe.sum()), np.eye(m), "solve_failed")
    return Deflation(eta_c, -eta_c * vg, coef_newton, lam, int(safe.sum()), next_basis)
