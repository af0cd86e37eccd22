"""The communicator's collectives of the sharded exchange (reduce-scatter, in-place Allgatherv,
Alltoallv, the gather of a checkpoint) and the shared-memory window of the gradient, on P
ranks, against closed forms of rank-dependent inputs and against MPI's own Allreduce.

Uneven block sizes (n not divisible by P) are the case to get wrong; float32 values stay
small integers so that sums are exact and the closed forms bitwise. Every verdict is
collective (mpicheck)."""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI
from mpicheck import assert_all, assert_identical, check_all

from hessmpi.comm import Communicator
from hessmpi.nodewindow import MIN_BYTES

pytestmark = pytest.mark.timeout(60)


def blocks(n: int, P: int) -> list[int]:
    """Block sizes that differ (and one empty) whenever P > 1: n = 7 -> 0, 3, 4 on 3 ranks."""
    sizes = [n * (r + 1) // (P * (P + 1) // 2) for r in range(P)]
    sizes[-1] += n - sum(sizes)
    return sizes


def values(rank: int, n: int, dtype=np.float64) -> np.ndarray:
    """Rank-dependent small integers: (rank + 1) * (i % 17) + rank."""
    return ((rank + 1) * (np.arange(n) % 17) + rank).astype(dtype)


def summed(P: int, n: int, dtype=np.float64) -> np.ndarray:
    """Sum over ranks of :func:`values`: (i % 17) P(P+1)/2 + P(P-1)/2."""
    return ((np.arange(n) % 17) * (P * (P + 1) // 2) + P * (P - 1) // 2).astype(dtype)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("n", [7, 40_001])
def test_reduce_scatter_gives_each_rank_its_block_of_the_sum(comm, n):
    P, r = comm.size, comm.rank
    counts = blocks(n, P)
    lo = sum(counts[:r])
    out = np.full(counts[r], -1.0)
    before = comm.bytes_sent
    comm.reduce_scatter_(values(r, n), out, counts)

    def check():
        np.testing.assert_array_equal(out, summed(P, n)[lo:lo + counts[r]])
        assert comm.bytes_sent - before == n * 8

    check_all(comm, check)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_allgatherv_in_place_fills_in_every_other_block(comm, dtype):
    P, r, n = comm.size, comm.rank, 1001
    counts = blocks(n, P)
    displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
    buf = np.full(n, np.nan, dtype=dtype)
    buf[displs[r]:displs[r] + counts[r]] = np.arange(n, dtype=dtype)[
        displs[r]:displs[r] + counts[r]]
    comm.allgatherv_(buf, counts, displs)
    check_all(comm, lambda: np.testing.assert_array_equal(buf, np.arange(n, dtype=dtype)))


@pytest.mark.mpi(min_size=2)
def test_alltoallv_moves_block_j_to_rank_j(comm):
    """Rank r sends part j of its row (entries of value 100 r + j) to rank j, who stores the
    parts at strided places, as the pair exchange does with a ring slot."""
    P, r, n = comm.size, comm.rank, 23
    counts = blocks(n, P)
    displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
    row = np.concatenate([np.full(c, 100.0 * r + j) for j, c in enumerate(counts)])
    mine = counts[r]
    recv = np.full(2 * P * mine, np.nan)
    comm.alltoallv_(row, counts, displs, recv, [mine] * P, [2 * q * mine for q in range(P)])

    def check():
        for q in range(P):
            np.testing.assert_array_equal(recv[2 * q * mine:(2 * q + 1) * mine],
                                          np.full(mine, 100.0 * q + r))
        assert np.isnan(recv[mine:2 * mine]).all()   # the places nothing was sent to

    check_all(comm, check)


@pytest.mark.mpi(min_size=2)
def test_alltoall_blocks_moves_strided_parts_of_rows_both_ways(comm):
    """The pair exchange's move: part j (columns of block j) of each of R whole rows to
    rank j, received as a contiguous R x part block per source, in source order; and back
    (a rank's parts of everyone's rows to the owner, as whole rows)."""
    P, r, n, R = comm.size, comm.rank, 29, 3
    counts = blocks(n, P)
    displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
    rows = np.array([[1000.0 * r + 100 * i + c for c in range(n)] for i in range(R)])
    b = counts[r]
    got = np.full((P * R, b), np.nan)
    comm.alltoall_blocks_(rows, [(lo, R, c, n) for lo, c in zip(displs, counts, strict=True)],
                          got, [(q * R * b, 1, R * b, R * b) for q in range(P)])
    back = np.full((R, n), np.nan)
    comm.alltoall_blocks_(got, [(q * R * b, 1, R * b, R * b) for q in range(P)],
                          back, [(lo, R, c, n) for lo, c in zip(displs, counts, strict=True)])

    def check():
        lo = displs[r]
        for q in range(P):
            want = np.array([[1000.0 * q + 100 * i + c for c in range(lo, lo + b)]
                             for i in range(R)])
            np.testing.assert_array_equal(got[q * R:(q + 1) * R], want)
        np.testing.assert_array_equal(back, rows)   # each source's own rows came back

    check_all(comm, check)


@pytest.mark.mpi(min_size=2)
def test_gatherv_root_concatenates_in_rank_order_on_root_only(comm):
    P, r = comm.size, comm.rank
    counts = blocks(11, P)
    got = comm.gatherv_root(np.full(counts[r], float(r)), counts)
    want = np.concatenate([np.full(c, float(q)) for q, c in enumerate(counts)])
    ok = (got is None) if r != 0 else (got is not None and np.array_equal(got, want))
    assert_all(comm, ok, f"got {got}")


# ----- the shared-memory window of the gradient -----------------------------------------------
N_WINDOW = MIN_BYTES // 8 + 3          # float64 entries: just over the threshold


@pytest.fixture
def windowed():
    """A Communicator over COMM_WORLD whose gradient buffers go in the node's window."""
    c = Communicator(MPI.COMM_WORLD, intranode="window")
    yield c
    c.comm.Free()


@pytest.fixture
def emulated(request):
    """A Communicator over COMM_WORLD whose "nodes" are the split given by the test's
    parameter (rank -> colour), freed after the test."""
    colour = request.param
    world = MPI.COMM_WORLD
    nodes = world.Split(color=colour(world.rank, world.size), key=world.rank)
    c = Communicator(world, nodes=nodes, intranode="window")
    yield c
    c.comm.Free()
    nodes.Free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_window_allreduce_equals_mpi_allreduce(windowed, dtype):
    """On this machine's node: the gradient buffer is in the window, its Allreduce equals
    the closed form and MPI's own Allreduce of the same data (bitwise on two ranks, where
    the sum has one order), identical on every rank."""
    P, r, n = windowed.size, windowed.rank, MIN_BYTES // np.dtype(dtype).itemsize + 5
    buf = windowed.gradient_buffer(n, dtype, np)
    path = windowed.gradient_path(buf)
    buf[...] = values(r, n, dtype)
    windowed.allreduce_sum_(buf)
    plain = values(r, n, dtype)
    windowed.comm.Allreduce(MPI.IN_PLACE, plain, op=MPI.SUM)
    assert_all(windowed, path.startswith("shared-memory window"), path)
    check_all(windowed, lambda: np.testing.assert_array_equal(buf, summed(P, n, dtype)))
    if P == 2:
        check_all(windowed, lambda: np.testing.assert_array_equal(buf, plain))
    assert_identical(windowed, reduced=np.array(buf))


@pytest.mark.mpi(min_size=2)
def test_window_allreduce_of_rounded_values_is_identical_on_every_rank(windowed):
    """Random floats (inexact sums): every rank ends with the same bits, close to the sum."""
    P, r, n = windowed.size, windowed.rank, N_WINDOW
    buf = windowed.gradient_buffer(n, np.float64, np)
    buf[...] = np.random.default_rng([4, r]).standard_normal(n)
    want = sum(np.random.default_rng([4, q]).standard_normal(n) for q in range(P))
    windowed.allreduce_sum_(buf)
    check_all(windowed, lambda: np.testing.assert_allclose(buf, want, rtol=1e-13, atol=1e-13))
    assert_identical(windowed, reduced=np.array(buf))


@pytest.mark.mpi(min_size=2)
def test_window_reduce_scatter_on_one_node(windowed):
    P, r, n = windowed.size, windowed.rank, N_WINDOW
    counts = blocks(n, P)
    lo = sum(counts[:r])
    buf = windowed.gradient_buffer(n + 2, np.float64, np)
    buf[:n] = values(r, n)
    buf[n:] = [0.1 * (r + 1), 2.0 ** r]             # a loss and a flag ride along
    out = np.zeros(counts[r])
    windowed.reduce_scatter_(buf[:n], out, counts, tail=buf[n:])
    path = windowed.gradient_path(buf, sharded=True)
    assert_all(windowed, path.startswith("shared-memory window"), path)
    check_all(windowed, lambda: np.testing.assert_array_equal(out, summed(P, n)[lo:lo + counts[r]]))
    loss = sum(0.1 * (q + 1) for q in range(P))
    check_all(windowed, lambda: (np.testing.assert_allclose(buf[n], loss, rtol=1e-15),
                             np.testing.assert_array_equal(buf[n + 1], 2.0 ** P - 1)))
    assert_identical(windowed, tail=np.array(buf[n:]))


@pytest.mark.mpi(min_size=2)
def test_reduce_scatter_tail_through_mpi(comm):
    """A plain buffer: the tail's scalars by one Allreduce."""
    P, r, n = comm.size, comm.rank, 40
    counts = blocks(n, P)
    buf = np.concatenate([values(r, n), [1.0, r]])
    out = np.zeros(counts[r])
    comm.reduce_scatter_(buf[:n], out, counts, tail=buf[n:])
    ok = buf[n] == P and buf[n + 1] == P * (P - 1) / 2
    assert_all(comm, ok, f"tail {buf[n:]}")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("emulated", [lambda rank, size: rank], indirect=True)
def test_two_level_allreduce_across_emulated_nodes(comm, emulated):
    """Every rank its own "node" (as many ranks on each): the window's reduction in the node,
    then MPI_Allreduce between the nodes; the sum is the closed form, on every rank. The
    sharded reduce-scatter is MPI's own there (the window only serves one node)."""
    P, r, n = comm.size, comm.rank, N_WINDOW
    buf = emulated.gradient_buffer(n, np.float64, np)
    buf[...] = values(r, n)
    emulated.allreduce_sum_(buf)
    path, rs_path = emulated.gradient_path(buf), emulated.gradient_path(buf, sharded=True)
    assert_all(comm, f"between {P} nodes" in path, path)
    assert_all(comm, rs_path.startswith("MPI_Reduce_scatter"), rs_path)
    check_all(comm, lambda: np.testing.assert_array_equal(buf, summed(P, n)))
    counts = blocks(n, P)
    lo = sum(counts[:r])
    buf[...] = values(r, n)
    out = np.zeros(counts[r])
    emulated.reduce_scatter_(buf, out, counts)
    check_all(comm, lambda: np.testing.assert_array_equal(out, summed(P, n)[lo:lo + counts[r]]))


@pytest.mark.mpi(min_size=3)
@pytest.mark.parametrize("emulated", [lambda rank, size: int(rank == size - 1)],
                         indirect=True)
def test_unequal_nodes_fall_back_to_mpi(comm, emulated):
    """Nodes of P - 1 and 1 ranks: no two-level scheme fits, the buffer is a plain array
    and MPI reduces it; the results file would say why."""
    P, r, n = comm.size, comm.rank, N_WINDOW
    buf = emulated.gradient_buffer(n, np.float64, np)
    path = emulated.gradient_path(buf)
    buf[...] = values(r, n)
    emulated.allreduce_sum_(buf)
    assert_all(comm, path.startswith("MPI_Allreduce") and "different numbers" in path, path)
    check_all(comm, lambda: np.testing.assert_array_equal(buf, summed(P, n)))


@pytest.mark.mpi(min_size=2)
def test_no_window_by_default_small_or_alone(comm, windowed, solo):
    paths = [comm.gradient_path(comm.gradient_buffer(N_WINDOW, np.float64, np)),
             windowed.gradient_path(windowed.gradient_buffer(100, np.float64, np)),
             solo.gradient_path(solo.gradient_buffer(N_WINDOW, np.float64, np))]
    ok = paths[:2] == ["MPI_Allreduce"] * 2 and paths[2] == "none (one rank)"
    assert_all(comm, ok, f"{paths}")


@pytest.mark.mpi(min_size=2)
def test_buffers_alive_at_once_get_windows_of_their_own_and_a_dead_ones_is_reused(windowed):
    """Two owners alive at once: two windows, both reducing correctly; once the first owner
    is gone on every rank, the next request of that size gets its window again."""

    class Owner:
        def __init__(self):
            self.buf = windowed.gradient_buffer(N_WINDOW, np.float64, np, owner=self)

    P, r, n = windowed.size, windowed.rank, N_WINDOW
    first, second = Owner(), Owner()
    address = first.buf.ctypes.data
    distinct = address != second.buf.ctypes.data
    first.buf[...] = values(r, n)
    second.buf[...] = 2 * values(r, n)
    windowed.allreduce_sum_(first.buf)
    windowed.allreduce_sum_(second.buf)
    paths = (windowed.gradient_path(first.buf), windowed.gradient_path(second.buf))
    results = (first.buf.copy(), second.buf.copy())
    del first
    third = Owner()
    assert_all(windowed, distinct and third.buf.ctypes.data == address and not third.buf.any(),
               "windows not distinct while alive, or the dead owner's not reused (zeroed)")
    assert_all(windowed, all(p.startswith("shared-memory window") for p in paths), f"{paths}")
    check_all(windowed, lambda: (np.testing.assert_array_equal(results[0], summed(P, n)),
                             np.testing.assert_array_equal(results[1], 2 * summed(P, n))))
