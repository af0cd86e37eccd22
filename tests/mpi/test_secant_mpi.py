"""The secant optimizer on P ranks (run under ``mpiexec -n P python -m pytest --with-mpi``).

Checks: the parameters stay bitwise identical on every rank; they equal a serial dense
reference that simulates the P workers with n x n matrices; every variant lowers the
full-batch objective; pairs = local gives pairs that sum to zero over the ranks; garbage
pairs on one rank end in the same SGD fallback on every rank. Every verdict is reduced over
the ranks (MPI.LAND) so that all ranks assert the same thing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from hessmpi import config
from hessmpi.backend import make_backend
from hessmpi.comm import Communicator
from hessmpi.data import Sampler, shard_bounds, write_dataset
from hessmpi.importers import synthetic
from hessmpi.models.dense import DenseNet
from hessmpi.trainer import Interval, Run

pytestmark = pytest.mark.timeout(60)

BATCH, LR, SEED = 4, 0.2, 3


# ----- collective verdicts and fixtures -------------------------------------------------------
def assert_everywhere(comm: Communicator, ok: bool, detail: str = "") -> None:
    """Every rank asserts the same value: the logical AND of the ranks' ``ok``."""
    all_ok = comm.comm.allreduce(bool(ok), op=MPI.LAND)
    details = comm.comm.allgather("" if ok else detail or "failed")
    assert all_ok, "; ".join(f"rank {r}: {d}" for r, d in enumerate(details) if d)


def verdict(check) -> tuple[bool, str]:
    """Run the local check ``check()``; (True, "") or (False, what went wrong)."""
    try:
        check()
    except Exception as e:  # noqa: BLE001 - turned into a collective verdict
        return False, f"{type(e).__name__}: {e}"
    return True, ""


def digest(theta) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(theta).tobytes(), digest_size=16).digest()


@pytest.fixture
def world():
    c = Communicator(MPI.COMM_WORLD)
    yield c
    c.comm.Free()


@pytest.fixture
def data(world):
    """(path, x, y): a small synthetic dataset that rank 0 writes into a directory whose path
    it broadcasts; x, y the whole training split, read by every rank."""
    tmp = tempfile.mkdtemp(prefix="hessmpi-secant-") if world.rank == 0 else None
    tmp = Path(world.bcast(tmp))
    path, error = tmp / "data.h5", None
    if world.rank == 0:
        try:
            train, test, attrs = synthetic(64, 32, 6, 3, 10.0, 2.0, 5)
            write_dataset(path, train, test, **attrs)
        except Exception as e:  # noqa: BLE001 - reported on every rank
            error = f"{type(e).__name__}: {e}"
    error = world.bcast(error)
    if error:
        raise RuntimeError(f"rank 0 could not write the dataset: {error}")
    with h5py.File(path, "r") as f:
        x, y = f["train/x"][()].astype(np.float64), f["train/y"][()]
    yield tmp, path, x, y
    world.barrier()
    if world.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)


def make_run(comm, path, out, steps, *overrides) -> Run:
    cfg = config.load(None, [
        f"data.path={json.dumps(str(path))}", "backend.dtype=float64", "backend.device=cpu",
        "backend.threads=1", f"train.steps={steps}", f"train.batch_size={BATCH}",
        f"train.seed={SEED}", "train.log_every=5", "train.eval_every=0",
        "optim.name=secant", f"optim.lr={LR}", "optim.check_every=5", *overrides])
    return Run(cfg, comm, make_backend("cpu", "float64", 1), out)


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
        lam, Q = np.linalg.eigh(0.5 * (S.T @ Y + Y.T @ S))
        keep = (lam > tau * lam.max()) & (lam > 0)
        u = LR * g
        fallback = True
        if keep.any():
            Sk, Yk, Di = S @ Q[:, keep], Y @ Q[:, keep], np.diag(1.0 / lam[keep])
            L = np.eye(n) - Sk @ Di @ Yk.T
            d = (Sk @ Di @ Sk.T + LR * L @ L.T) @ g
            if g @ d > 0:
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
def test_ranks_agree_bitwise_and_match_the_dense_reference(world, data, memory):
    tmp, path, x, y = data
    steps = 10
    run = make_run(world, path, tmp / f"out-ref-{memory}", steps, f"optim.memory={memory}")
    before = float(run.model.loss(run.theta, x, y))
    infos = [run.step(t, Interval())[1] for t in range(steps)]
    theta = run.theta.copy()
    same = len(set(world.allgather(digest(theta)))) == 1
    assert_everywhere(world, same, "parameters differ across ranks")
    ref, ref_fallbacks = reference(x, y, world.size, steps, memory=memory)
    err = float(np.linalg.norm(theta - ref) / np.linalg.norm(ref))
    assert_everywhere(world, err < 1e-9, f"relative distance to the dense reference {err:.3g}")
    fallbacks = [bool(i.fallback) for i in infos]
    assert_everywhere(world, fallbacks == ref_fallbacks, f"{fallbacks} != {ref_fallbacks}")
    assert_everywhere(world, not all(fallbacks), "every step fell back: nothing was tested")
    after = float(run.model.loss(theta, x, y))
    assert_everywhere(world, after < before, f"objective {before:.6g} -> {after:.6g}")


