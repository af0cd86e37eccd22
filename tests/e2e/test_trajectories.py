"""Behaviour held across the redesign of issue 14: every configuration of the recorded
matrix (``trajectories.py``) trained through ``hessmpi train`` on 1, 2 and 3 ranks gives the
final parameters, metrics rows and counters recorded on the code before it, bit for bit
(those a later issue changed on purpose, listed with the reason in ``CHANGED``, as recorded
after that change); and checkpoints written by that code still resume to the parameters of
its uninterrupted run."""

from __future__ import annotations

import json
import shutil

import pytest
from clirun import train
from trajectories import (
    CHANGED,
    DATA,
    FIXTURES,
    LEGACY,
    MATRIX,
    RANKS,
    RECORD,
    summarise,
    train_one,
)

pytestmark = pytest.mark.timeout(120)

RECORDED = json.loads(RECORD.read_text())


def assert_same(got: dict, want: dict, what: str) -> None:
    for key in ("step", "params", "metrics", "train_loss", "grad_evals", "forward_evals"):
        assert got[key] == want[key], f"{what}: {key} {got[key]!r} != recorded {want[key]!r}"
    # counters kept by name; a counter added since must be zero
    for reason, count in got["fallback_reasons"].items():
        assert count == want["fallback_reasons"].get(reason, 0), \
            f"{what}: fallback_reasons {got['fallback_reasons']} != {want['fallback_reasons']}"


def test_the_fixture_covers_the_matrix():
    current = {key for key in RECORDED if "#" not in key}
    assert current == {f"{name}@{ranks}" for name in MATRIX for ranks in RANKS}
    assert {key.split("@")[0] for key in RECORDED if "#" in key} == set(CHANGED)


@pytest.mark.parametrize("name", sorted(MATRIX))
@pytest.mark.parametrize("ranks", RANKS)
def test_trajectory_is_reproduced_bitwise(name, ranks, tmp_path):
    assert_same(train_one(name, ranks, tmp_path, train), RECORDED[f"{name}@{ranks}"],
                f"{name} on {ranks} ranks")


@pytest.mark.parametrize("name", LEGACY)
def test_a_checkpoint_of_the_old_code_resumes(name, tmp_path):
    """The half-way checkpoint written before the redesign, resumed on 2 ranks, ends at the
    recorded parameters of the uninterrupted run."""
    shutil.copy(DATA, tmp_path / "data.h5")
    run = tmp_path / name
    shutil.copytree(FIXTURES / "legacy" / name, run)
    result = train("--resume", run, n=2, cwd=tmp_path)
    assert result.rc == 0, str(result)
    got = summarise(run)
    want = RECORDED.get(f"{name}@2#before", RECORDED[f"{name}@2"])
    assert (got["step"], got["params"]) == (want["step"], want["params"]), name
