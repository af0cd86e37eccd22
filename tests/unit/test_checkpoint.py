"""hessmpi.checkpoint: the file format, the checksum, atomic writes, refusal of damaged or
foreign files, picking the newest valid checkpoint, pruning.

Every check compares with something the module did not compute: the bytes of the arrays
written, the file read back with plain h5py, a BLAKE2b digest computed here from the
documented recipe, the bytes of a file on disk before and after.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from hessmpi.checkpoint import (
    FORMAT,
    CheckpointError,
    checkpoint_dir,
    checkpoint_path,
    checksum,
    list_checkpoints,
    newest_valid,
    prune,
    read_checkpoint,
    write_checkpoint,
)
from hessmpi.errors import UsageError

CONFIG_TOML = '[model]\nname = "mlp"\nhidden = [8, 4]\n\n[train]\nsteps = 40\n'


def sample_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Arrays like a trainer's: flat float32 params with awkward values (NaN, -0.0, inf,
    denormals), optimizer state in a group, float64 matrices, int64 sampler state."""
    rng = np.random.default_rng(seed)
    params = rng.standard_normal(257).astype(np.float32)
    params[:5] = [np.nan, -0.0, np.inf, np.finfo(np.float32).smallest_subnormal, -np.inf]
    return {
        "params": params,
        "sampler": np.array([[3, 48], [3, 48], [2, 0]], dtype=np.int64),
        "optim/velocity": rng.standard_normal(257).astype(np.float32),
        "optim/W": rng.standard_normal((7, 257)),
        "optim/ring": np.array([2, 1, 11]),
        "optim/counts": np.array([0, 4, 1, 0], dtype=np.int32),
    }


def sample_attrs(step: int = 40) -> dict:
    return {"step": step, "epoch": 3.25, "grad_evals": 2 * step, "wall_time": 1.5,
            "config": CONFIG_TOML, "mpi_size": 3, "hessmpi_version": "0.1.0",
            "signature": '{"model": {"name": "mlp"}, "n_params": 257}'}


def hand_checksum(arrays: dict[str, np.ndarray]) -> str:
    """The documented recipe, written out independently: BLAKE2b (20 bytes) over, for each
    array in name order, 'name|dtype|shape|' and then the array's C-order bytes."""
    h = hashlib.blake2b(digest_size=20)
    for name in sorted(arrays):
        a = arrays[name]
        h.update(name.encode() + b"|" + a.dtype.str.encode() + b"|" + str(a.shape).encode()
                 + b"|")
        h.update(bytes(memoryview(np.ascontiguousarray(a)).cast("B")))
    return h.hexdigest()


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def write_run_checkpoint(out: Path, step: int, seed: int | None = None) -> Path:
    path = checkpoint_path(out, step)
    write_checkpoint(path, sample_arrays(step if seed is None else seed), sample_attrs(step))
    return path


def data_offset(path: Path, name: str) -> tuple[int, int]:
    """(file offset, size in bytes) of dataset ``name``'s raw data, from HDF5 itself."""
    with h5py.File(path, "r") as f:
        d = f[name]
        offset = d.id.get_offset()
        assert offset is not None, f"{name} is not stored contiguously"
        return offset, d.id.get_storage_size()


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))


def refused(path: Path, *needles: str) -> CheckpointError:
    """read_checkpoint(path) raises CheckpointError naming the file (and every needle)."""
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert str(path) in message, message
    for needle in needles:
        assert needle in message, message
    return info.value


# ----- names -------------------------------------------------------------------------------

def test_paths_follow_the_contract(tmp_path):
    assert checkpoint_dir(tmp_path) == tmp_path / "checkpoints"
    assert checkpoint_path(tmp_path, 1200) == tmp_path / "checkpoints" / "ckpt_000001200.h5"


def test_checkpoint_error_is_a_usage_error():
    """Exit status 2 with one message (the CLI catches UsageError)."""
    assert issubclass(CheckpointError, UsageError)


# ----- round trip ----------------------------------------------------------------------------

