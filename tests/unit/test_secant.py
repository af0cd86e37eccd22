"""The Secant optimizer on one rank (a Communicator over MPI.COMM_SELF, P = 1).

Compared against independent quantities: the exact Hessian-vector product of softmax
regression (DenseNet.curvature_product), gradients recomputed with model.loss_grad, the
block-BFGS step written as a dense n x n matrix, a Gram matrix recomputed from scratch, and
the SGD step written out by hand.
"""

from __future__ import annotations

import json
import tracemalloc

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from hessmpi import config
from hessmpi.backend import make_backend
from hessmpi.comm import Communicator
from hessmpi.data import write_dataset
from hessmpi.importers import synthetic
from hessmpi.models.dense import DenseNet
from hessmpi.optim.secant import Secant, secant_options
from hessmpi.trainer import Interval, Run

D_IN, CLASSES, ROWS, BATCH = 7, 4, 256, 32


# ----- fixtures and helpers -------------------------------------------------------------------
@pytest.fixture
def comm():
    c = Communicator(MPI.COMM_SELF)
    yield c
    c.comm.Free()


class Problem:
    """Softmax regression (DenseNet [d, C], float64) on a random labelled dataset, with a
    deterministic stream of minibatches."""

    def __init__(self, seed=0, d=D_IN, classes=CLASSES, rows=ROWS, batch=BATCH, l2=1e-3):
        rng = np.random.default_rng(seed)
        self.model = DenseNet([d, classes], "relu", l2, xp=np, dtype=np.float64)
        self.x = rng.standard_normal((rows, d))
        self.y = rng.integers(0, classes, rows)
        self.theta = 0.3 * rng.standard_normal(self.model.n_params)
        self.batch = batch
        self._rng = np.random.default_rng(seed + 100)

    def draw(self):
        idx = self._rng.choice(len(self.y), self.batch, replace=False)
        return self.x[idx], self.y[idx]

    def grad(self, theta, x, y):
        out = np.empty(self.model.n_params)
        self.model.loss_grad(theta, x, y, out)
        return out


def options(**overrides) -> dict:
    o = config.defaults()["optim"]
    o["name"] = "secant"
    o.update(overrides)
    return secant_options(o)


def make(problem, comm, **overrides) -> Secant:
    return Secant(problem.theta, model=problem.model, comm=comm, draw_batch=problem.draw,
                  seed=11, opts=options(**overrides))


def one_step(opt, problem, theta, lr, batch=None, between=None):
    """What the trainer does on one rank: gradient, observe, (Allreduce of 1), step.
    ``between(opt)`` runs after observe and before step. Returns (grad, StepInfo)."""
    x, y = batch if batch is not None else problem.draw()
    grad = problem.grad(theta, x, y)
    opt.observe(theta, grad, lr, x, y)
    if between is not None:
        between(opt)
    return grad, opt.step(theta, grad, lr, x, y)


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def dense_bfgs_step(g, S, Y, h, tau=1e-6):
    """H+ g with the curvature filter, as n x n matrices: rotate to the eigenvectors of
    sym(S^T Y), keep those above tau * max, then H+ = S D^-1 S^T + (I-SD^-1Y^T) h (I-YD^-1S^T)."""
    lam, Q = np.linalg.eigh(0.5 * (S.T @ Y + Y.T @ S))
    keep = (lam > tau * lam.max()) & (lam > 0)
    S, Y, Di = S @ Q[:, keep], Y @ Q[:, keep], np.diag(1.0 / lam[keep])
    L = np.eye(len(g)) - S @ Di @ Y.T
    return (S @ Di @ S.T + h * L @ L.T) @ g, int(keep.sum())


def dense_lsq_step(g, S, Y, h, mu_rel):
    m = S.shape[1]
    mu = mu_rel * np.trace(Y.T @ Y) / m
    b = np.linalg.solve(Y.T @ Y + mu * np.eye(m), Y.T @ g)
    return S @ b + h * (g - Y @ b), m


