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
