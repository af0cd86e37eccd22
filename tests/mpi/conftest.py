"""Fixtures of the MPI suite (run under ``mpiexec -n P python -m pytest --with-mpi``).

Every test runs on every rank at once. Its checks are collective: each rank finds its own
verdict, the verdicts are gathered, and every rank asserts the same thing, so a failure on
one rank fails the test everywhere instead of leaving the other ranks waiting.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from harness import make_dataset
from mpi4py import MPI

from hessmpi.comm import Communicator


@pytest.fixture
def comm():
    """A fresh hessmpi Communicator (a Dup of COMM_WORLD) for this test only."""
    c = Communicator(MPI.COMM_WORLD)
    yield c
    c.comm.Free()


@pytest.fixture
def shared_dir(comm):
    """A directory made by rank 0 whose path every rank knows; removed after the test."""
    path = tempfile.mkdtemp(prefix="hessmpi-mpi-") if comm.rank == 0 else None
    path = Path(comm.bcast(path))
    yield path
    comm.barrier()
    if comm.rank == 0:
        shutil.rmtree(path, ignore_errors=True)



@pytest.fixture
def dataset(comm, shared_dir):
    """Path of a 61-train / 31-test, 6-feature, 3-class dataset (odd sizes: shards of
    2 or 3 ranks leave rows over)."""
    return make_dataset(comm, shared_dir)