def test_round_trip_is_bitwise(tmp_path):
    arrays, attrs = sample_arrays(), sample_attrs()
    path = tmp_path / "sub" / "ck.h5"          # the parent is created
    write_checkpoint(path, arrays, attrs)
    got, got_attrs = read_checkpoint(path)

    assert set(got) == set(arrays)
    for name, a in arrays.items():
        assert same_bits(np.asarray(got[name]), a), name
    for key, value in attrs.items():
        assert got_attrs[key] == value, key
        assert type(got_attrs[key]) is not bytes, key
    assert got_attrs["format"] == FORMAT
    assert got_attrs["checksum"] == hand_checksum(arrays)


def test_file_is_plain_hdf5_with_the_documented_layout(tmp_path):
    """Another tool (plain h5py) finds params, optim/* and the root attributes."""
    arrays, attrs = sample_arrays(), sample_attrs()
    path = tmp_path / "ck.h5"
    write_checkpoint(path, arrays, attrs)
    with h5py.File(path, "r") as f:
        assert isinstance(f["optim"], h5py.Group)
        for name, a in arrays.items():
            assert same_bits(f[name][()], a), name
        assert f.attrs["format"] == FORMAT
        assert f.attrs["step"] == attrs["step"]
        assert f.attrs["config"] == CONFIG_TOML
        assert f.attrs["checksum"] == hand_checksum(arrays)


def test_checksum_matches_the_documented_recipe():
    arrays = sample_arrays()
    assert checksum(arrays) == hand_checksum(arrays)
    # insertion order does not matter, non-contiguous input is hashed as its C-order copy
    reordered = dict(reversed(list(arrays.items())))
    assert checksum(reordered) == hand_checksum(arrays)
    strided = np.arange(20, dtype=np.float32)[::2]
    assert checksum({"a": strided}) == hand_checksum({"a": strided.copy()})


def test_checksum_changes_when_any_byte_changes():
    arrays = {"params": np.linspace(-1, 1, 6, dtype=np.float32),
              "optim/ring": np.array([1, 2], dtype=np.int64)}
    reference = checksum(arrays)
    seen = {reference}
    for name in arrays:
        raw = bytearray(arrays[name].tobytes())
        for i in range(len(raw)):
            for mask in (0x01, 0x80):
                changed = bytearray(raw)
                changed[i] ^= mask
                a = np.frombuffer(bytes(changed), dtype=arrays[name].dtype)
                digest = checksum({**arrays, name: a.reshape(arrays[name].shape)})
                assert digest not in seen, (name, i, mask)
                seen.add(digest)
    # the same bytes under another name, dtype or shape are another checkpoint
    p = arrays["params"]
    assert checksum({**arrays, "params": p.view(np.int32)}) != reference
    assert checksum({**arrays, "params": p.reshape(2, 3)}) != reference
    renamed = {"theta" if k == "params" else k: v for k, v in arrays.items()}
    assert checksum(renamed) != reference
    assert checksum({**arrays, "extra": np.zeros(0, np.float32)}) != reference


# ----- refusing damaged and foreign files ---------------------------------------------------

@pytest.mark.parametrize("keep", ["empty", "superblock", "half", "all_but_one_byte"])
def test_truncated_file_is_refused(tmp_path, keep):
    path = tmp_path / "ck.h5"
    write_checkpoint(path, sample_arrays(), sample_attrs())
    size = path.stat().st_size
    new_size = {"empty": 0, "superblock": 96, "half": size // 2,
                "all_but_one_byte": size - 1}[keep]
    os.truncate(path, new_size)
    refused(path)


