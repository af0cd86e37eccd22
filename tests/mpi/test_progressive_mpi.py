"""Progressive batching (``optim.batch_test = "inner_product"``) on P ranks against a dense
reference (run under ``mpiexec -n P python -m pytest --with-mpi``).

Each step of a real Run is checked: the global batch the test asked for equals the
augmented inner-product test computed here from the definitions, on every rank's rows of the
step, split into the documented pieces, their gradients from the model called directly (the
variances of e_j^T g and of e_j's part orthogonal to g, e_j a piece's gradient less its
rank's mean, P (K - 1) degrees of freedom; no use of the sums the code reduces); the next
step's batch is exactly that (per rank, rounded up, at most the shard, never smaller than
before); the test's answer, the batches and the parameters are bitwise identical on every
rank.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from harness import make_dataset, rel, run_config, start_run
from mpicheck import assert_all, assert_identical

pytestmark = pytest.mark.timeout(60)

BATCH, PIECES, STEPS, THETA, NU = 4, 2, 14, 0.2, 0.5


def dense_request(model, theta, parts, pieces, test_theta, nu) -> float:
    """The test's batch from the definitions: ``parts`` [(x, y)] of every rank, the spread
    of each rank's piece gradients about that rank's own mean (the batch is stratified by
    shard), P (K - 1) degrees of freedom."""
    ip, orth, grads = 0.0, 0.0, []
    for x, y in parts:
        cuts = [j * len(y) // pieces for j in range(pieces + 1)]
        rank = []
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            g = np.empty(model.n_params)
            model.loss_grad(theta, x[a:b], y[a:b], g)
            rank.append((b - a, g))
        grads.append(rank)
    g = np.mean([sum(n * gj for n, gj in rank) / sum(n for n, _ in rank) for rank in grads],
                axis=0)
    g2 = g @ g
    for rank in grads:
        mean = sum(n * gj for n, gj in rank) / sum(n for n, _ in rank)
        for n, gj in rank:
            e = gj - mean
            ip += n * (e @ g) ** 2
            o = e - (e @ g) / g2 * g
            orth += n * (o @ o)
    dof = len(parts) * (pieces - 1)
    return max(ip / dof / (test_theta ** 2 * g2 ** 2), orth / dof / (nu ** 2 * g2))


@pytest.mark.mpi(min_size=2)
def test_the_batch_grows_exactly_as_the_test_says(comm, shared_dir):
    data = make_dataset(comm, shared_dir, n_train=241, features=5, classes=3, seed=8)
    cfg = run_config(data, "model.name=softmax", "optim.name=sgd", "optim.lr=0.5",
                     "optim.momentum=0", f"train.batch_size={BATCH}", "train.seed=2",
                     f"train.steps={STEPS}", "optim.batch_test=inner_product",
                     f"optim.batch_pieces={PIECES}", f"optim.batch_theta={THETA}",
                     f"optim.batch_nu={NU}")
    run = start_run(cfg, comm, shared_dir / "run")
    shard = run.sampler.rows
    bad, sizes, asked_by_rank = [], [run.sampler.batch_size], []
    for step in range(STEPS):
        theta = run.theta.copy()
        run.step(step)
        parts = comm.allgather((run.objective.x, run.objective.y))
        asked = run.objective.requested_batch
        want = dense_request(run.model, theta, parts, PIECES, THETA, NU)
        if rel(asked, want) > 1e-9:
            bad.append(f"step {step}: asked {asked}, the definition says {want}")
        expected = max(sizes[-1], min(shard, math.ceil(asked / comm.size)))
        if run.sampler.batch_size != expected or len(run.objective.y) != sizes[-1]:
            bad.append(f"step {step}: batch {len(run.objective.y)} -> "
                       f"{run.sampler.batch_size}, expected {sizes[-1]} -> {expected}")
        sizes.append(run.sampler.batch_size)
        asked_by_rank.append(asked)
    assert_all(comm, not bad, "; ".join(bad))
    assert_identical(comm, asked=np.array(asked_by_rank), sizes=np.array(sizes))
    grew = [b > a for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    assert_all(comm, any(grew) and not all(grew), f"per-rank batches {sizes}: the test "
               "should both grow the batch and keep it in these steps")
    assert_identical(comm, theta=run.theta)
