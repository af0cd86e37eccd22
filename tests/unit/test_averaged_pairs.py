"""Averaged-iterate pairs (``optim.pairs = "averaged"``, SQN-style) on one rank: every L
steps the average of the last L iterates; s = its change, y = the Gauss-Newton product along
s at the new average on the step's batch, committed at the next step; checked against the
iterates recorded here and the closed-form product of a quadratic, with the curvature
products counted and the state surviving a checkpoint."""

from __future__ import annotations

import numpy as np
from harness import build, own_rows
from toymodels import Quadratic, spd

from hessmpi.objective import Objective

DUMMY_X, DUMMY_Y = np.zeros((4, 1)), np.zeros(4, dtype=np.int64)
KEYS = dict(pairs="averaged", probe_every=3, curvature="lbfgs", h0="bb", memory=2,
            damping=0.0, newton_lr=0.5, momentum=0.5, lr=0.05)


def make(theta, comm, A, b, **keys):
    obj = Objective(Quadratic(A, b), comm)
    obj.use_batch(DUMMY_X, DUMMY_Y)
    return build(theta, obj, **(KEYS | keys)), obj


def test_pairs_are_the_averages_change_and_its_curvature_product(comm):
    n, L = 6, 3
    A, b, rng = spd(n, 0, high=20.0)
    theta = rng.standard_normal(n)
    opt, obj = make(theta, comm, A, b)
    iterates = []
    for step in range(4 * L):
        before = obj.curvature_evals
        opt.step(theta, obj, 0.05)
        iterates.append(theta.copy())
        done = step + 1
        # a product at the end of every period but the first
        assert obj.curvature_evals - before == (1.0 if done % L == 0 and done > L else 0.0)
        averages = [np.mean(iterates[k * L:(k + 1) * L], axis=0) for k in range(done // L)]
        if done == 3 * L + 1:
            # the pairs of periods 2 and 3, committed at steps 2L+1 and 3L+1, fill both slots
            assert opt.memory.filled == 2 and not opt.source.pending
            for slot, k in ((0, 1), (1, 2)):
                s_row, y_row = opt.memory.slot(slot)
                s = averages[k] - averages[k - 1]
                np.testing.assert_allclose(s_row, s, rtol=1e-12, atol=1e-15)
                np.testing.assert_allclose(y_row, A @ s, rtol=1e-12, atol=1e-15)
    # period 4's pair, measured at its end, waits in the next slot (the oldest) for the next
    # step to commit it
    assert opt.source.pending
    s_next, y_next = (rows[0] for rows in own_rows(opt))
    np.testing.assert_allclose(s_next, averages[3] - averages[2], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(y_next, A @ s_next, rtol=1e-12, atol=1e-15)


def test_the_averaging_state_is_checkpointed(comm):
    n = 5
    A, b, rng = spd(n, 1)
    start = rng.standard_normal(n)
    theta = start.copy()
    opt, obj = make(theta, comm, A, b)
    for _ in range(7):                 # mid-period, a pair pending
        opt.step(theta, obj, 0.05)
    state = {k: np.array(v, copy=True) for k, v in opt.state().items()}
    assert {"pairs_sum", "pairs_last", "pairs_count"} <= set(state)
    again_theta = theta.copy()
    again, obj2 = make(again_theta, comm, A, b)
    again.load_state(state, same_layout=True)
    for _ in range(8):
        opt.step(theta, obj, 0.05)
        again.step(again_theta, obj2, 0.05)
    np.testing.assert_array_equal(theta, again_theta)
    np.testing.assert_array_equal(opt.memory.W, again.memory.W)
