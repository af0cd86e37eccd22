"""Checkpoints and ``train --resume`` end to end, under real MPI (``mpiexec -n 2``).

Each test compares with something the resumed run did not produce: the final checkpoint and
metrics rows of an uninterrupted run of the same configuration, the bytes of files before
and after, the checkpoint files themselves read back with ``read_checkpoint``.

The launcher is HESSMPI_MPIEXEC (the Makefile exports it), by default the ``mpiexec`` next
to this Python. The tests that kill a rank or signal a job need ranks that run as local
child processes of the launcher (MPICH hydra); they skip where there are none.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from clirun import HESSMPI, Result, hessmpi, mpiexec, run, set_args, synthetic_data, train

from hessmpi.checkpoint import (
    checkpoint_path,
    list_checkpoints,
    read_checkpoint,
    write_checkpoint,
)
from hessmpi.metrics import COLUMNS, read_metrics

pytestmark = pytest.mark.timeout(120)

N, HALF = 40, 20             # HALF is a multiple of EVERY and of LOG
N_TRAIN, BATCH = 512, 16
EVERY, LOG, EVAL = 10, 5, 10
TIMING = ("wall_time", "t_grad", "t_comm", "t_solve")
COMPARED = [c for c in COLUMNS if c not in TIMING]
TIMEOUT = 60                 # seconds for one command

OPTIMIZERS = {
    "sgd": ["optim.name=sgd", "optim.lr=0.1", "optim.momentum=0.9"],
    "secant": ["optim.name=secant", "optim.memory=3", "optim.lr=0.1", "optim.momentum=0.9"],
}


# ----- helpers -----------------------------------------------------------------------------

def base_sets(data: Path, optimizer: str = "sgd") -> list[str]:
    return [f"data.path={data}", "model.name=mlp", "model.hidden=[16]",
            f"train.batch_size={BATCH}", "train.seed=3", f"train.log_every={LOG}",
            f"train.eval_every={EVAL}", f"checkpoint.every={EVERY}", "checkpoint.keep=3",
            "backend.threads=1", "optim.check_every=10", *OPTIMIZERS[optimizer]]


def new_run(out: Path, sets: list[str], *, n: int = 2) -> Result:
    return train(*set_args(sets), "--out", out, n=n, timeout=TIMEOUT)


def resume(out: Path, *sets: str, n: int = 2) -> Result:
    return train("--resume", out, *set_args(list(sets)), n=n, timeout=TIMEOUT)


def ok(result: Result) -> Result:
    assert result.rc == 0, str(result)
    assert "Traceback" not in result.stdout + result.stderr, str(result)
    return result


def final_checkpoint(out: Path, step: int) -> tuple[dict, dict]:
    path = checkpoint_path(out, step)
    assert path.is_file(), f"no checkpoint {path}; have {sorted(os.listdir(path.parent))}"
    return read_checkpoint(path)


def assert_same_state(got: tuple[dict, dict], want: tuple[dict, dict]) -> None:
    """params, every optim/* array and the sampler state identical byte for byte."""
    (a, a_attrs), (b, b_attrs) = got, want
    assert sorted(a) == sorted(b)
    state = sorted(k for k in a if not k.startswith("metrics/"))   # rows: assert_same_rows
    assert "params" in a and any(k.startswith("optim/") for k in a), sorted(a)
    for name in state:
        x, y = np.asarray(a[name]), np.asarray(b[name])
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if x.tobytes() != y.tobytes():
            bad = np.flatnonzero(x.reshape(-1).view(np.uint8) != y.reshape(-1).view(np.uint8))
            pytest.fail(f"{name} differs in {bad.size} bytes (first at byte {bad[0]})")
    for key in ("step", "epoch", "grad_evals"):
        assert a_attrs[key] == b_attrs[key], key


def assert_same_rows(got: dict, want: dict) -> None:
    """Every metrics column but the timings identical (bytes, NaNs included)."""
    for name in COMPARED:
        x, y = got[name], want[name]
        assert x.dtype == y.dtype and x.shape == y.shape, (name, x.shape, y.shape)
        if x.tobytes() != y.tobytes():
            pytest.fail(f"metrics column {name} differs:\n{x}\n{y}")


def logged_steps(last: int) -> np.ndarray:
    """The steps a run of ``last`` steps logs, each once: every LOG-th, and the last."""
    return np.array(sorted({*range(LOG, last + 1, LOG), last}))


def one_error_line(result: Result, *needles: str) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("hessmpi: error")]
    assert len(errors) == 1, str(result)
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert "Traceback" not in result.stdout + result.stderr, str(result)
    return errors[0]


def snapshot(out: Path) -> dict[str, bytes]:
    """The bytes of every file of a run directory."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file()}


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def flip_params_byte(path: Path) -> None:
    with h5py.File(path, "r") as f:
        offset = f["params"].id.get_offset()
        size = f["params"].id.get_storage_size()
    assert offset is not None
    with open(path, "r+b") as fh:
        fh.seek(offset + size // 2)
        b = fh.read(1)
        fh.seek(offset + size // 2)
        fh.write(bytes([b[0] ^ 0x10]))


# ----- runs shared by several tests --------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def data(workdir) -> Path:
    return synthetic_data(workdir / "synthetic.h5", N_TRAIN, 128, 20, 4)


@pytest.fixture(scope="module")
def reference_runs(workdir, data):
    """For an optimizer, built once on first use: a straight run of N steps, a run of HALF
    steps (kept pristine for other tests), and a copy of that run resumed to N steps."""
    built: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in built:
            base = workdir / name
            sets = base_sets(data, name)
            straight, half = base / "straight", base / "half"
            ok(new_run(straight, [*sets, f"train.steps={N}"]))
            ok(new_run(half, [*sets, f"train.steps={HALF}"]))
            assert [s for s, _ in list_checkpoints(half)] == [HALF, HALF - EVERY]
            resumed = copy_run(half, base / "resumed")
            result = ok(resume(resumed, f"train.steps={N}"))
            built[name] = dict(optimizer=name, sets=sets, straight=straight, half=half,
                               resumed=resumed, result=result)
        return built[name]

    return get


@pytest.fixture(params=list(OPTIMIZERS))
def runs(request, reference_runs) -> dict:
    return reference_runs(request.param)


@pytest.fixture
def sgd_runs(reference_runs) -> dict:
    return reference_runs("sgd")


# ----- exact continuation ------------------------------------------------------------------

def test_resume_continues_bit_for_bit(runs):
    straight, resumed = runs["straight"], runs["resumed"]
    assert f"step {HALF}" in runs["result"].stdout
    assert_same_state(final_checkpoint(resumed, N), final_checkpoint(straight, N))

    attrs, got = read_metrics(resumed / "metrics.h5")
    want_attrs, want = read_metrics(straight / "metrics.h5")
    np.testing.assert_array_equal(got["step"], logged_steps(N))  # none missing, none twice
    assert_same_rows(got, want)
    assert attrs["status"] == "finished"
    assert list(attrs["resumed_at"]) == [HALF]
    if runs["optimizer"] == "secant":
        assert np.all(got["grad_evals"] == 2 * got["step"])  # one probe gradient per step
        assert attrs["fallback_reasons"] == want_attrs["fallback_reasons"]


def test_metrics_rows_past_the_checkpoint_are_replaced(runs, tmp_path):
    """Rows a run logged after its newest checkpoint (it died before the next one) are
    dropped on resume and logged again, once."""
    out = copy_run(runs["half"], tmp_path / "run")
    (out / "checkpoints" / f"ckpt_{HALF:09d}.h5").unlink()   # as if it died before it
    ok(resume(out, f"train.steps={N}"))
    attrs, got = read_metrics(out / "metrics.h5")
    np.testing.assert_array_equal(got["step"], logged_steps(N))
    assert_same_rows(got, read_metrics(runs["straight"] / "metrics.h5")[1])
    assert_same_state(final_checkpoint(out, N), final_checkpoint(runs["straight"], N))
    assert list(attrs["resumed_at"]) == [HALF - EVERY]


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_resume_on_more_ranks_warns_and_finishes(optimizer, data, tmp_path):
    sets = base_sets(data, optimizer)
    out = tmp_path / "run"
    ok(new_run(out, [*sets, f"train.steps={HALF}"]))
    before = read_metrics(out / "metrics.h5")[1]
    result = ok(resume(out, f"train.steps={N}", n=3))
    said = result.stdout + result.stderr
    assert "sample order changed" in said, str(result)
    assert "3 ranks" in said and "checkpointed on 2" in said, str(result)

    arrays, attrs = final_checkpoint(out, N)
    assert attrs["mpi_size"] == 3 and arrays["sampler"].shape == (3, 2)
    assert np.isfinite(arrays["params"]).all()
    m_attrs, got = read_metrics(out / "metrics.h5")
    assert m_attrs["status"] == "finished" and m_attrs["mpi_size"] == 3
    np.testing.assert_array_equal(got["step"], logged_steps(N))
    assert_same_rows({k: v[got["step"] <= HALF] for k, v in got.items()}, before)
    # the restored run starts at a fresh epoch of the re-sharded data (N_TRAIN // 3 rows)
    first_after = got["epoch"][got["step"] > HALF][0]
    fresh = np.floor(before["epoch"][-1]) + 1
    assert first_after == pytest.approx(fresh + LOG * BATCH / (N_TRAIN // 3))


VARIANTS = {
    "secant-local-cosine": ["optim.name=secant", "optim.pairs=local", "optim.local_steps=3",
                            "optim.memory=2", "optim.schedule=cosine", "optim.warmup_steps=5"],
    "secant-random-probe-lsq": ["optim.name=secant", "optim.probe=random",
                                "optim.curvature=lsq", "optim.pairs_per_rank=2"],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resume_from_a_mid_run_checkpoint_reproduces_the_run(variant, data, tmp_path):
    """The same configuration (so the same schedule), resumed from the checkpoint of step
    HALF, rewrites the later checkpoints and rows exactly as the run first wrote them."""
    sets = [s for s in base_sets(data) if not s.startswith("optim.")]
    straight = tmp_path / "straight"
    ok(new_run(straight, [*sets, *VARIANTS[variant], f"train.steps={N}"]))
    later = [s for s, _ in list_checkpoints(straight) if s > HALF]
    assert later == [N, HALF + EVERY]
    out = copy_run(straight, tmp_path / "run")
    for step in later:
        checkpoint_path(out, step).unlink()
    result = ok(resume(out))
    assert f"from ckpt_{HALF:09d}.h5" in result.stdout, str(result)
    for step in later:
        assert_same_state(final_checkpoint(out, step), final_checkpoint(straight, step))
    attrs, got = read_metrics(out / "metrics.h5")
    np.testing.assert_array_equal(got["step"], logged_steps(N))
    assert_same_rows(got, read_metrics(straight / "metrics.h5")[1])
    assert list(attrs["resumed_at"]) == [HALF]


# ----- damaged and foreign checkpoints -----------------------------------------------------

@pytest.fixture(scope="module")
def foreign_checkpoint(workdir, data) -> Path:
    """A valid checkpoint of step EVERY of a run whose model differs (hidden [8])."""
    out = workdir / "foreign"
    sets = [s for s in base_sets(data) if not s.startswith("model.hidden")]
    ok(new_run(out, [*sets, "model.hidden=[8]", f"train.steps={EVERY}"]))
    path = checkpoint_path(out, EVERY)
    read_checkpoint(path)
    return path


@pytest.mark.parametrize("damage", ["truncated", "bit_flipped", "foreign"])
def test_bad_newest_checkpoint_is_skipped(damage, sgd_runs, foreign_checkpoint, tmp_path):
    out = copy_run(sgd_runs["half"], tmp_path / "run")
    newest = checkpoint_path(out, HALF)
    if damage == "truncated":
        os.truncate(newest, newest.stat().st_size * 2 // 3)
        bad, used = newest, HALF - EVERY
    elif damage == "bit_flipped":
        flip_params_byte(newest)
        bad, used = newest, HALF - EVERY
    else:   # a newer name in this run's directory, but another model's file
        bad, used = checkpoint_path(out, HALF + EVERY), HALF
        shutil.copyfile(foreign_checkpoint, bad)

    result = ok(resume(out, f"train.steps={N}"))
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and bad.name in warnings[0], str(result)
    if damage == "foreign":
        assert "model.hidden" in warnings[0], warnings[0]
    assert f"from ckpt_{used:09d}.h5" in result.stdout, str(result)
    # the older checkpoint continues the run exactly: the result is the straight run's
    assert_same_state(final_checkpoint(out, N), final_checkpoint(sgd_runs["straight"], N))
    got = read_metrics(out / "metrics.h5")[1]
    np.testing.assert_array_equal(got["step"], logged_steps(N))
    assert_same_rows(got, read_metrics(sgd_runs["straight"] / "metrics.h5")[1])


@pytest.mark.parametrize("kind", ["failed_state_file", "config_of_a_newer_version"])
def test_verified_file_that_is_no_checkpoint_of_this_run_is_skipped(kind, sgd_runs,
                                                                     tmp_path):
    out = copy_run(sgd_runs["half"], tmp_path / "run")
    arrays, attrs = read_checkpoint(checkpoint_path(out, HALF))
    attrs = {k: v for k, v in attrs.items() if k not in ("format", "checksum")}
    bad = checkpoint_path(out, HALF + EVERY)
    if kind == "failed_state_file":   # what Run.run writes to OUT/failed_state_step_N.h5
        write_checkpoint(bad, {"params": arrays["params"]},
                         {"step": HALF + EVERY, "failure": "the training loss is nan"})
    else:
        write_checkpoint(bad, arrays, {**attrs, "step": HALF + EVERY,
                                       "config": attrs["config"] + "\n[future]\nknob = 1\n"})
    result = resume(out, f"train.steps={N}")
    assert result.rc == 0, str(result)
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and bad.name in warnings[0], str(result)
    assert f"from ckpt_{HALF:09d}.h5" in result.stdout, str(result)
    assert_same_state(final_checkpoint(out, N), final_checkpoint(sgd_runs["straight"], N))


def test_no_valid_checkpoint_exits_2(sgd_runs, tmp_path):
    out = copy_run(sgd_runs["half"], tmp_path / "run")
    for _, path in list_checkpoints(out):
        os.truncate(path, 1000)
    before = snapshot(out)
    result = resume(out, f"train.steps={N}")
    assert result.rc == 2, str(result)
    one_error_line(result, "no usable checkpoint", str(out / "checkpoints"))
    for step in (HALF, HALF - EVERY):
        assert f"ckpt_{step:09d}.h5" in result.stderr, str(result)
    assert snapshot(out) == before


def test_no_checkpoint_at_all_exits_2(sgd_runs, tmp_path):
    out = copy_run(sgd_runs["half"], tmp_path / "run")
    shutil.rmtree(out / "checkpoints")
    result = resume(out, f"train.steps={N}")
    assert result.rc == 2, str(result)
    one_error_line(result, "no checkpoint")


@pytest.mark.parametrize("override", ["model.hidden=[8]", "data.path=elsewhere.h5",
                                      "optim.memory=2", "train.seed=4",
                                      "train.batch_size=8"])
def test_resume_refuses_overrides_that_change_model_or_data(override, sgd_runs, tmp_path):
    out = copy_run(sgd_runs["half"], tmp_path / "run")
    before = snapshot(out)
    result = resume(out, f"train.steps={N}", override)
    assert result.rc == 2, str(result)
    one_error_line(result, override.split("=")[0])
    assert snapshot(out) == before


def test_resume_accepts_fixed_keys_given_unchanged(sgd_runs, tmp_path):
    """Re-running the first command with --resume: fixed keys at their saved values are no
    change, and the run continues to the same end as the straight run."""
    out = copy_run(sgd_runs["half"], tmp_path / "run")
    ok(resume(out, f"train.steps={N}", "model.hidden=[16]", "model.name=mlp"))
    resumed, _ = read_checkpoint(checkpoint_path(out, N))
    straight, _ = read_checkpoint(checkpoint_path(sgd_runs["straight"], N))
    assert resumed["params"].tobytes() == straight["params"].tobytes()


def test_refused_resume_of_a_finished_run_leaves_it_untouched(sgd_runs, tmp_path):
    """Resuming a finished run without extending it is refused before anything is written
    (it once reopened metrics.h5 first and left a finished run marked 'running')."""
    out = copy_run(sgd_runs["straight"], tmp_path / "run")
    before = snapshot(out)
    result = resume(out)
    assert result.rc == 2, str(result)
    one_error_line(result, f"already holds {N} steps", "train.steps")
    attrs, _ = read_metrics(out / "metrics.h5")
    assert attrs["status"] == "finished" and "resumed_at" not in attrs
    assert snapshot(out) == before


# ----- killed and signalled jobs -----------------------------------------------------------

def _env() -> dict:
    env = dict(os.environ)
    env.pop("HESSMPI_TRACEBACK", None)
    env.setdefault("MPIEXEC_TIMEOUT", "90")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _children() -> dict[int, list[int]]:
    """{parent pid: [child pids]} of every process, from /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _cmdline(pid: int) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


class Job:
    """``mpiexec -n 2 hessmpi train ARGS`` running in the background, in its own session,
    output to files. Remembers every process it saw under the launcher, so that ``end()``
    kills exactly those (hydra puts each rank in a session of its own, so the launcher's
    process group does not hold them)."""

    def __init__(self, args: list, log_dir: Path, n: int = 2):
        self.stdout = log_dir / "stdout.txt"
        self.stderr = log_dir / "stderr.txt"
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.proc = subprocess.Popen(
                [*mpiexec(n), HESSMPI, "train", *map(str, args)], env=_env(),
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
        self.seen: dict[int, bytes] = {}

    def descendants(self) -> list[int]:
        children, found, todo = _children(), [], [self.proc.pid]
        while todo:
            for child in children.get(todo.pop(), []):
                found.append(child)
                todo.append(child)
        for pid in found:
            cmd = _cmdline(pid)
            if cmd is not None:
                self.seen.setdefault(pid, cmd)
        return found

    def ranks(self) -> dict[int, int]:
        """{MPI rank: pid} of the rank processes (PMI_RANK in their environment)."""
        ranks = {}
        for pid in self.descendants():
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for item in env:
                if item.startswith(b"PMI_RANK="):
                    ranks[int(item[9:])] = pid
        return ranks

    def wait_for_checkpoint(self, out: Path, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not list_checkpoints(out):
            if self.proc.poll() is not None:
                pytest.fail(f"the job ended before its first checkpoint\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no checkpoint after {timeout} s\n{self.output()}")
            time.sleep(0.05)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def output(self) -> str:
        return (f"--- stdout\n{self.stdout.read_text()[-3000:]}\n"
                f"--- stderr\n{self.stderr.read_text()[-3000:]}")

    def end(self) -> None:
        """Kill whatever of this job is left: the launcher's group, then each process seen."""
        if self.proc.poll() is None:
            self.descendants()
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid, cmd in self.seen.items():
            if _cmdline(pid) == cmd:      # still the same process
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.wait(10)


def long_run_args(data: Path, out: Path, every: int) -> list[str]:
    sets = [s for s in base_sets(data) if not s.startswith("checkpoint.every")]
    return [*set_args([*sets, f"checkpoint.every={every}", "train.steps=1000000"]),
            "--out", out]


def rank_pids(job: Job, n: int = 2, timeout: float = 30) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ranks = job.ranks()
        if len(ranks) == n:
            return ranks
        time.sleep(0.1)
    pytest.skip(f"the launcher {mpiexec(n)[0]} does not run the ranks as local child "
                f"processes (found {ranks})")


@pytest.mark.parametrize("victim", [0, 1])
def test_kill_9_of_one_rank_ends_the_job_and_the_run_resumes(victim, data, tmp_path, jobs):
    out = tmp_path / "run"
    job = Job(long_run_args(data, out, every=EVERY), tmp_path)
    jobs.append(job)
    ranks = rank_pids(job)
    job.wait_for_checkpoint(out)
    time.sleep(0.3)     # well into training, between or during checkpoints
    os.kill(ranks[victim], signal.SIGKILL)
    killed = time.monotonic()
    rc = job.wait(30)
    ended = time.monotonic() - killed
    assert rc is not None, f"the job still runs 30 s after rank {victim} was killed"
    assert rc != 0, job.output()
    leftover = [pid for pid in job.seen if _cmdline(pid) == job.seen[pid]]
    assert not leftover, f"processes left after the job ended: {leftover}"
    print(f"job ended {ended:.2f} s after kill -9 of rank {victim}, exit {rc}")

    listed = list_checkpoints(out)
    assert listed, job.output()
    newest, path = listed[0]
    _, attrs = read_checkpoint(path)          # raises if it does not verify
    assert attrs["step"] == newest and newest % EVERY == 0
    for _, older in listed[1:]:
        read_checkpoint(older)

    # rank 0 was killed (by hydra, if another rank died) before it could mark the run: the
    # file says running, the lock it left says its process is gone
    assert read_metrics(out / "metrics.h5")[0]["status"] == "running"
    report = hessmpi("report", out)
    assert report.rc == 0 and "killed" in report.stdout, str(report)
    end = newest + 2 * EVERY
    result = ok(resume(out, f"train.steps={end}"))
    assert f"from {path.name}" in result.stdout, str(result)
    assert "took over the stale lock" in result.stderr, str(result)
    arrays, attrs = final_checkpoint(out, end)
    assert attrs["step"] == end and np.isfinite(arrays["params"]).all()
    m_attrs, got = read_metrics(out / "metrics.h5")
    assert m_attrs["status"] == "finished"
    np.testing.assert_array_equal(got["step"], logged_steps(end))


def test_stop_signals_are_ignored_once_the_run_is_over(data, tmp_path):
    """mpiexec forwards a stop signal the ranks may have had already; when its copy reaches a
    rank that is exiting, Python's finalization has given the default action back to any
    Python handler (death by the signal: the job's exit 75 becomes a crash), but not to
    SIG_IGN. So once the run is over, both stop signals are ignored."""
    out = tmp_path / "run"
    code = ("import signal, sys\n"
            "from hessmpi.cli import main\n"
            f"rc = main(['train', *{set_args([*base_sets(data), 'train.steps=4'])!r}, "
            f"'--out', {str(out)!r}])\n"
            "print('exit', rc, 'ignored', [signal.getsignal(s) == signal.SIG_IGN\n"
            "                             for s in (signal.SIGUSR1, signal.SIGTERM)])\n"
            "signal.raise_signal(signal.SIGUSR1)\n"
            "sys.exit(rc)\n")
    result = ok(run([sys.executable, "-c", code], timeout=TIMEOUT))
    assert "exit 0 ignored [True, True]" in result.stdout, str(result)


@pytest.mark.parametrize("signum, to", [(signal.SIGUSR1, "mpiexec"), (signal.SIGTERM, "mpiexec"),
                                        (signal.SIGUSR1, "rank 1")],
                         ids=["USR1", "TERM", "USR1-to-rank-1-alone"])
def test_signal_checkpoints_stops_with_75_and_resumes_exactly(signum, to, data, tmp_path,
                                                              jobs):
    out = tmp_path / "run"
    job = Job(long_run_args(data, out, every=50), tmp_path)
    jobs.append(job)
    ranks = rank_pids(job)
    job.wait_for_checkpoint(out)              # the ranks' handlers are installed by then
    if to == "mpiexec":
        job.proc.send_signal(signum)          # hydra forwards it to every rank
    else:                                     # one rank alone: every rank must still stop
        os.kill(ranks[1], signum)
    rc = job.wait(30)
    assert rc == 75, f"exit {rc}\n{job.output()}"
    stderr = job.stderr.read_text()
    match = re.search(r"stopped by a signal after step (\d+)", stderr)
    assert match, job.output()
    stop = int(match.group(1))
    assert f"--resume {out}" in stderr and "Traceback" not in stderr, job.output()

    assert list_checkpoints(out)[0] == (stop, checkpoint_path(out, stop))
    _, attrs = read_checkpoint(checkpoint_path(out, stop))
    assert attrs["step"] == stop
    m_attrs, rows = read_metrics(out / "metrics.h5")
    assert m_attrs["status"] == "stopped"
    assert rows["step"][-1] <= stop

    end = stop + 3 * LOG + 2        # not a multiple of LOG: an extra last row
    ok(resume(out, f"train.steps={end}"))
    reference = tmp_path / "reference"
    ok(new_run(reference, [*base_sets(data), f"train.steps={end}"]))
    assert_same_state(final_checkpoint(out, end), final_checkpoint(reference, end))
    m_attrs, got = read_metrics(out / "metrics.h5")
    want = read_metrics(reference / "metrics.h5")[1]
    assert m_attrs["status"] == "finished"
    np.testing.assert_array_equal(got["step"], logged_steps(end))
    assert_same_rows(got, want)


# ----- a run that diverges -----------------------------------------------------------------

def test_nan_loss_exits_1_keeps_the_last_good_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    sets = [s for s in base_sets(data) if not s.startswith(("checkpoint.every",
                                                             "train.log_every", "optim.lr"))]
    result = new_run(out, [*sets, "optim.lr=1e6", "checkpoint.every=1", "train.log_every=1",
                           f"train.steps={N}", "train.max_loss_ratio=0"])
    assert result.rc == 1, str(result)
    line = one_error_line(result, "run failed", "optim.lr")
    failed_files = sorted(out.glob("failed_state_step_*.h5"))
    assert len(failed_files) == 1, sorted(os.listdir(out))
    failed = int(re.fullmatch(r"failed_state_step_(\d+)\.h5", failed_files[0].name).group(1))
    assert f"at step {failed}" in line, line
    assert 2 <= failed < N, "expected a blow-up after at least one good step"

    # the checkpoints of the steps before the blow-up are kept, whole, none after it
    listed = list_checkpoints(out)
    assert [s for s, _ in listed] == [failed - 1, failed - 2, failed - 3][:min(3, failed - 1)]
    good, good_attrs = read_checkpoint(listed[0][1])
    assert good_attrs["step"] == failed - 1 and np.isfinite(good["params"]).all()
    # the failed state holds the parameters the non-finite loss was computed at: those after
    # step failed - 1, i.e. the last checkpoint's
    state, state_attrs = read_checkpoint(failed_files[0])
    assert state_attrs["step"] == failed and "failure" in state_attrs
    assert state["params"].tobytes() == good["params"].tobytes()

    m_attrs, rows = read_metrics(out / "metrics.h5")
    assert m_attrs["status"] == "failed" and f"at step {failed}" in m_attrs["failure"]
    np.testing.assert_array_equal(rows["step"], np.arange(1, failed))
