"""The secant optimizer on P ranks (run under ``mpiexec -n P python -m pytest --with-mpi``).

Checks: the parameters stay bitwise identical on every rank; they equal a serial dense
reference that simulates the P workers with n x n matrices; every variant lowers the
full-batch objective; pairs = local gives pairs that sum to zero over the ranks; garbage
pairs on one rank end in the same SGD fallback on every rank. Every verdict is collective
(mpicheck) so that all ranks assert the same thing.
"""

from __future__ import annotations

import numpy as np
import pytest
from harness import (
    after_pairs,
    block_bfgs,
    make_dataset,
    own_rows,
    read_split,
    run_config,
    start_run,
)
from mpicheck import assert_all, assert_checks, assert_identical, check_all

from hessmpi.data import Sampler, shard_bounds
from hessmpi.models.dense import DenseNet
from hessmpi.trainer import Interval

pytestmark = pytest.mark.timeout(60)

BATCH, LR, SEED = 4, 0.2, 3


@pytest.fixture
def data(comm, shared_dir):
    """(directory, path, x, y): a 64-train / 32-test synthetic dataset in the shared
    directory; x, y the whole training split, read by every rank."""
    path = make_dataset(comm, shared_dir, n_train=64, n_test=32)
    x, y, _ = read_split(path)
    return shared_dir, path, x, y


def make_run(comm, path, out, steps, *overrides):
    cfg = run_config(path, f"train.steps={steps}", f"train.batch_size={BATCH}",
                     f"train.seed={SEED}", "train.log_every=5", "train.eval_every=0",
                     "optim.name=secant", f"optim.lr={LR}", "optim.check_every=5", *overrides)
    return start_run(cfg, comm, out)


# ----- a serial dense reference of P workers --------------------------------------------------
def reference(x, y, size, steps, *, memory=1, damping=0.1, alpha=0.2, beta=0.9, tau=1e-6,
              ratio=10.0, l2=1e-4):
    """Softmax regression from theta = 0, P simulated workers with the trainer's shards and
    samplers, sgd probes (s = -lr g_r, y = g_r(theta + s) - g_r + damping s), the last
    ``memory`` steps of pairs, the filtered block-BFGS step as an n x n matrix, clip, fallback,
    momentum. Returns (theta, [fallback of each step])."""
    classes = int(y.max()) + 1
    model = DenseNet([x.shape[1], classes], "relu", l2, xp=np, dtype=np.float64)
    n = model.n_params
    bounds = [shard_bounds(len(y), r, size, equal=True) for r in range(size)]
    samplers = [Sampler(hi - lo, BATCH, SEED, r) for r, (lo, hi) in enumerate(bounds)]

    def grad(theta, rows):
        out = np.empty(n)
        model.loss_grad(theta, x[rows], y[rows], out)
        return out

    theta, v = np.zeros(n), np.zeros(n)
    ring, fallbacks = [], []
    for _ in range(steps):
        gs, S, Y = [], [], []
        for (lo, _), sampler in zip(bounds, samplers, strict=True):
            rows = lo + sampler.next()
            g_r = grad(theta, rows)
            s = -LR * g_r
            gs.append(g_r)
            S.append(s)
            Y.append(grad(theta + s, rows) - g_r + damping * s)
        g = sum(gs) / size
        ring = [*ring, (S, Y)][-memory:]
        S = np.stack([s for block in ring for s in block[0]], axis=1)
        Y = np.stack([t for block in ring for t in block[1]], axis=1)
        d, kept = block_bfgs(g, S, Y, LR, tau)
        u, fallback = LR * g, True
        if kept and g @ d > 0:
            limit = ratio * LR * np.linalg.norm(g)
            if np.linalg.norm(d) > limit:
                d *= limit / np.linalg.norm(d)
            u, fallback = alpha * d, False
        fallbacks.append(fallback)
        v = beta * v + u
        theta = theta - v
    return theta, fallbacks


