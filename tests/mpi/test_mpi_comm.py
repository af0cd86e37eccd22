"""hessmpi.comm.Communicator on P ranks, against closed forms of rank-dependent inputs."""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI
from mpicheck import assert_all, check_all, raises_everywhere

from hessmpi.errors import UsageError

pytestmark = pytest.mark.timeout(60)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("n", [7, 40_000])  # small and large messages take different algorithms
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int64])
def test_allreduce_sum_matches_closed_form(comm, n, dtype):
    r, p = comm.rank, comm.size
    k = np.arange(n) % 1000  # keeps float32 sums exact
    buf = ((r + 1) * k + r).astype(dtype)
    before = comm.bytes_sent
    comm.allreduce_sum_(buf)
    # sum_r (r+1) k + r = k P(P+1)/2 + P(P-1)/2
    expected = (k * (p * (p + 1) // 2) + p * (p - 1) // 2).astype(dtype)

    def check():
        assert buf.dtype == dtype
        np.testing.assert_array_equal(buf, expected)
        assert comm.bytes_sent - before == n * np.dtype(dtype).itemsize

    check_all(comm, check)


@pytest.mark.mpi(min_size=2)
def test_allreduce_sum_in_place_on_a_view(comm):
    """The trainer reduces gradient and loss together in one buffer; a slice view of it
    must see the reduced values."""
    r, p = comm.rank, comm.size
    buf = np.zeros(11)
    grad = buf[:10]
    grad[:] = np.arange(10.0) * (r + 1)
    buf[10] = 2.0 ** r
    comm.allreduce_sum_(buf)

    def check():
        np.testing.assert_array_equal(grad, np.arange(10.0) * p * (p + 1) / 2)
        assert buf[10] == 2.0 ** p - 1

    check_all(comm, check)


@pytest.mark.mpi(min_size=2)
def test_bcast_from_last_rank_and_bytes_counted_on_root_only(comm):
    root = comm.size - 1
    buf = np.full(100, float(comm.rank))
    comm.bcast_(buf, root=root)

    def check():
        np.testing.assert_array_equal(buf, np.full(100, float(root)))
        assert comm.bytes_sent == (800 if comm.rank == root else 0)

    check_all(comm, check)


@pytest.mark.mpi
def test_single_rank_communicator_sends_no_bytes(comm, solo):
    """On one rank a collective moves nothing: bytes_sent stays 0, the data unchanged."""
    buf = np.arange(5.0)
    solo.allreduce_sum_(buf)
    solo.bcast_(buf)
    ok = solo.size == 1 and solo.bytes_sent == 0 and np.array_equal(buf, np.arange(5.0))
    assert_all(comm, ok, f"size {solo.size}, bytes_sent {solo.bytes_sent}, buf {buf}")


@pytest.mark.mpi(min_size=2)
def test_bytes_sent_accumulates_over_calls(comm):
    a, b = np.ones(3), np.ones(17, dtype=np.float32)
    for _ in range(4):
        comm.allreduce_sum_(a)
        comm.allreduce_sum_(b)
    assert_all(comm, comm.bytes_sent == 4 * (24 + 68), f"bytes_sent {comm.bytes_sent}")
    assert_all(comm, comm.seconds > 0, f"seconds {comm.seconds}")


@pytest.mark.mpi(min_size=2)
def test_scalar_reductions(comm):
    r, p = comm.rank, comm.size
    got = (comm.sum(r + 1), comm.min(10 - r), comm.max(10 - r), comm.any(r == p - 1),
           comm.any(False), comm.allgather(r * r), comm.bcast("from root" if r == 0 else None))
    expected = (p * (p + 1) // 2, 10 - (p - 1), 10, True, False, [q * q for q in range(p)],
                "from root")
    assert_all(comm, got == expected, f"{got} != {expected}")


@pytest.mark.mpi(min_size=2)
def test_communicator_is_a_private_duplicate(comm):
    """Its messages cannot match COMM_WORLD's: a Dup, congruent but not identical."""
    relation = MPI.Comm.Compare(comm.comm, MPI.COMM_WORLD)
    assert_all(comm, relation == MPI.CONGRUENT and comm.rank == MPI.COMM_WORLD.rank
               and comm.size == MPI.COMM_WORLD.size, f"Compare gave {relation}")


# ----- collectively: a UsageError on any rank is raised on every rank -----------------------

def _fails_on(ranks, rank):
    if rank in ranks:
        raise UsageError(f"bad input seen by rank {rank}")
    return rank * 10


@pytest.mark.mpi(min_size=2)
def test_collectively_raises_on_every_rank_when_one_rank_fails(comm):
    e = raises_everywhere(comm, UsageError, comm.collectively, _fails_on, {1}, comm.rank,
                          match="bad input seen by rank 1")
    assert_all(comm, e is not None and str(e) == "bad input seen by rank 1", repr(e))


@pytest.mark.mpi(min_size=2)
def test_collectively_reports_the_lowest_failing_rank(comm):
    failing = set(range(1, comm.size))  # every rank but 0
    e = raises_everywhere(comm, UsageError, comm.collectively, _fails_on, failing, comm.rank)
    assert_all(comm, str(e) == "bad input seen by rank 1", repr(e))


@pytest.mark.mpi(min_size=2)
def test_collectively_returns_each_ranks_own_result(comm):
    got = comm.collectively(_fails_on, set(), comm.rank)
    assert_all(comm, got == comm.rank * 10, f"got {got}")
    # and the communicator is still usable afterwards
    assert_all(comm, comm.sum(1) == comm.size)
