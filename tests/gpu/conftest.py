"""Fixtures of the GPU tests."""

import os
import subprocess

import pytest

#: The environment before this test process initialises MPI (the test modules import
#: mpi4py.MPI after this file): a child mpiexec must not inherit the variables MPI_Init adds,
#: or it believes it is nested in this process's job.
ENV_BEFORE_MPI = dict(os.environ)


@pytest.fixture
def launch():
    """Run a command (a list) with the pre-MPI environment; returns CompletedProcess."""
    def run(cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env=ENV_BEFORE_MPI)
    return run
