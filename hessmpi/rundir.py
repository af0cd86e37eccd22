"""Run directories: one run at a time in each (a lock), and a new run only where no other
run left results or checkpoints.

Rank 0 takes the lock, OUT/hessmpi.lock, before anything is written in OUT, and releases it
on every exit it sees. The lock file says who holds it (host, pid, the process's start, the
SLURM job, the command, since when), so a second ``train`` or ``--resume`` on OUT is refused
naming the holder. A lock whose process is known to have ended is stale and is taken over
with a warning: one from a process gone from this host (a run ended by SIGKILL, or by
MPI_Abort from another rank), or from an earlier attempt of this requeued SLURM job. Any
other lock from another host cannot be checked from here: the message says how to remove
it. Readers (``report``) take no lock.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from hessmpi.checkpoint import list_checkpoints
from hessmpi.errors import UsageError

LOCK = "hessmpi.lock"


def _started(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks after boot: /proc/PID/stat field 22), or
    None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _slurm_attempt() -> tuple[str | None, int]:
    """(SLURM job id, restart count) of this process; (None, 0) outside SLURM."""
    return os.environ.get("SLURM_JOB_ID"), int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def _gone(holder: dict) -> bool:
    """Whether the process that took a lock is known to have ended: an earlier attempt of
    this requeued SLURM job (SLURM starts an attempt after the last one ended), or a process
    of this host, which has rebooted since or has no process of that pid and start time."""
    job, restart = _slurm_attempt()
    if job is not None and holder.get("slurm_job") == job \
            and holder.get("slurm_restart", 0) < restart:
        return True
    if holder.get("host") != socket.gethostname() or _started(os.getpid()) is None:
        return False
    return holder.get("boot") != _boot_id() or _started(holder["pid"]) != holder.get("start")


def _read(path: Path) -> tuple[str | None, dict | None]:
    """(text, holder) of lock file ``path``: (None, None) if there is none, holder None if it
    cannot be read or is not a lock."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError):
        return "", None
    try:
        holder = json.loads(text)
    except ValueError:
        return text, None
    return text, holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) \
        else None


def _read_settled(path: Path) -> tuple[str | None, dict | None]:
    """``_read``, waiting up to a second for a lock that another process is writing."""
    for _ in range(20):
        text, holder = _read(path)
        if text is None or holder is not None:
            break
        time.sleep(0.05)
    return text, holder


def _refusal(out: Path, path: Path, holder: dict | None) -> str:
    if holder is None:
        return (f"{out} is locked: {path} exists but cannot be read (a run starting this "
                f"instant, or a damaged lock); if no run uses {out}, remove {path}")
    who = (f"'{holder.get('command')}' (pid {holder['pid']} on host {holder.get('host')}, "
           f"since {holder.get('since')})")
    if _gone(holder):
        return (f"{out} is locked by {who}, which is no longer running, and the stale lock "
                f"could not be taken over (another process is taking it over, or left "
                f"{path}.takeover behind); remove {path} and {path}.takeover and try again")
    if holder.get("host") != socket.gethostname():
        return (f"{out} is in use by {who}; whether it still runs cannot be checked from this "
                f"host: if it does not, remove {path} and try again")
    return f"{out} is in use by {who}; wait for it to end, or choose another --out"


class RunLock:
    """The lock of run directory ``out`` for this process. ``created``: this run made
    ``out``, so releasing the lock also removes it if nothing else was written there."""

    def __init__(self, out: Path, created: bool = False):
        self.out, self.path, self.created = Path(out), Path(out) / LOCK, created
        pid = os.getpid()
        job, restart = _slurm_attempt()
        self.me = {"host": socket.gethostname(), "pid": pid, "start": _started(pid),
                   "boot": _boot_id(), "slurm_job": job, "slurm_restart": restart,
                   "since": datetime.now(UTC).isoformat(timespec="seconds"),
                   "command": " ".join(["hessmpi", *sys.argv[1:]])}

    def take(self) -> RunLock:
        """Create the lock file; UsageError naming the holder if another run has it."""
        while True:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                text, holder = _read_settled(self.path)
                if text is None:          # released meanwhile: try again
                    continue
                if holder is None or not _gone(holder):
                    raise UsageError(_refusal(self.out, self.path, holder)) from None
                if self._remove_stale(text):
                    print(f"hessmpi: warning: took over the stale lock {self.path} of "
                          f"'{holder.get('command')}' (pid {holder['pid']} on host "
                          f"{holder.get('host')}, since {holder.get('since')}), which is no "
                          "longer running", file=sys.stderr, flush=True)
                continue                  # taken over, or changed meanwhile: look again
            except OSError as e:
                raise UsageError(f"cannot write in {self.out}: {e.strerror}") from None
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            return self

    def _remove_stale(self, text: str) -> bool:
        """Remove the lock file if it still reads ``text`` (False if it changed meanwhile).
        Takeovers take turns through the guard file LOCK.takeover (created O_EXCL, removed
        after), so that two of them never remove each other's new lock; UsageError if the
        guard stays taken."""
        guard = self.path.with_name(f"{LOCK}.takeover")
        try:
            for _ in range(40):
                try:
                    os.close(os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                    break
                except FileExistsError:
                    time.sleep(0.05)
            else:
                raise UsageError(_refusal(self.out, self.path, _read(self.path)[1]))
            try:
                if _read(self.path)[0] != text:
                    return False
                self.path.unlink()
                return True
            finally:
                guard.unlink(missing_ok=True)
        except OSError as e:
            raise UsageError(f"cannot take over the stale lock {self.path}: {e.strerror}") \
                from None

    def release(self) -> None:
        """Remove the lock if it is still this process's (safe to call more than once)."""
        if _read(self.path)[1] == self.me:
            self.path.unlink(missing_ok=True)
        if self.created:
            try:
                self.out.rmdir()
            except OSError:
                pass


def claim(out: Path, *, resuming: bool) -> RunLock:
    """Lock run directory ``out`` for a resumed run, or for a new one (``out`` created if
    missing, and refused if it holds another run's results or checkpoints): UsageError
    otherwise, with nothing left behind."""
    out = Path(out)
    if resuming:
        if not out.is_dir():
            raise UsageError(f"{out} holds no run to resume (no such directory)")
        lock = RunLock(out)
    else:
        lock = RunLock(out, created=not out.exists())
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create output directory {out}: {e.strerror}") from None
    try:
        lock.take()
        if not resuming:
            _check_unused(out)
    except UsageError:
        lock.release()
        raise
    return lock


def claim_on_rank0(comm, out: Path, *, resuming: bool) -> RunLock | None:
    """``claim`` on rank 0 of ``comm``: the lock there, None elsewhere; UsageError on every
    rank if rank 0 cannot claim ``out``."""
    return comm.collectively(lambda: claim(out, resuming=resuming) if comm.rank == 0 else None)


def _check_unused(out: Path) -> None:
    if (out / "metrics.h5").exists():
        raise UsageError(f"{out} already holds a run (metrics.h5); choose another --out "
                         f"or continue it with --resume {out}")
    found = list_checkpoints(out)
    if found:
        raise UsageError(f"{out} holds checkpoints of another run ({len(found)} files, "
                         f"{found[-1][1].name} to {found[0][1].name}) but no metrics.h5: a new "
                         "run would mix its checkpoints with them; choose another --out, or "
                         f"continue them with --resume {out}")


def abandoned(out: Path) -> bool:
    """Whether no process can be writing run directory ``out``: it has no lock, or the
    process holding it is gone from this host."""
    text, holder = _read(Path(out) / LOCK)
    return text is None or (holder is not None and _gone(holder))
