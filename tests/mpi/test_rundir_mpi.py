"""Claiming a run directory under MPI: rank 0 alone takes the lock, and when it cannot
(another holder, another run's checkpoints) every rank raises the same UsageError."""

from __future__ import annotations

import json
import os

import pytest
from mpicheck import assert_all, raises_everywhere

from hessmpi.checkpoint import checkpoint_path, write_checkpoint
from hessmpi.errors import UsageError
from hessmpi.rundir import LOCK, RunLock, claim_on_rank0

pytestmark = pytest.mark.timeout(60)


@pytest.mark.mpi(min_size=2)
def test_rank_0_alone_holds_the_lock_until_it_releases_it(comm, shared_dir):
    out = shared_dir / "run"
    lock = claim_on_rank0(comm, out, resuming=False)
    assert_all(comm, (lock is not None) == (comm.rank == 0), f"lock {lock}")
    comm.barrier()
    holder = json.loads((out / LOCK).read_text())
    assert_all(comm, holder["pid"] == comm.bcast(os.getpid()), f"held by {holder}")
    comm.barrier()
    if lock is not None:
        lock.release()
    comm.barrier()
    assert_all(comm, not (out / LOCK).exists() and not out.exists())


@pytest.mark.mpi(min_size=2)
def test_a_held_directory_is_refused_on_every_rank(comm, shared_dir):
    other = RunLock(shared_dir).take() if comm.rank == 0 else None
    comm.barrier()
    raises_everywhere(comm, UsageError, claim_on_rank0, comm, shared_dir, resuming=True,
                      match="in use by")
    if other is not None:
        other.release()


@pytest.mark.mpi(min_size=2)
def test_another_runs_checkpoints_are_refused_on_every_rank(comm, shared_dir):
    if comm.rank == 0:
        write_checkpoint(checkpoint_path(shared_dir, 240), {"params": [0.0]}, {"step": 240})
    comm.barrier()
    raises_everywhere(comm, UsageError, claim_on_rank0, comm, shared_dir, resuming=False,
                      match="checkpoints of another run")
    assert_all(comm, not (shared_dir / LOCK).exists())
