"""History pairs (``optim.pairs = "history"``, and ``"overlap"``, the same step with y on
the rows consecutive batches share; also with progressive batching) through ``hessmpi
train`` and ``--resume``, under real MPI, with real HDF5 checkpoints.

Each test compares with something the resumed run did not produce: the final checkpoint and
metrics rows of an uninterrupted run of the same configuration (byte for byte), the pair
memory of the checkpoint the run was resumed from (read back with ``read_checkpoint``), and
the fallback counters and messages the CLI wrote.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from clirun import Result, hessmpi, set_args, synthetic_data, train

from hessmpi.checkpoint import checkpoint_path, list_checkpoints, read_checkpoint
from hessmpi.metrics import COLUMNS, read_metrics

pytestmark = pytest.mark.timeout(120)

N, HALF = 16, 8
N_TRAIN, MEMORY = 240, 5        # 120 rows per rank on 2 ranks, 80 on 3
TIMING = ("wall_time", "t_grad", "t_comm", "t_solve")
COMPARED = [c for c in COLUMNS if c not in TIMING]
TIMEOUT = 60
#: L-BFGS on the global batch, the intended use of history pairs.
LBFGS = ["optim.name=secant", "optim.pairs=history", "optim.line_search=armijo",
         "optim.newton_lr=1", "optim.momentum=0", "optim.damping=0", "optim.h0=bb",
         "optim.max_step_ratio=1e4", f"optim.memory={MEMORY}", "optim.lr=0.5"]
#: kind: (rows per rank and batch, the sets beyond LBFGS)
BATCHES = {"full-batch": (N_TRAIN // 2, []), "minibatch": (16, []),
           "overlap": (16, ["optim.pairs=overlap", "optim.overlap=0.25"]),
           "progressive": (16, ["optim.batch_test=inner_product", "optim.batch_theta=0.3",
                                "optim.batch_nu=1"])}


# ----- helpers -------------------------------------------------------------------------------
def base_sets(data: Path, batch: int, *more: str) -> list[str]:
    return [f"data.path={data}", "model.name=mlp", "model.hidden=[8]",
            f"train.batch_size={batch}", "train.seed=5", "train.log_every=4",
            "train.eval_every=8", f"checkpoint.every={HALF}", "checkpoint.keep=3",
            "backend.threads=1", "optim.check_every=4", *LBFGS, *more]


def ok(result: Result) -> Result:
    assert result.rc == 0, str(result)
    assert "Traceback" not in result.stdout + result.stderr, str(result)
    return result


def new_run(out: Path, sets: list[str], *, n: int = 2) -> Result:
    return ok(train(*set_args(sets), "--out", out, n=n, timeout=TIMEOUT))


def resume(out: Path, *sets: str, n: int = 2) -> Result:
    return ok(train("--resume", out, *set_args(list(sets)), n=n, timeout=TIMEOUT))


def checkpoint(out: Path, step: int) -> tuple[dict, dict]:
    path = checkpoint_path(out, step)
    assert path.is_file(), f"no checkpoint {path}; have {list_checkpoints(out)}"
    return read_checkpoint(path)


def ring(arrays: dict) -> tuple[int, int, int, int]:
    """(filled, next_slot, steps, pending) of a checkpoint's pair memory."""
    r = [int(v) for v in arrays["optim/ring"]]
    assert len(r) == 4, r
    return tuple(r)


def assert_same_state(got: tuple[dict, dict], want: tuple[dict, dict]) -> None:
    """params, every optim/* array and the sampler identical byte for byte."""
    (a, a_attrs), (b, b_attrs) = got, want
    assert sorted(a) == sorted(b)
    state = sorted(k for k in a if not k.startswith("metrics/"))   # rows: assert_same_rows
    assert {"params", "optim/W", "optim/gram", "optim/ring"} <= set(a), sorted(a)
    for name in state:
        x, y = np.asarray(a[name]), np.asarray(b[name])
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if x.tobytes() != y.tobytes():
            bad = np.flatnonzero(x.reshape(-1).view(np.uint8) != y.reshape(-1).view(np.uint8))
            pytest.fail(f"{name} differs in {bad.size} bytes (first at byte {bad[0]})")
    for key in ("step", "epoch", "grad_evals", "forward_evals"):
        assert a_attrs[key] == b_attrs[key], key