# ----- pairs from the real model --------------------------------------------------------------
def test_sgd_probe_y_is_the_hessian_vector_product(comm):
    p = Problem(seed=1)
    x, y = p.draw()
    g = p.grad(p.theta, x, y)
    errors = []
    for eta_p in (1e-1, 1e-2, 1e-3):
        opt = make(p, comm, probe="sgd", probe_lr=eta_p, damping=0.0)
        theta = p.theta.copy()
        opt.observe(theta, g.copy(), 0.5, x, y)
        s, yv = opt.W[1], opt.W[2]
        np.testing.assert_array_equal(s, -eta_p * g)       # s = -eta_probe * g, bitwise
        np.testing.assert_array_equal(theta, p.theta)      # observe leaves theta alone
        hs = p.model.curvature_product(p.theta, s, x, y)   # exact H s (softmax: G = H)
        err = rel(yv, hs)
        assert err < 0.5 * np.linalg.norm(s)                # finite-difference accuracy O(||s||)
        errors.append(err)
    assert errors[-1] < 1e-3
    assert errors[0] / errors[1] > 5 and errors[1] / errors[2] > 5   # first order in ||s||


def test_sgd_probe_lr_zero_means_the_step_lr(comm):
    p = Problem(seed=2)
    x, y = p.draw()
    g = p.grad(p.theta, x, y)
    opt = make(p, comm, probe="sgd", probe_lr=0.0)
    opt.observe(p.theta.copy(), g, 0.037, x, y)
    np.testing.assert_array_equal(opt.W[1], -0.037 * g)


def test_random_probe_length_direction_and_curvature(comm):
    p = Problem(seed=3)
    x, y = p.draw()
    g = p.grad(p.theta, x, y)
    sigma, k = 1e-3, 3
    opt = make(p, comm, probe="random", probe_sigma=sigma, pairs_per_rank=k)
    opt.observe(p.theta, g, 0.1, x, y)
    S, Y = opt.W[1:1 + k], opt.W[1 + k:1 + 2 * k]
    scale = sigma * max(np.linalg.norm(p.theta), 1.0)
    for j in range(k):
        assert np.isclose(np.linalg.norm(S[j]), scale, rtol=1e-12)
        assert rel(Y[j], p.model.curvature_product(p.theta, S[j], x, y)) < 10 * scale
    # k different directions, not one repeated
    cos = (S @ S.T) / scale**2
    assert np.abs(cos - np.eye(k)).max() < 0.9
    # the floor: at theta = 0 the probe still has length sigma
    zero = np.zeros_like(p.theta)
    opt0 = make(p, comm, probe="random", probe_sigma=sigma)
    opt0.observe(zero, p.grad(zero, x, y), 0.1, x, y)
    assert np.isclose(np.linalg.norm(opt0.W[1]), sigma, rtol=1e-12)


def test_sgd_probe_with_k_pairs_uses_sub_batch_gradients(comm):
    p = Problem(seed=4)
    x, y = p.draw()
    g = p.grad(p.theta, x, y)
    k, eta_p = 2, 1e-3
    opt = make(p, comm, probe="sgd", probe_lr=eta_p, pairs_per_rank=k)
    opt.observe(p.theta, g, 0.1, x, y)
    S, Y = opt.W[1:1 + k], opt.W[1 + k:1 + 2 * k]
    for j, part in enumerate(np.array_split(np.arange(len(y)), k)):   # B = 32: equal halves
        assert rel(S[j], -eta_p * p.grad(p.theta, x[part], y[part])) < 1e-14
        # y on the whole batch at theta + s_j (same-batch difference)
        assert rel(Y[j], p.grad(p.theta + S[j], x, y) - g) < 1e-10
        assert rel(Y[j], p.model.curvature_product(p.theta, S[j], x, y)) < 1e-2


def test_damping_adds_lambda_s_to_y_in_step(comm):
    p = Problem(seed=5)
    x, y = p.draw()
    lam = 0.25
    opt = make(p, comm, damping=lam, probe_lr=1e-2)
    theta = p.theta.copy()
    g = p.grad(theta, x, y)
    opt.observe(theta, g, 0.1, x, y)
    s, y_raw = opt.W[1].copy(), opt.W[2].copy()
    opt.step(theta, g, 0.1, x, y)
    assert rel(opt.W[2], y_raw + lam * s) < 1e-15
    np.testing.assert_array_equal(opt.W[1], s)
    np.testing.assert_array_equal(opt.W[0], g)


