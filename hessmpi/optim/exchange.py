"""How the workers' pairs move between ranks (``optim.exchange``, ALGORITHM.md s.4)."""

from __future__ import annotations


class AllgatherExchange:
    """Every rank ends with every rank's pairs: one in-place Allgather of a ring slot of the
    pair memory, whose rows are laid out by contributing rank. Traffic and memory grow with
    the number of ranks (the sharded exchange of s.4, which does not, is not built)."""

    name = "allgather"

    def __init__(self, comm):
        self.comm = comm

    def share(self, slot_rows) -> None:
        """``slot_rows`` (2*P*k, n): this rank's block in place; afterwards every rank's."""
        self.comm.allgather_(slot_rows)


EXCHANGES = {AllgatherExchange.name: AllgatherExchange}


def build_exchange(name: str, comm):
    """The exchange strategy ``name`` over Communicator ``comm``."""
    return EXCHANGES[name](comm)
