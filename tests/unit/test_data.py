"""Dataset files, per-rank shards and the deterministic minibatch sampler."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from hessmpi.data import Sampler, read_shard, shard_bounds, write_dataset
from hessmpi.errors import UsageError

COMBOS = [(total, size) for total in (0, 1, 2, 3, 5, 7, 10, 16, 17, 31, 64, 100, 1001)
          for size in (1, 2, 3, 4, 5, 7, 8, 13)]


# ----- shard_bounds ---------------------------------------------------------------------------
@pytest.mark.parametrize(("total", "size"), COMBOS)
def test_shard_bounds_unequal_covers_every_row(total, size):
    # reference: numpy's array_split gives the first total % size parts one row more
    parts = np.array_split(np.arange(total), size)
    covered = []
    for rank in range(size):
        start, stop = shard_bounds(total, rank, size, equal=False)
        np.testing.assert_array_equal(np.arange(start, stop), parts[rank])
        covered.extend(range(start, stop))
    assert covered == list(range(total))


@pytest.mark.parametrize(("total", "size"), COMBOS)
def test_shard_bounds_equal_gives_same_count_to_all(total, size):
    rows = total // size
    kept = np.arange(rows * size).reshape(size, rows)
    for rank in range(size):
        start, stop = shard_bounds(total, rank, size, equal=True)
        np.testing.assert_array_equal(np.arange(start, stop), kept[rank])
        assert stop <= total


# ----- write_dataset / read_shard ------------------------------------------------------------
def make_arrays(n, d, classes, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.integers(0, classes, n).astype(np.int32)


@pytest.fixture
def dataset(tmp_path):
    train = make_arrays(23, 4, 3, seed=1)
    test = make_arrays(9, 4, 3, seed=2)
    path = tmp_path / "sub" / "ds.h5"
    write_dataset(path, train, test, source="unit test", description="tiny", n_classes=3)
    return path, train, test


def test_write_dataset_layout_with_plain_h5py(dataset):
    path, (x, y), (xt, yt) = dataset
    assert sorted(p.name for p in path.parent.iterdir()) == ["ds.h5"]  # no temporary left
    with h5py.File(path, "r") as f:
        assert f.attrs["source"] == "unit test"
        assert f.attrs["description"] == "tiny"
        assert int(f.attrs["n_classes"]) == 3
        for split, (a, b) in (("train", (x, y)), ("test", (xt, yt))):
            assert f[f"{split}/x"].dtype == np.float32
            assert f[f"{split}/y"].dtype == np.int64
            np.testing.assert_array_equal(f[f"{split}/x"][()], a.astype(np.float32))
            np.testing.assert_array_equal(f[f"{split}/y"][()], b.astype(np.int64))


def test_write_dataset_replaces_existing(tmp_path):
    path = tmp_path / "ds.h5"
    write_dataset(path, make_arrays(5, 2, 2), make_arrays(3, 2, 2), source="a",
                  description="", n_classes=2)
    write_dataset(path, make_arrays(8, 2, 2, 5), make_arrays(4, 2, 2, 6), source="b",
                  description="", n_classes=2)
    shard = read_shard(path, "train", 0, 1, equal=False)
    assert shard.source == "b" and shard.total == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.h5"]


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
def test_read_shard_round_trip(dataset, split, size):
    path, train, test = dataset
    x, y = train if split == "train" else test
    n = len(y)
    xs, ys = [], []
    for rank in range(size):
        shard = read_shard(path, split, rank, size, equal=False)
        assert shard.x.dtype == np.float32 and shard.y.dtype == np.int64
        assert shard.x.ndim == 2 and shard.x.shape[1] == 4
        assert shard.x.shape[0] == shard.y.shape[0]
        assert shard.total == n and shard.n_classes == 3 and shard.source == "unit test"
        assert shard.offset == sum(len(a) for a in ys)
        xs.append(shard.x)
        ys.append(shard.y)
    np.testing.assert_array_equal(np.concatenate(xs), x.astype(np.float32))
    np.testing.assert_array_equal(np.concatenate(ys), y)
    # equal shards: each total // size rows, contiguous, the remainder left out
    rows = n // size
    for rank in range(size):
        shard = read_shard(path, split, rank, size, equal=True)
        assert shard.offset == rank * rows
        np.testing.assert_array_equal(shard.x, x[rank * rows:(rank + 1) * rows].astype(np.float32))
        np.testing.assert_array_equal(shard.y, y[rank * rows:(rank + 1) * rows])


def expect_usage_error(path, *args, needle=None, **kwargs):
    with pytest.raises(UsageError) as exc:
        read_shard(path, *args, **kwargs)
    msg = str(exc.value)
    assert str(path) in msg
    if needle:
        assert needle in msg.replace(str(path), "")


def test_read_shard_missing_file(tmp_path):
    expect_usage_error(tmp_path / "none.h5", "train", 0, 1, equal=True, needle="does not exist")


def test_read_shard_not_hdf5(tmp_path):
    path = tmp_path / "text.h5"
    path.write_text("this is not HDF5\n" * 100)
    expect_usage_error(path, "train", 0, 1, equal=True)


def test_read_shard_truncated_hdf5(dataset, tmp_path):
    path = tmp_path / "cut.h5"
    path.write_bytes(dataset[0].read_bytes()[:1500])
    expect_usage_error(path, "train", 0, 1, equal=True)


def test_read_shard_missing_group(tmp_path):
    path = tmp_path / "only_train.h5"
    with h5py.File(path, "w") as f:
        f.attrs["n_classes"] = 2
        f["train/x"] = np.zeros((4, 2), np.float32)
        f["train/y"] = np.zeros(4, np.int64)
    assert read_shard(path, "train", 0, 1, equal=True).total == 4
    expect_usage_error(path, "test", 0, 1, equal=True, needle="test/x")


def test_read_shard_missing_labels(tmp_path):
    path = tmp_path / "no_y.h5"
    with h5py.File(path, "w") as f:
        f.attrs["n_classes"] = 2
        f["train/x"] = np.zeros((4, 2), np.float32)
    expect_usage_error(path, "train", 0, 1, equal=True, needle="train/y")


@pytest.mark.parametrize(("xshape", "yshape"), [((4, 2), (5,)), ((4,), (4,)), ((4, 2), (4, 1))])
def test_read_shard_bad_shapes(tmp_path, xshape, yshape):
    path = tmp_path / "shapes.h5"
    with h5py.File(path, "w") as f:
        f.attrs["n_classes"] = 2
        f["train/x"] = np.zeros(xshape, np.float32)
        f["train/y"] = np.zeros(yshape, np.int64)
    expect_usage_error(path, "train", 0, 1, equal=True)


def test_read_shard_missing_n_classes(tmp_path):
    path = tmp_path / "no_classes.h5"
    with h5py.File(path, "w") as f:
        f["train/x"] = np.zeros((4, 2), np.float32)
        f["train/y"] = np.zeros(4, np.int64)
    expect_usage_error(path, "train", 0, 1, equal=True, needle="n_classes")


@pytest.mark.parametrize("bad", [3, -1, 100])
def test_read_shard_labels_out_of_range(tmp_path, bad):
    x, y = make_arrays(6, 2, 3)
    y[4] = bad
    path = tmp_path / "labels.h5"
    write_dataset(path, (x, y), make_arrays(2, 2, 3), source="s", description="", n_classes=3)
    expect_usage_error(path, "train", 0, 1, equal=False, needle="labels")
    # the test split is fine
    assert read_shard(path, "test", 0, 1, equal=False).total == 2


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_read_shard_non_finite_features(tmp_path, bad):
    x, y = make_arrays(6, 2, 3)
    x[2, 1] = bad
    path = tmp_path / "nan.h5"
    write_dataset(path, make_arrays(2, 2, 3), (x, y), source="s", description="", n_classes=3)
    expect_usage_error(path, "test", 0, 1, equal=False, needle="non-finite")


def write_raw(path, train, test, n_classes=3):
    """A dataset file written with plain h5py, as another tool might (any dtypes, shapes)."""
    with h5py.File(path, "w") as f:
        f.attrs["n_classes"] = n_classes
        for split, (x, y) in (("train", train), ("test", test)):
            f[f"{split}/x"], f[f"{split}/y"] = x, y
    return path


def test_a_test_split_of_another_width_is_refused(tmp_path):
    path = write_raw(tmp_path / "w.h5", make_arrays(8, 4, 3), make_arrays(4, 5, 3))
    assert read_shard(path, "train", 0, 2, equal=True).x.shape == (4, 4)
    expect_usage_error(path, "test", 0, 2, equal=False, needle="test/x has 5 features")


def test_an_empty_split_is_refused(tmp_path):
    path = write_raw(tmp_path / "e.h5", make_arrays(8, 4, 3), make_arrays(0, 4, 3))
    expect_usage_error(path, "test", 0, 1, equal=False, needle="the test split is empty")


@pytest.mark.parametrize("rows, size", [(2, 3), (1, 2)])
def test_fewer_training_rows_than_ranks_is_refused(tmp_path, rows, size):
    path = write_raw(tmp_path / "few.h5", make_arrays(rows, 4, 3), make_arrays(1, 4, 3))
    for rank in range(size):
        expect_usage_error(path, "train", rank, size, equal=True,
                           needle=f"{rows} rows, fewer than the {size} ranks")
    # the test split is shared out unequally: a rank without test rows is fine
    assert [len(read_shard(path, "test", r, size, equal=False).y) for r in range(size)] == \
        [1] + [0] * (size - 1)


@pytest.mark.parametrize("labels", [[0.0, 1.5, 2.0, 1.0], [0.0, 1.0, np.nan, 1.0],
                                    [b"cat", b"dog", b"cat", b"cat"]])
def test_labels_that_are_not_whole_numbers_are_refused(tmp_path, labels):
    x, _ = make_arrays(4, 2, 3)
    path = write_raw(tmp_path / "lab.h5", (x, np.array(labels)), make_arrays(2, 2, 3))
    expect_usage_error(path, "train", 0, 1, equal=True, needle="labels must be class indices")


def test_whole_float_labels_are_class_indices(tmp_path):
    x, y = make_arrays(4, 2, 3)
    path = write_raw(tmp_path / "f.h5", (x, y.astype(np.float64)), make_arrays(2, 2, 3))
    shard = read_shard(path, "train", 0, 1, equal=True)
    assert shard.y.dtype == np.int64 and shard.y.tolist() == y.tolist()


# ----- Sampler --------------------------------------------------------------------------------
def draw(sampler, n):
    return [sampler.next().copy() for _ in range(n)]


def test_sampler_is_deterministic():
    a = draw(Sampler(50, 7, seed=3, rank=1), 20)
    b = draw(Sampler(50, 7, seed=3, rank=1), 20)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)


def test_sampler_follows_documented_order():
    rows, batch = 23, 5
    sampler = Sampler(rows, batch, seed=11, rank=2)
    per_epoch = rows // batch
    for epoch in range(3):
        order = np.random.default_rng([11, 2, epoch]).permutation(rows)
        for k in range(per_epoch):
            np.testing.assert_array_equal(sampler.next(), order[k * batch:(k + 1) * batch])


@pytest.mark.parametrize(("other_seed", "other_rank"), [(4, 0), (3, 1)])
def test_sampler_differs_across_seed_and_rank(other_seed, other_rank):
    a = np.concatenate(draw(Sampler(64, 8, seed=3, rank=0), 8))
    b = np.concatenate(draw(Sampler(64, 8, seed=other_seed, rank=other_rank), 8))
    assert not np.array_equal(a, b)


@pytest.mark.parametrize(("rows", "batch"), [(20, 5), (23, 5), (7, 7), (10, 1), (100, 33)])
def test_sampler_epochs_visit_distinct_rows(rows, batch):
    sampler = Sampler(rows, batch, seed=0, rank=0)
    per_epoch = rows // batch
    epochs = []
    for _ in range(4):
        idx = np.concatenate(draw(sampler, per_epoch))
        assert idx.shape == (batch * per_epoch,)
        assert idx.dtype.kind == "i"
        assert len(np.unique(idx)) == batch * per_epoch  # no repeats within an epoch
        assert idx.min() >= 0 and idx.max() < rows
        epochs.append(idx)
    if rows > batch:
        assert not all(np.array_equal(epochs[0], e) for e in epochs[1:])  # reshuffled


@pytest.mark.parametrize(("rows", "batch"), [(20, 5), (23, 5), (7, 7), (10, 3)])
def test_sampler_epoch_counter(rows, batch):
    sampler = Sampler(rows, batch, seed=0, rank=0)
    per_epoch = rows // batch
    assert sampler.epoch == 0 and sampler.epochs_done == 0.0
    for n in range(1, 3 * per_epoch + 2):
        sampler.next()
        epoch = (n - 1) // per_epoch
        position = ((n - 1) % per_epoch + 1) * batch
        assert sampler.epoch == epoch
        assert sampler.epochs_done == pytest.approx(epoch + position / rows, abs=1e-15)


def test_sampler_batch_size_checks():
    assert len(Sampler(5, 5, seed=0, rank=0).next()) == 5
    with pytest.raises(UsageError) as exc:
        Sampler(5, 6, seed=0, rank=0)
    assert "batch_size" in str(exc.value) and "6" in str(exc.value) and "5" in str(exc.value)


# ----- Sampler with overlap (optim.pairs = "overlap") -----------------------------------------
@pytest.mark.parametrize(("rows", "batch", "shared"), [(40, 8, 2), (23, 6, 3), (30, 7, 1)])
def test_overlapping_batches_share_their_ends_and_draw_fresh_rows(rows, batch, shared):
    """Batch t+1 starts with the last O rows of batch t; the rest of it is the next rows
    of the documented epoch order (the first batch: batch_size of them), an epoch skipping
    the rows that do not fill the fresh part; epochs count fresh rows."""
    sampler = Sampler(rows, batch, seed=4, rank=1, overlap=shared)
    fresh = batch - shared
    batches = draw(sampler, 3 * rows // fresh)
    assert all(b.shape == (batch,) for b in batches)
    stream, epoch, at = [], 0, 0   # the fresh rows the documented order gives
    order = np.random.default_rng([4, 1, 0]).permutation(rows)
    for t, b in enumerate(batches):
        take = batch if t == 0 else fresh
        if at + take > rows:
            epoch, at = epoch + 1, 0
            order = np.random.default_rng([4, 1, epoch]).permutation(rows)
        stream.append(order[at:at + take])
        at += take
        if t:
            np.testing.assert_array_equal(b[:shared], batches[t - 1][-shared:])
            np.testing.assert_array_equal(b[shared:], stream[-1])
        else:
            np.testing.assert_array_equal(b, stream[0])
    assert (sampler.epoch, sampler.position) == (epoch, at)


@pytest.mark.parametrize("cut", [1, 2, 5, 6, 11])
def test_an_overlapping_sampler_restored_continues_the_same_batches(cut):
    """Restored from (epoch, position) after any batch, epoch ends included, a new sampler
    gives the batches the straight one gives (the shared rows follow from the position)."""
    straight = draw(Sampler(23, 6, seed=2, rank=0, overlap=3), 14)
    first = Sampler(23, 6, seed=2, rank=0, overlap=3)
    draw(first, cut)
    again = Sampler(23, 6, seed=2, rank=0, overlap=3)
    again.restore(first.epoch, first.position)
    for want, got in zip(straight[cut:], draw(again, 14 - cut), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shared", [-1, 4])
def test_an_overlap_beyond_half_the_batch_is_refused(shared):
    with pytest.raises(ValueError, match="overlap"):
        Sampler(20, 7, seed=0, rank=0, overlap=shared)


def test_an_overlapping_sampler_restored_at_an_epochs_start_draws_a_whole_fresh_batch():
    """Position 0 (a resume on another rank count restarts at the next epoch's start):
    nothing is shared yet, the batch is batch_size fresh rows of that epoch's order."""
    sampler = Sampler(23, 6, seed=2, rank=0, overlap=3)
    sampler.restore(2, 0)
    np.testing.assert_array_equal(sampler.next(),
                                  np.random.default_rng([2, 0, 2]).permutation(23)[:6])