# ----- the step against the dense n x n formula -----------------------------------------------
@pytest.mark.parametrize("curvature", ["bfgs", "lsq"])
def test_steps_equal_the_dense_formula_with_momentum(comm, curvature):
    """Two steps of P = 1, k = 3 random probes: theta_t+1 = theta_t - v, v = beta v + alpha d,
    d from the dense H+ built from pairs recomputed here with model.loss_grad."""
    p = Problem(seed=6)
    k, lam, alpha, beta, lr, mu = 3, 0.1, 0.2, 0.9, 0.3, 1e-9
    opt = make(p, comm, probe="random", probe_sigma=1e-2, pairs_per_rank=k, damping=lam,
               newton_lr=alpha, momentum=beta, max_step_ratio=1e6, curvature=curvature,
               lsq_mu=mu)
    theta = p.theta.copy()
    ref_theta, ref_v = p.theta.copy(), np.zeros_like(p.theta)
    for _ in range(2):
        x, y = p.draw()
        g = p.grad(ref_theta, x, y)
        snap = {}
        _, info = one_step(opt, p, theta, lr, batch=(x, y),
                           between=lambda o, snap=snap: snap.update(S=o.W[1:1 + k].T.copy()))
        S = snap["S"]
        Y = np.stack([p.grad(ref_theta + S[:, j], x, y) - g for j in range(k)], axis=1)
        Y += lam * S
        if curvature == "bfgs":
            d, kept = dense_bfgs_step(g, S, Y, lr)
        else:
            d, kept = dense_lsq_step(g, S, Y, lr, mu)
        assert info.fallback == 0 and info.rank_kept == kept == k
        ref_v = beta * ref_v + alpha * d
        ref_theta = ref_theta - ref_v
        assert rel(theta, ref_theta) < 1e-10
        assert rel(opt.velocity, ref_v) < 1e-8
        assert np.isclose(opt.last_step_norm, np.linalg.norm(ref_v), rtol=1e-8)


def test_clip_counts_and_bounds_the_step(comm):
    p = Problem(seed=7)
    ratio, lr = 0.5, 0.2
    opt = make(p, comm, max_step_ratio=ratio, momentum=0.0, newton_lr=1.0, damping=0.0)
    theta = p.theta.copy()
    g, info = one_step(opt, p, theta, lr)
    assert info.fallback == 0
    assert opt.counts["clipped"] == 1
    # momentum 0, alpha 1: the velocity is d itself, and ||d|| = ratio * ||lr g||
    assert np.isclose(np.linalg.norm(opt.velocity), ratio * lr * np.linalg.norm(g), rtol=1e-10)
    assert json.loads(opt.counters())["clipped"] == 1


def test_clip_holds_when_the_gram_of_a_tiny_probe_underflows(comm):
    """A kept pair with ||s|| = 1e-200 (s.s = 0 in floating point, s.y > 0) and low curvature:
    the actual step must still respect the clip."""
    p = Problem(seed=15)
    ratio, lr = 10.0, 0.1
    opt = make(p, comm, damping=0.0, momentum=0.0, newton_lr=1.0, max_step_ratio=ratio)
    theta = p.theta.copy()

    def tiny_pair(o):
        s_rows, y_rows = o._my_rows(o.next_slot)
        e = g / np.linalg.norm(g)
        perp = np.random.default_rng(0).standard_normal(len(g))
        perp -= (perp @ e) * e
        s_rows[0] = 1e-200 * e
        y_rows[0] = 0.01 * e + perp / np.linalg.norm(perp)     # curvature 0.01 along s

    x, y = p.draw()
    g = p.grad(theta, x, y)
    with np.errstate(all="ignore"):
        _, info = one_step(opt, p, theta, lr, batch=(x, y), between=tiny_pair)
    assert info.fallback == 0
    assert np.linalg.norm(opt.velocity) <= ratio * lr * np.linalg.norm(g) * (1 + 1e-9)


