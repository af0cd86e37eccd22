"""Fixtures of the job-script tests: a dataset, a working directory, and the local SLURM.

The tests marked ``slurm`` need the one-host cluster of jobs/slurm-local/start.sh. If it does
not answer, the ``cluster`` fixture starts it (and stops it at the end of the session) where
the machine allows (root, the packages or apt); otherwise those tests are skipped with the
reason. ``make test-slurm`` (tests/slurm/run.sh) starts and stops it around the whole run.
"""

from __future__ import annotations

import os

import pytest
from slurmkit import HESSMPI, JOBS, STATE, run, srun_answers


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: needs the local SLURM of jobs/slurm-local/")


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    """Where jobs run and write runs/ and their logs: under /tmp, which every emulated node
    sees (they share this host's file system)."""
    return tmp_path_factory.mktemp("slurm-jobs")


@pytest.fixture(scope="session")
def data(workdir):
    """The digits dataset (the scripts' default config trains on it), built here."""
    path = workdir / "digits.h5"
    result = run([HESSMPI, "data", "digits", "--out", path], timeout=120)
    assert result.rc == 0, str(result)
    return path


@pytest.fixture(scope="session")
def cluster():
    """The local SLURM, running: skipped where it cannot run."""
    started = False
    if not srun_answers():
        if os.geteuid() != 0:
            pytest.skip("the local SLURM is not running and cannot be started: not root "
                        "(run make test-slurm as root, or bash jobs/slurm-local/start.sh)")
        result = run(["bash", JOBS / "slurm-local" / "start.sh"], timeout=300)
        if result.rc == 77:
            pytest.skip(f"the local SLURM cannot run here: {result.stderr.strip()}")
        assert result.rc == 0, f"jobs/slurm-local/start.sh failed\n{result}"
        started = True
        assert srun_answers(), "start.sh said ready but srun does not answer"
    yield STATE
    if started:
        run(["bash", JOBS / "slurm-local" / "stop.sh"], timeout=120)