def assert_same_rows(got: dict, want: dict) -> None:
    for name in COMPARED:
        if got[name].tobytes() != want[name].tobytes():
            pytest.fail(f"metrics column {name} differs:\n{got[name]}\n{want[name]}")


def slot_rows(W: np.ndarray, q: int) -> np.ndarray:
    """The s and y rows of ring slot q: one global pair per slot (rows 1 + 2q, 2 + 2q)."""
    return W[1 + 2 * q: 3 + 2 * q]


# ----- runs shared by several tests ----------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("history")


@pytest.fixture(scope="module")
def data(workdir) -> Path:
    return synthetic_data(workdir / "synthetic.h5", N_TRAIN, 60, 10, 3)


@pytest.fixture(scope="module")
def reference_runs(workdir, data):
    """For a batch kind, built once: a straight run of N steps, a run of HALF steps (kept
    pristine), and a copy of it resumed to N steps, all on 2 ranks."""
    built: dict[str, dict] = {}

    def get(kind: str) -> dict:
        if kind not in built:
            base = workdir / kind
            batch, more = BATCHES[kind]
            sets = base_sets(data, batch, *more)
            straight, half = base / "straight", base / "half"
            new_run(straight, [*sets, f"train.steps={N}"])
            new_run(half, [*sets, f"train.steps={HALF}"])
            resumed = base / "resumed"
            shutil.copytree(half, resumed)
            result = resume(resumed, f"train.steps={N}")
            built[kind] = dict(straight=straight, half=half, resumed=resumed, result=result)
        return built[kind]

    return get


# ----- exact continuation --------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(BATCHES))
def test_resume_continues_history_pairs_bit_for_bit(kind, reference_runs):
    """N/2 steps and --resume to N give the straight run's final checkpoint and metrics rows
    byte for byte. Below full batch every step forms a pair (probe_every 1), so the
    checkpoint of step N/2 holds a pair measured but not yet committed (pending; overlap
    pairs: the shared rows' averaged gradient, and the sampler's shared rows follow from its
    position); at full batch none is pending and the line search's trials are the only
    gradients (the accepted one the next step's), no forward passes. A history pair below
    full batch costs one gradient a step, an overlap pair none."""
    runs = reference_runs(kind)
    full = kind == "full-batch"
    per_step = 1 if kind == "overlap" else 2
    mid, mid_attrs = checkpoint(runs["half"], HALF)
    # HALF steps: pairs of steps 0..HALF-2 committed, step HALF-1's pending below full batch
    assert ring(mid) == (MEMORY, (HALF - 1) % MEMORY, HALF, 0 if full else 1)
    if full:
        assert mid_attrs["grad_evals"] >= HALF and mid_attrs["forward_evals"] == 0
    else:
        assert mid_attrs["grad_evals"] == HALF * per_step
    assert f"step {HALF}" in runs["result"].stdout
    assert_same_state(checkpoint(runs["resumed"], N), checkpoint(runs["straight"], N))
    attrs, got = read_metrics(runs["resumed"] / "metrics.h5")
    want_attrs, want = read_metrics(runs["straight"] / "metrics.h5")
    np.testing.assert_array_equal(got["step"], np.arange(4, N + 1, 4))
    assert_same_rows(got, want)
    assert attrs["status"] == "finished" and list(attrs["resumed_at"]) == [HALF]
    assert attrs["fallback_reasons"] == want_attrs["fallback_reasons"]
    assert json.loads(attrs["fallback_reasons"])["no_pairs"] == 1    # only the first step
    if full:     # the trials' gradients: at least one a step, no forward passes
        assert np.all(got["grad_evals"] >= got["step"]) and not got["forward_evals"].any()
    else:
        assert np.all(got["grad_evals"] == got["step"] * per_step)