# ----- the incremental, blocked Gram matrix ---------------------------------------------------
@pytest.mark.parametrize("block", [None, 7, 1])
def test_incremental_gram_equals_the_gram_from_scratch(comm, block):
    p = Problem(seed=8)
    K, k, steps = 3, 2, 20
    opt = make(p, comm, memory=K, pairs_per_rank=k, probe="sgd", probe_lr=1e-2)
    if block is not None:
        opt.gram_block = block
    n = p.model.n_params
    assert opt.W.shape == (1 + 2 * k * K, n)
    theta = p.theta.copy()
    for t in range(steps):
        snap = {}
        g, _ = one_step(opt, p, theta, 0.05,
                        between=lambda o, snap=snap: snap.update(
                            rows=o._slot(o.next_slot).copy()))
        # the ring: step t wrote slot t % K, after the damping of its y rows
        slot = opt._slot(t % K)
        np.testing.assert_array_equal(slot[:k], snap["rows"][:k])
        np.testing.assert_allclose(slot[k:], snap["rows"][k:] + 0.1 * snap["rows"][:k],
                                   rtol=1e-14, atol=0)
        np.testing.assert_array_equal(opt.W[0], g)
        active = 1 + min(t + 1, K) * 2 * k
        Wa = opt.W[:active]
        fresh = Wa @ Wa.T
        err = np.abs(opt.gram[:active, :active] - fresh).max()
        assert err <= 1e-13 * np.abs(fresh).max(), (t, err)
    assert opt.filled == K and opt.next_slot == steps % K


def test_blocked_gram_matches_default_block_in_float32(comm):
    """float32 parameters: the Gram is accumulated in float32 over blocks; still equal to a
    float64 product from scratch to float32 round-off."""
    p = Problem(seed=9)
    model32 = DenseNet([D_IN, CLASSES], "relu", 1e-3, xp=np, dtype=np.float32)
    theta = p.theta.astype(np.float32)
    opt = Secant(theta, model=model32, comm=comm, draw_batch=p.draw, seed=1,
                 opts=options(memory=2))
    opt.gram_block = 5
    for _ in range(5):
        x, y = p.draw()
        x = x.astype(np.float32)
        g = np.empty_like(theta)
        model32.loss_grad(theta, x, y, g)
        opt.observe(theta, g, 0.05, x, y)
        opt.step(theta, g, 0.05, x, y)
    W64 = opt.W.astype(np.float64)
    fresh = W64 @ W64.T
    assert opt.gram.dtype == np.float32
    assert np.abs(opt.gram - fresh).max() <= 1e-5 * np.abs(fresh).max()


# ----- deliberately bad pairs end in the SGD fallback -------------------------------------------
def _spoil(kind):
    def spoil(opt):
        s_rows, y_rows = opt._my_rows(opt.next_slot)
        if kind == "zero_y":
            y_rows[...] = 0.0
        elif kind == "minus_s":
            y_rows[...] = -s_rows
        elif kind == "nan_y":
            y_rows[0, 3] = np.nan
        elif kind == "inf_s":
            s_rows[0, 0] = np.inf
        elif kind == "huge_y":
            y_rows[...] = 1e200
    return spoil


REASON = {"zero_y": "no_curvature", "minus_s": "no_curvature", "nan_y": "not_finite",
          "inf_s": "not_finite", "huge_y": "not_finite"}


# zero y with damping is the valid pair y = lam s, so it is tried without damping only
@pytest.mark.parametrize("kind, damping", [(kind, lam) for kind in REASON for lam in (0.0, 0.1)
                                           if not (kind == "zero_y" and lam)])
def test_bad_pairs_fall_back_to_the_sgd_step(comm, kind, damping):
    p = Problem(seed=10)
    beta, lr = 0.9, 0.1
    opt = make(p, comm, damping=damping, momentum=beta)
    theta = p.theta.copy()
    one_step(opt, p, theta, lr)                 # a good step first: the velocity is not zero
    assert sum(opt.counts[r] for r in REASON.values()) == 0
    before, v_before = theta.copy(), opt.velocity.copy()
    with np.errstate(all="ignore"):
        g, info = one_step(opt, p, theta, lr, between=_spoil(kind))
    assert info.fallback == 1 and info.reason == REASON[kind] and info.rank_kept == 0
    assert opt.counts[REASON[kind]] == 1
    assert sum(opt.counts[r] for r in set(REASON.values())) == 1
    assert json.loads(opt.counters())[REASON[kind]] == 1
    # exactly the SGD step with momentum, bitwise
    v = v_before * beta
    v += lr * g
    np.testing.assert_array_equal(opt.velocity, v)
    np.testing.assert_array_equal(theta, before - v)
    assert np.isfinite(theta).all()
    # the next good pairs overwrite the ring slot (memory 1): no fallback any more
    _, info = one_step(opt, p, theta, lr)
    assert info.fallback == 0 and np.isfinite(theta).all()


