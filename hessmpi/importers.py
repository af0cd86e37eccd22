"""Builders of dataset files: the scikit-learn digits, MNIST from IDX files, a synthetic problem.

Each returns ``(train, test, attrs)`` with ``train`` and ``test`` as ``(x, y)`` pairs, x
float32 (N, d) and y int64 (N,), ready for :func:`hessmpi.data.write_dataset`.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from hessmpi.errors import UsageError

IDX_IMAGES = 0x00000803
IDX_LABELS = 0x00000801


def digits(test_fraction: float = 0.2, seed: int = 0):
    """The UCI handwritten digits bundled in scikit-learn (1,797 images of 8x8, pixels 0..16,
    scaled to [0, 1]); a seeded shuffle, then the last ``test_fraction`` of rows are test."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UsageError("'hessmpi data digits' needs scikit-learn: "
                         "pip install 'hessmpi[data]'") from None
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    n_train = len(y) - int(round(test_fraction * len(y)))
    attrs = dict(source="scikit-learn load_digits (UCI optical recognition of handwritten "
                        "digits, test part)",
                 description=f"8x8 digits scaled to [0,1], shuffled with seed {seed}, "
                             f"{n_train} train / {len(y) - n_train} test",
                 n_classes=10, image_shape=(8, 8))
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:]), attrs


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (gzip-compressed or plain) of unsigned bytes: images (count, rows, cols)
    with magic 0x803, or labels (count,) with magic 0x801."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except OSError as e:
        raise UsageError(f"cannot read IDX file {path}: {e.strerror or e}") from None
    except (EOFError, gzip.BadGzipFile, zlib.error, ValueError) as e:
        raise UsageError(f"IDX file {path} is a damaged gzip file: {e}") from None
    if len(raw) < 8:
        raise UsageError(f"IDX file {path} is too short to hold a header")
    magic, count = struct.unpack(">II", raw[:8])
    if magic == IDX_IMAGES:
        if len(raw) < 16:
            raise UsageError(f"IDX file {path} is too short to hold an image header")
        rows, cols = struct.unpack(">II", raw[8:16])
        shape, header = (count, rows, cols), 16
    elif magic == IDX_LABELS:
        shape, header = (count,), 8
    else:
        raise UsageError(f"{path} is not an IDX file of unsigned bytes "
                         f"(magic {magic:#010x}, expected 0x00000803 or 0x00000801)")
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise UsageError(f"IDX file {path}: header says {size} bytes of data, "
                         f"file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _idx_pair(images: str | Path, labels: str | Path):
    """(x (N, rows*cols) float32 in [0, 1], y (N,) int64, (rows, cols)) of an IDX image
    and label file."""
    x = read_idx(images)
    y = read_idx(labels)
    if x.ndim != 3:
        raise UsageError(f"{images} holds labels, not images")
    if y.ndim != 1:
        raise UsageError(f"{labels} holds images, not labels")
    if len(x) != len(y):
        raise UsageError(f"{images} has {len(x)} images but {labels} has {len(y)} labels")
    if y.size and y.max() > 9:
        raise UsageError(f"{labels} holds labels above 9: not one of MNIST's 10 classes")
    return ((x.reshape(len(x), -1) / np.float32(255)).astype(np.float32), y.astype(np.int64),
            tuple(int(v) for v in x.shape[1:]))


#: The IDX image sets the mnist importer reads: (source, what the images are).
IDX_SETS = {
    "mnist": ("MNIST (LeCun, Cortes & Burges), IDX files", "digits"),
    "fashion-mnist": ("Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, Zalando), IDX files",
                      "images of clothing (10 classes)"),
}


def mnist(images, labels, test_images=None, test_labels=None, n_train: int = 8000,
          kind: str = "mnist"):
    """MNIST, or an image set in its IDX format (``kind``: a key of IDX_SETS, e.g.
    "fashion-mnist"), pixels scaled to [0, 1], with ``image_shape`` (rows, cols). With test
    files, those are the test split; without, the first ``n_train`` samples train and the
    rest test (the convention of ../shared/data for the 10,000-sample t10k files)."""
    source, what = IDX_SETS[kind]
    x, y, shape = _idx_pair(images, labels)
    if (test_images is None) != (test_labels is None):
        raise UsageError("give both --test-images and --test-labels, or neither")
    if test_images is not None:
        *test, test_shape = _idx_pair(test_images, test_labels)
        if test_shape != shape:
            raise UsageError(f"{images} holds {shape} images but {test_images} {test_shape}")
        train, test = (x, y), tuple(test)
        how = f"train from {Path(images).name}, test from {Path(test_images).name}"
    else:
        if not 0 < n_train < len(y):
            raise UsageError(f"--n-train {n_train} must be between 1 and {len(y) - 1} "
                             f"for {len(y)} samples")
        train, test = (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])
        how = f"first {n_train} of {Path(images).name} train, last {len(y) - n_train} test"
    attrs = dict(source=source, description=f"{shape[0]}x{shape[1]} {what} scaled to [0,1]; "
                 f"{how}", n_classes=10, image_shape=shape)
    return train, test, attrs


def synthetic(n_train: int = 4000, n_test: int = 1000, features: int = 50, classes: int = 5,
              cond: float = 100.0, separation: float = 2.0, seed: int = 0):
    """A seeded Gaussian-mixture classification problem whose feature covariance has
    condition number ``cond``: class means on a sphere of radius ``separation``, unit noise,
    then every sample multiplied by diag(s) with s log-spaced from 1 to 1/sqrt(cond) and
    rotated by a random orthogonal matrix (so the ill-conditioning is not axis-aligned)."""
    if features < 1 or classes < 2 or n_train < 1 or n_test < 1:
        raise UsageError("synthetic data needs features >= 1, classes >= 2, n-train and "
                         "n-test >= 1")
    if not cond >= 1.0:
        raise UsageError(f"--cond {cond} must be >= 1")
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((classes, features))
    means *= separation / np.linalg.norm(means, axis=1, keepdims=True)
    scale = np.logspace(0.0, -0.5 * np.log10(cond), features)
    rotation, _ = np.linalg.qr(rng.standard_normal((features, features)))

    def draw(n):
        y = rng.integers(0, classes, n)
        z = means[y] + rng.standard_normal((n, features))
        return ((z * scale) @ rotation.T).astype(np.float32), y.astype(np.int64)

    attrs = dict(source="hessmpi synthetic Gaussian mixture",
                 description=f"{classes} classes, {features} features, feature covariance "
                             f"condition number about {cond:g}, separation {separation:g}, "
                             f"seed {seed}",
                 n_classes=classes)
    return draw(n_train), draw(n_test), attrs