# ----- the step is the same everywhere, and the right one ---------------------------------------
@pytest.mark.mpi
@pytest.mark.parametrize("memory", [1, 3])
def test_ranks_agree_bitwise_and_match_the_dense_reference(comm, data, memory):
    tmp, path, x, y = data
    steps = 10
    run = make_run(comm, path, tmp / f"out-ref-{memory}", steps, f"optim.memory={memory}")
    before = float(run.model.loss(run.theta, x, y))
    infos = [run.step(t, Interval()) for t in range(steps)]
    theta = run.theta.copy()
    assert_identical(comm, parameters=theta)
    ref, ref_fallbacks = reference(x, y, comm.size, steps, memory=memory)
    err = float(np.linalg.norm(theta - ref) / np.linalg.norm(ref))
    assert_all(comm, err < 1e-9, f"relative distance to the dense reference {err:.3g}")
    fallbacks = [bool(i.fallback) for i in infos]
    assert_all(comm, fallbacks == ref_fallbacks, f"{fallbacks} != {ref_fallbacks}")
    assert_all(comm, not all(fallbacks), "every step fell back: nothing was tested")
    after = float(run.model.loss(theta, x, y))
    assert_all(comm, after < before, f"objective {before:.6g} -> {after:.6g}")


@pytest.mark.mpi
def test_one_rank_run_inside_an_mpi_job(comm, solo, data):
    """Every rank runs its own one-rank job (a Communicator over COMM_SELF)."""
    tmp, path, x, y = data
    steps = 8

    def check():
        run = make_run(solo, path, tmp / f"out-solo-{comm.rank}", steps)
        run.run()
        ref, _ = reference(x, y, 1, steps)
        err = np.linalg.norm(run.theta - ref) / np.linalg.norm(ref)
        assert err < 1e-9, f"relative distance to the dense reference {err:.3g}"

    check_all(comm, check)


VARIANTS = {
    "local": (["optim.pairs=local", "optim.local_steps=4"], 4),
    "memory4": (["optim.memory=4"], 2),
    "random": (["optim.probe=random", "optim.pairs_per_rank=3"], 4),
    "lsq": (["optim.curvature=lsq"], 2),
    "subspace-bb": (["optim.curvature=subspace", "optim.h0=bb"], 2),
    "k2": (["optim.pairs_per_rank=2"], 4),
}


@pytest.mark.mpi
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_stay_identical_and_reduce_the_objective(comm, data, variant):
    """Each variant (every step forms pairs): the objective counts the declared gradient
    evaluations, 1 + source.cost() per step."""
    tmp, path, x, y = data
    overrides, evals = VARIANTS[variant]
    steps = 15
    run = make_run(comm, path, tmp / f"out-{variant}", steps, *overrides)
    before = float(run.model.loss(run.theta, x, y))
    summary = run.run()                       # includes the trainer's own consistency checks
    theta = run.theta
    after = float(run.model.loss(theta, x, y))
    assert_identical(comm, parameters=theta)
    assert_all(comm, summary["steps"] == steps and bool(np.isfinite(theta).all()),
               "run did not finish with finite parameters")
    assert_all(comm, after < 0.9 * before, f"objective {before:.6g} -> {after:.6g}")
    declared, counted = 1 + run.optimizer.source.cost(), run.objective.grad_evals
    assert_all(comm, declared == evals and counted == steps * evals,
               f"grad evals {declared} per step declared, {counted} counted in all")
    assert_identical(comm, fallback_counters=run.optimizer.counters())


@pytest.mark.mpi
def test_random_probes_of_all_ranks_are_independent(comm, data):
    """probe = random, k = 3: every rank draws its own directions, so the P*k exchanged s are
    linearly independent, each of length sigma * max(||theta||, 1), and the filter keeps more
    than one rank's k directions (not all of them: the ranks' y come from different minibatch
    Hessians, so sym(S^T Y) need not be positive definite)."""
    tmp, path, _, _ = data
    k, sigma = 3, 1e-2
    run = make_run(comm, path, tmp / "out-random", 2, "optim.probe=random",
                   f"optim.pairs_per_rank={k}", f"optim.probe_sigma={sigma}")
    P, n = comm.size, run.model.n_params
    run.step(0, Interval())
    theta = run.theta.copy()
    info = run.step(1, Interval())
    S = run.optimizer.memory.slot(0).reshape(P, 2, k, n)[:, 0].reshape(P * k, n)
    lengths = np.linalg.norm(S, axis=1)
    want = sigma * max(np.linalg.norm(theta), 1.0)
    spectrum = np.linalg.eigvalsh(S @ S.T)
    kept_ok = info.rank_kept > k if P > 1 else info.rank_kept == k
    ok = (kept_ok and np.allclose(lengths, want, rtol=1e-12)
          and spectrum.min() > 1e-3 * spectrum.max())
    assert_all(comm, ok, f"kept {info.rank_kept} of {P * k}; lengths {lengths}")


