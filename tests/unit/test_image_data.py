"""Image datasets: the importers write image_shape (digits 8x8, MNIST and Fashion-MNIST
rows x cols of their IDX files), read_shard reads it back and refuses one that does not fit
the features; the cnn refuses a dataset without it."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from test_importers import idx_images, idx_labels, rand_images, write

from hessmpi.data import read_shard, write_dataset
from hessmpi.errors import UsageError
from hessmpi.importers import IDX_SETS, digits, mnist

FASHION = Path(__file__).resolve().parents[3] / "shared" / "data" / "fashion-mnist"


def idx_pair(tmp_path, name, count, rows, cols, seed=0):
    images = write(tmp_path / f"{name}-images.gz", idx_images(rand_images(count, rows, cols,
                                                                        seed)), True)
    labels = write(tmp_path / f"{name}-labels", idx_labels(np.arange(count) % 10), False)
    return images, labels


@pytest.mark.parametrize("kind", IDX_SETS)
def test_idx_importers_write_rows_by_cols(tmp_path, kind):
    images, labels = idx_pair(tmp_path, "train", 12, 5, 3)
    train, test, attrs = mnist(images, labels, n_train=8, kind=kind)
    assert attrs["image_shape"] == (5, 3) and train[0].shape == (8, 15)
    assert attrs["source"] == IDX_SETS[kind][0] and "5x3" in attrs["description"]
    path = tmp_path / "out.h5"
    write_dataset(path, train, test, **attrs)
    with h5py.File(path) as f:
        np.testing.assert_array_equal(f.attrs["image_shape"], [5, 3])
    assert read_shard(path, "test", 0, 1, equal=False).image_shape == (5, 3)


def test_test_images_of_another_size_are_refused(tmp_path):
    images, labels = idx_pair(tmp_path, "train", 6, 4, 4)
    t_images, t_labels = idx_pair(tmp_path, "test", 3, 4, 5)
    with pytest.raises(UsageError, match=r"\(4, 4\) images but .*\(4, 5\)"):
        mnist(images, labels, t_images, t_labels, kind="fashion-mnist")


def test_digits_are_8_by_8():
    pytest.importorskip("sklearn", reason="scikit-learn is not installed (hessmpi[data])")
    assert digits()[2]["image_shape"] == (8, 8)


@pytest.mark.skipif(not FASHION.is_dir(), reason=f"{FASHION} is not on this machine")
def test_the_fashion_mnist_test_files():
    train, test, attrs = mnist(FASHION / "t10k-images-idx3-ubyte.gz",
                               FASHION / "t10k-labels-idx1-ubyte.gz", n_train=9000,
                               kind="fashion-mnist")
    assert attrs["image_shape"] == (28, 28) and train[0].shape == (9000, 784)
    assert sorted(set(test[1].tolist())) == list(range(10))


def test_a_dataset_without_images_has_no_image_shape(tmp_path):
    path = tmp_path / "flat.h5"
    arrays = (np.zeros((4, 6), np.float32), np.zeros(4, np.int64))
    write_dataset(path, arrays, arrays, source="s", description="d", n_classes=2)
    assert read_shard(path, "train", 0, 1, equal=True).image_shape is None


@pytest.mark.parametrize("shape", [(2, 2), (7,), (2, 3, 2, 1), (0, 6)])
def test_an_image_shape_that_does_not_fit_is_refused(tmp_path, shape):
    path = tmp_path / "bad.h5"
    arrays = (np.zeros((4, 6), np.float32), np.zeros(4, np.int64))
    write_dataset(path, arrays, arrays, source="s", description="d", n_classes=2,
                  image_shape=shape)
    with pytest.raises(UsageError, match="image_shape"):
        read_shard(path, "train", 0, 1, equal=True)


@pytest.mark.parametrize("shape", [(2, 3), (3, 2, 1), (1, 2, 3)])
def test_an_image_shape_that_fits_is_read(tmp_path, shape):
    path = tmp_path / "ok.h5"
    arrays = (np.zeros((4, 6), np.float32), np.zeros(4, np.int64))
    write_dataset(path, arrays, arrays, source="s", description="d", n_classes=2,
                  image_shape=shape)
    assert read_shard(path, "train", 0, 1, equal=True).image_shape == shape
