"""Checkpoints: OUT/checkpoints/ckpt_STEP.h5, written atomically, verified before loading.

A checkpoint holds named arrays (``params``, ``optim/<name>``, ``sampler`` (P, 2): every
rank's (epoch, position)) and root attributes (format, step, config TOML, MPI size,
hessmpi version, model signature, counters) plus a BLAKE2b checksum over every array's name,
dtype, shape and bytes; a training checkpoint also carries the rows of OUT/metrics.h5 up to
its step (``metrics/<column>``), from which a damaged results file is rebuilt. It is written
to a temporary name in the same directory, sealed (``sealed``: a digest of the file's bytes,
checked before the file is opened), fsynced, then renamed into place, so a run killed at any
instant leaves the previous checkpoint whole.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from pathlib import Path

import numpy as np

from hessmpi.errors import UsageError
from hessmpi.metrics import read_metrics
from hessmpi.sealed import USERBLOCK, check, seal

FORMAT = "hessmpi-checkpoint-1"
NAME = re.compile(r"^ckpt_(\d+)\.h5$")


class CheckpointError(UsageError):
    """A checkpoint file that is damaged, truncated, foreign, or does not fit the run."""


def checkpoint_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def checkpoint_path(out: Path, step: int) -> Path:
    return checkpoint_dir(out) / f"ckpt_{step:09d}.h5"


def checksum(arrays: dict[str, np.ndarray]) -> str:
    """Hex BLAKE2b digest over the arrays' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.blake2b(digest_size=20)
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(memoryview(a).cast("B"))  # no copy (tobytes() would copy)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(path: Path, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    """Write ``arrays`` (host arrays) and ``attrs`` to ``path`` atomically, with checksum,
    sealed."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with h5py.File(tmp, "w", userblock_size=USERBLOCK) as f:
            for name, a in arrays.items():
                f.create_dataset(name, data=np.asarray(a))
            f.attrs.update(attrs)
            f.attrs["format"] = FORMAT
            f.attrs["checksum"] = checksum(arrays)
        seal(tmp, fsync=True)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def read_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, attrs) of a checkpoint whose seal and checksum verify; CheckpointError
    otherwise (an unsealed file, written by an older hessmpi, is opened unchecked)."""
    import h5py

    arrays: dict[str, np.ndarray] = {}
    try:
        check(path)
        with h5py.File(path, "r") as f:
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            if attrs.get("format") != FORMAT:
                raise CheckpointError(f"{path} is not a hessmpi checkpoint "
                                      f"(format {attrs.get('format')!r})")
            f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()])
                         if isinstance(obj, h5py.Dataset) else None)
    except CheckpointError:
        raise
    except UsageError as e:  # sealed.DamagedFile
        raise CheckpointError(str(e)) from None
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{path} cannot be read (damaged or truncated): {e}") from None
    if checksum(arrays) != attrs.get("checksum"):
        raise CheckpointError(f"{path} fails its checksum (damaged)")
    return arrays, attrs


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, path) of the files named like checkpoints under OUT/checkpoints, newest first."""
    d = checkpoint_dir(out)
    found = [(int(m.group(1)), p) for p in d.glob("ckpt_*.h5") if (m := NAME.match(p.name))]
    return sorted(found, reverse=True)


def newest_valid(out: Path, accept, warn) -> Path:
    """The newest checkpoint of run directory ``out`` that verifies and that
    ``accept(path, attrs)`` does not refuse (by raising CheckpointError); ``warn(message)``
    is called for each one skipped. CheckpointError if none is left."""
    listed = list_checkpoints(out)
    if not listed:
        raise CheckpointError(f"no checkpoint to resume from in {checkpoint_dir(out)}")
    for _, path in listed:
        try:
            _, attrs = read_checkpoint(path)
            accept(path, attrs)
            return path
        except CheckpointError as e:
            warn(f"skipping checkpoint: {e}")
    raise CheckpointError(f"no usable checkpoint in {checkpoint_dir(out)} "
                          f"({len(listed)} found, all damaged or foreign)")


class BackgroundWriter:
    """Writes one checkpoint at a time on a background thread, so training goes on while
    the file is written, checksummed and fsynced. ``submit`` takes arrays it may keep (the
    caller passes copies); ``wait`` joins the write in flight and re-raises its error."""

    def __init__(self, out: Path, keep: int):
        self.out, self.keep = Path(out), keep
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _write(self, path: Path, arrays: dict, attrs: dict) -> None:
        try:
            write_checkpoint(path, {**arrays, **results_rows(self.out, attrs["step"])}, attrs)
            prune(self.out, self.keep, attrs["step"])
        except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()
            self._error = e

    def submit(self, path: Path, arrays: dict, attrs: dict) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._write, args=(path, arrays, attrs),
                                        name="hessmpi-checkpoint", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def results_rows(out: Path, step: int) -> dict[str, np.ndarray]:
    """The rows of OUT/metrics.h5 up to ``step`` as checkpoint arrays ``metrics/<column>``;
    none if that file cannot be read (the checkpoint is written all the same)."""
    try:
        _, cols = read_metrics(Path(out) / "metrics.h5")
    except (OSError, UsageError):
        return {}
    upto = cols["step"] <= step
    return {f"metrics/{name}": c[upto] for name, c in cols.items()}


def prune(out: Path, keep: int, step: int) -> None:
    """After the checkpoint of ``step`` is in place: remove all but the ``keep`` newest
    checkpoints up to ``step`` (later ones, not of this run's history, are never removed),
    and the temporary files a writer killed mid-write left behind."""
    for _, path in [c for c in list_checkpoints(out) if c[0] <= step][keep:]:
        path.unlink(missing_ok=True)
    for tmp in checkpoint_dir(out).glob(".ckpt_*.h5.tmp*"):
        tmp.unlink(missing_ok=True)
