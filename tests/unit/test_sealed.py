"""hessmpi.sealed: the seal is the documented digest, plain HDF5 readers ignore it, and any
changed, missing or added byte is refused before the HDF5 library sees the file."""

from __future__ import annotations

import hashlib

import h5py
import numpy as np
import pytest

from hessmpi.errors import UsageError
from hessmpi.sealed import MAGIC, USERBLOCK, DamagedFile, check, seal


def sealed_file(path):
    with h5py.File(path, "w", userblock_size=USERBLOCK) as f:
        f["x"] = np.arange(40, dtype=np.float64)
        f.attrs["note"] = "sealed"
    seal(path)
    return path


def test_the_seal_is_the_documented_digest(tmp_path):
    """The first 512 bytes: MAGIC, then the hex BLAKE2b-256 of the whole file with those 64
    digest characters zeroed (recomputed here from the bytes on disk)."""
    data = sealed_file(tmp_path / "s.h5").read_bytes()
    at = len(MAGIC)
    assert data.startswith(MAGIC)
    zeroed = data[:at] + b"\0" * 64 + data[at + 64:]
    assert data[at:at + 64].decode() == hashlib.blake2b(zeroed, digest_size=32).hexdigest()
    assert data[USERBLOCK:USERBLOCK + 8] == b"\x89HDF\r\n\x1a\n"


def test_plain_h5py_reads_a_sealed_file(tmp_path):
    path = sealed_file(tmp_path / "s.h5")
    assert check(path) is True
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["x"][()], np.arange(40))
        assert f.attrs["note"] == "sealed"


def test_every_single_byte_change_is_refused(tmp_path):
    path = sealed_file(tmp_path / "s.h5")
    data = path.read_bytes()
    for offset in range(len(data)):
        damaged = bytearray(data)
        damaged[offset] ^= 0x01
        path.write_bytes(bytes(damaged))
        with pytest.raises(DamagedFile, match=str(path)):
            check(path)


@pytest.mark.parametrize("change", ["truncated", "appended", "empty"])
def test_missing_or_added_bytes_are_refused(tmp_path, change):
    path = sealed_file(tmp_path / "s.h5")
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:-1], "appended": data + b"\0",
                      "empty": b""}[change])
    with pytest.raises(DamagedFile, match=str(path)):
        check(path)


def test_an_unsealed_hdf5_file_is_opened_unchecked(tmp_path):
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.zeros(3)
    assert check(path) is False


def test_other_files_are_refused_by_name(tmp_path):
    path = tmp_path / "other.h5"
    path.write_bytes(b"not hdf5 at all")
    with pytest.raises(DamagedFile, match=str(path)) as info:
        check(path)
    assert isinstance(info.value, UsageError)
    with pytest.raises(FileNotFoundError):
        check(tmp_path / "missing.h5")
