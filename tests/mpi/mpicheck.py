"""Collective assertions for the MPI suite: every rank reaches the same verdict.

Each rank finds its own verdict, the verdicts are gathered, and every rank asserts the same
thing, so a failure on one rank fails the test everywhere instead of leaving others waiting.
"""

from __future__ import annotations

from hessmpi.comm import Communicator


def assert_all(comm: Communicator, ok: bool, detail: str = "") -> None:
    """Assert, on every rank alike, that ``ok`` holds on every rank. The message names
    the failing ranks and what each one reported."""
    ok = bool(ok)
    verdicts = comm.comm.allgather((ok, detail))
    failures = [f"rank {r}: {d or 'failed'}" for r, (v, d) in enumerate(verdicts) if not v]
    assert not failures, "; ".join(failures)


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
