"""Fixtures of the end-to-end suite: a small dataset and one finished two-rank run,
shared by the tests that only read them."""

from __future__ import annotations

from pathlib import Path

import pytest
from clirun import Result, set_args, train

# A small, fast run: 23 steps (not a multiple of log_every, so the last row is extra).
RUN_TOML = """\
[model]
name = "mlp"
hidden = [8]

[optim]
lr = 0.1
momentum = 0.9

[train]
steps = 23
batch_size = 8
seed = 1
log_every = 5
eval_every = 10
"""
RUN_SETS = ["backend.device=cpu", "backend.threads=1", "optim.check_every=4"]


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def dataset(workdir) -> Path:
    """A 200-train / 50-test, 8-feature, 3-class synthetic dataset, written in-process."""
    from hessmpi.data import write_dataset
    from hessmpi.importers import synthetic

    path = workdir / "data.h5"
    train_, test_, attrs = synthetic(200, 50, 8, 3, 10.0, 2.0, 7)
    write_dataset(path, train_, test_, **attrs)
    return path


@pytest.fixture(scope="session")
def run_config(workdir, dataset) -> tuple[Path, list[str]]:
    """(config file, --set overrides) of the small run."""
    path = workdir / "run.toml"
    path.write_text(RUN_TOML + f'\n[data]\npath = "{dataset}"\n')
    return path, list(RUN_SETS)


@pytest.fixture(scope="session")
def finished_run(workdir, run_config) -> tuple[Path, Result]:
    """The small run, trained once under ``mpiexec -n 2``: (run directory, its result)."""
    cfg, sets = run_config
    out = workdir / "finished"
    result = train("--config", cfg, *set_args(sets), "--out", out)
    if result.rc != 0:
        pytest.fail(f"the reference run failed: {result}")
    return out, result


@pytest.fixture
def jobs() -> list:
    """Background jobs a test starts (``test_resume.Job``); each is ended after the test,
    whatever its outcome, so no rank outlives it."""
    started: list = []
    yield started
    for job in started:
        job.end()
