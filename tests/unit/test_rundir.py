"""hessmpi.rundir: the lock of a run directory (who holds it, stale locks, other hosts) and
the rule that a new run only starts where no other run left results or checkpoints."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import threading
import time

import h5py
import pytest

from hessmpi.checkpoint import checkpoint_path, write_checkpoint
from hessmpi.errors import UsageError
from hessmpi.rundir import LOCK, RunLock, abandoned, claim


def holder(**changes) -> dict:
    """What a lock file of this process holds, with ``changes``."""
    return {**RunLock("unused").me, **changes}


def write_lock(out, content) -> None:
    out.mkdir(exist_ok=True)
    (out / LOCK).write_text(content if isinstance(content, str) else json.dumps(content))


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_the_lock_names_its_holder_and_goes_on_release(tmp_path):
    lock = RunLock(tmp_path).take()
    held = json.loads((tmp_path / LOCK).read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    assert held["command"].startswith("hessmpi") and held["since"]
    lock.release()
    lock.release()
    assert not (tmp_path / LOCK).exists()


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    first = RunLock(tmp_path).take()
    with pytest.raises(UsageError) as info:
        RunLock(tmp_path).take()
    message = str(info.value)
    assert f"pid {os.getpid()}" in message and socket.gethostname() in message, message
    assert "in use" in message
    first.release()
    RunLock(tmp_path).take().release()


@pytest.mark.parametrize("how", ["dead pid", "pid reused", "rebooted"])
def test_a_stale_lock_on_this_host_is_taken_over_with_a_warning(tmp_path, capsys, how):
    stale = holder(**{"dead pid": {"pid": dead_pid()}, "pid reused": {"start": "0"},
                      "rebooted": {"boot": "another boot"}}[how])
    write_lock(tmp_path, stale)
    assert abandoned(tmp_path)
    lock = RunLock(tmp_path).take()
    warning = capsys.readouterr().err
    assert "stale lock" in warning and f"pid {stale['pid']}" in warning, warning
    assert json.loads((tmp_path / LOCK).read_text()) == lock.me
    assert not abandoned(tmp_path)
    lock.release()


def test_an_earlier_attempt_of_this_requeued_slurm_job_is_taken_over(tmp_path, capsys,
                                                                     monkeypatch):
    """SLURM starts a requeued job's next attempt only after the last one ended, on
    whichever node: its lock is stale even from another host."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    for refused in (holder(host="node-a", slurm_job="77", slurm_restart=2),   # this attempt
                    holder(host="node-a", slurm_job="78", slurm_restart=0)):  # another job
        write_lock(tmp_path, refused)
        with pytest.raises(UsageError, match="cannot be checked from this host"):
            RunLock(tmp_path).take()
    write_lock(tmp_path, holder(host="node-a", slurm_job="77", slurm_restart=1))
    lock = RunLock(tmp_path).take()
    assert "took over the stale lock" in capsys.readouterr().err
    assert lock.me["slurm_job"] == "77" and lock.me["slurm_restart"] == 2
    lock.release()


def test_a_takeover_left_unfinished_is_refused_saying_what_to_remove(tmp_path):
    write_lock(tmp_path, holder(pid=dead_pid()))
    (tmp_path / f"{LOCK}.takeover").write_text("")
    with pytest.raises(UsageError, match=f"{LOCK}.takeover behind.*remove {tmp_path / LOCK} and"):
        RunLock(tmp_path).take()


def test_a_lock_from_another_host_is_refused_saying_how_to_remove_it(tmp_path):
    write_lock(tmp_path, holder(host="node-elsewhere", pid=dead_pid()))
    with pytest.raises(UsageError) as info:
        RunLock(tmp_path).take()
    message = str(info.value)
    assert "node-elsewhere" in message and f"remove {tmp_path / LOCK}" in message, message
    assert not abandoned(tmp_path)


@pytest.mark.parametrize("content", ["", "{not json", '{"host": "h"}', "[1, 2]"])
def test_an_unreadable_lock_is_refused_saying_how_to_remove_it(tmp_path, content):
    write_lock(tmp_path, content)
    with pytest.raises(UsageError, match=f"cannot be read.*remove {tmp_path / LOCK}"):
        RunLock(tmp_path).take()
    assert (tmp_path / LOCK).read_text() == content


def test_a_lock_being_written_this_instant_is_read_once_written(tmp_path):
    """Created (O_EXCL) and then written: a second run starting at the same instant waits
    for the content instead of calling the lock unreadable."""
    write_lock(tmp_path, "")
    threading.Timer(0.2, write_lock, (tmp_path, holder())).start()
    with pytest.raises(UsageError, match="in use by"):
        RunLock(tmp_path).take()


def test_release_leaves_a_lock_that_is_not_its_own(tmp_path):
    lock = RunLock(tmp_path).take()
    other = holder(pid=1, since="later")
    write_lock(tmp_path, other)
    lock.release()
    assert json.loads((tmp_path / LOCK).read_text()) == other


def _contend(out, ready, results):
    ready.wait()
    try:
        lock = RunLock(out).take()
    except UsageError:
        results.put("refused")
        return
    results.put("took")
    time.sleep(1.0)
    lock.release()


@pytest.mark.parametrize("stale", [False, True])
def test_of_processes_racing_for_a_lock_exactly_one_takes_it(tmp_path, stale):
    if stale:
        write_lock(tmp_path, holder(pid=dead_pid()))
    ctx = multiprocessing.get_context("fork")
    ready, results = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(tmp_path, ready, results)) for _ in range(6)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=30) for _ in procs)
    for p in procs:
        p.join(30)
    assert outcomes == ["refused"] * 5 + ["took"]


# ----- claim: a new run only in an unused directory ---------------------------------------

def test_claim_creates_the_directory_and_removes_it_if_left_empty(tmp_path):
    out = tmp_path / "a" / "run"
    lock = claim(out, resuming=False)
    assert (out / LOCK).is_file()
    lock.release()
    assert not out.exists()


def test_a_new_run_refuses_another_runs_results(tmp_path):
    (tmp_path / "metrics.h5").write_bytes(b"earlier run")
    with pytest.raises(UsageError, match="already holds a run"):
        claim(tmp_path, resuming=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.h5"]


def test_a_new_run_refuses_another_runs_checkpoints(tmp_path):
    for step in (225, 240):
        write_checkpoint(checkpoint_path(tmp_path, step), {"params": [0.0]}, {"step": step})
    with pytest.raises(UsageError) as info:
        claim(tmp_path, resuming=False)
    message = str(info.value)
    for needle in ("checkpoints of another run", "ckpt_000000225.h5", "ckpt_000000240.h5",
                   "another --out", f"--resume {tmp_path}"):
        assert needle in message, message
    assert not (tmp_path / LOCK).exists()


def test_a_resume_needs_an_existing_directory(tmp_path):
    with pytest.raises(UsageError, match="no run to resume"):
        claim(tmp_path / "missing", resuming=True)
    assert not (tmp_path / "missing").exists()


def test_a_resume_claims_a_directory_with_a_run(tmp_path):
    with h5py.File(tmp_path / "metrics.h5", "w"):
        pass
    lock = claim(tmp_path, resuming=True)
    with pytest.raises(UsageError, match="in use"):
        claim(tmp_path, resuming=True)
    lock.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.h5"]