@pytest.mark.parametrize("name", ["params", "optim/velocity", "optim/W", "sampler"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_bit_flip_in_array_data_is_refused(tmp_path, name, where):
    path = tmp_path / "ck.h5"
    write_checkpoint(path, sample_arrays(), sample_attrs())
    offset, size = data_offset(path, name)
    flip_byte(path, offset + {"first": 0, "middle": size // 2, "last": size - 1}[where])
    # plain HDF5 still opens the file and reads the array: only the checksum can tell
    with h5py.File(path, "r") as f:
        assert not same_bits(f[name][()], sample_arrays()[name])
    refused(path, "checksum")


def test_array_rewritten_through_hdf5_is_refused(tmp_path):
    """A well-formed HDF5 file whose contents changed after the checksum was taken."""
    path = tmp_path / "ck.h5"
    write_checkpoint(path, sample_arrays(), sample_attrs())
    with h5py.File(path, "a") as f:
        f["params"][7] = np.float32(1.0) + f["params"][7]
    refused(path, "checksum")


def test_added_array_is_refused(tmp_path):
    path = tmp_path / "ck.h5"
    write_checkpoint(path, sample_arrays(), sample_attrs())
    with h5py.File(path, "a") as f:
        f["optim/extra"] = np.zeros(3)
    refused(path, "checksum")


def test_missing_checksum_is_refused(tmp_path):
    path = tmp_path / "ck.h5"
    write_checkpoint(path, sample_arrays(), sample_attrs())
    with h5py.File(path, "a") as f:
        del f.attrs["checksum"]
    refused(path)


def test_non_hdf5_file_is_refused(tmp_path):
    path = tmp_path / "ckpt_000000010.h5"
    path.write_bytes(b"step = 10\nparams = [0.1, 0.2]\n" * 20)
    refused(path)


def test_missing_file_is_refused(tmp_path):
    refused(tmp_path / "ckpt_000000010.h5")


@pytest.mark.parametrize("kind", ["dataset", "other_format", "metrics_like"])
def test_hdf5_file_that_is_not_a_checkpoint_is_refused(tmp_path, kind):
    path = tmp_path / "ckpt_000000010.h5"
    with h5py.File(path, "w") as f:
        f["params"] = np.zeros(4, np.float32)
        f.attrs["checksum"] = checksum({"params": np.zeros(4, np.float32)})
        if kind == "other_format":
            f.attrs["format"] = "hessmpi-checkpoint-999"
        if kind == "metrics_like":
            f.attrs["status"] = "finished"
            f.create_group("metrics")["step"] = np.arange(3)
    refused(path, "not a hessmpi checkpoint")


# ----- atomic writes -------------------------------------------------------------------------

def test_write_leaves_only_the_file(tmp_path):
    path = tmp_path / "checkpoints" / "ckpt_000000010.h5"
    write_checkpoint(path, sample_arrays(), sample_attrs())
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    # replacing an existing checkpoint also leaves no temporary file behind
    write_checkpoint(path, sample_arrays(1), sample_attrs(11))
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    got, attrs = read_checkpoint(path)
    assert same_bits(got["params"], sample_arrays(1)["params"]) and attrs["step"] == 11


@pytest.mark.parametrize("bad", ["object_array", "unstorable_attr"])
def test_failed_write_keeps_the_previous_file(tmp_path, bad):
    path = tmp_path / "checkpoints" / "ckpt_000000010.h5"
    write_checkpoint(path, sample_arrays(), sample_attrs())
    before = path.read_bytes()
    arrays, attrs = sample_arrays(1), sample_attrs(11)
    if bad == "object_array":   # h5py cannot store Python objects
        arrays["optim/velocity"] = np.array([object(), 1.0], dtype=object)
    else:
        attrs["signature"] = {"not": "storable"}
    with pytest.raises(Exception):  # noqa: B017 - whatever h5py raises, it must propagate
        write_checkpoint(path, arrays, attrs)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    got, _ = read_checkpoint(path)
    assert same_bits(got["params"], sample_arrays()["params"])


def test_failed_first_write_leaves_nothing(tmp_path):
    path = tmp_path / "ckpt_000000010.h5"
    with pytest.raises(Exception):  # noqa: B017
        write_checkpoint(path, {"params": np.array([None, 1], dtype=object)}, {})
    assert list(tmp_path.iterdir()) == []


# ----- choosing a checkpoint, pruning --------------------------------------------------------

def test_list_checkpoints_is_newest_first_and_ignores_other_names(tmp_path):
    d = checkpoint_dir(tmp_path)
    d.mkdir()
    for name in ("ckpt_000000020.h5", "ckpt_9.h5", "ckpt_000000100.h5", "ckpt_abc.h5",
                 ".ckpt_000000300.h5.tmp123", "ckpt_000000200.h5.bak", "notes.txt"):
        (d / name).write_bytes(b"")
    assert [(s, p.name) for s, p in list_checkpoints(tmp_path)] == [
        (100, "ckpt_000000100.h5"), (20, "ckpt_000000020.h5"), (9, "ckpt_9.h5")]
    assert list_checkpoints(tmp_path / "elsewhere") == []


def test_newest_valid_skips_damaged_newest_first_and_warns_by_name(tmp_path):
    good = write_run_checkpoint(tmp_path, 10)
    flipped = write_run_checkpoint(tmp_path, 20)
    offset, _ = data_offset(flipped, "params")
    flip_byte(flipped, offset + 9)
    truncated = write_run_checkpoint(tmp_path, 30)
    os.truncate(truncated, truncated.stat().st_size // 3)
    junk = checkpoint_path(tmp_path, 40)
    junk.write_text("not a checkpoint")

    warnings: list[str] = []
    accepted: list[Path] = []
    chosen = newest_valid(tmp_path, lambda p, a: accepted.append(p), warnings.append)
    assert chosen == good
    assert accepted == [good]     # accept() only sees files that verified
    assert len(warnings) == 3
    for message, path in zip(warnings, (junk, truncated, flipped), strict=True):
        assert str(path) in message, message
    # the skipped files are left alone
    assert junk.read_text() == "not a checkpoint" and truncated.exists() and flipped.exists()


def test_newest_valid_skips_what_accept_refuses(tmp_path):
    older = write_run_checkpoint(tmp_path, 10)
    foreign = write_run_checkpoint(tmp_path, 20)

    def accept(path, attrs):
        if attrs["step"] == 20:
            raise CheckpointError(f"{path} belongs to another run")

    warnings: list[str] = []
    assert newest_valid(tmp_path, accept, warnings.append) == older
    assert len(warnings) == 1 and str(foreign) in warnings[0]


def test_newest_valid_without_a_usable_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        newest_valid(tmp_path, lambda p, a: None, lambda m: None)
    bad = checkpoint_path(tmp_path, 10)
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 50)
    warnings: list[str] = []
    with pytest.raises(CheckpointError) as info:
        newest_valid(tmp_path, lambda p, a: None, warnings.append)
    assert str(checkpoint_dir(tmp_path)) in str(info.value)
    assert len(warnings) == 1 and str(bad) in warnings[0]


def test_prune_keeps_the_newest(tmp_path):
    paths = {step: write_run_checkpoint(tmp_path, step) for step in (5, 10, 15, 20, 100)}
    contents = {step: p.read_bytes() for step, p in paths.items()}
    other = checkpoint_dir(tmp_path) / "notes.txt"
    other.write_text("mine")

    prune(tmp_path, 10, 100)
    assert all(p.exists() for p in paths.values())
    prune(tmp_path, 2, 100)
    assert sorted(p.name for p in checkpoint_dir(tmp_path).iterdir()) == [
        "ckpt_000000020.h5", "ckpt_000000100.h5", "notes.txt"]
    assert paths[20].read_bytes() == contents[20] and paths[100].read_bytes() == contents[100]
    prune(tmp_path, 1, 100)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [100]
    assert other.read_text() == "mine"


def test_prune_never_removes_checkpoints_after_the_step_written(tmp_path):
    """A run at step 60 among checkpoints 225-240 left by another run keeps its own newest
    (issue 16: keep = 3 once kept the stranger's 225/230/240 and removed 25/50/60)."""
    theirs = {step: write_run_checkpoint(tmp_path, step) for step in (225, 230, 240)}
    for step in (25, 50, 60):
        write_run_checkpoint(tmp_path, step)
        prune(tmp_path, 3, step)
    write_run_checkpoint(tmp_path, 10)   # an older one of its own history goes first
    prune(tmp_path, 3, 60)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [240, 230, 225, 60, 50, 25]
    assert all(p.exists() for p in theirs.values())
    prune(tmp_path, 1, 60)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [240, 230, 225, 60]
