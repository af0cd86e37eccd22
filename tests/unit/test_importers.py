"""Dataset builders: IDX parsing (hand-built files), MNIST, scikit-learn digits, synthetic."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from hessmpi.errors import UsageError
from hessmpi.importers import digits, mnist, read_idx, synthetic

T10K = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist-t10k"


def idx_images(pixels: np.ndarray) -> bytes:
    count, rows, cols = pixels.shape
    return struct.pack(">IIII", 0x00000803, count, rows, cols) + pixels.astype(np.uint8).tobytes()


def idx_labels(labels) -> bytes:
    labels = list(labels)
    return struct.pack(">II", 0x00000801, len(labels)) + struct.pack(f">{len(labels)}B", *labels)


def write(path: Path, data: bytes, compress: bool) -> Path:
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def rand_images(count, rows=3, cols=2, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, rows, cols), dtype=np.uint8)


# ----- read_idx -------------------------------------------------------------------------------
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_images(tmp_path, compress):
    # pixel (i, r, c) = 7*i + 3*r + c, written in row-major order by hand
    count, rows, cols = 4, 3, 5
    body = bytes((7 * i + 3 * r + c) % 256 for i in range(count) for r in range(rows)
                 for c in range(cols))
    data = struct.pack(">IIII", 0x803, count, rows, cols) + body
    arr = read_idx(write(tmp_path / "img.idx", data, compress))
    assert arr.shape == (count, rows, cols) and arr.dtype == np.uint8
    for i in range(count):
        for r in range(rows):
            for c in range(cols):
                assert arr[i, r, c] == (7 * i + 3 * r + c) % 256


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_labels(tmp_path, compress):
    labels = [3, 0, 9, 255, 1]
    arr = read_idx(write(tmp_path / "lab.idx", idx_labels(labels), compress))
    assert arr.dtype == np.uint8
    assert arr.tolist() == labels


def test_read_idx_empty(tmp_path):
    assert read_idx(write(tmp_path / "e", idx_labels([]), False)).shape == (0,)
    data = struct.pack(">IIII", 0x803, 0, 28, 28)
    assert read_idx(write(tmp_path / "i", data, True)).shape == (0, 28, 28)


def expect_idx_error(path, needle=None):
    with pytest.raises(UsageError) as exc:
        read_idx(path)
    msg = str(exc.value)
    assert str(path) in msg
    if needle:
        assert needle in msg.replace(str(path), "")


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("magic", [0x00000802, 0x00000D03, 0x08030000, 0x00000804, 0])
def test_read_idx_bad_magic(tmp_path, magic, compress):
    data = struct.pack(">II", magic, 3) + bytes(3)
    expect_idx_error(write(tmp_path / "bad", data, compress), needle="magic")


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("case", ["short_images", "long_images", "short_labels", "long_labels",
                                  "count_too_big", "tiny", "empty", "no_image_header"])
def test_read_idx_size_mismatch(tmp_path, case, compress):
    img = idx_images(rand_images(4))
    lab = idx_labels([1, 2, 3, 4])
    data = {
        "short_images": img[:-1],
        "long_images": img + b"\0",
        "short_labels": lab[:-2],
        "long_labels": lab + b"\0\0",
        "count_too_big": struct.pack(">II", 0x801, 5) + bytes(4),
        "tiny": struct.pack(">I", 0x801) + b"\0\0",
        "empty": b"",
        "no_image_header": struct.pack(">III", 0x803, 4, 3),
    }[case]
    expect_idx_error(write(tmp_path / "f", data, compress))


def test_read_idx_missing_file(tmp_path):
    expect_idx_error(tmp_path / "absent.gz")


def compressible_gzip():
    pixels = np.tile(np.arange(16, dtype=np.uint8), 400).reshape(100, 8, 8)
    return gzip.compress(idx_images(pixels))


@pytest.mark.parametrize("damage", ["truncated", "crc", "length"])
def test_read_idx_damaged_gzip(tmp_path, damage):
    gz = bytearray(compressible_gzip())
    if damage == "truncated":
        gz = gz[:len(gz) // 2]
    elif damage == "crc":
        gz[-6] ^= 0xFF
    else:
        gz[-2] ^= 0xFF
    expect_idx_error(write(tmp_path / "damaged.gz", bytes(gz), False))


def test_read_idx_corrupt_deflate_stream(tmp_path):
    gz = bytearray(compressible_gzip())
    gz[10] ^= 0xFF  # first byte of the deflate stream after the 10-byte gzip header
    expect_idx_error(write(tmp_path / "corrupt.gz", bytes(gz), False))


# ----- mnist ----------------------------------------------------------------------------------
@pytest.fixture
def idx_files(tmp_path):
    px = rand_images(10, 4, 4, seed=1)
    lab = np.arange(10) % 10
    tpx = rand_images(3, 4, 4, seed=2)
    tlab = [9, 8, 7]
    files = {
        "images": write(tmp_path / "train-images.gz", idx_images(px), True),
        "labels": write(tmp_path / "train-labels.gz", idx_labels(lab), True),
        "test_images": write(tmp_path / "test-images", idx_images(tpx), False),
        "test_labels": write(tmp_path / "test-labels", idx_labels(tlab), False),
    }
    return files, (px, lab, tpx, tlab)


def check_pair(split, pixels, labels):
    x, y = split
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert x.shape == (len(pixels), pixels.shape[1] * pixels.shape[2])
    np.testing.assert_allclose(x, pixels.reshape(len(pixels), -1) / 255.0, rtol=1e-6, atol=0)
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert y.tolist() == list(labels)


def test_mnist_with_test_files(idx_files):
    files, (px, lab, tpx, tlab) = idx_files
    train, test, attrs = mnist(files["images"], files["labels"], files["test_images"],
                               files["test_labels"])
    check_pair(train, px, lab)
    check_pair(test, tpx, tlab)
    assert attrs["n_classes"] == 10


@pytest.mark.parametrize("n_train", [1, 6, 9])
def test_mnist_split_without_test_files(idx_files, n_train):
    files, (px, lab, _, _) = idx_files
    train, test, attrs = mnist(files["images"], files["labels"], n_train=n_train)
    check_pair(train, px[:n_train], lab[:n_train])
    check_pair(test, px[n_train:], lab[n_train:])
    assert str(n_train) in attrs["description"]


def test_mnist_pixel_extremes(tmp_path):
    px = np.array([[[0, 255], [51, 102]]], dtype=np.uint8).repeat(2, axis=0)
    img = write(tmp_path / "i", idx_images(px), False)
    lab = write(tmp_path / "l", idx_labels([0, 1]), False)
    (x, _), _, _ = mnist(img, lab, n_train=1)
    assert x[0].tolist() == [0.0, 1.0, np.float32(0.2), np.float32(0.4)]


@pytest.mark.parametrize("n_train", [0, 10, 11, -1])
def test_mnist_bad_n_train(idx_files, n_train):
    files, _ = idx_files
    with pytest.raises(UsageError, match="n-train"):
        mnist(files["images"], files["labels"], n_train=n_train)


def test_mnist_mismatched_counts(idx_files, tmp_path):
    files, _ = idx_files
    short = write(tmp_path / "short-labels", idx_labels([1, 2, 3]), False)
    with pytest.raises(UsageError) as exc:
        mnist(files["images"], short, n_train=2)
    assert "10 images" in str(exc.value) and "3 labels" in str(exc.value)
    two = write(tmp_path / "two-labels", idx_labels([1, 2]), False)
    with pytest.raises(UsageError) as exc:
        mnist(files["images"], files["labels"], files["test_images"], two)
    assert "3 images" in str(exc.value) and "2 labels" in str(exc.value)


def test_mnist_swapped_or_bad_files(idx_files, tmp_path):
    files, _ = idx_files
    with pytest.raises(UsageError, match="labels, not images"):
        mnist(files["labels"], files["labels"])
    with pytest.raises(UsageError, match="images, not labels"):
        mnist(files["images"], files["images"])
    big = write(tmp_path / "big-labels", idx_labels([1] * 9 + [10]), False)
    with pytest.raises(UsageError, match="above 9"):
        mnist(files["images"], big)
    with pytest.raises(UsageError, match="both"):
        mnist(files["images"], files["labels"], test_images=files["test_images"])


@pytest.mark.skipif(not T10K.is_dir(), reason="shared MNIST t10k files not present")
def test_real_mnist_t10k():
    x = read_idx(T10K / "t10k-images-idx3-ubyte.gz")
    y = read_idx(T10K / "t10k-labels-idx1-ubyte.gz")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (10000,)
    assert sorted(set(y.tolist())) == list(range(10))
    # the well-known first labels and class counts of the MNIST test set
    assert y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert x.min() == 0 and x.max() == 255
    train, test, _ = mnist(T10K / "t10k-images-idx3-ubyte.gz", T10K / "t10k-labels-idx1-ubyte.gz")
    assert train[0].shape == (8000, 784) and test[0].shape == (2000, 784)
    assert train[1].tolist() == y[:8000].tolist() and test[1].tolist() == y[8000:].tolist()
    assert train[0].min() == 0.0 and train[0].max() == 1.0


# ----- digits ---------------------------------------------------------------------------------
def sorted_rows(x, y):
    table = np.column_stack([np.asarray(x, np.float64), y])
    return table[np.lexsort(table.T[::-1])]


def test_digits_split_and_values():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    (x, y), (xt, yt), attrs = digits()
    assert len(y) + len(yt) == 1797
    assert len(yt) == 359 and len(y) == 1438  # round(0.2 * 1797) test rows
    assert x.shape == (1438, 64) and xt.shape == (359, 64)
    assert x.dtype == xt.dtype == np.float32 and y.dtype == yt.dtype == np.int64
    both = np.concatenate([x, xt])
    assert both.min() == 0.0 and both.max() == 1.0
    np.testing.assert_array_equal(both * 16, np.round(both * 16))  # levels 0..16 / 16
    assert set(np.concatenate([y, yt]).tolist()) == set(range(10))
    assert attrs["n_classes"] == 10
    # the split is a permutation of the original set
    bunch = sklearn_datasets.load_digits()
    np.testing.assert_array_equal(sorted_rows(both, np.concatenate([y, yt])),
                                  sorted_rows(bunch.data / 16.0, bunch.target))
    # shuffled, not the original order
    assert not np.array_equal(y[:50], bunch.target[:50])


def test_digits_seed_and_fraction():
    pytest.importorskip("sklearn")
    a, b = digits(seed=3), digits(seed=3)
    np.testing.assert_array_equal(a[0][0], b[0][0])
    np.testing.assert_array_equal(a[1][1], b[1][1])
    c = digits(seed=4)
    assert not np.array_equal(a[0][1], c[0][1])
    (x, _), (xt, _), _ = digits(test_fraction=0.5)
    assert len(xt) in (898, 899) and len(x) + len(xt) == 1797


# ----- synthetic ------------------------------------------------------------------------------
def test_synthetic_shapes_and_reproducibility():
    (x, y), (xt, yt), attrs = synthetic(n_train=300, n_test=120, features=7, classes=4, seed=5)
    assert x.shape == (300, 7) and xt.shape == (120, 7)
    assert x.dtype == xt.dtype == np.float32 and y.dtype == yt.dtype == np.int64
    assert set(y.tolist()) == set(range(4)) and set(yt.tolist()) <= set(range(4))
    assert attrs["n_classes"] == 4
    (x2, y2), (xt2, yt2), _ = synthetic(n_train=300, n_test=120, features=7, classes=4, seed=5)
    for u, v in ((x, x2), (y, y2), (xt, xt2), (yt, yt2)):
        np.testing.assert_array_equal(u, v)
    (x3, _), _, _ = synthetic(n_train=300, n_test=120, features=7, classes=4, seed=6)
    assert not np.array_equal(x, x3)
    assert not np.array_equal(x[:120], xt)


@pytest.mark.parametrize("cond", [1.0, 10.0, 100.0, 1000.0])
def test_synthetic_covariance_condition_number(cond):
    (x, _), _, _ = synthetic(n_train=40000, n_test=1, features=8, classes=3, cond=cond,
                             separation=0.0, seed=1)
    eig = np.linalg.eigvalsh(np.cov(x.astype(np.float64), rowvar=False))
    assert eig.max() / eig.min() == pytest.approx(cond, rel=0.2)
    # largest variance is 1 (the unscaled direction), smallest 1/cond
    assert eig.max() == pytest.approx(1.0, rel=0.1)
    assert eig.min() == pytest.approx(1.0 / cond, rel=0.1)


def test_synthetic_class_means_on_sphere():
    separation = 3.0
    (x, y), _, _ = synthetic(n_train=60000, n_test=1, features=6, classes=3, cond=1.0,
                             separation=separation, seed=2)
    for k in range(3):
        mean = x[y == k].astype(np.float64).mean(axis=0)
        assert np.linalg.norm(mean) == pytest.approx(separation, abs=0.1)


@pytest.mark.parametrize("kwargs", [dict(features=0), dict(classes=1), dict(n_train=0),
                                    dict(n_test=0), dict(cond=0.5), dict(cond=float("nan"))])
def test_synthetic_bad_arguments(kwargs):
    with pytest.raises(UsageError):
        synthetic(**kwargs)