def test_no_curvature_step_is_exactly_eta_g_without_momentum(comm):
    p = Problem(seed=11)
    lr = 0.07
    opt = make(p, comm, damping=0.0, momentum=0.0)
    theta = p.theta.copy()
    before = theta.copy()
    g, info = one_step(opt, p, theta, lr, between=_spoil("minus_s"))
    assert info.reason == "no_curvature"
    np.testing.assert_array_equal(opt.velocity, lr * g)
    np.testing.assert_array_equal(theta, before - lr * g)


def test_nan_pair_stays_in_memory_until_the_ring_overwrites_it(comm):
    p = Problem(seed=12)
    K = 3
    opt = make(p, comm, memory=K)
    theta = p.theta.copy()
    with np.errstate(all="ignore"):
        _, info = one_step(opt, p, theta, 0.1, between=_spoil("nan_y"))
        assert info.reason == "not_finite"
        for _ in range(K - 1):
            _, info = one_step(opt, p, theta, 0.1)
            assert info.reason == "not_finite"      # the NaN slot is still in the ring
    _, info = one_step(opt, p, theta, 0.1)          # slot 0 overwritten now
    assert info.fallback == 0 and info.rank_kept > 0
    assert np.isfinite(opt.gram).all() and np.isfinite(theta).all()
    assert opt.counts["not_finite"] == K


# ----- cost accounting ------------------------------------------------------------------------
@pytest.mark.parametrize("variant, expected", [
    (dict(pairs="probe", probe="sgd", pairs_per_rank=1), 2),
    (dict(pairs="probe", probe="random", pairs_per_rank=3), 4),
    (dict(pairs="local", local_steps=4), 4),
    (dict(pairs="probe", probe="sgd", pairs_per_rank=2), 4),
])
def test_grad_evals_per_step(comm, variant, expected):
    """The declared count equals the gradients observe() really evaluates (in units of one
    minibatch gradient) plus the step's own gradient."""
    p = Problem(seed=13)
    opt = make(p, comm, **variant)
    assert opt.grad_evals_per_step == expected
    used = []
    real = p.model.loss_grad

    def counting(theta, x, y, grad):
        used.append(len(y) / p.batch)
        return real(theta, x, y, grad)

    p.model.loss_grad = counting
    theta = p.theta.copy()
    x, y = p.draw()
    g = p.grad(theta, x, y)
    used.clear()
    opt.observe(theta, g, 0.1, x, y)
    assert 1 + sum(used) == expected


def test_step_allocates_nothing_of_size_n():
    """tracemalloc sees NumPy's buffers: several steps on n = 10^6 parameters must peak far
    below one vector of n floats."""
    comm = Communicator(MPI.COMM_SELF)
    try:
        d, classes = 100_000, 10
        model = DenseNet([d, classes], "relu", 0.0, xp=np, dtype=np.float64)
        n = model.n_params
        rng = np.random.default_rng(14)
        theta = rng.standard_normal(n) * 1e-3
        for pairs in ("probe", "local"):
            opt = Secant(theta, model=model, comm=comm, draw_batch=None, seed=0,
                         opts=options(pairs=pairs, memory=2, damping=0.1))
            grads = [rng.standard_normal(n) for _ in range(3)]
            tracemalloc.start()
            try:
                peak = 0
                for t, g in enumerate(grads):
                    s_rows, y_rows = opt._my_rows(opt.next_slot)
                    if t == 0 or pairs == "local":   # fill the own rows (outside the trace)
                        tracemalloc.stop()
                        s_rows[0] = rng.standard_normal(n) * (1e-3 if pairs == "probe" else 1)
                        y_rows[0] = 2.0 * s_rows[0] + rng.standard_normal(n) * 1e-5
                        if pairs == "local":
                            s_rows[0] += theta   # the drifted point
                        tracemalloc.start()
                    tracemalloc.reset_peak()
                    base = tracemalloc.get_traced_memory()[0]
                    opt.step(theta, g, 0.01)
                    peak = max(peak, tracemalloc.get_traced_memory()[1] - base)
            finally:
                tracemalloc.stop()
            assert np.isfinite(theta).all()
            assert peak < 0.1 * n * 8, (pairs, peak)
    finally:
        comm.comm.Free()