def test_resume_on_three_ranks_keeps_the_history_memory(reference_runs, tmp_path):
    """The minibatch run checkpointed on 2 ranks (a pending pair in it), resumed on 3 for one
    step: the warning is printed once; the 3-rank checkpoint keeps every slot of the 2-rank
    one but the slot the new step measured into (the pending pair committed unchanged), and
    the first step after the resume is no 'no_pairs' fallback."""
    runs = reference_runs("minibatch")
    out = tmp_path / "run"
    shutil.copytree(runs["half"], out)
    before, _ = checkpoint(out, HALF)
    result = resume(out, f"train.steps={HALF + 1}", n=3)
    said = (result.stdout + result.stderr).splitlines()
    warnings = [line for line in said if "warning: resuming on 3 ranks" in line]
    assert len(warnings) == 1, str(result)
    assert "checkpointed on 2" in warnings[0] and "history pairs kept" in warnings[0]

    after, attrs = checkpoint(out, HALF + 1)
    assert attrs["mpi_size"] == 3 and after["sampler"].shape == (3, 2)
    assert ring(after) == (MEMORY, HALF % MEMORY, HALF + 1, 1)
    assert before["optim/W"].shape == after["optim/W"].shape
    for q in range(MEMORY):
        if q == HALF % MEMORY:                         # the pair measured by step HALF + 1
            continue
        assert slot_rows(after["optim/W"], q).tobytes() == \
            slot_rows(before["optim/W"], q).tobytes(), f"slot {q} changed"
        assert slot_rows(before["optim/W"], q).any(), f"slot {q} was empty"
    m_attrs, _ = read_metrics(out / "metrics.h5")
    assert json.loads(m_attrs["fallback_reasons"])["no_pairs"] == 1
    assert m_attrs["status"] == "finished" and m_attrs["mpi_size"] == 3


def test_overlap_pairs_resumed_on_three_ranks_start_again(reference_runs, tmp_path):
    """Overlap pairs depend on how the rows are split: the overlap run checkpointed on 2
    ranks, resumed on 3 for two steps, says it drops them, starts the re-sharded sampler on
    whole fresh batches, and forms its next pair from the rows its own batches share."""
    runs = reference_runs("overlap")
    out = tmp_path / "run"
    shutil.copytree(runs["half"], out)
    result = resume(out, f"train.steps={HALF + 2}", n=3)
    warning = [line for line in (result.stdout + result.stderr).splitlines()
               if "warning: resuming on 3 ranks" in line]
    assert len(warning) == 1 and "overlap pairs, are dropped" in warning[0], str(result)
    after, attrs = checkpoint(out, HALF + 2)
    # the first step after the resume has no pairs; it keeps its tail, the second commits
    assert ring(after) == (1, 1, HALF + 2, 1), ring(after)
    assert attrs["grad_evals"] == HALF + 2
    m_attrs, _ = read_metrics(out / "metrics.h5")
    assert json.loads(m_attrs["fallback_reasons"])["no_pairs"] == 2