@pytest.mark.mpi(min_size=2)
def test_local_pairs_sum_to_zero_over_the_ranks(comm, data):
    """pairs = local: s_r = theta_r - theta_avg and y_r = g_r - g_avg sum to zero over the
    ranks, so at most P - 1 directions are kept; theta moves to theta_avg before the step."""
    tmp, path, _, _ = data
    run = make_run(comm, path, tmp / "out-local", 6, "optim.pairs=local", "optim.damping=0",
                   "optim.momentum=0")
    opt = run.optimizer
    P, n = comm.size, run.model.n_params
    checks = []
    for t in range(6):
        drifted = {}
        slot_index = opt.memory.next_slot
        with after_pairs(opt, lambda o, drifted=drifted: drifted.update(
                point=own_rows(o)[0][0].copy())):
            info = run.step(t, Interval())
        slot = opt.memory.slot(slot_index).reshape(P, 2, n)
        S, Y = slot[:, 0], slot[:, 1]
        points = np.array(comm.allgather(drifted["point"]))
        avg = points.sum(axis=0) / P
        scale_s = np.abs(points).max()               # round-off of the average is relative to it
        scale_y = max(np.abs(Y).max(), np.abs(run.objective.grad).max())
        checks += [
            (np.abs(S.sum(axis=0)).max() <= 1e-13 * scale_s, f"step {t}: sum of s_r is not 0"),
            (np.abs(Y.sum(axis=0)).max() <= 1e-13 * scale_y, f"step {t}: sum of y_r is not 0"),
            (np.allclose(S, points - avg, rtol=0, atol=1e-13 * scale_s),
             f"step {t}: s_r is not theta_r - theta_avg"),
            (np.allclose(run.theta + opt.velocity, avg, rtol=0, atol=1e-13 * scale_s),
             f"step {t}: the step did not start from theta_avg"),
            (info.rank_kept <= P - 1, f"step {t}: {info.rank_kept} directions kept, P = {P}"),
            (np.abs(S).max() > 1e-6 * scale_s, f"step {t}: the ranks did not drift apart"),
        ]
    assert_checks(comm, checks)


# ----- garbage pairs on one rank ----------------------------------------------------------------
def _spoil(kind, rows):
    s_rows, y_rows = rows
    if kind == "nan_y":
        y_rows[0, 1] = np.nan
    elif kind == "huge_y":
        y_rows[...] = 1e200
    elif kind == "inf_s":
        s_rows[0, -1] = -np.inf
    elif kind == "minus_s":
        y_rows[...] = -s_rows


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind, who, reason", [
    ("nan_y", "last", "not_finite"),
    ("huge_y", "last", "not_finite"),
    ("inf_s", "first", "not_finite"),
    ("minus_s", "all", "no_curvature"),
])
def test_garbage_pairs_end_in_the_same_sgd_step_on_every_rank(comm, data, kind, who, reason):
    tmp, path, _, _ = data
    run = make_run(comm, path, tmp / f"out-bad-{kind}", 4)
    opt, beta = run.optimizer, run.cfg["optim"]["momentum"]
    spoiled = {"last": comm.size - 1, "first": 0}.get(who)
    run.step(0, Interval())                             # a good step: non-zero velocity

    def spoil(o):
        if spoiled is None or comm.rank == spoiled:
            _spoil(kind, own_rows(o))

    before, v_before = run.theta.copy(), opt.velocity.copy()
    with np.errstate(all="ignore"), after_pairs(opt, spoil):
        info = run.step(1, Interval())
    v = v_before * beta
    v += LR * run.objective.grad
    sgd = before - v
    assert_checks(comm, [
        (info.fallback == 1 and info.reason == reason, f"step reported {info}"),
        (bool(np.isfinite(run.theta).all()), "non-finite parameters"),
        (np.array_equal(run.theta, sgd), "theta is not the SGD step with momentum"),
        (opt.counts[reason] == 1, f"counts {opt.counts}"),
    ])
    assert_identical(comm, parameters=run.theta)
    # the ring slot is overwritten by the next, good pairs: no fallback, finite, identical
    info = run.step(2, Interval())
    good = info.fallback == 0 and bool(np.isfinite(run.theta).all())
    assert_all(comm, good, f"after the garbage step: {info}")
    assert_identical(comm, parameters_after_recovery=run.theta)
