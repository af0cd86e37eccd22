"""Overlap pairs (``optim.pairs = "overlap"``, multi-batch L-BFGS) on P ranks against a
dense reference (run under ``mpiexec -n P python -m pytest --with-mpi``).

Each rank draws its batches from a real overlapping :class:`~hessmpi.data.Sampler` (the last
O rows of a batch open the next). The pair committed at step t must be s = theta_t -
theta_{t-1} and y = g_U(theta_t) - g_U(theta_{t-1}), g_U the model's gradient, called
directly, on the union U of every rank's rows shared by batches t-1 and t (equal O per rank,
so the mean of the ranks' means is the mean over U); no gradient beyond the step's own is
evaluated; parameters and pair memory are bitwise identical across the ranks. Every verdict
is collective (mpicheck).
"""

from __future__ import annotations

import numpy as np
import pytest
from harness import build, counted, gathered, rel, step_on
from mpicheck import assert_all, assert_identical
from toymodels import rank_rows

from hessmpi.data import Sampler
from hessmpi.models.dense import DenseNet
from hessmpi.objective import Objective

pytestmark = pytest.mark.timeout(60)

BATCH, SHARED, STEPS, TOL = 8, 2, 9, 1e-10
KEYS = dict(pairs="overlap", overlap=SHARED / BATCH, curvature="lbfgs", memory=STEPS,
            line_search="armijo", newton_lr=1.0, momentum=0.0, damping=0.0, h0="bb",
            max_step_ratio=1e4)


def reference_gradient(model, theta, x, y):
    g = np.empty(model.n_params)
    model.loss_grad(theta, x, y, g)
    return g


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("every", [1, 2])
def test_pairs_are_the_gradient_change_on_the_shared_rows(comm, every):
    x, y = rank_rows(comm.rank, seed=21, label_seed=4, spread=0.5)   # 24 rows of this rank
    model = DenseNet([5, 3], "relu", 1e-2, xp=np, dtype=np.float64)
    theta = 0.3 * np.random.default_rng(9).standard_normal(model.n_params)
    objective = Objective(model, comm)
    opt = build(theta, objective, seed=1, probe_every=every, **KEYS)
    sampler = Sampler(len(y), BATCH, seed=3, rank=comm.rank, overlap=SHARED)
    thetas, shared, bad, evals = [theta.copy()], [], [], []
    for _ in range(STEPS):
        idx = sampler.next()
        with counted(objective) as used:
            step_on(opt, objective, theta, 0.5, x[idx], y[idx])
        evals.append(used["grad_evals"])
        thetas.append(theta.copy())
        shared.append(gathered(comm, x[idx[-SHARED:]], y[idx[-SHARED:]]))
    committed = [t for t in range(1, STEPS) if (t - 1) % every == 0]
    assert_all(comm, opt.memory.filled == len(committed),
               f"{opt.memory.filled} pairs, not {len(committed)}")
    for slot, t in enumerate(committed):        # the pair of step t-1 -> t, formed at step t
        s_row, y_row = opt.memory.slot(slot)
        xu, yu = shared[t - 1]                  # batch t-1's last rows, batch t's first
        y_ref = (reference_gradient(model, thetas[t], xu, yu)
                 - reference_gradient(model, thetas[t - 1], xu, yu))
        s_rel, y_rel = rel(s_row, thetas[t] - thetas[t - 1]), rel(y_row, y_ref)
        if s_rel > TOL or y_rel > TOL:
            bad.append(f"slot {slot} (step {t}): s rel {s_rel:.1e}, y rel {y_rel:.1e}")
    assert_all(comm, not bad, "; ".join(bad))
    assert_all(comm, evals == [1.0] * STEPS, f"gradient evaluations per step {evals}")
    assert_identical(comm, theta=theta, W=opt.memory.W, gram=opt.memory.gram)
