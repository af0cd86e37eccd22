"""The optimizer's bytes per rank against the number of ranks P, counted from the
allocations (tracemalloc, which NumPy reports its array memory to) while an optimizer is
built for rank P - 1 of P, without MPI: building allocates everything an optimizer holds and
calls no collective, so a stand-in communicator that knows its rank and size is enough to
build one for P = 1 ... 1024.

With ``sharded`` (ALGORITHM.md s.4) the state that grows with the model is 1/P per rank:
SGD's momentum and step exactly; with history pairs (m = K whatever P) W and the momentum,
beside a fixed number of whole vectors (the step, the line search's trial point, the
gathered momentum); with the workers' probe pairs (m = P k K) the (2m+1) n / P rows of W stay
about 2kK n per rank, where the allgather layout's (2m+1) n grow with P. The goal of the
issue: state per rank <= (2m+1) n / P + O(n).
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from harness import build

from hessmpi.models.dense import DenseNet
from hessmpi.objective import Objective
from hessmpi.optim import state_bytes
from hessmpi.optim.exchange import build_exchange

N_IN, N_OUT = 2_000, 10
N = N_IN * N_OUT + N_OUT                # softmax: n = 20,010 parameters (float64)
ITEM = 8


class StandIn:
    """Rank ``rank`` of ``size`` for building objectives and optimizers: no collective."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size

    def gradient_buffer(self, count, dtype, xp, owner=None):
        return xp.zeros(count, dtype=dtype)


def built_bytes(P: int, exchange: str, **keys) -> tuple[int, int, object]:
    """(bytes allocated while building the optimizer for the last of P ranks, what
    state_bytes counts in it, the optimizer); the objective is in the exchange's layout
    before, so that its own buffers are not counted."""
    model = DenseNet([N_IN, N_OUT], "relu", 1e-4, xp=np, dtype=np.float64)
    theta = np.zeros(model.n_params)
    comm = StandIn(P - 1, P)
    objective = Objective(model, comm)
    objective.use_exchange(build_exchange(exchange, comm, N))   # the objective's own buffers
    name = keys.pop("name", "secant")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        opt = build(theta, objective, name, exchange=exchange, **keys)
        allocated = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return allocated, state_bytes(opt), opt


def part(P: int) -> int:
    """Entries of the last rank's part (the largest: floor division leaves it the rest)."""
    return N - (P - 1) * N // P


HISTORY = dict(pairs="history", memory=5, line_search="armijo", curvature="lbfgs", damping=0.0,
               momentum=0.0)
PROBE = dict(pairs="probe", memory=2)


def close(a: int, b: int) -> bool:
    return abs(a - b) <= 0.01 * b + 16_384      # Python objects beside the arrays


@pytest.mark.parametrize("P", [1, 2, 3, 4, 8, 64, 1024])
def test_sgd_state_is_exactly_its_part(P):
    allocated, counted, _ = built_bytes(P, "sharded", name="sgd")
    want = 2 * part(P) * ITEM                   # momentum and step
    assert counted == want and close(allocated, want), (allocated, counted, want)


@pytest.mark.parametrize("P", [1, 2, 3, 4, 8, 64, 1024])
def test_history_pairs_state_falls_as_one_over_p(P):
    allocated, counted, opt = built_bytes(P, "sharded", **HISTORY)
    rows = 1 + 2 * 5
    whole = 2 + (P > 1)                          # u, the trial point, the gathered momentum
    want = ITEM * ((rows + 1) * part(P) + whole * N + rows * rows)
    assert counted == want and close(allocated, want), (allocated, counted, want)
    m = 5
    assert counted <= ITEM * ((2 * m + 1) * N / P + 4 * N)     # the goal


def test_history_pairs_part_halves_when_p_doubles():
    sizes = {}
    for P in (2, 4, 8, 16):
        allocated, _, _ = built_bytes(P, "sharded", **HISTORY)
        sizes[P] = allocated - ITEM * 3 * N     # less the whole vectors
    for P in (2, 4, 8):
        assert sizes[2 * P] / sizes[P] == pytest.approx(0.5, rel=0.02), sizes


@pytest.mark.parametrize("P", [1, 2, 4, 8, 16])
def test_probe_pairs_allgather_grows_with_p_sharded_does_not(P):
    k, K = 1, 2
    rows = 1 + 2 * P * k * K
    allocated_a, counted_a, _ = built_bytes(P, "allgather", **PROBE)
    allocated_s, counted_s, opt = built_bytes(P, "sharded", **PROBE)
    # allgather: W, momentum and u whole, the probe's work vector
    want_a = ITEM * ((rows + 3) * N + rows * rows)
    # sharded: W and momentum over the part; u, the probe's work vector and (P > 1) the
    # outbox of this rank's 2k rows, whole
    want_s = ITEM * ((rows + 1) * part(P) + 2 * N + (2 * k * N if P > 1 else 0)
                     + rows * rows)
    assert counted_a == want_a and close(allocated_a, want_a), (allocated_a, want_a)
    assert counted_s == want_s and close(allocated_s, want_s), (allocated_s, want_s)
    m = P * k * K
    assert counted_s <= ITEM * ((2 * m + 1) * N / P + 6 * N)
    assert counted_s <= ITEM * (2 * k * K + 6) * N          # bounded whatever P


def test_a_refused_method_keeps_every_vector_whole():
    """Adam is refused for the sharded exchange by the configuration; built anyway, it is
    in the allgather layout (its objective stays whole)."""
    _, counted, opt = built_bytes(4, "allgather", name="adam")
    assert counted == ITEM * 3 * N and opt.m.shape == (N,)
