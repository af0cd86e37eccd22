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



def make_dataset(comm, directory: Path, *, n_train: int = 61, n_test: int = 31,
                 features: int = 6, classes: int = 3, seed: int = 5) -> Path:
    """Rank 0 writes a small synthetic dataset file; every rank gets its path (or every
    rank raises if rank 0 could not write it)."""
    from hessmpi.data import write_dataset
    from hessmpi.importers import synthetic

    path = directory / "data.h5"
    error = None
    if comm.rank == 0:
        try:
            train, test, attrs = synthetic(n_train, n_test, features, classes, 10.0, 2.0, seed)
            write_dataset(path, train, test, **attrs)
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            error = f"{type(e).__name__}: {e}"
    error = comm.bcast(error)
    if error:
        raise RuntimeError(f"rank 0 could not write the dataset: {error}")
    return path


@pytest.fixture
def dataset(comm, shared_dir):
    """Path of a 61-train / 31-test, 6-feature, 3-class dataset (odd sizes: shards of
    2 or 3 ranks leave rows over)."""
    return make_dataset(comm, shared_dir)
