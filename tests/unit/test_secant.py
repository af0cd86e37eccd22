"""The Secant optimizer on one rank (a Communicator over MPI.COMM_SELF, P = 1).

Compared against independent quantities: the exact Hessian-vector product of softmax
regression (DenseNet.curvature_product), gradients recomputed with model.loss_grad, the
block-BFGS step written as a dense n x n matrix, a Gram matrix recomputed from scratch, and
the SGD step written out by hand.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from harness import (
    after_pairs,
    block_bfgs,
    build,
    counted,
    form_pairs,
    own_rows,
    read_split,
    rel,
    run_config,
    start_run,
    step_on,
)
from toymodels import Quadratic, Recorder, SoftmaxProblem

from hessmpi.data import Sampler, write_dataset
from hessmpi.importers import synthetic
from hessmpi.models.dense import DenseNet
from hessmpi.objective import Objective
from hessmpi.optim.secant import Secant
from hessmpi.trainer import Interval

D_IN, CLASSES, ROWS, BATCH = 7, 4, 256, 32


# ----- helpers ----------------------------------------------------------------------------------
def problem(seed) -> SoftmaxProblem:
    """Softmax regression [7, 4], float64, on 256 random rows; batches of 32."""
    return SoftmaxProblem(seed, d=D_IN, classes=CLASSES, rows=ROWS, batch=BATCH, l2=1e-3,
                          draw_seed=seed + 100)


def make(p, comm, **keys) -> tuple[Secant, Objective]:
    """A Secant on p's objective (the problem's batch stream for next_batch)."""
    objective = p.objective(comm)
    return build(p.theta, objective, seed=11, **keys), objective


def one_step(opt, objective, p, theta, lr, batch=None, between=None):
    """One step on a batch (default: the next of p's stream); ``between(opt)`` runs on the
    own pairs before the exchange. Returns (g, StepInfo), g the batch gradient at theta
    recomputed here with model.loss_grad."""
    x, y = batch if batch is not None else p.draw()
    g = p.grad(theta, x, y)
    if between is None:
        info = step_on(opt, objective, theta, lr, x, y)
    else:
        with after_pairs(opt, between):
            info = step_on(opt, objective, theta, lr, x, y)
    np.testing.assert_array_equal(objective.grad, g)     # the step's gradient is the model's
    return g, info


def dense_lsq_step(g, S, Y, h, mu_rel):
    m = S.shape[1]
    mu = mu_rel * np.trace(Y.T @ Y) / m
    b = np.linalg.solve(Y.T @ Y + mu * np.eye(m), Y.T @ g)
    return S @ b + h * (g - Y @ b), m


# ----- pairs from the real model --------------------------------------------------------------
def test_sgd_probe_y_is_the_hessian_vector_product(comm):
    p = problem(1)
    x, y = p.draw()
    g = p.grad(p.theta, x, y)
    errors = []
    for eta_p in (1e-1, 1e-2, 1e-3):
        opt, objective = make(p, comm, probe="sgd", probe_lr=eta_p, damping=0.0)
        theta = p.theta.copy()
        form_pairs(opt, objective, theta, 0.5, x, y)
        s, yv = opt.memory.W[1], opt.memory.W[2]
        np.testing.assert_array_equal(s, -eta_p * g)       # s = -eta_probe * g, bitwise
        np.testing.assert_array_equal(theta, p.theta)      # the probe leaves theta alone
        hs = p.model.curvature_product(p.theta, s, x, y)   # exact H s (softmax: G = H)
        err = rel(yv, hs)
        assert err < 0.5 * np.linalg.norm(s)                # finite-difference accuracy O(||s||)
        errors.append(err)
    assert errors[-1] < 1e-3
    assert errors[0] / errors[1] > 5 and errors[1] / errors[2] > 5   # first order in ||s||


def test_sgd_probe_lr_zero_means_the_step_lr(comm):
    p = problem(2)
    x, y = p.draw()
    g = p.grad(p.theta, x, y)
    opt, objective = make(p, comm, probe="sgd", probe_lr=0.0)
    form_pairs(opt, objective, p.theta.copy(), 0.037, x, y)
    np.testing.assert_array_equal(opt.memory.W[1], -0.037 * g)


def test_random_probe_length_direction_and_curvature(comm):
    p = problem(3)
    x, y = p.draw()
    sigma, k = 1e-3, 3
    opt, objective = make(p, comm, probe="random", probe_sigma=sigma, pairs_per_rank=k)
    form_pairs(opt, objective, p.theta, 0.1, x, y)
    S, Y = opt.memory.W[1:1 + k], opt.memory.W[1 + k:1 + 2 * k]
    scale = sigma * max(np.linalg.norm(p.theta), 1.0)
    for j in range(k):
        assert np.isclose(np.linalg.norm(S[j]), scale, rtol=1e-12)
        assert rel(Y[j], p.model.curvature_product(p.theta, S[j], x, y)) < 10 * scale
    # k different directions, not one repeated
    cos = (S @ S.T) / scale**2
    assert np.abs(cos - np.eye(k)).max() < 0.9
    # the floor: at theta = 0 the probe still has length sigma
    zero = np.zeros_like(p.theta)
    opt0, objective0 = make(p, comm, probe="random", probe_sigma=sigma)
    form_pairs(opt0, objective0, zero, 0.1, x, y)
    assert np.isclose(np.linalg.norm(opt0.memory.W[1]), sigma, rtol=1e-12)


def test_sgd_probe_with_k_pairs_uses_sub_batch_gradients(comm):
    p = problem(4)
    x, y = p.draw()
    g = p.grad(p.theta, x, y)
    k, eta_p = 2, 1e-3
    opt, objective = make(p, comm, probe="sgd", probe_lr=eta_p, pairs_per_rank=k)
    form_pairs(opt, objective, p.theta, 0.1, x, y)
    S, Y = opt.memory.W[1:1 + k], opt.memory.W[1 + k:1 + 2 * k]
    for j, part in enumerate(np.array_split(np.arange(len(y)), k)):   # B = 32: equal halves
        assert rel(S[j], -eta_p * p.grad(p.theta, x[part], y[part])) < 1e-14
        # y on the whole batch at theta + s_j (same-batch difference)
        assert rel(Y[j], p.grad(p.theta + S[j], x, y) - g) < 1e-10
        assert rel(Y[j], p.model.curvature_product(p.theta, S[j], x, y)) < 1e-2


def test_damping_adds_lambda_s_to_y_in_step(comm):
    p = problem(5)
    x, y = p.draw()
    lam = 0.25
    opt, objective = make(p, comm, damping=lam, probe_lr=1e-2)
    theta = p.theta.copy()
    snap = {}

    def keep(o):
        snap["s"], snap["y"] = o.memory.W[1].copy(), o.memory.W[2].copy()

    g, _ = one_step(opt, objective, p, theta, 0.1, batch=(x, y), between=keep)
    assert rel(opt.memory.W[2], snap["y"] + lam * snap["s"]) < 1e-15
    np.testing.assert_array_equal(opt.memory.W[1], snap["s"])
    np.testing.assert_array_equal(opt.memory.W[0], g)


# ----- the step against the dense n x n formula -----------------------------------------------
@pytest.mark.parametrize("curvature", ["bfgs", "lsq"])
def test_steps_equal_the_dense_formula_with_momentum(comm, curvature):
    """Two steps of P = 1, k = 3 random probes: theta_t+1 = theta_t - v, v = beta v + alpha d,
    d from the dense H+ built from pairs recomputed here with model.loss_grad."""
    p = problem(6)
    k, lam, alpha, beta, lr, mu = 3, 0.1, 0.2, 0.9, 0.3, 1e-9
    lsq = {"lsq_mu": mu} if curvature == "lsq" else {}
    opt, objective = make(p, comm, probe="random", probe_sigma=1e-2, pairs_per_rank=k,
                          damping=lam, newton_lr=alpha, momentum=beta, max_step_ratio=1e6,
                          curvature=curvature, **lsq)
    theta = p.theta.copy()
    ref_theta, ref_v = p.theta.copy(), np.zeros_like(p.theta)
    for _ in range(2):
        x, y = p.draw()
        g = p.grad(ref_theta, x, y)
        snap = {}
        _, info = one_step(opt, objective, p, theta, lr, batch=(x, y),
                           between=lambda o, snap=snap: snap.update(
                               S=o.memory.W[1:1 + k].T.copy()))
        S = snap["S"]
        Y = np.stack([p.grad(ref_theta + S[:, j], x, y) - g for j in range(k)], axis=1)
        Y += lam * S
        if curvature == "bfgs":
            d, kept = block_bfgs(g, S, Y, lr)
        else:
            d, kept = dense_lsq_step(g, S, Y, lr, mu)
        assert info.fallback == 0 and info.rank_kept == kept == k
        ref_v = beta * ref_v + alpha * d
        ref_theta = ref_theta - ref_v
        assert rel(theta, ref_theta) < 1e-10
        assert rel(opt.velocity, ref_v) < 1e-8
        assert np.isclose(opt.last_step_norm, np.linalg.norm(ref_v), rtol=1e-8)


def test_clip_counts_and_bounds_the_step(comm):
    p = problem(7)
    ratio, lr = 0.5, 0.2
    opt, objective = make(p, comm, max_step_ratio=ratio, momentum=0.0, newton_lr=1.0,
                          damping=0.0)
    theta = p.theta.copy()
    g, info = one_step(opt, objective, p, theta, lr)
    assert info.fallback == 0
    assert opt.counts["clipped"] == 1
    # momentum 0, alpha 1: the velocity is d itself, and ||d|| = ratio * ||lr g||
    assert np.isclose(np.linalg.norm(opt.velocity), ratio * lr * np.linalg.norm(g), rtol=1e-10)
    assert opt.counters()["clipped"] == 1


def test_clip_holds_when_the_gram_of_a_tiny_probe_underflows(comm):
    """A kept pair with ||s|| = 1e-200 (s.s = 0 in floating point, s.y > 0) and low curvature:
    the actual step must still respect the clip."""
    p = problem(15)
    ratio, lr = 10.0, 0.1
    opt, objective = make(p, comm, damping=0.0, momentum=0.0, newton_lr=1.0,
                          max_step_ratio=ratio)
    theta = p.theta.copy()

    def tiny_pair(o):
        s_rows, y_rows = own_rows(o)
        e = g / np.linalg.norm(g)
        perp = np.random.default_rng(0).standard_normal(len(g))
        perp -= (perp @ e) * e
        s_rows[0] = 1e-200 * e
        y_rows[0] = 0.01 * e + perp / np.linalg.norm(perp)     # curvature 0.01 along s

    x, y = p.draw()
    g = p.grad(theta, x, y)
    with np.errstate(all="ignore"):
        _, info = one_step(opt, objective, p, theta, lr, batch=(x, y), between=tiny_pair)
    assert info.fallback == 0
    assert np.linalg.norm(opt.velocity) <= ratio * lr * np.linalg.norm(g) * (1 + 1e-9)


# ----- the incremental, blocked Gram matrix ---------------------------------------------------
@pytest.mark.parametrize("block", [None, 7, 1])
def test_incremental_gram_equals_the_gram_from_scratch(comm, block):
    p = problem(8)
    K, k, steps = 3, 2, 20
    opt, objective = make(p, comm, memory=K, pairs_per_rank=k, probe="sgd", probe_lr=1e-2)
    memory = opt.memory
    if block is not None:
        memory.gram_block = block
    n = p.model.n_params
    assert memory.W.shape == (1 + 2 * k * K, n)
    theta = p.theta.copy()
    for t in range(steps):
        snap = {}
        g, _ = one_step(opt, objective, p, theta, 0.05,
                        between=lambda o, snap=snap: snap.update(
                            rows=o.memory.slot(o.memory.next_slot).copy()))
        # the ring: step t wrote slot t % K, after the damping of its y rows
        slot = memory.slot(t % K)
        np.testing.assert_array_equal(slot[:k], snap["rows"][:k])
        np.testing.assert_allclose(slot[k:], snap["rows"][k:] + 0.1 * snap["rows"][:k],
                                   rtol=1e-14, atol=0)
        np.testing.assert_array_equal(memory.W[0], g)
        active = 1 + min(t + 1, K) * 2 * k
        Wa = memory.W[:active]
        fresh = Wa @ Wa.T
        err = np.abs(memory.gram[:active, :active] - fresh).max()
        assert err <= 1e-13 * np.abs(fresh).max(), (t, err)
    assert memory.filled == K and memory.next_slot == steps % K


def test_blocked_gram_matches_default_block_in_float32(comm):
    """float32 parameters: the Gram is accumulated in float32 over blocks; still equal to a
    float64 product from scratch to float32 round-off."""
    p = problem(9)
    model32 = DenseNet([D_IN, CLASSES], "relu", 1e-3, xp=np, dtype=np.float32)
    theta = p.theta.astype(np.float32)
    objective = Objective(model32, comm)
    opt = build(theta, objective, seed=1, memory=2)
    opt.memory.gram_block = 5
    for _ in range(5):
        x, y = p.draw()
        step_on(opt, objective, theta, 0.05, x.astype(np.float32), y)
    assert objective.grad_evals == 5 * 2 and theta.dtype == np.float32
    W64 = opt.memory.W.astype(np.float64)
    fresh = W64 @ W64.T
    assert opt.memory.gram.dtype == np.float32
    assert np.abs(opt.memory.gram - fresh).max() <= 1e-5 * np.abs(fresh).max()


# ----- deliberately bad pairs end in the SGD fallback -------------------------------------------
def _spoil(kind):
    def spoil(opt):
        s_rows, y_rows = own_rows(opt)
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
    p = problem(10)
    beta, lr = 0.9, 0.1
    opt, objective = make(p, comm, damping=damping, momentum=beta)
    theta = p.theta.copy()
    one_step(opt, objective, p, theta, lr)      # a good step first: the velocity is not zero
    assert sum(opt.counts[r] for r in REASON.values()) == 0
    before, v_before = theta.copy(), opt.velocity.copy()
    with np.errstate(all="ignore"):
        g, info = one_step(opt, objective, p, theta, lr, between=_spoil(kind))
    assert info.fallback == 1 and info.reason == REASON[kind] and info.rank_kept == 0
    assert opt.counts[REASON[kind]] == 1
    assert sum(opt.counts[r] for r in set(REASON.values())) == 1
    assert opt.counters()[REASON[kind]] == 1
    # exactly the SGD step with momentum, bitwise
    v = v_before * beta
    v += lr * g
    np.testing.assert_array_equal(opt.velocity, v)
    np.testing.assert_array_equal(theta, before - v)
    assert np.isfinite(theta).all()
    # the next good pairs overwrite the ring slot (memory 1): no fallback any more
    _, info = one_step(opt, objective, p, theta, lr)
    assert info.fallback == 0 and np.isfinite(theta).all()


def test_no_curvature_step_is_exactly_eta_g_without_momentum(comm):
    p = problem(11)
    lr = 0.07
    opt, objective = make(p, comm, damping=0.0, momentum=0.0)
    theta = p.theta.copy()
    before = theta.copy()
    g, info = one_step(opt, objective, p, theta, lr, between=_spoil("minus_s"))
    assert info.reason == "no_curvature"
    np.testing.assert_array_equal(opt.velocity, lr * g)
    np.testing.assert_array_equal(theta, before - lr * g)


def test_nan_pair_stays_in_memory_until_the_ring_overwrites_it(comm):
    p = problem(12)
    K = 3
    opt, objective = make(p, comm, memory=K)
    theta = p.theta.copy()
    with np.errstate(all="ignore"):
        _, info = one_step(opt, objective, p, theta, 0.1, between=_spoil("nan_y"))
        assert info.reason == "not_finite"
        for _ in range(K - 1):
            _, info = one_step(opt, objective, p, theta, 0.1)
            assert info.reason == "not_finite"      # the NaN slot is still in the ring
    _, info = one_step(opt, objective, p, theta, 0.1)   # slot 0 overwritten now
    assert info.fallback == 0 and info.rank_kept > 0
    assert np.isfinite(opt.memory.gram).all() and np.isfinite(theta).all()
    assert opt.counts["not_finite"] == K


# ----- cost accounting ------------------------------------------------------------------------
@pytest.mark.parametrize("variant, expected", [
    (dict(pairs="probe", probe="sgd", pairs_per_rank=1), 2),
    (dict(pairs="probe", probe="random", pairs_per_rank=3), 4),
    (dict(pairs="local", local_steps=4), 4),
    (dict(pairs="probe", probe="sgd", pairs_per_rank=2), 4),
])
def test_grad_evals_per_step(comm, variant, expected):
    """The declared cost of a pair-forming step (1 + source.cost()) equals the gradients
    the objective counts in the step and the rows the model was really asked to
    differentiate (in units of one minibatch gradient), the step's own gradient included."""
    p = problem(13)
    model = Recorder(p.model)
    opt, objective = make(p, comm, **variant)
    objective.model = model
    assert 1 + opt.source.cost() == expected
    theta = p.theta.copy()
    x, y = p.draw()
    with counted(objective) as used:
        step_on(opt, objective, theta, 0.1, x, y)
    assert opt.source.forming
    assert used["grad_evals"] == expected
    assert sum(model.grad_rows) / p.batch == expected
    assert opt.source.cost() == used["grad_evals"] - 1


def test_step_allocates_nothing_of_size_n(comm):
    """tracemalloc sees NumPy's buffers: several whole steps (gradient, pairs, exchange,
    Gram, direction, update) on n = 10^6 parameters must peak far below one vector of n
    floats. The model is a diagonal quadratic whose gradient is formed in place, so what
    is traced is the objective's and the optimizer's own work."""
    n = 1_000_000
    rng = np.random.default_rng(14)
    model = Quadratic(1.0 + rng.random(n), rng.standard_normal(n))
    x, y = np.zeros((4, 1)), np.zeros(4, dtype=np.int64)
    for pairs in ("probe", "local"):
        theta = rng.standard_normal(n) * 1e-3
        objective = Objective(model, comm, x, y, Sampler(4, 4, 0, 0))
        opt = build(theta, objective, pairs=pairs, memory=2, damping=0.1, lr=0.01)
        reasons = []
        tracemalloc.start()
        try:
            peak = 0
            for _ in range(3):
                objective.next_batch()
                tracemalloc.reset_peak()
                base = tracemalloc.get_traced_memory()[0]
                reasons.append(opt.step(theta, objective, 0.01).reason)
                peak = max(peak, tracemalloc.get_traced_memory()[1] - base)
        finally:
            tracemalloc.stop()
        assert np.isfinite(theta).all()
        assert peak < 0.1 * n * 8, (pairs, peak)
        if pairs == "probe":     # the direction was formed and combined, not only the fallback
            assert None in reasons, reasons
        else:                    # one rank: s = theta_r - theta_avg = 0
            assert reasons == ["no_curvature"] * 3, reasons


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
    x, y, _ = read_split(path)
    return path, x, y


@pytest.mark.parametrize("variant", [[], ["optim.pairs=local"], ["optim.memory=4"],
                                     ["optim.probe=random"], ["optim.curvature=subspace",
                                                              "optim.h0=bb"]])
def test_single_rank_run_reduces_the_full_batch_objective(comm, tmp_path, variant):
    path, x, y = _dataset(tmp_path)
    steps = 15
    cfg = run_config(path, f"train.steps={steps}", "train.batch_size=8", "train.log_every=5",
                     "train.eval_every=0", "optim.name=secant", "optim.lr=0.2",
                     "optim.check_every=5", *variant)
    run = start_run(cfg, comm, tmp_path / "out")
    before = float(run.model.loss(run.theta, x, y))
    summary = run.run()
    after = float(run.model.loss(run.theta, x, y))
    assert summary["steps"] == steps
    assert np.isfinite(run.theta).all()
    assert after < 0.9 * before, (before, after)
    # every step forms pairs: the counted gradients are the declared cost of each step
    assert run.objective.grad_evals == steps * (1 + run.optimizer.source.cost())
    counts = run.optimizer.counts
    if "optim.pairs=local" in variant:
        # one rank: s = theta_r - theta_avg = 0, so every step is the SGD fallback
        assert counts["no_curvature"] == steps
    else:
        assert sum(counts[r] for r in ("no_curvature", "not_finite", "not_descent")) < steps


def test_run_step_is_the_sgd_step_when_the_pair_is_bad(comm, tmp_path):
    """Through Run.step (gradient, pairs, Allreduce, step) with a NaN injected into the own
    y row before the exchange: the parameters take the SGD step with momentum and stay
    finite."""
    path, _, _ = _dataset(tmp_path)
    cfg = run_config(path, "train.steps=3", "train.batch_size=8", "optim.name=secant",
                     "optim.lr=0.2")
    run = start_run(cfg, comm, tmp_path / "out")
    opt = run.optimizer
    run.step(0, Interval())

    def spoil(o):
        own_rows(o)[1][0, 0] = np.nan

    before, v_before = run.theta.copy(), opt.velocity.copy()
    with np.errstate(all="ignore"), after_pairs(opt, spoil):
        info = run.step(1, Interval())
    assert info.reason == "not_finite" and opt.counts["not_finite"] == 1
    v = v_before * cfg["optim"]["momentum"]
    v += cfg["optim"]["lr"] * run.objective.grad
    np.testing.assert_array_equal(run.theta, before - v)
    assert np.isfinite(run.theta).all()
