"""Fixtures of every suite, and the home of the modules the suites share.

pytest (prepend import mode, no ``__init__.py``) puts the folder of each conftest.py on
sys.path, so with this file tests/unit and tests/mpi import ``toymodels`` (the toy models
and problems, each defined once) and ``harness`` (how the tests build and drive the
optimizers, runs and references) by name.

Nothing here imports mpi4py at import time: the GPU suite records the environment before
MPI starts (tests/gpu/conftest.py), and the end-to-end suite launches mpiexec itself.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def solo():
    """A hessmpi Communicator over MPI.COMM_SELF (one rank: every collective is the
    identity), freed after the test."""
    from mpi4py import MPI

    from hessmpi.comm import Communicator

    c = Communicator(MPI.COMM_SELF)
    yield c
    c.comm.Free()
