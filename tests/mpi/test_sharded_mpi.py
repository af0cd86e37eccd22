"""The sharded exchange (``optim.exchange = "sharded"``, ALGORITHM.md s.4) on P ranks against
the allgather exchange, its reference (run under ``mpiexec -n P python -m pytest
--with-mpi``).

The two layouts take the same steps in a different order of floating-point operations (the
Gram rows summed over parts, the norms over parts, the reduce-scatter), so in float64 their
parameters and their whole optimizer state (the sharded one gathered as a checkpoint
gathers it) must agree to round-off after a dozen steps, on 1 rank (a Communicator over
COMM_SELF on every rank) and on all P ranks. The models have n = 21 and n = 83 parameters:
parts of different sizes on 2 and 3 ranks. A sharded run's parameters must also be bitwise
identical on every rank, each rank must hold only its part of every n-vector of the state,
and the bytes the optimizer holds must be those its layout implies. Every verdict is
collective (mpicheck).
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from harness import rel, run_config
from mpi4py import MPI
from mpicheck import assert_all, assert_checks, assert_identical

from hessmpi.backend import make_backend
from hessmpi.comm import Communicator
from hessmpi.optim import state_bytes
from hessmpi.trainer import Training

pytestmark = pytest.mark.timeout(120)

STEPS, TOL = 12, 1e-10
SECANT = ["optim.name=secant", "optim.lr=0.05"]
LBFGS_FULL = ["optim.name=secant", "optim.pairs=history", "optim.curvature=lbfgs",
              "optim.newton_lr=1", "optim.momentum=0", "optim.damping=0", "optim.h0=bb",
              "optim.max_step_ratio=1e4", "optim.lr=0.5", "optim.memory=5",
              "train.batch_size=0"]
CASES = {
    "sgd": ["optim.name=sgd", "optim.lr=0.1", "optim.nesterov=true",
            "optim.weight_decay=1e-3"],
    "probe-memory": [*SECANT, "optim.memory=3", "optim.pairs_per_rank=2",
                     "optim.probe_batch=0.5"],
    "probe-random-lsq": [*SECANT, "optim.probe=random", "optim.memory=2",
                         "optim.curvature=lsq", "optim.probe_sigma=0.01"],
    "history-armijo-fullbatch": [*LBFGS_FULL, "optim.line_search=armijo"],
    "history-wolfe-fullbatch": [*LBFGS_FULL, "optim.line_search=wolfe"],
    "history-armijo-minibatch": [*SECANT, "optim.pairs=history", "optim.memory=4",
                                 "optim.line_search=armijo", "optim.curvature=lbfgs"],
    "subspace-armijo-momentum": [*SECANT, "optim.curvature=subspace",
                                 "optim.line_search=armijo", "optim.newton_lr=1",
                                 "optim.memory=2"],
    "shared-probe": [*SECANT, "optim.pairs=shared_probe", "optim.memory=2",
                     "optim.damping=0.5"],
    "overlap-armijo": [*SECANT, "optim.pairs=overlap", "optim.overlap=0.25",
                       "optim.memory=3", "optim.line_search=armijo", "optim.curvature=lbfgs"],
    "averaged": [*SECANT, "optim.pairs=averaged", "optim.probe_every=3", "optim.memory=3",
                 "optim.curvature=lbfgs"],
    "deflated": ["optim.name=deflated", "optim.lr=0.05", "optim.pairs_per_rank=2",
                 "optim.probe_every=3", "optim.newton_lr=0.5"],
}
MODELS = {"softmax-n21": ["model.name=softmax"],
          "mlp-n83": ["model.name=mlp", "model.hidden=[8]", "model.activation=tanh"]}


def training(dataset, comm, sets, exchange) -> Training:
    cfg = run_config(dataset, "train.batch_size=8", "train.seed=3", *sets,
                     f"optim.exchange={exchange}")
    b = cfg["backend"]
    return Training(cfg, comm, make_backend(b["device"], b["dtype"], b["threads"]))


def trained(dataset, comm, sets, exchange) -> Training:
    tr = training(dataset, comm, sets, exchange)
    for step in range(STEPS):
        tr.step(step)
    return tr


def compare(ref: Training, got: Training) -> list[tuple[bool, str]]:
    """(ok, what) of this rank: parameters, and on rank 0 the whole optimizer state."""
    checks = [(rel(got.theta, ref.theta) <= TOL,
               f"theta differs by {rel(got.theta, ref.theta):.2e}")]
    want, have = ref.optimizer.state(), got.optimizer.state()   # collectives, every rank
    if got.comm.rank == 0:
        checks.append((set(want) == set(have), f"state keys {sorted(have)} != {sorted(want)}"))
        for key in set(want) & set(have):
            a, b = np.asarray(want[key], dtype=float), np.asarray(have[key], dtype=float)
            same = a.shape == b.shape and (np.array_equal(a, b) or (
                np.isfinite(a).all() and np.linalg.norm(a - b) <= TOL * max(
                    np.linalg.norm(a), 1e-300)))
            checks.append((same, f"state {key}: {a.shape} vs {b.shape}, "
                           f"max diff {np.max(np.abs(a - b)) if a.shape == b.shape else '-'}"))
    return checks


@pytest.fixture(params=["world", "one rank"])
def on(request, comm):
    """The communicator the runs use: all P ranks, or one (each rank alone)."""
    if request.param == "world":
        yield comm
        return
    solo = Communicator(MPI.COMM_SELF)
    yield solo
    solo.comm.Free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_equals_allgather_to_round_off(comm, dataset, on, model, case):
    sets = [*MODELS[model], *CASES[case]]
    ref = trained(dataset, on, sets, "allgather")
    got = trained(dataset, on, sets, "sharded")
    assert_checks(comm, compare(ref, got))
    assert_identical(comm, theta=np.array(got.theta) if on is comm else np.zeros(1))
    kinds = (ref.objective.exchange.name, got.objective.exchange.name)
    assert_all(comm, kinds == ("allgather", "sharded"), f"{kinds}")


@pytest.mark.mpi(min_size=2)
def test_the_window_path_gives_the_same_steps(comm, dataset):
    """A model large enough (n = 11,003 float64) for the shared-memory window of the
    gradient: sharded (its reduce-scatter through the window) against allgather (its
    Allreduce through the window), and allgather through the window against MPI's own
    Allreduce, bitwise on two ranks (one sum order)."""
    sets = ["model.name=mlp", "model.hidden=[1100]", *CASES["probe-memory"]]
    window = Communicator(MPI.COMM_WORLD, intranode="window")
    try:
        ref = trained(dataset, window, sets, "allgather")
        got = trained(dataset, window, sets, "sharded")
        plain = trained(dataset, comm, sets, "allgather")       # the default: MPI's own
        paths = [tr.objective.gradient_collective for tr in (ref, got, plain)]
        assert_all(comm, paths[0].startswith("shared-memory window")
                   and paths[1].startswith("shared-memory window")
                   and paths[2] == "MPI_Allreduce", f"{paths}")
        assert_checks(comm, compare(ref, got))
        exact = np.array_equal(ref.theta, plain.theta)
        close = rel(ref.theta, plain.theta) <= TOL
        assert_all(comm, exact if comm.size == 2 else close,
                   f"window vs MPI Allreduce: rel {rel(ref.theta, plain.theta):.2e}")
    finally:
        window.comm.Free()


@pytest.mark.mpi(min_size=2)
def test_each_rank_holds_its_part_and_the_parts_tile_n(comm, dataset):
    tr = training(dataset, comm, [*MODELS["mlp-n83"], *CASES["probe-memory"]], "sharded")
    x, n, P = tr.objective.exchange, tr.model.n_params, comm.size
    parts = comm.allgather((x.lo, x.hi))
    opt = tr.optimizer
    rows = 1 + 2 * P * 2 * 3
    checks = [
        ([lo for lo, _ in parts] == [r * n // P for r in range(P)] and parts[-1][1] == n,
         f"parts {parts} do not tile [0, {n})"),
        (max(h - lo for lo, h in parts) - min(h - lo for lo, h in parts) <= 1,
         f"part sizes {[h - lo for lo, h in parts]}"),
        (opt.memory.W.shape == (rows, x.hi - x.lo), f"W {opt.memory.W.shape}"),
        (opt.velocity.shape == (x.hi - x.lo,), f"velocity {opt.velocity.shape}"),
        (opt.memory.outbox.shape == (2 * 2, n), f"outbox {opt.memory.outbox.shape}"),
    ]
    assert_checks(comm, checks)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("exchange", ["allgather", "sharded"])
def test_state_bytes_are_what_the_allocations_hold(comm, dataset, exchange):
    """tracemalloc counts the bytes allocated while the optimizer is built (an independent
    count of what ``state_bytes`` finds in its objects), and both equal the layout's
    formula: W (1 + 2 K) rows and the momentum over this rank's part, plus the whole
    vectors every layout needs (the step u and the line search's trial point) and, sharded,
    the gathered momentum of the line search. History pairs at full batch, K = 5: m does
    not grow with P, so the sharded state falls as 1/P."""
    sets = ["model.name=mlp", "model.hidden=[400]", *LBFGS_FULL, "optim.line_search=armijo"]
    tr = training(dataset, comm, sets, exchange)
    n, x = tr.model.n_params, tr.objective.exchange
    part = x.hi - x.lo
    rows = 1 + 2 * 5
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tr.optimizer = type(tr.optimizer)(tr.theta, tr.objective,
                                          tr.optimizer.o, seed=0)
        allocated = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    counted = state_bytes(tr.optimizer)
    whole_vectors = 2 + (1 if exchange == "sharded" and comm.size > 1 else 0)
    formula = 8 * (rows * part + part + whole_vectors * n + rows * rows)
    checks = [(abs(counted - formula) <= 8 * 64, f"state_bytes {counted} != formula {formula}"),
              (abs(allocated - formula) <= 0.01 * formula + 32_768,
               f"tracemalloc {allocated} != formula {formula}")]
    assert_checks(comm, checks)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("model", sorted(MODELS))
def test_local_drift_pairs_are_exchanged_alike(comm, dataset, model):
    """``pairs = "local"``: y = g_r(theta_r) moves whole and every rank subtracts its part
    of the average after the Alltoall. The first step's pairs (formed from the same theta
    in both layouts) must agree to round-off, W gathered whole and the Gram matrix. Not the
    steps after: local pairs sum to zero, so sym(S^T Y) has an eigenvalue of round-off size,
    and when the others are negative the curvature filter keeps or drops it by its sign
    (seen on 3 ranks: 1.7e-18 in one layout, 2.2e-18 in the other), so the trajectories part
    after a step or two in either layout; the method is that sensitive."""
    sets = [*MODELS[model], *SECANT, "optim.pairs=local", "optim.local_steps=3"]
    state = {}
    for exchange in ("allgather", "sharded"):
        tr = training(dataset, comm, sets, exchange)
        tr.step(0)
        state[exchange] = tr.optimizer.state()      # a collective: W gathered on rank 0
    checks = []
    if comm.rank == 0:
        for key in ("W", "gram"):
            a, b = state["allgather"][key], state["sharded"][key]
            checks.append((a.shape == b.shape and a[1:].any()
                           and rel(b, a) <= TOL, f"{key}: rel {rel(b, a):.2e}"))
    assert_checks(comm, checks)
