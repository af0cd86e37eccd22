"""The device-buffer path of the communicator, on CPU: a fake array exposing
``__cuda_array_interface__`` over host memory goes to MPI as a device buffer would with a
CUDA-aware library (mpi4py reads the pointer from the interface)."""

import numpy as np
import pytest
from mpi4py import MPI
from mpicheck import check_all

from hessmpi.comm import Communicator


class FakeDeviceArray:
    """Host memory behind the CUDA array interface (version 3), like mpi4py's own tests."""

    def __init__(self, host: np.ndarray):
        self.host = host
        self.shape, self.dtype, self.nbytes = host.shape, host.dtype, host.nbytes
        self.__cuda_array_interface__ = {
            "shape": host.shape, "typestr": host.dtype.str, "strides": None,
            "data": (host.ctypes.data, False), "version": 3}


@pytest.fixture
def direct():
    """A Communicator over COMM_WORLD that hands device buffers to MPI directly."""
    c = Communicator(MPI.COMM_WORLD, device_path="direct")
    yield c
    c.comm.Free()


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_direct_path_reduces_and_gathers_device_buffers(direct):
    comm = direct
    P, r = comm.size, comm.rank
    host = np.arange(6, dtype=np.float64) * (r + 1)
    comm.allreduce_sum_(FakeDeviceArray(host))
    gathered = np.zeros((P, 3))
    gathered[r] = r + 0.5
    comm.allgather_(FakeDeviceArray(gathered))

    def check():
        np.testing.assert_array_equal(host, np.arange(6) * P * (P + 1) / 2)
        np.testing.assert_array_equal(gathered,
                                      np.repeat(np.arange(P)[:, None] + 0.5, 3, axis=1))
        assert comm.bytes_sent == (0 if P == 1 else host.nbytes + gathered.nbytes // P), \
            comm.bytes_sent

    check_all(comm, check)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_direct_path_of_the_sharded_collectives(direct):
    """Reduce-scatter, in-place Allgatherv and Alltoallv hand device buffers to MPI as they
    are on the direct path (blocks of different sizes)."""
    comm = direct
    P, r = comm.size, comm.rank
    counts = [2 + q for q in range(P)]
    displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
    n = sum(counts)
    part = np.zeros(counts[r])
    comm.reduce_scatter_(FakeDeviceArray(np.arange(n, dtype=np.float64) * (r + 1)),
                         FakeDeviceArray(part), counts)
    whole = np.full(n, np.nan)
    whole[displs[r]:displs[r] + counts[r]] = r
    comm.allgatherv_(FakeDeviceArray(whole), counts, displs)
    row = np.concatenate([np.full(c, 10.0 * r + j) for j, c in enumerate(counts)])
    got = np.zeros(P * counts[r])
    comm.alltoallv_(FakeDeviceArray(row), counts, displs, FakeDeviceArray(got),
                    [counts[r]] * P, [q * counts[r] for q in range(P)])

    def check():
        lo = displs[r]
        np.testing.assert_array_equal(part, np.arange(lo, lo + counts[r]) * P * (P + 1) / 2)
        np.testing.assert_array_equal(whole, np.repeat(np.arange(P), counts).astype(float))
        np.testing.assert_array_equal(got, np.repeat(10.0 * np.arange(P) + r, counts[r]))

    check_all(comm, check)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_direct_path_of_strided_blocks(direct):
    """The pair exchange's Alltoallw of strided blocks hands device buffers to MPI as they
    are: part j of two rows to rank j."""
    comm = direct
    P, r, n = comm.size, comm.rank, 3 * comm.size + 1
    counts = [n // P + (q < n % P) for q in range(P)]
    displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
    rows = np.array([np.arange(n) + 100.0 * r, np.arange(n) - 100.0 * r])
    b = counts[r]
    got = np.zeros((2 * P, b))
    comm.alltoall_blocks_(FakeDeviceArray(rows),
                          [(lo, 2, c, n) for lo, c in zip(displs, counts, strict=True)],
                          FakeDeviceArray(got), [(2 * q * b, 1, 2 * b, 2 * b) for q in range(P)])

    def check():
        lo = displs[r]
        for q in range(P):
            np.testing.assert_array_equal(got[2 * q], np.arange(lo, lo + b) + 100.0 * q)
            np.testing.assert_array_equal(got[2 * q + 1], np.arange(lo, lo + b) - 100.0 * q)

    check_all(comm, check)
