"""The sharded exchange (``optim.exchange = "sharded"``) through ``hessmpi train`` and
``--resume``, under real MPI, with real HDF5 checkpoints.

A sharded run's checkpoint gathers every rank's part of the optimizer state, so it has the
allgather layout's format (the same ``optim/*`` names and shapes): a run resumes on as many
ranks bit for bit, on another rank count and across exchanges to round-off. What each test
compares with is produced by another run: the straight run of the same configuration (byte
for byte), the allgather run (float64, to round-off), the checkpoint the run resumed from.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from clirun import hessmpi, one_error_line, set_args, synthetic_data, train

from hessmpi.checkpoint import checkpoint_path, read_checkpoint
from hessmpi.metrics import COLUMNS, read_metrics

pytestmark = pytest.mark.timeout(180)

N, HALF, TIMEOUT, TOL = 12, 6, 60, 1e-9
TIMING = ("wall_time", "t_grad", "t_comm", "t_solve")
LBFGS_FULL = ["optim.name=secant", "optim.pairs=history", "optim.line_search=armijo",
              "optim.curvature=lbfgs", "optim.newton_lr=1", "optim.momentum=0",
              "optim.damping=0", "optim.h0=bb", "optim.max_step_ratio=1e4",
              "optim.memory=4", "optim.lr=0.5", "train.batch_size=0"]
CONFIGS = {
    "sgd": ["optim.name=sgd", "optim.lr=0.1", "train.batch_size=16"],
    "probe-memory": ["optim.name=secant", "optim.lr=0.05", "optim.memory=3",
                     "train.batch_size=16"],
    "history-fullbatch": LBFGS_FULL,
}


def base_sets(data: Path, name: str, exchange: str = "sharded") -> list[str]:
    """The MLP 10-8-3 (n = 115: parts of 57/58 on 2 ranks, 38/38/39 on 3), float64."""
    return [f"data.path={data}", "model.name=mlp", "model.hidden=[8]", "train.seed=4",
            "train.log_every=3", "train.eval_every=6", f"checkpoint.every={HALF}",
            "checkpoint.keep=4", "backend.threads=1", "backend.dtype=float64",
            "optim.check_every=3", *CONFIGS[name], f"optim.exchange={exchange}"]


def ok(result):
    assert result.rc == 0, str(result)
    assert "Traceback" not in result.stdout + result.stderr, str(result)
    return result


def new_run(out: Path, sets: list[str], *, n: int = 2):
    return ok(train(*set_args(sets), "--out", out, n=n, timeout=TIMEOUT))


def resume(out: Path, *sets: str, n: int = 2):
    return ok(train("--resume", out, *set_args(list(sets)), n=n, timeout=TIMEOUT))


def state(out: Path, step: int) -> tuple[dict, dict]:
    arrays, attrs = read_checkpoint(checkpoint_path(out, step))
    return {k: v for k, v in arrays.items() if not k.startswith("metrics/")}, attrs


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sharded")


@pytest.fixture(scope="module")
def data(workdir) -> Path:
    return synthetic_data(workdir / "synthetic.h5", 240, 60, 10, 3)


@pytest.fixture(scope="module")
def runs(workdir, data):
    """Per configuration, built once on 2 ranks: sharded straight to N, sharded to HALF (kept
    pristine), that one resumed to N, and allgather straight to N."""
    built: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in built:
            base = workdir / name
            straight, half, resumed, gathered = (base / k for k in (
                "straight", "half", "resumed", "allgather"))
            new_run(straight, [*base_sets(data, name), f"train.steps={N}"])
            new_run(half, [*base_sets(data, name), f"train.steps={HALF}"])
            shutil.copytree(half, resumed)
            resume(resumed, f"train.steps={N}")
            new_run(gathered, [*base_sets(data, name, "allgather"), f"train.steps={N}"])
            built[name] = dict(straight=straight, half=half, resumed=resumed,
                               allgather=gathered)
        return built[name]

    return get


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_resume_on_as_many_ranks_is_bit_for_bit(name, runs):
    r = runs(name)
    (got, got_attrs), (want, want_attrs) = state(r["resumed"], N), state(r["straight"], N)
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].tobytes() == want[key].tobytes(), f"{name}: {key} differs"
    for key in ("step", "epoch", "grad_evals", "forward_evals"):
        assert got_attrs[key] == want_attrs[key], key
    _, rows = read_metrics(r["resumed"] / "metrics.h5")
    _, rows_want = read_metrics(r["straight"] / "metrics.h5")
    for column in COLUMNS:
        if column not in TIMING:
            assert rows[column].tobytes() == rows_want[column].tobytes(), column


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_checkpoints_have_the_allgather_format_and_values(name, runs):
    """Step N of the sharded and the allgather run: the same arrays, names, shapes and
    dtypes, the values equal to round-off (W and the momentum gathered whole)."""
    r = runs(name)
    (sharded, _), (gathered, _) = state(r["straight"], N), state(r["allgather"], N)
    assert sorted(sharded) == sorted(gathered)
    for key, want in gathered.items():
        got = sharded[key]
        assert (got.shape, got.dtype) == (want.shape, want.dtype), key
        assert np.array_equal(got, want) or rel(got, want) <= TOL, \
            f"{key}: rel {rel(got, want):.2e}"
    if name != "sgd":
        assert sharded["optim/W"].shape[1] == 115 and sharded["optim/W"][1:].any()
    m_attrs, _ = read_metrics(r["straight"] / "metrics.h5")
    g_attrs, _ = read_metrics(r["allgather"] / "metrics.h5")
    assert (m_attrs["exchange"], g_attrs["exchange"]) == ("sharded", "allgather")
    assert 0 < m_attrs["state_bytes_per_rank"] < g_attrs["state_bytes_per_rank"]
    assert m_attrs["gradient_collective"].startswith("MPI_Reduce_scatter")   # n small
    assert g_attrs["gradient_collective"].startswith("MPI_Allreduce")


@pytest.mark.parametrize("name", ["history-fullbatch", "probe-memory"])
def test_resume_on_three_ranks_equals_the_allgather_resume(name, runs, tmp_path):
    """The 2-rank sharded checkpoint of step HALF resumed on 3 ranks, sharded and (the
    reference) allgather: the same parameters to round-off. History pairs keep their memory
    across rank counts (every untouched slot of the first resumed step's checkpoint is the
    2-rank one's); the workers' probe pairs start empty."""
    r = runs(name)
    ends = {}
    for exchange in ("sharded", "allgather"):
        out = tmp_path / exchange
        shutil.copytree(r["half"], out)
        said = resume(out, f"train.steps={HALF + 3}", f"optim.exchange={exchange}", n=3)
        assert "warning: resuming on 3 ranks" in said.stdout + said.stderr
        ends[exchange] = state(out, HALF + 3)
        assert read_checkpoint(checkpoint_path(out, HALF + 3))[1]["mpi_size"] == 3
    (got, _), (want, _) = ends["sharded"], ends["allgather"]
    assert rel(got["params"], want["params"]) <= TOL, rel(got["params"], want["params"])
    assert rel(got["optim/W"], want["optim/W"]) <= TOL
    before, _ = state(r["half"], HALF)
    if name == "history-fullbatch":
        # HALF steps filled slots 0..HALF-2 of 4 (mod 4); 3 more steps overwrote 3 slots
        assert before["optim/W"][1:].any()
        kept = [q for q in range(4) if q not in {(HALF - 1 + j) % 4 for j in range(3)}]
        for q in kept:
            rows = slice(1 + 2 * q, 3 + 2 * q)
            assert got["optim/W"][rows].tobytes() == before["optim/W"][rows].tobytes(), q
    else:
        assert got["optim/W"].shape[0] == 1 + 2 * 3 * 3     # P = 3 workers' slots


def test_an_allgather_checkpoint_resumes_sharded(runs, tmp_path):
    """Across exchanges on as many ranks: the allgather run's checkpoint of step N resumed
    sharded for 3 steps ends where the allgather run resumed alike ends, to round-off."""
    r = runs("history-fullbatch")
    ends = {}
    for exchange in ("sharded", "allgather"):
        out = tmp_path / exchange
        shutil.copytree(r["allgather"], out)
        resume(out, f"train.steps={N + 3}", f"optim.exchange={exchange}")
        ends[exchange] = state(out, N + 3)[0]
    assert rel(ends["sharded"]["params"], ends["allgather"]["params"]) <= TOL


def test_info_says_how_the_run_was_laid_out(runs):
    out = runs("history-fullbatch")["straight"]
    result = hessmpi("info", out)
    assert result.rc == 0, str(result)
    attrs, _ = read_metrics(out / "metrics.h5")
    lines = result.stdout.splitlines()
    assert "exchange  sharded" in lines
    assert f"state     {attrs['state_bytes_per_rank']:,} bytes per rank" in result.stdout
    assert "gradient  MPI_Reduce_scatter" in result.stdout
    missing = hessmpi("info", out / "nothing-here")
    assert missing.rc == 2 and "holds no run" in missing.stderr, str(missing)


@pytest.mark.parametrize("method", ["adam", "hessian_free", "entropy_sgd"])
def test_sharded_is_refused_where_it_does_not_apply(method, data, tmp_path):
    out = tmp_path / "out"
    result = train(*set_args([f"data.path={data}", f"optim.name={method}",
                              "optim.exchange=sharded", "train.steps=2"]), "--out", out,
                   timeout=TIMEOUT)
    assert result.rc == 2, str(result)
    one_error_line(result, "optim.exchange = 'sharded'", f"optim.name = '{method}'",
                   "does not apply")
    assert not (out / "metrics.h5").exists()