@pytest.mark.mpi
def test_one_rank_run_inside_an_mpi_job(world, data):
    """Every rank runs its own one-rank job (a Communicator over COMM_SELF)."""
    tmp, path, x, y = data
    steps = 8
    solo = Communicator(MPI.COMM_SELF)
    try:
        def check():
            run = make_run(solo, path, tmp / f"out-solo-{world.rank}", steps)
            run.run()
            ref, _ = reference(x, y, 1, steps)
            err = np.linalg.norm(run.theta - ref) / np.linalg.norm(ref)
            assert err < 1e-9, f"relative distance to the dense reference {err:.3g}"
        ok, detail = verdict(check)
    finally:
        solo.comm.Free()
    assert_everywhere(world, ok, detail)


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
def test_variants_stay_identical_and_reduce_the_objective(world, data, variant):
    tmp, path, x, y = data
    overrides, evals = VARIANTS[variant]
    steps = 15
    run = make_run(world, path, tmp / f"out-{variant}", steps, *overrides)
    before = float(run.model.loss(run.theta, x, y))
    summary = run.run()                       # includes the trainer's own consistency checks
    theta = run.theta
    after = float(run.model.loss(theta, x, y))
    same = len(set(world.allgather(digest(theta)))) == 1
    assert_everywhere(world, same, "parameters differ across ranks")
    assert_everywhere(world, summary["steps"] == steps and bool(np.isfinite(theta).all()),
                      "run did not finish with finite parameters")
    assert_everywhere(world, after < 0.9 * before, f"objective {before:.6g} -> {after:.6g}")
    assert_everywhere(world, run.optimizer.grad_evals_per_step == evals
                      and run.grad_evals == steps * evals,
                      f"grad evals {run.optimizer.grad_evals_per_step} per step, "
                      f"{run.grad_evals} in all")
    counts = world.allgather(run.optimizer.counters())
    assert_everywhere(world, len(set(counts)) == 1, f"fallback counters differ: {counts}")


@pytest.mark.mpi
def test_random_probes_of_all_ranks_are_independent(world, data):
    """probe = random, k = 3: every rank draws its own directions, so the P*k exchanged s are
    linearly independent, each of length sigma * max(||theta||, 1), and the filter keeps more
    than one rank's k directions (not all of them: the ranks' y come from different minibatch
    Hessians, so sym(S^T Y) need not be positive definite)."""
    tmp, path, _, _ = data
    k, sigma = 3, 1e-2
    run = make_run(world, path, tmp / "out-random", 2, "optim.probe=random",
                   f"optim.pairs_per_rank={k}", f"optim.probe_sigma={sigma}")
    P, n = world.size, run.model.n_params
    run.step(0, Interval())
    theta = run.theta.copy()
    _, info = run.step(1, Interval())
    S = run.optimizer._slot(0).reshape(P, 2, k, n)[:, 0].reshape(P * k, n)
    lengths = np.linalg.norm(S, axis=1)
    want = sigma * max(np.linalg.norm(theta), 1.0)
    spectrum = np.linalg.eigvalsh(S @ S.T)
    kept_ok = info.rank_kept > k if P > 1 else info.rank_kept == k
    ok = (kept_ok and np.allclose(lengths, want, rtol=1e-12)
          and spectrum.min() > 1e-3 * spectrum.max())
    assert_everywhere(world, ok, f"kept {info.rank_kept} of {P * k}; lengths {lengths}")