def test_tracemalloc_sees_numpy_buffers():
    """The allocation test above is only meaningful if NumPy reports to tracemalloc."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        a = np.empty(1_000_000)
        assert tracemalloc.get_traced_memory()[1] - base >= a.nbytes
    finally:
        tracemalloc.stop()


# ----- a whole run on one rank ----------------------------------------------------------------
def _dataset(tmp_path):
    train, test, attrs = synthetic(120, 40, 6, 3, 10.0, 2.0, 5)
    path = tmp_path / "data.h5"
    write_dataset(path, train, test, **attrs)
    with h5py.File(path, "r") as f:
        x, y = f["train/x"][()].astype(np.float64), f["train/y"][()]
    return path, x, y


@pytest.mark.parametrize("variant", [[], ["optim.pairs=local"], ["optim.memory=4"],
                                     ["optim.probe=random"], ["optim.curvature=subspace",
                                                              "optim.h0=bb"]])
def test_single_rank_run_reduces_the_full_batch_objective(comm, tmp_path, variant):
    path, x, y = _dataset(tmp_path)
    steps = 15
    cfg = config.load(None, [f"data.path={json.dumps(str(path))}", "backend.dtype=float64",
                             "backend.threads=1", f"train.steps={steps}", "train.batch_size=8",
                             "train.log_every=5", "train.eval_every=0", "optim.name=secant",
                             "optim.lr=0.2", "optim.check_every=5", *variant])
    backend = make_backend("cpu", "float64", 1)
    run = Run(cfg, comm, backend, tmp_path / "out")
    before = float(run.model.loss(run.theta, x, y))
    summary = run.run()
    after = float(run.model.loss(run.theta, x, y))
    assert summary["steps"] == steps
    assert np.isfinite(run.theta).all()
    assert after < 0.9 * before, (before, after)
    assert run.grad_evals == steps * run.optimizer.grad_evals_per_step
    counts = run.optimizer.counts
    if "optim.pairs=local" in variant:
        # one rank: s = theta_r - theta_avg = 0, so every step is the SGD fallback
        assert counts["no_curvature"] == steps
    else:
        assert sum(counts[r] for r in ("no_curvature", "not_finite", "not_descent")) < steps


def test_run_step_is_the_sgd_step_when_the_pair_is_bad(comm, tmp_path):
    """Through Run.step (observe, Allreduce, step) with a NaN injected between observe and
    step: the parameters take the SGD step with momentum and stay finite."""
    path, _, _ = _dataset(tmp_path)
    cfg = config.load(None, [f"data.path={json.dumps(str(path))}", "backend.dtype=float64",
                             "backend.threads=1", "train.steps=3", "train.batch_size=8",
                             "optim.name=secant", "optim.lr=0.2"])
    run = Run(cfg, comm, make_backend("cpu", "float64", 1), tmp_path / "out")
    opt = run.optimizer
    run.step(0, Interval())
    real_observe = opt.observe

    def observe(theta, grad, lr, x, y):
        seconds = real_observe(theta, grad, lr, x, y)
        opt._my_rows(opt.next_slot)[1][0, 0] = np.nan
        return seconds

    opt.observe = observe
    before, v_before = run.theta.copy(), opt.velocity.copy()
    with np.errstate(all="ignore"):
        _, info = run.step(1, Interval())
    assert info.reason == "not_finite" and opt.counts["not_finite"] == 1
    v = v_before * cfg["optim"]["momentum"]
    v += cfg["optim"]["lr"] * run.grad
    np.testing.assert_array_equal(run.theta, before - v)
    assert np.isfinite(run.theta).all()
