"""Shared-probe pairs (``optim.pairs = "shared_probe"``, issue 15) on P ranks against a
serial one-rank reference on the union of the ranks' rows, under ``mpiexec -n P``.

Every rank probes the same point theta - eta g_bar, and one Allreduce gives the pair's y on
the whole global batch, so the pairs and the steps do not depend on how the rows are split:
P ranks with equal batches take the steps of one process holding every row (to round-off),
and every rank holds bitwise the same parameters and pair memory. The workers' own probe
pairs (``pairs = "probe"``) do not have this property; the test shows that too.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from mpi4py import MPI
from mpicheck import assert_all

from hessmpi import config
from hessmpi.comm import Communicator
from hessmpi.models.dense import DenseNet
from hessmpi.objective import Objective
from hessmpi.optim import Secant

pytestmark = pytest.mark.timeout(60)

STEPS, LR = 12, 0.5


def digest(a) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).digest()


def rows_of(rank: int, n=20, d=5, classes=3):
    """Rank ``rank``'s rows: rank-seeded, so that the ranks' objectives differ."""
    rng = np.random.default_rng([31, rank])
    x = rng.standard_normal((n, d)) * (1.0 + 0.5 * rank)
    y = rng.integers(0, classes, n)
    return x, y


def train(comm, x, y, pairs: str, curvature: str) -> tuple[np.ndarray, Secant]:
    model = DenseNet([x.shape[1], 3], "relu", 1e-2, dtype=np.float64)
    theta = 0.3 * np.random.default_rng(9).standard_normal(model.n_params)
    obj = Objective(model, comm, full_batch=True)
    obj.use_batch(x, y)
    cfg = config.from_dict({"optim": {"name": "secant", "pairs": pairs, "memory": 4,
                                      "curvature": curvature, "line_search": "armijo",
                                      "newton_lr": 1.0, "momentum": 0.0, "damping": 0.0,
                                      "h0": "bb", "max_step_ratio": 1e4, "lr": LR}})
    opt = Secant(theta, obj, config.options(cfg, "optim"), seed=1)
    for _ in range(STEPS):
        opt.step(theta, obj, LR)
    return theta, opt


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("curvature", ["bfgs", "lbfgs"])
def test_shared_probe_on_p_ranks_is_one_rank_on_every_row(comm, curvature):
    x, y = rows_of(comm.rank)
    theta, opt = train(comm, x, y, "shared_probe", curvature)
    parts = [rows_of(r) for r in range(comm.size)]
    x_all, y_all = (np.concatenate([p[i] for p in parts]) for i in (0, 1))
    alone = Communicator(MPI.COMM_SELF)
    ref, ref_opt = train(alone, x_all, y_all, "shared_probe", curvature)
    alone.comm.Free()
    err = float(np.linalg.norm(theta - ref) / np.linalg.norm(ref))
    assert_all(comm, err < 1e-10, f"theta differs from the serial reference by {err:.2e}")
    assert_all(comm, opt.memory.filled == ref_opt.memory.filled == 4)
    for name, a in (("theta", theta), ("W", opt.memory.W), ("gram", opt.memory.gram)):
        assert_all(comm, len(set(comm.allgather(digest(a)))) == 1, f"{name} differs")


@pytest.mark.mpi(min_size=2)
def test_the_workers_own_probe_pairs_depend_on_the_split(comm):
    """The contrast: each worker's probe pair sees only its rows' curvature, so P ranks do
    not take one process's steps."""
    x, y = rows_of(comm.rank)
    theta, _ = train(comm, x, y, "probe", "bfgs")
    parts = [rows_of(r) for r in range(comm.size)]
    x_all, y_all = (np.concatenate([p[i] for p in parts]) for i in (0, 1))
    alone = Communicator(MPI.COMM_SELF)
    ref, _ = train(alone, x_all, y_all, "probe", "bfgs")
    alone.comm.Free()
    err = float(np.linalg.norm(theta - ref) / np.linalg.norm(ref))
    assert_all(comm, err > 1e-6, f"probe pairs matched the serial reference ({err:.2e})")