@pytest.mark.mpi(min_size=2)
def test_local_pairs_sum_to_zero_over_the_ranks(world, data):
    """pairs = local: s_r = theta_r - theta_avg and y_r = g_r - g_avg sum to zero over the
    ranks, so at most P - 1 directions are kept; theta moves to theta_avg before the step."""
    tmp, path, _, _ = data
    run = make_run(world, path, tmp / "out-local", 6, "optim.pairs=local", "optim.damping=0",
                   "optim.momentum=0")
    opt = run.optimizer
    P, n = world.size, run.model.n_params
    ok, detail = True, ""
    for t in range(6):
        drifted = {}
        real_observe = opt.observe

        def observe(theta, grad, lr, xb, yb, real_observe=real_observe, drifted=drifted):
            seconds = real_observe(theta, grad, lr, xb, yb)
            drifted["point"] = opt._my_rows(opt.next_slot)[0][0].copy()
            return seconds

        opt.observe = observe
        slot_index = opt.next_slot
        _, info = run.step(t, Interval())
        del opt.observe
        slot = opt._slot(slot_index).reshape(P, 2, n)
        S, Y = slot[:, 0], slot[:, 1]
        points = np.array(world.allgather(drifted["point"]))
        avg = points.sum(axis=0) / P
        scale_s = np.abs(points).max()               # round-off of the average is relative to it
        scale_y = max(np.abs(Y).max(), np.abs(run.grad).max())
        checks = [
            (np.abs(S.sum(axis=0)).max() <= 1e-13 * scale_s, "sum of s_r is not zero"),
            (np.abs(Y.sum(axis=0)).max() <= 1e-13 * scale_y, "sum of y_r is not zero"),
            (np.allclose(S, points - avg, rtol=0, atol=1e-13 * scale_s),
             "s_r is not theta_r - theta_avg"),
            (np.allclose(run.theta + opt.velocity, avg, rtol=0, atol=1e-13 * scale_s),
             "the step did not start from theta_avg"),
            (info.rank_kept <= P - 1, f"{info.rank_kept} directions kept with P = {P}"),
            (np.abs(S).max() > 1e-6 * scale_s, "the ranks did not drift apart"),
        ]
        for good, what in checks:
            if ok and not good:
                ok, detail = False, f"step {t}: {what}"
    assert_everywhere(world, ok, detail)


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
def test_garbage_pairs_end_in_the_same_sgd_step_on_every_rank(world, data, kind, who, reason):
    tmp, path, _, _ = data
    run = make_run(world, path, tmp / f"out-bad-{kind}", 4)
    opt, beta = run.optimizer, run.cfg["optim"]["momentum"]
    spoiled = {"last": world.size - 1, "first": 0}.get(who)
    run.step(0, Interval())                             # a good step: non-zero velocity
    real_observe = opt.observe

    def observe(theta, grad, lr, xb, yb):
        seconds = real_observe(theta, grad, lr, xb, yb)
        if spoiled is None or world.rank == spoiled:
            _spoil(kind, opt._my_rows(opt.next_slot))
        return seconds

    opt.observe = observe
    before, v_before = run.theta.copy(), opt.velocity.copy()
    with np.errstate(all="ignore"):
        _, info = run.step(1, Interval())
    del opt.observe
    v = v_before * beta
    v += LR * run.grad
    sgd = before - v
    checks = [
        (info.fallback == 1 and info.reason == reason, f"step reported {info}"),
        (bool(np.isfinite(run.theta).all()), "non-finite parameters"),
        (np.array_equal(run.theta, sgd), "theta is not the SGD step with momentum"),
        (opt.counts[reason] == 1, f"counts {opt.counts}"),
    ]
    ok, detail = next(((False, what) for good, what in checks if not good), (True, ""))
    assert_everywhere(world, ok, detail)
    same = len(set(world.allgather(digest(run.theta)))) == 1
    assert_everywhere(world, same, "parameters differ across ranks")
    # the ring slot is overwritten by the next, good pairs: no fallback, finite, identical
    _, info = run.step(2, Interval())
    good = info.fallback == 0 and bool(np.isfinite(run.theta).all())
    assert_everywhere(world, good, f"after the garbage step: {info}")
    same = len(set(world.allgather(digest(run.theta)))) == 1
    assert_everywhere(world, same, "parameters differ across ranks after recovery")
