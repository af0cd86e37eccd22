"""Shared-probe pairs (``optim.pairs = "shared_probe"``, issue 15) on P ranks against a
serial one-rank reference on the union of the ranks' rows, under ``mpiexec -n P``.

Every rank probes the same point theta - eta g_bar, and one Allreduce gives the pair's y on
the whole global batch, so the pairs and the steps do not depend on how the rows are split:
P ranks with equal batches take the steps of one process holding every row (to round-off),
and every rank holds bitwise the same parameters and pair memory. The workers' own probe
pairs (``pairs = "probe"``) do not have this property; the test shows that too.
"""

from __future__ import annotations

import numpy as np
import pytest
from harness import build, gathered, rel
from mpicheck import assert_all, assert_identical
from toymodels import rank_rows

from hessmpi.models.dense import DenseNet
from hessmpi.objective import Objective

pytestmark = pytest.mark.timeout(60)

STEPS, LR = 12, 0.5


def rows_of(rank: int):
    """Rank ``rank``'s rows: rank-seeded, so that the ranks' objectives differ."""
    return rank_rows(rank, seed=31, label_seed=4, spread=0.5, rows=20)


def train(comm, x, y, pairs: str, curvature: str):
    model = DenseNet([x.shape[1], 3], "relu", 1e-2, dtype=np.float64)
    theta = 0.3 * np.random.default_rng(9).standard_normal(model.n_params)
    obj = Objective(model, comm, full_batch=True)
    obj.use_batch(x, y)
    opt = build(theta, obj, seed=1, pairs=pairs, memory=4, curvature=curvature,
                line_search="armijo", newton_lr=1.0, momentum=0.0, damping=0.0, h0="bb",
                max_step_ratio=1e4, lr=LR)
    for _ in range(STEPS):
        opt.step(theta, obj, LR)
    return theta, opt


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("curvature", ["bfgs", "lbfgs"])
def test_shared_probe_on_p_ranks_is_one_rank_on_every_row(comm, solo, curvature):
    x, y = rows_of(comm.rank)
    theta, opt = train(comm, x, y, "shared_probe", curvature)
    ref, ref_opt = train(solo, *gathered(comm, x, y), "shared_probe", curvature)
    err = rel(theta, ref)
    assert_all(comm, err < 1e-10, f"theta differs from the serial reference by {err:.2e}")
    assert_all(comm, opt.memory.filled == ref_opt.memory.filled == 4)
    assert_identical(comm, theta=theta, W=opt.memory.W, gram=opt.memory.gram)


@pytest.mark.mpi(min_size=2)
def test_the_workers_own_probe_pairs_depend_on_the_split(comm, solo):
    """The contrast: each worker's probe pair sees only its rows' curvature, so P ranks do
    not take one process's steps."""
    x, y = rows_of(comm.rank)
    theta, _ = train(comm, x, y, "probe", "bfgs")
    ref, _ = train(solo, *gathered(comm, x, y), "probe", "bfgs")
    err = rel(theta, ref)
    assert_all(comm, err > 1e-6, f"probe pairs matched the serial reference ({err:.2e})")


@pytest.mark.mpi(min_size=2)
def test_averaged_pairs_on_p_ranks_are_one_process_on_every_row(comm, solo):
    """SQN-style pairs (iterate averages, a Gauss-Newton product on the global batch) are
    global pairs too: P ranks take one process's steps, identically."""
    def run(c, x, y):
        model = DenseNet([x.shape[1], 3], "relu", 1e-2, dtype=np.float64)
        theta = 0.3 * np.random.default_rng(9).standard_normal(model.n_params)
        obj = Objective(model, c, full_batch=True)
        obj.use_batch(x, y)
        opt = build(theta, obj, seed=1, pairs="averaged", probe_every=3, memory=3,
                    curvature="lbfgs", h0="bb", damping=0.0, newton_lr=0.5, momentum=0.5,
                    lr=LR)
        for _ in range(15):
            opt.step(theta, obj, LR)
        return theta, opt

    x, y = rows_of(comm.rank)
    theta, opt = run(comm, x, y)
    ref, ref_opt = run(solo, *gathered(comm, x, y))
    assert_all(comm, rel(theta, ref) < 1e-10, f"rel {rel(theta, ref):.2e}")
    assert_all(comm, opt.memory.filled == ref_opt.memory.filled == 3)
    assert_identical(comm, theta=theta, W=opt.memory.W)
