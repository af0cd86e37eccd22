"""HDF5 datasets (format in data/README.md), per-rank shards, and the deterministic sampler.

A dataset file holds ``train/x`` (N, d) float32, ``train/y`` (N,) int64 class labels in
[0, n_classes), the same under ``test/``, and root attributes ``source``, ``n_classes``,
``description``, and for images ``image_shape`` ((height, width) or (height, width,
channels): each row of x is an image in that row-major order). Each rank reads only its
own contiguous slab of rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hessmpi.errors import UsageError

FORMAT_VERSION = 1


@dataclass
class Shard:
    """One rank's rows of one split. x: (rows, d) host array; y: (rows,) int64;
    offset: index of the first row in the file; total: rows of the split in the file;
    image_shape: (height, width[, channels]) of the rows as images, None if not images."""

    x: np.ndarray
    y: np.ndarray
    offset: int
    total: int
    n_classes: int
    source: str
    image_shape: tuple[int, ...] | None = None


def write_dataset(path: str | Path, train: tuple[np.ndarray, np.ndarray],
                  test: tuple[np.ndarray, np.ndarray], *, source: str, description: str,
                  n_classes: int, image_shape: tuple[int, ...] | None = None) -> None:
    """Write a dataset file atomically (a temporary name, then rename into place);
    ``image_shape``: (height, width[, channels]) of each row, for image data."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs.update(source=source, description=description, n_classes=int(n_classes),
                           format_version=FORMAT_VERSION)
            if image_shape is not None:
                f.attrs["image_shape"] = np.asarray(image_shape, dtype=np.int64)
            for split, (x, y) in (("train", train), ("test", test)):
                g = f.create_group(split)
                g.create_dataset("x", data=np.ascontiguousarray(x, dtype=np.float32))
                g.create_dataset("y", data=np.asarray(y, dtype=np.int64))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def shard_bounds(total: int, rank: int, size: int, equal: bool) -> tuple[int, int]:
    """Rows [start, stop) of ``rank``'s slab. ``equal``: every rank gets total // size rows
    (the remainder is left out, so ranks step through epochs in lockstep); otherwise the
    first total % size ranks get one row more, and every row is covered."""
    if equal:
        rows = total // size
        return rank * rows, (rank + 1) * rows
    base, extra = divmod(total, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def read_shard(path: str | Path, split: str, rank: int, size: int, *, equal: bool) -> Shard:
    """Read ``rank``'s slab of ``split`` ("train" or "test"); raise UsageError naming the file
    and the problem if it is missing, not HDF5, or not laid out as data/README.md says."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"dataset {path} does not exist (make one with 'hessmpi data ...')")
    try:
        with h5py.File(path, "r") as f:
            for name in (f"{split}/x", f"{split}/y"):
                if name not in f:
                    raise UsageError(f"dataset {path} has no '{name}': not a hessmpi dataset "
                                     "(see data/README.md)")
            x, y = f[f"{split}/x"], f[f"{split}/y"]
            if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
                raise UsageError(f"dataset {path}: {split}/x {x.shape} and {split}/y {y.shape} "
                                 "must be (N, d) and (N,)")
            n_classes = int(f.attrs.get("n_classes", 0))
            if n_classes < 2:
                raise UsageError(f"dataset {path}: root attribute n_classes missing or < 2")
            _check_split(path, f, split, size, equal)
            start, stop = shard_bounds(x.shape[0], rank, size, equal)
            xs = x[start:stop]
            ys = _labels(path, split, y[start:stop])
            source = str(f.attrs.get("source", "unknown"))
            image_shape = f.attrs.get("image_shape")
    except UsageError:
        raise
    except (OSError, KeyError, ValueError) as e:
        raise UsageError(f"dataset {path} cannot be read: {e}") from None
    if ys.size and (ys.min() < 0 or ys.max() >= n_classes):
        raise UsageError(f"dataset {path}: {split}/y holds labels outside [0, {n_classes})")
    if not np.isfinite(xs).all():
        raise UsageError(f"dataset {path}: {split}/x holds non-finite values")
    if image_shape is not None:
        image_shape = tuple(int(v) for v in np.atleast_1d(image_shape))
        if (len(image_shape) not in (2, 3) or min(image_shape) < 1
                or int(np.prod(image_shape)) != xs.shape[1]):
            raise UsageError(f"dataset {path}: root attribute image_shape {image_shape} is "
                             f"not (height, width[, channels]) of its {xs.shape[1]} features")
    return Shard(x=xs, y=ys, offset=start, total=int(x.shape[0]), n_classes=n_classes,
                 source=source, image_shape=image_shape)


def _check_split(path: Path, f, split: str, size: int, equal: bool) -> None:
    """UsageError if ``split`` of open file ``f`` cannot be used on ``size`` ranks: empty,
    fewer rows than ranks where each rank needs its own (``equal``), or a width other than
    the training split's."""
    rows, width = f[f"{split}/x"].shape
    if rows == 0:
        raise UsageError(f"dataset {path}: the {split} split is empty (0 rows)")
    if equal and rows < size:
        raise UsageError(f"dataset {path}: the {split} split has {rows} rows, fewer than the "
                         f"{size} ranks (each rank needs at least one)")
    train_width = f["train/x"].shape[1] if "train/x" in f else width
    if width != train_width:
        raise UsageError(f"dataset {path}: {split}/x has {width} features per row but "
                         f"train/x has {train_width}; both splits need the same features")


def _labels(path: Path, split: str, y: np.ndarray) -> np.ndarray:
    """Labels as int64; UsageError if they are not whole numbers (class indices)."""
    if y.dtype.kind in "iub":
        return y.astype(np.int64)
    whole = (np.isfinite(y) & (y == np.round(y)) if y.dtype.kind == "f"
             else np.zeros(y.shape, dtype=bool))
    if not whole.all():
        raise UsageError(f"dataset {path}: {split}/y holds {y[~whole][0]!r} ({y.dtype}): "
                         "labels must be class indices, whole numbers")
    return y.astype(np.int64)


def overlap_rows(fraction: float, batch_size: int) -> int:
    """O: rows of a batch of ``batch_size`` that ``fraction`` of it (optim.overlap) shares
    with the next batch."""
    return round(fraction * batch_size)


class Sampler:
    """Minibatches of one rank's shard without replacement, reshuffled every epoch.

    The order depends only on (seed, rank, epoch): epoch e visits the shard in the order
    ``np.random.default_rng([seed, rank, e]).permutation(rows)``, ``batch_size`` rows at a
    time; the last rows that do not fill a batch are skipped. With ``overlap`` O > 0 rows
    (at most half the batch) consecutive batches share O rows: a batch is the last O rows
    of the one before, then batch_size - O fresh rows (the first batch: batch_size fresh
    rows); epochs count fresh rows. State: (epoch, position); the shared rows are the last
    O fresh rows drawn, so they follow from it.
    """

    def __init__(self, rows: int, batch_size: int, seed: int, rank: int, overlap: int = 0):
        if batch_size > rows:
            raise UsageError(f"train.batch_size = {batch_size} is larger than the {rows} "
                             "training rows of each rank's shard")
        if not 0 <= 2 * overlap <= batch_size:
            raise ValueError(f"overlap {overlap} is not within [0, batch_size / 2]")
        self.rows, self.batch_size, self.seed, self.rank = rows, batch_size, seed, rank
        self.overlap = overlap
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)
        self._shared = None      # the rows the next batch starts with

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, self.rank, epoch]).permutation(self.rows)

    def restore(self, epoch: int, position: int) -> None:
        """Continue from state (epoch, position), as saved in a checkpoint."""
        self.epoch, self.position = epoch, position
        self._order = self._permutation(epoch)
        # position 0: nothing drawn in this epoch (a start, or a resume on another rank
        # count): the next batch is all fresh rows
        drawn = self.overlap and position
        self._shared = self._order[position - self.overlap:position] if drawn else None

    def resize(self, batch_size: int) -> None:
        """Draw batches of ``batch_size`` (<= the shard's rows) from the next one on
        (progressive batching; not with overlap)."""
        if self.overlap or not 0 < batch_size <= self.rows:
            raise ValueError(f"cannot resize to {batch_size} rows (overlap {self.overlap}, "
                             f"{self.rows} rows)")
        self.batch_size = batch_size

    @property
    def epochs_done(self) -> float:
        """Fractional passes over the shard so far."""
        return self.epoch + self.position / self.rows

    def next(self) -> np.ndarray:
        """Row indices (into the shard) of the next minibatch, shape (batch_size,)."""
        fresh = self.batch_size - (0 if self._shared is None else self.overlap)
        if self.position + fresh > self.rows:
            self.epoch += 1
            self.position = 0
            self._order = self._permutation(self.epoch)
        idx = self._order[self.position:self.position + fresh]
        self.position += fresh
        if self.overlap:
            if self._shared is not None:
                idx = np.concatenate([self._shared, idx])
            self._shared = idx[self.batch_size - self.overlap:]
        return idx
