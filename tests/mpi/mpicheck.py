"""Collective assertions for the MPI suite: every rank reaches the same verdict.

Each rank finds its own verdict, the verdicts are gathered, and every rank asserts the same
thing, so a failure on one rank fails the test everywhere instead of leaving others waiting.
"""

from __future__ import annotations

import hashlib

import numpy as np

from hessmpi.comm import Communicator


def assert_all(comm: Communicator, ok: bool, detail: str = "") -> None:
    """Assert, on every rank alike, that ``ok`` holds on every rank. The message names
    the failing ranks and what each one reported."""
    ok = bool(ok)
    verdicts = comm.comm.allgather((ok, detail))
    failures = [f"rank {r}: {d or 'failed'}" for r, (v, d) in enumerate(verdicts) if not v]
    assert not failures, "; ".join(failures)


def assert_checks(comm: Communicator, checks) -> None:
    """``checks``: this rank's (ok, what) pairs; assert on every rank alike that every one
    holds on every rank, naming the first that failed on each failing rank."""
    detail = next((what for ok, what in checks if not ok), "")
    assert_all(comm, not detail, detail)


def _fingerprint(value):
    """An array by its shape, type and a hash of its bytes, a float by its bits (NaN equals
    NaN); any other value as it is."""
    if isinstance(value, float):
        return value.hex()
    if isinstance(value, np.ndarray):
        data = np.ascontiguousarray(value).tobytes()
        return value.shape, value.dtype.str, hashlib.blake2b(data, digest_size=16).digest()
    return value


def assert_identical(comm: Communicator, **values) -> None:
    """Assert on every rank alike that each named value is the same on every rank: a
    NumPy array or a float bitwise (shape and type included), anything else by ``==``."""
    for name, value in values.items():
        everyone = comm.comm.allgather(_fingerprint(value))
        differ = [r for r, v in enumerate(everyone) if v != everyone[0]]
        assert_all(comm, not differ, f"{name} differs across ranks (ranks {differ} "
                   "from rank 0)")


def check_all(comm: Communicator, check) -> None:
    """Run the local (non-collective) ``check()`` on every rank; an exception or failed
    assertion on any rank fails the test on every rank."""
    try:
        check()
    except Exception as e:  # noqa: BLE001 - any local failure becomes a collective verdict
        assert_all(comm, False, f"{type(e).__name__}: {e}")
    else:
        assert_all(comm, True)


def raises_everywhere(comm: Communicator, exc_type, fn, *args, match: str | None = None,
                      **kwargs):
    """Call ``fn`` on every rank (it may be collective); assert that it raised ``exc_type``
    on every rank, with ``match`` in the message if given. Returns this rank's exception."""
    caught, detail = None, ""
    try:
        fn(*args, **kwargs)
        detail = f"no {exc_type.__name__} raised"
    except exc_type as e:
        caught = e
        if match is not None and match not in str(e):
            detail = f"{exc_type.__name__} message {str(e)!r} lacks {match!r}"
    except Exception as e:  # noqa: BLE001
        detail = f"raised {type(e).__name__}: {e} instead of {exc_type.__name__}"
    assert_all(comm, not detail, detail)
    return caught
