"""``hessmpi data``, ``hessmpi report`` and ``hessmpi info`` end to end (no MPI launcher)."""

from __future__ import annotations

import csv
import gzip
import re
import shutil
import struct
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from clirun import hessmpi, run

from hessmpi import importers
from hessmpi.metrics import read_metrics

pytestmark = pytest.mark.timeout(120)

MNIST = Path("/work/shared/data/mnist-t10k")
if not MNIST.is_dir():  # the shared data seen from the repository (../shared/data)
    MNIST = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist-t10k"


def one_error(result, *needles: str) -> None:
    errors = [line for line in result.stderr.splitlines() if "hessmpi: error" in line]
    assert len(errors) == 1, str(result)
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    assert "Traceback" not in result.stderr + result.stdout, str(result)


def read_dataset(path: Path):
    with h5py.File(path, "r") as f:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        return (f["train/x"][()], f["train/y"][()]), (f["test/x"][()], f["test/y"][()]), attrs


def assert_dataset(path: Path, train, test, attrs) -> None:
    """The file at ``path`` holds exactly the importer's output."""
    got_train, got_test, got_attrs = read_dataset(path)
    for (gx, gy), (x, y) in ((got_train, train), (got_test, test)):
        assert gx.dtype == np.float32 and gy.dtype == np.int64
        np.testing.assert_array_equal(gx, x)
        np.testing.assert_array_equal(gy, y)
    for key in ("source", "description", "n_classes"):
        assert got_attrs[key] == attrs[key], key


# ----- hessmpi data -----------------------------------------------------------------------

def test_data_synthetic_writes_the_importers_problem(tmp_path):
    out = tmp_path / "syn.h5"
    result = hessmpi("data", "synthetic", "--n-train", "300", "--n-test", "70", "--features",
                     "12", "--classes", "4", "--cond", "50", "--separation", "1.5", "--seed",
                     "9", "--out", out)
    assert result.rc == 0, str(result)
    train, test, attrs = importers.synthetic(300, 70, 12, 4, 50.0, 1.5, 9)
    assert_dataset(out, train, test, attrs)
    assert train[0].shape == (300, 12) and test[0].shape == (70, 12)
    assert set(np.unique(train[1])) <= set(range(4))
    assert "300 train and 70 test samples of 12 features, 4 classes" in result.stdout


