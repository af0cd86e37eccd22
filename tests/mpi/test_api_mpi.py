"""The Python API on P ranks: DistributedOptimizer steps on each rank's own rows are the
steps of one process on every rank's rows, and every rank holds the same parameters."""

from __future__ import annotations

import numpy as np
import pytest
from harness import gathered
from mpicheck import assert_all, assert_identical, raises_everywhere
from toymodels import rank_rows

import hessmpi
from hessmpi.models.dense import DenseNet

pytestmark = pytest.mark.timeout(60)


@pytest.mark.mpi(min_size=2)
def test_steps_on_each_ranks_rows_are_steps_on_the_global_batch(comm):
    x, y = rank_rows(comm.rank, seed=1, label_seed=2, spread=0.5)
    model = DenseNet([5, 4, 3], "tanh", 1e-3, dtype=np.float64)
    start = model.init_params(0) + comm.rank        # rank 0's is broadcast
    opt = hessmpi.DistributedOptimizer(model, comm=comm, theta=start,
                                       optim={"name": "sgd", "lr": 0.1, "momentum": 0.9})
    losses = [opt.step(x, y).loss for _ in range(6)]
    assert_identical(comm, parameters=opt.theta)
    xs, ys = gathered(comm, x, y)
    theta, velocity = model.init_params(0), np.zeros(model.n_params)
    want = []
    for _ in range(6):
        grad = np.empty(model.n_params)
        want.append(float(model.loss_grad(theta, xs, ys, grad)))
        velocity = 0.9 * velocity + grad
        theta = theta - 0.1 * velocity
    assert_all(comm, np.allclose(losses, want, rtol=1e-12, atol=0)
               and np.allclose(opt.theta, theta, rtol=1e-10, atol=1e-12),
               f"losses {losses} != {want}")
    loss, acc = opt.evaluate(x, y)
    total, correct = model.evaluate(opt.theta, xs, ys)
    assert_all(comm, abs(loss - total / len(ys)) < 1e-12 and acc == correct / len(ys))
    opt.check_consistency()


@pytest.mark.mpi(min_size=2)
def test_overlap_pairs_refuse_batches_that_do_not_share_rows(comm):
    """pairs = "overlap" through the API: batches from an overlapping Sampler step; a batch
    that does not start with the last batch's shared rows on one rank only is refused on
    every rank (UsageError naming the Sampler's overlap), before any collective of the step."""
    x, y = rank_rows(comm.rank, seed=1, label_seed=2, spread=0.5)      # 24 rows
    model = DenseNet([5, 3], "relu", 1e-3, dtype=np.float64)
    opt = hessmpi.DistributedOptimizer(model, comm=comm, optim={
        "name": "secant", "pairs": "overlap", "overlap": 0.25, "curvature": "lbfgs",
        "memory": 4, "lr": 0.1})
    sampler = hessmpi.Sampler(len(y), 8, seed=0, rank=comm.rank, overlap=2)
    for _ in range(3):
        rows = sampler.next()
        opt.step(x[rows], y[rows])
    rows = sampler.next()
    if comm.rank == 1:
        rows = rows[::-1].copy()
    raises_everywhere(comm, hessmpi.errors.UsageError, opt.step, x[rows], y[rows],
                      match="overlap=2")
    assert_all(comm, opt.optimizer.memory.filled == 2, f"{opt.optimizer.memory.filled}")
    raises_everywhere(comm, hessmpi.errors.UsageError, opt.step, x[:2], y[:2],
                      match="less than one row")           # 0.25 of 2 rows rounds to 0


@pytest.mark.mpi(min_size=2)
def test_the_batch_test_refuses_unequal_parts_on_every_rank(comm):
    """optim.batch_test assumes every rank's part has B rows (the global gradient is then
    the row mean): a step where rank 0's part is shorter is a UsageError on every rank,
    none left waiting; equal parts then step, and every rank has the same answer."""
    x, y = rank_rows(comm.rank, seed=6, label_seed=1, spread=0.5)
    model = DenseNet([5, 3], "relu", 1e-3, dtype=np.float64)
    opt = hessmpi.DistributedOptimizer(model, comm=comm, optim={
        "name": "sgd", "lr": 0.1, "batch_test": "inner_product", "batch_pieces": 2})
    rows = slice(0, 8 if comm.rank else 6)
    raises_everywhere(comm, hessmpi.errors.UsageError, opt.step, x[rows], y[rows],
                      match="the same number")
    opt.step(x[:8], y[:8])
    assert_identical(comm, asked=np.array([opt.requested_batch]), theta=opt.theta)
    assert_all(comm, opt.requested_batch > 0)
