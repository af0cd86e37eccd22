"""The pair memory of the quasi-Newton methods: pairs and the averaged gradient as the rows
of one contiguous buffer, and its incrementally updated Gram matrix (ALGORITHM.md s.1-2).

    W (1 + 2*P*k*K, n):  row 0 = g_bar, then K ring slots of 2*P*k rows each; in a slot,
                          contributor r owns rows [2*k*r, 2*k*(r+1)): its k s-rows, then
                          its k y-rows.

P is the number of contributors to a slot (the ranks, or 1 for pairs every rank forms
alike), k the pairs each contributes. One in-place collective fills a slot, the memory never
moves, the Gram update reads W once, and a direction c_g g + S c_s + Y c_y is one
matrix-vector product. Nothing of size n is allocated per step.

The columns of W are this rank's part of n in the layout of the exchange
(:mod:`hessmpi.optim.exchange`): all n with ``allgather``, about n / P with ``sharded``,
where the Gram rows are completed by one Allreduce of the parts' products and a worker's
own rows are formed whole in an ``outbox`` (2k, n) until the exchange moves them.
"""

from __future__ import annotations

import numpy as np

from hessmpi.backend import to_host
from hessmpi.optim.exchange import Whole

#: Bytes of W one block of the blocked Gram product covers: fastest measured for m = 4..16
#: on this machine's L2 (benchmarks/secant_step.py: 1 MiB, 8-21 % ahead of 256 KiB).
GRAM_BLOCK_BYTES = 1 << 20


class PairMemory:
    """n: parameters; contributors: P; k: pairs per contributor per slot; slots: K; own: this
    rank's contributor index; xp, dtype: array module and floating type; exchange: the
    layout of the columns (default: all n, no communication).

    ``filled``: slots holding pairs; ``next_slot``: the slot the next pairs go to;
    ``gram`` (rows, rows): W W^T over the active rows (1 + filled * slot_rows);
    ``outbox`` (2k, n): this contributor's rows, whole, where W holds less than the whole
    rows and several contributors share a slot (None otherwise: they are formed in W)."""

    def __init__(self, n: int, *, contributors: int, k: int, slots: int, own: int, xp,
                 dtype, exchange=None):
        self.xp = xp
        self.exchange = Whole(n) if exchange is None else exchange
        self.contributors, self.k, self.slots, self.own = contributors, k, slots, own
        self.slot_rows = 2 * contributors * k
        self.m = contributors * k * slots
        part = self.exchange.part_size
        self.W = xp.zeros((1 + self.slot_rows * slots, part), dtype=dtype)
        self.outbox = (xp.zeros((2 * k, n), dtype=dtype)
                       if contributors > 1 and part != n else None)
        self.gram = xp.zeros((self.W.shape[0],) * 2, dtype=dtype)
        self.filled = 0
        self.next_slot = 0
        block = max(1, GRAM_BLOCK_BYTES // (self.W.shape[0] * self.W.itemsize))
        self.gram_block = n if xp.__name__ != "numpy" else block

    def slot(self, t: int):
        """The rows (slot_rows, n) of ring slot t."""
        start = 1 + t * self.slot_rows
        return self.W[start:start + self.slot_rows]

    def own_rows(self, t: int):
        """(s rows (k, n), y rows (k, n)) of this contributor in slot t: whole rows of the
        outbox if there is one, else its rows of W (with one contributor and a sharded
        layout, this rank's parts (k, n / P) of the pairs every rank forms alike)."""
        if self.outbox is not None:
            return self.outbox[:self.k], self.outbox[self.k:]
        block = self.slot(t)[2 * self.k * self.own: 2 * self.k * (self.own + 1)]
        return block[:self.k], block[self.k:]

    def slot_pairs(self, t: int) -> list:
        """[(s row, y row)] of every contributor's pairs in slot t (views of W)."""
        block = self.slot(t)
        return [(block[2 * self.k * c + j], block[2 * self.k * c + self.k + j])
                for c in range(self.contributors) for j in range(self.k)]

    def commit(self) -> int:
        """The next slot now holds pairs: returns its index and moves the ring on."""
        slot = self.next_slot
        self.next_slot = (slot + 1) % self.slots
        self.filled = min(self.filled + 1, self.slots)
        return slot

    @property
    def active(self) -> int:
        """Rows of W in use: g and the filled slots."""
        return 1 + self.filled * self.slot_rows

    def pair_indices(self, chronological: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(S rows, Y rows) of W, (m_filled,) each: pair j is rows s[j], y[j]; in slot
        order, or ``chronological``: oldest slot first (in a slot: by contributor)."""
        rows = np.arange(1, self.active).reshape(self.filled, self.contributors, 2, self.k)
        if chronological and self.filled == self.slots:
            rows = np.roll(rows, -self.next_slot, axis=0)
        return rows[:, :, 0].ravel(), rows[:, :, 1].ravel()

    def set_gradient(self, grad) -> None:
        """Row 0 <- this rank's part of the step's averaged gradient ((n,) whole)."""
        self.W[0] = grad

    def gram_host(self) -> np.ndarray:
        """The active Gram matrix on the host: the (2m+1)^2 work is tiny, so it runs in
        NumPy on every backend (on a GPU dozens of tiny kernels and syncs cost ~3 ms)."""
        return to_host(self.xp, self.gram[:self.active, :self.active])

    def combine(self, coef: np.ndarray, out) -> None:
        """out <- coef @ W[:active] for host coefficients ``coef`` (active,): this rank's
        part of the combination ((n,) whole)."""
        xp = self.xp
        xp.matmul(xp.asarray(coef, dtype=self.W.dtype), self.W[:self.active], out=out)

    def update_gram(self, slot_index: int | None) -> None:
        """Recompute the Gram rows and columns of the g row and of ring slot ``slot_index``
        (if any) against every active row: one blocked pass over W (rows read from cache);
        sharded, over this rank's columns, then one Allreduce of the (1 + rows, active) new
        rows completes them."""
        xp, W = self.xp, self.W
        active = self.active
        rows = 0 if slot_index is None else self.slot_rows
        start = 1 + (slot_index or 0) * self.slot_rows
        out = xp.zeros((1 + rows, active), dtype=W.dtype)
        part = xp.empty_like(out)
        n, b = W.shape[1], self.gram_block
        for c in range(0, n, b):         # views only: no copy of the new rows
            block = W[:active, c:c + b]
            xp.matmul(block, W[0, c:c + b], out=part[0])
            if rows:
                xp.matmul(W[start:start + rows, c:c + b], block.T, out=part[1:])
            out += part
        self.exchange.complete_(out)
        new = xp.asarray(np.array([0, *range(start, start + rows)]))
        self.gram[new, :active] = out
        self.gram[:active, new] = out.T

    def state(self) -> dict:
        """W whole (sharded: gathered on rank 0, a collective) and the Gram matrix."""
        return {"W": self.exchange.gathered(self.W), "gram": self.gram}

    def load_state(self, state: dict, filled: int, next_slot: int) -> None:
        """Restore :meth:`state` (W whole, of any layout: this rank takes its part)."""
        self.W[...] = self.xp.asarray(self.exchange.part(state["W"]))
        self.gram[...] = self.xp.asarray(state["gram"])
        self.filled, self.next_slot = filled, next_slot


def damp_(xp, s_rows, y_rows, lam: float, work) -> None:
    """Y <- Y + lam * S, row by row (k, n), in place; ``work`` (n,) is scratch."""
    for s, y in zip(s_rows, y_rows, strict=True):
        xp.multiply(s, lam, out=work)
        y += work