def test_data_digits_writes_the_importers_split(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "digits.h5"
    result = hessmpi("data", "digits", "--test-fraction", "0.25", "--seed", "3", "--out", out)
    assert result.rc == 0, str(result)
    train, test, attrs = importers.digits(0.25, 3)
    assert_dataset(out, train, test, attrs)
    assert len(train[1]) + len(test[1]) == 1797 and len(test[1]) == round(0.25 * 1797)
    assert 0 <= train[0].min() and train[0].max() <= 1


@pytest.mark.skipif(not MNIST.is_dir(), reason="no shared MNIST t10k files")
def test_data_mnist_from_the_shared_t10k_files(tmp_path):
    images = MNIST / "t10k-images-idx3-ubyte.gz"
    labels = MNIST / "t10k-labels-idx1-ubyte.gz"
    out = tmp_path / "mnist.h5"
    result = hessmpi("data", "mnist", "--images", images, "--labels", labels, "--out", out)
    assert result.rc == 0, str(result)
    assert_dataset(out, *importers.mnist(images, labels))
    # and independently of the importer: the IDX bytes scaled to [0, 1], 8000 / 2000
    raw_x = np.frombuffer(gzip.decompress(images.read_bytes()), np.uint8, offset=16)
    raw_y = np.frombuffer(gzip.decompress(labels.read_bytes()), np.uint8, offset=8)
    (x, y), (xt, yt), _ = read_dataset(out)
    assert x.shape == (8000, 784) and xt.shape == (2000, 784)
    np.testing.assert_allclose(np.concatenate([x, xt]).ravel(),
                               raw_x.astype(np.float64) / 255, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(np.concatenate([y, yt]), raw_y)


def idx_bytes(a: np.ndarray, magic: int | None = None) -> bytes:
    """An IDX file of unsigned bytes: big-endian magic, the dimensions, the data."""
    if magic is None:
        magic = 0x803 if a.ndim == 3 else 0x801
    return struct.pack(f">I{a.ndim}I", magic, *a.shape) + a.astype(np.uint8).tobytes()


@pytest.fixture
def small_idx(tmp_path):
    """30 random 4x5 images (plain IDX) and their labels (gzipped IDX)."""
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (30, 4, 5)).astype(np.uint8)
    labels = rng.integers(0, 10, 30).astype(np.uint8)
    (tmp_path / "images.idx").write_bytes(idx_bytes(images))
    (tmp_path / "labels.idx.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    return images, labels, tmp_path / "images.idx", tmp_path / "labels.idx.gz"


def test_data_mnist_reads_plain_and_gzipped_idx(small_idx, tmp_path):
    images, labels, image_file, label_file = small_idx
    out = tmp_path / "small.h5"
    result = hessmpi("data", "mnist", "--images", image_file, "--labels", label_file,
                     "--n-train", "22", "--out", out)
    assert result.rc == 0, str(result)
    (x, y), (xt, yt), attrs = read_dataset(out)
    pixels = images.reshape(30, 20).astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(x, pixels[:22])
    np.testing.assert_array_equal(xt, pixels[22:])
    np.testing.assert_array_equal(y, labels[:22])
    np.testing.assert_array_equal(yt, labels[22:])
    assert attrs["n_classes"] == 10


def test_data_mnist_with_separate_test_files(small_idx, tmp_path):
    images, labels, image_file, label_file = small_idx
    out = tmp_path / "split.h5"
    result = hessmpi("data", "mnist", "--images", image_file, "--labels", label_file,
                     "--test-images", image_file, "--test-labels", label_file, "--out", out)
    assert result.rc == 0, str(result)
    (x, y), (xt, yt), _ = read_dataset(out)
    np.testing.assert_array_equal(x, xt)
    np.testing.assert_array_equal(y, labels)
    assert x.shape == (30, 20)


def _damage(case: str, images: np.ndarray, labels: np.ndarray, d: Path) -> tuple[Path, Path]:
    """(images file, labels file) with one of them damaged as ``case`` says."""
    img, lab = d / "images.idx", d / "labels.idx"
    img.write_bytes(idx_bytes(images))
    lab.write_bytes(idx_bytes(labels))
    good_gz = gzip.compress(idx_bytes(labels))
    if case == "truncated data":
        img.write_bytes(idx_bytes(images)[:-7])
    elif case == "too short for a header":
        img.write_bytes(b"\x00\x00\x08")
    elif case == "wrong magic":
        img.write_bytes(idx_bytes(images, magic=0x0D03))
    elif case == "truncated gzip":
        lab = d / "labels.idx.gz"
        lab.write_bytes(good_gz[:len(good_gz) // 2])
    elif case == "gzip with a bad checksum":
        lab = d / "labels.idx.gz"
        lab.write_bytes(good_gz[:-8] + b"\x00\x00\x00\x00" + good_gz[-4:])
    elif case == "corrupted gzip data":
        lab = d / "labels.idx.gz"
        bad = bytearray(good_gz)
        bad[10] = 0xFF  # first deflate block header: final, reserved block type 3
        lab.write_bytes(bytes(bad))
        with pytest.raises(zlib.error):  # precondition: what the importer must handle
            gzip.decompress(bytes(bad))
    elif case == "images and labels swapped":
        img, lab = lab, img
    elif case == "labels above 9":
        lab.write_bytes(idx_bytes(labels + 10))
    elif case == "count mismatch":
        lab.write_bytes(idx_bytes(labels[:-1]))
    elif case == "missing file":
        img = d / "absent.idx"
    else:
        raise AssertionError(case)
    return img, lab


DAMAGED = ["truncated data", "too short for a header", "wrong magic", "truncated gzip",
           "gzip with a bad checksum", "corrupted gzip data", "images and labels swapped",
           "labels above 9", "count mismatch", "missing file"]


@pytest.mark.parametrize("case", DAMAGED)
def test_damaged_idx_exits_2_naming_the_file(case, small_idx, tmp_path):
    images, labels, _, _ = small_idx
    d = tmp_path / "damaged"
    d.mkdir()
    img, lab = _damage(case, images, labels, d)
    out = tmp_path / "never.h5"
    result = hessmpi("data", "mnist", "--images", img, "--labels", lab, "--n-train", "20",
                     "--out", out)
    assert result.rc == 2, str(result)
    damaged = img if case in ("truncated data", "too short for a header", "wrong magic",
                              "missing file", "images and labels swapped") else lab
    one_error(result, damaged.name)
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [
    (["synthetic", "--cond", "0.5"], "--cond"),
    (["synthetic", "--classes", "1"], "classes"),
])
def test_bad_data_arguments_exit_2(args, needle, tmp_path):
    result = hessmpi("data", *args, "--out", tmp_path / "x.h5")
    assert result.rc == 2, str(result)
    one_error(result, needle)
    assert not (tmp_path / "x.h5").exists()


def test_unwritable_data_output_exits_2(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "x.h5"
    result = hessmpi("data", "synthetic", "--n-train", "10", "--n-test", "5", "--out", out)
    assert result.rc == 2, str(result)
    one_error(result, str(out))


# ----- hessmpi report ---------------------------------------------------------------------

def table(text: str) -> list[dict]:
    """The rows of the report's aligned table as {column: cell}; cells start under their
    header and may hold spaces."""
    lines = text.rstrip("\n").splitlines()
    starts = [m.start() for m in re.finditer(r"\S+", lines[0])]
    names = lines[0].split()
    rows = []
    for line in lines[1:]:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        rows.append(dict(zip(names, cells, strict=True)))
    return rows


def test_report_table_of_a_finished_run(finished_run, tmp_path):
    out, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    result = hessmpi("report", out, copy, "--csv", tmp_path / "t.csv")
    assert result.rc == 0, str(result)
    _, cols = read_metrics(out / "metrics.h5")
    rows = table(result.stdout)
    assert [r["run"] for r in rows] == [str(out), str(copy)]
    row = rows[0]
    assert row["status"] == "finished"
    assert row["ranks"] == "2" and row["batch"] == "8" and row["steps"] == "23"
    assert row["grad_evals"] == "23" and row["backend"] == "numpy"
    assert row["final_loss"] == f"{cols['train_loss'][-1]:.4g}"
    assert row["test_acc"] == f"{cols['test_acc'][-1]:.4g}"
    assert row["method"].startswith("sgd")
    with open(tmp_path / "t.csv", newline="") as f:
        records = list(csv.DictReader(f))
    assert [r["run"] for r in records] == [str(out), str(copy)]
    assert float(records[0]["final_loss"]) == float(cols["train_loss"][-1])
    assert float(records[0]["best_loss"]) == float(cols["train_loss"].min())
    assert float(records[0]["wall_s"]) == float(cols["wall_time"][-1])


def test_report_of_a_missing_run_exits_2_naming_it(finished_run, tmp_path):
    missing = tmp_path / "no-such-run"
    result = hessmpi("report", finished_run[0], missing)
    assert result.rc == 2, str(result)
    one_error(result, str(missing))


def test_report_of_a_damaged_results_file_exits_2_naming_it(tmp_path):
    bad = tmp_path / "bad-run"
    bad.mkdir()
    (bad / "metrics.h5").write_bytes(b"not hdf5 at all" * 8)
    result = hessmpi("report", bad)
    assert result.rc == 2, str(result)
    one_error(result, str(bad))


# ----- hessmpi info -----------------------------------------------------------------------

def test_info_names_the_mpi_library_and_numpy_version():
    probe = run([sys.executable, "-c",
                 "import numpy; from mpi4py import MPI; print(numpy.__version__); "
                 "print(' '.join(MPI.Get_library_version().splitlines()[0].split()))"])
    assert probe.rc == 0, str(probe)
    numpy_version, mpi_library = probe.stdout.splitlines()[:2]
    result = hessmpi("info")
    assert result.rc == 0, str(result)
    assert mpi_library in result.stdout, str(result)
    assert re.search(rf"^numpy\s+{re.escape(numpy_version)}$", result.stdout, re.M), str(result)
    assert "Traceback" not in result.stderr
