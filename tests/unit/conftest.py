"""Fixtures of the unit suite."""

from __future__ import annotations

import pytest


@pytest.fixture
def comm(solo):
    """The unit tests' communicator: one rank, over MPI.COMM_SELF."""
    return solo
