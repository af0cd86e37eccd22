"""HDF5 files sealed with a digest of their bytes, checked before the HDF5 library opens them.

The HDF5 library can crash or hang on a damaged file, and it reads damage in its raw data
as numbers. A sealed file starts with a 512-byte HDF5 user block (which the library skips:
plain h5py, pandas and xarray read the file as usual) holding ``MAGIC`` and the hex
BLAKE2b-256 digest of the whole file, digest field zeroed. Any changed, missing or added
byte breaks the seal, and the reader refuses the file by name without opening it. Files
without the user block (written before hessmpi sealed them, or by other tools) are opened
unchecked.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from hessmpi.errors import UsageError

USERBLOCK = 512
MAGIC = b"hessmpi sealed HDF5, blake2b-256:"
DIGEST = slice(len(MAGIC), len(MAGIC) + 64)
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class DamagedFile(UsageError):
    """A file that is not what hessmpi wrote: damaged, truncated, or changed since."""


def _digest(f) -> str:
    """The seal of open binary file ``f`` (read from its start)."""
    f.seek(0)
    head = f.read(USERBLOCK)
    h = hashlib.blake2b(digest_size=32)
    h.update(head[:DIGEST.start] + b"\0" * 64 + head[DIGEST.stop:])
    while chunk := f.read(1 << 20):
        h.update(chunk)
    return h.hexdigest()


def seal(path: Path, *, fsync: bool = False) -> None:
    """Seal ``path``, an HDF5 file just written with ``userblock_size=USERBLOCK``."""
    with open(path, "r+b") as f:
        f.write(MAGIC)
        digest = _digest(f)
        f.seek(DIGEST.start)
        f.write(digest.encode())
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def check(path: Path) -> bool:
    """True if ``path`` is sealed and whole, False for an HDF5 file without a seal;
    FileNotFoundError if there is none; DamagedFile (naming the file and what is wrong)
    otherwise."""
    try:
        with open(path, "rb") as f:
            head = f.read(USERBLOCK)
            if head.startswith(HDF5_SIGNATURE):
                return False
            if not head.startswith(MAGIC):
                raise DamagedFile(f"{path} is damaged or not an HDF5 file (its first bytes are "
                                  "neither an HDF5 signature nor a hessmpi seal)")
            if _digest(f).encode() != head[DIGEST]:
                raise DamagedFile(f"{path} is damaged: it fails the checksum of its bytes "
                                  "(corrupted, truncated or changed since hessmpi wrote it)")
    except FileNotFoundError:
        raise
    except OSError as e:
        raise DamagedFile(f"{path} cannot be read: {e.strerror or e}") from None
    return True