def test_a_grown_batch_is_kept_by_resume_on_any_rank_count(reference_runs, tmp_path):
    """Progressive batching: the run's batch grows (the metrics' global batch column from
    2 x 16 up) and its checkpoint keeps the grown part (the bit-for-bit resume
    above needs it); resumed on 3 ranks the global batch is kept: each rank draws
    ceil(2 x grown / 3) rows."""
    runs = reference_runs("progressive")
    _, cols = read_metrics(runs["straight"] / "metrics.h5")
    assert cols["batch"][-1] > cols["batch"][0] >= 32, cols["batch"]
    _, mid_attrs = checkpoint(runs["half"], HALF)
    grown = int(mid_attrs["batch_rows"])
    assert 16 < grown < N_TRAIN // 2, grown
    out = tmp_path / "run"
    shutil.copytree(runs["half"], out)
    resume(out, f"train.steps={HALF + 1}", n=3)
    _, attrs = checkpoint(out, HALF + 1)
    _, cols = read_metrics(out / "metrics.h5")
    per_rank = -(-2 * grown // 3)
    assert cols["batch"][-1] == 3 * per_rank, (cols["batch"], grown)
    assert attrs["batch_rows"] >= per_rank


# ----- configuration errors ------------------------------------------------------------------
@pytest.mark.parametrize("override", ["optim.pairs_per_rank=2", "optim.probe_batch=0.5"])
def test_history_with_a_probe_option_exits_2(override, data, tmp_path):
    out = tmp_path / "out"
    result = train(*set_args([*base_sets(data, 16), override, "train.steps=2"]), "--out",
                   out, timeout=TIMEOUT)
    assert result.rc == 2, str(result)
    errors = [line for line in result.stderr.splitlines() if "hessmpi: error" in line]
    assert len(errors) == 1, str(result)
    key = override.split("=")[0]
    assert f"{key} = " in errors[0] and "does not apply" in errors[0], errors[0]
    assert "applies with optim.name = 'secant' with pairs = 'probe'" in errors[0], errors[0]
    assert "Traceback" not in result.stdout + result.stderr, str(result)
    assert not (out / "metrics.h5").exists()


def test_batch_size_zero_is_the_whole_shard_on_any_rank_count(data, tmp_path):
    """train.batch_size = 0 means each rank's whole shard: on 3 ranks (80 rows each) the run
    equals, byte for byte, the one that names batch_size = 80, and it takes the full-batch
    path of history pairs (gradients only for the line search's trials, the accepted one the
    next step's; no extra measurement, no forward passes)."""
    steps = 6
    named, zero = tmp_path / "named", tmp_path / "zero"
    new_run(named, [*base_sets(data, N_TRAIN // 3), f"train.steps={steps}"], n=3)
    new_run(zero, [*base_sets(data, 0), f"train.steps={steps}"], n=3)
    assert_same_state(checkpoint(zero, steps), checkpoint(named, steps))
    _, cols = read_metrics(zero / "metrics.h5")
    assert cols["forward_evals"][-1] == 0 and steps <= cols["grad_evals"][-1] < 2 * steps
    report = hessmpi("report", zero)
    assert report.rc == 0 and " full " in report.stdout, str(report)


def test_progressive_batching_at_full_batch_exits_2(data, tmp_path):
    out = tmp_path / "out"
    result = train(*set_args([*base_sets(data, 0), "optim.batch_test=inner_product",
                              "train.steps=2"]), "--out", out, timeout=TIMEOUT)
    assert result.rc == 2, str(result)
    errors = [line for line in result.stderr.splitlines() if "hessmpi: error" in line]
    assert len(errors) == 1 and "no larger batch" in errors[0], str(result)
    assert not (out / "metrics.h5").exists()


@pytest.mark.parametrize("sets, needle", [
    (["train.batch_size=0"], "train.batch_size = 0"),
    (["train.batch_size=120"], "each rank's whole shard of 120 rows"),
    (["train.batch_size=16", "optim.overlap=0.01"], "less than one row"),
    (["train.batch_size=16", "optim.overlap=0.75"], "optim.overlap"),
])
def test_overlap_pairs_without_rows_to_share_exit_2(sets, needle, data, tmp_path):
    """Overlap pairs need rows that consecutive batches share: refused (exit 2, one error
    line, no results file) at full batch (batch_size 0, or the whole shard of 120 rows on
    2 ranks), below one shared row, and above half the batch."""
    out = tmp_path / "out"
    result = train(*set_args([*base_sets(data, 16), "optim.pairs=overlap", *sets,
                              "train.steps=2"]), "--out", out, timeout=TIMEOUT)
    assert result.rc == 2, str(result)
    errors = [line for line in result.stderr.splitlines() if "hessmpi: error" in line]
    assert len(errors) == 1 and needle in errors[0], str(result)
    assert "Traceback" not in result.stdout + result.stderr, str(result)
    assert not (out / "metrics.h5").exists()
