"""The secant optimizer (ALGORITHM.md sections 1-2): pairs from the workers, one Allgather,
an incrementally updated Gram matrix, and the quasi-Newton step of :mod:`quasi_newton`.

All pairs and the averaged gradient live as rows of one contiguous buffer

    W (1 + 2*P*k*K, n):  row 0 = g_bar, then K ring slots of 2*P*k rows each; in a slot,
                          rank r owns rows [2*k*r, 2*k*(r+1)): its k s-rows, then its k y-rows.

so that one in-place Allgather fills a slot, the memory never moves, the Gram update reads
W once, and d = c @ W is one matrix-vector product. Nothing of size n is allocated per step.

With ``pairs = "history"`` a slot holds one global pair (P = k = 1 in the layout): the step
taken, s = theta_{t+1} - theta_t, and the change of the averaged gradient on the same global
batch, y = g_B(theta_{t+1}) - g_B(theta_t) (the pairs of multi-batch L-BFGS, Berahas et al.
2016; the step is still the block rule of :mod:`quasi_newton`, which meets every kept secant
equation at once, not L-BFGS's two-loop recursion). It does not depend on the rank count.
At full batch (every rank's batch is its whole shard) y is the difference of consecutive
steps' averaged gradients and costs nothing; otherwise one extra gradient on the step's
batch at the new point and one Allreduce of n.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import numpy as np

from hessmpi.backend import synchronize, to_host
from hessmpi.optim.info import StepInfo
from hessmpi.optim.quasi_newton import FALLBACK_REASONS, direction

#: Bytes of W one block of the blocked Gram product covers: fastest measured for m = 4..16
#: on this machine's L2 (benchmarks/secant_step.py: 1 MiB, 8-21 % ahead of 256 KiB).
GRAM_BLOCK_BYTES = 1 << 20


class Secant:
    """Options are the ``[optim]`` keys of ALGORITHM.md section 2; ``model`` gives gradients
    for the probes, ``comm`` the collectives, ``draw_batch`` the next minibatch of this rank
    (used by ``pairs = "local"``), ``seed`` seeds the random probes."""

    def __init__(self, theta, *, model, comm, draw_batch, seed: int, opts: dict,
                 full_batch: bool = False):
        self.model, self.comm, self.draw_batch, self.seed = model, comm, draw_batch, seed
        self.o = opts
        self.full_batch = full_batch   # every batch of this rank is its whole shard
        xp = self.xp = model.xp
        self.history = opts["pairs"] == "history"
        n = theta.shape[0]
        self.k = 1 if self.history else opts["pairs_per_rank"]
        self.slot_ranks = 1 if self.history else comm.size   # contributors to one slot
        self.slot_rows = 2 * self.slot_ranks * self.k
        self.slots = opts["memory"]
        self.m = self.slot_ranks * self.k * self.slots
        self.W = xp.zeros((1 + self.slot_rows * self.slots, n), dtype=theta.dtype)
        self.gram = xp.zeros((self.W.shape[0],) * 2, dtype=theta.dtype)
        self.velocity = theta * 0
        self.work = theta * 0          # theta at the probe / drifted theta; then the step u
        self.filled = 0                # ring slots holding pairs
        self.next_slot = 0
        self.pending = False           # history: the next slot holds a pair not yet counted
        self.steps = 0
        self.counts = dict.fromkeys((*FALLBACK_REASONS, "clipped"), 0)
        block = max(1, GRAM_BLOCK_BYTES // (self.W.shape[0] * self.W.itemsize))
        self.gram_block = n if xp.__name__ != "numpy" else block
        probe, f = opts["pairs"] == "probe", opts["probe_batch"]
        if probe:    # k probes on a fraction f of the batch, the base gradient there if f < 1
            self._probe_cost = self.k * f + (f if f < 1 else 0.0)
            if opts["probe"] == "sgd" and self.k > 1:
                self._probe_cost += 1.0   # the k sub-batch directions cost one gradient in all
        elif self.history:
            self._probe_cost = 0.0 if full_batch else 1.0
        else:
            self._probe_cost = opts["local_steps"] - 1.0
        self.grad_evals_per_step = 1.0 + self._probe_cost   # of the last step, fractional
        self.probing = True            # whether the current step forms new pairs
        self._noise = (np.empty(n) if probe and opts["probe"] == "random"
                       else None)   # host buffer of the random probe directions
        self._probe_base = theta * 0 if probe and f < 1 else None  # gradient on the sub-batch
        self._trial = theta * 0 if opts["line_search"] == "armijo" else None
        self._reduced = np.zeros(1)    # a trial's objective, summed over ranks

    # ----- state ------------------------------------------------------------------------------
    def state(self) -> dict:
        """The arrays that a checkpoint must keep."""
        return {"velocity": self.velocity, "W": self.W, "gram": self.gram,
                "ring": np.array([self.filled, self.next_slot, self.steps, self.pending]),
                "counts": np.array(list(self.counts.values()))}

    def load_state(self, state: dict, same_layout: bool) -> None:
        """Restore ``state()`` as saved in a checkpoint. With another rank count
        (``same_layout`` false) the workers' pairs do not fit the ring and the memory starts
        empty; history pairs do not depend on the rank count and are kept."""
        xp = self.xp
        self.velocity[...] = xp.asarray(state["velocity"])
        ring = [int(v) for v in state["ring"]]
        self.steps = ring[2]
        self.counts = dict(zip(self.counts, (int(c) for c in state["counts"]), strict=True))
        if same_layout or self.history:
            self.W[...] = xp.asarray(state["W"])
            self.gram[...] = xp.asarray(state["gram"])
            self.filled, self.next_slot = ring[0], ring[1]
            self.pending = bool(ring[3]) if len(ring) > 3 else False

    def counters(self) -> str:
        """Fallbacks by reason and clipped steps so far, as JSON text."""
        return json.dumps(self.counts)

    @property
    def last_step_norm(self) -> float:
        """||theta_new - theta_old|| of the last step (= ||velocity||)."""
        return float(self.xp.linalg.norm(self.velocity))

    def _slot(self, t: int):
        start = 1 + t * self.slot_rows
        return self.W[start:start + self.slot_rows]

    def _my_rows(self, t: int):
        """(s rows (k, n), y rows (k, n)) of this rank in slot t."""
        r = 0 if self.history else self.comm.rank
        block = self._slot(t)[2 * self.k * r: 2 * self.k * (r + 1)]
        return block[:self.k], block[self.k:]

    # ----- before the Allreduce: this rank's pairs ------------------------------------------
    def observe(self, theta, grad, lr: float, x, y) -> float:
        """Form this rank's k pairs from its local gradient ``grad`` (n,) on batch (x, y) at
        ``theta``; for ``pairs = "local"`` drift first, replacing ``grad`` by the gradient at
        the drifted point. Only every ``probe_every``-th step forms pairs. Returns the
        seconds spent in gradient evaluations."""
        self.probing = self.o["pairs"] == "local" or self.steps % self.o["probe_every"] == 0
        self.grad_evals_per_step = 1.0 + (self._probe_cost if self.probing else 0.0)
        if not self.probing or self.history:   # history pairs are formed in step()
            return 0.0
        s_rows, y_rows = self._my_rows(self.next_slot)
        if self.o["pairs"] == "local":
            return self._drift(theta, grad, lr, s_rows, y_rows)
        xp, model = self.xp, self.model
        seconds = 0.0
        if self.o["probe"] == "sgd":
            eta_p = self.o["probe_lr"] or lr
            if self.k == 1:
                xp.multiply(grad, -eta_p, out=s_rows[0])
            else:
                synchronize(xp)
                t = time.perf_counter()
                bounds = np.linspace(0, len(y), self.k + 1).astype(int)
                for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
                    model.loss_grad(theta, x[a:b], y[a:b], s_rows[j])
                    s_rows[j] *= -eta_p
                synchronize(xp)
                seconds += time.perf_counter() - t
        else:
            scale = self.o["probe_sigma"] * max(float(xp.linalg.norm(theta)), 1.0)
            rng = np.random.default_rng([self.seed, self.comm.rank, self.steps])
            xi = self._noise
            for j in range(self.k):
                rng.standard_normal(out=xi)
                xi *= scale / np.linalg.norm(xi)
                s_rows[j][...] = xp.asarray(xi)
        base = grad
        if self._probe_base is not None:   # probe on the first rows of the batch only
            rows = max(1, math.ceil(round(self.o["probe_batch"] * len(y), 9)))
            x, y, base = x[:rows], y[:rows], self._probe_base
            synchronize(xp)
            t = time.perf_counter()
            model.loss_grad(theta, x, y, base)
            synchronize(xp)
            seconds += time.perf_counter() - t
        for j in range(self.k):
            xp.add(theta, s_rows[j], out=self.work)
            synchronize(xp)
            t = time.perf_counter()
            model.loss_grad(self.work, x, y, y_rows[j])
            synchronize(xp)
            seconds += time.perf_counter() - t
            y_rows[j] -= base
        return seconds

    def _drift(self, theta, grad, lr, s_rows, y_rows) -> float:
        """``local``: local_steps - 1 SGD steps on own minibatches from theta; s-row holds the
        drifted point, y-row and ``grad`` its gradient (made relative to the average later)."""
        seconds = 0.0
        point = s_rows[0]
        point[...] = theta
        for _ in range(self.o["local_steps"] - 1):
            self.xp.multiply(grad, lr, out=self.work)
            point -= self.work
            xb, yb = self.draw_batch()
            synchronize(self.xp)
            t = time.perf_counter()
            self.model.loss_grad(point, xb, yb, grad)
            synchronize(self.xp)
            seconds += time.perf_counter() - t
        y_rows[0] = grad
        return seconds

    # ----- after the Allreduce: exchange, Gram, step --------------------------------------
    def step(self, theta, grad, lr: float, x=None, y=None, loss: float | None = None
             ) -> StepInfo:
        """Exchange the pairs (on probing steps), update the Gram matrix, take the step
        (theta in place). ``grad`` (n,): the averaged gradient; ``loss``: the global
        minibatch objective at theta (the line search needs it); (x, y): this rank's batch."""
        xp, o, W = self.xp, self.o, self.W
        if self.history:
            slot = self._commit_history_pair(grad)
            W[0] = grad
            self._update_gram(slot)
        elif self.probing:
            self._exchange(theta, grad)
        else:
            W[0] = grad
            self._update_gram(None)
        active = 1 + self.filled * self.slot_rows
        # rows of each slot: per contributing rank, k s-rows then k y-rows
        rows = np.arange(1, active).reshape(self.filled, self.slot_ranks, 2, self.k)
        s_idx, y_idx = rows[:, :, 0].ravel(), rows[:, :, 1].ravel()
        # The (2m+1)^2 Gram matrix is tiny: its eigendecomposition and solves run on the host
        # (NumPy) on every backend; on a GPU, dozens of tiny kernels and syncs cost ~3 ms.
        gram = to_host(xp, self.gram[:active, :active])
        d = direction(gram, s_idx, y_idx, 0, eta=lr, curvature=o["curvature"],
                      curvature_tol=o["curvature_tol"], h0=o["h0"], lsq_mu=o["lsq_mu"],
                      max_step_ratio=o["max_step_ratio"], xp=np)
        reason, forward_evals = d.reason, 0
        u = self.work
        if reason is None:
            coef = np.zeros(active)
            coef[0] = d.coef_g
            coef[s_idx] = d.coef_s
            coef[y_idx] = d.coef_y
            coef *= o["newton_lr"]
            xp.matmul(xp.asarray(coef, dtype=W.dtype), W[:active], out=u)
            # ||d|| from the Gram misses what under- or overflowed in it (s.s = 0 for a tiny
            # s): hold the clip on the vector itself (u is identical on every rank).
            limit = o["newton_lr"] * o["max_step_ratio"] * lr * float(gram[0, 0]) ** 0.5
            u_norm = float(xp.linalg.norm(u))
            clipped = d.clipped
            if u_norm > limit:
                u *= limit / u_norm
                clipped = True
            self.counts["clipped"] += clipped
            if o["line_search"] == "armijo":
                accepted, forward_evals = self._armijo(theta, grad, u, loss, x, y)
                if not accepted:
                    reason = "line_search"
        if reason is not None:
            xp.multiply(grad, lr, out=u)
            self.counts[reason] += 1
        v = self.velocity
        v *= o["momentum"]
        v += u
        theta -= v
        self.steps += 1
        seconds = 0.0
        if self.history and not self.full_batch and self.probing:
            seconds = self._measure_history_pair(theta, grad, x, y)
        return StepInfo(fallback=int(reason is not None), reason=reason, rank_kept=d.kept,
                        forward_evals=forward_evals, grad_seconds=seconds)

    def _commit_history_pair(self, grad) -> int | None:
        """``pairs = "history"``: put the pair of the last step into the ring before W[0]
        becomes ``grad``; returns its slot, or None. At full batch the pair is formed here,
        y = grad - (the last step's averaged gradient, still in W[0]); otherwise it was
        measured at the end of the last step (``pending``)."""
        xp, slot = self.xp, self.next_slot
        s_row, y_row = (rows[0] for rows in self._my_rows(slot))
        if self.full_batch:
            if self.steps == 0 or (self.steps - 1) % self.o["probe_every"]:
                return None
            xp.negative(self.velocity, out=s_row)
            xp.subtract(grad, self.W[0], out=y_row)
        elif not self.pending:
            return None
        if self.o["damping"]:
            xp.multiply(s_row, self.o["damping"], out=self.work)
            y_row += self.work
        self.pending = False
        self.next_slot = (slot + 1) % self.slots
        self.filled = min(self.filled + 1, self.slots)
        return slot

    def _measure_history_pair(self, theta, grad, x, y) -> float:
        """Below full batch, after the step: s = theta_new - theta_old and y = g_B(theta_new)
        - g_B(theta_old) on this step's global batch B (one gradient of this rank's part of
        B, one Allreduce), kept in the next slot until the next step commits it. Returns the
        seconds of the gradient evaluation."""
        xp = self.xp
        s_row, y_row = (rows[0] for rows in self._my_rows(self.next_slot))
        synchronize(xp)
        t = time.perf_counter()
        self.model.loss_grad(theta, x, y, y_row)
        synchronize(xp)
        seconds = time.perf_counter() - t
        self.comm.allreduce_sum_(y_row)
        y_row /= self.comm.size
        y_row -= grad
        xp.negative(self.velocity, out=s_row)
        self.pending = True
        return seconds

    def _exchange(self, theta, grad) -> None:
        """Finish this rank's pairs, Allgather them into the next ring slot, update the Gram
        rows of that slot and of g. ``pairs = "local"``: theta becomes the ranks' average."""
        xp, o, W = self.xp, self.o, self.W
        slot_index = self.next_slot
        s_rows, y_rows = self._my_rows(slot_index)
        if o["pairs"] == "local":
            # theta_avg = mean of the drifted points; pairs relative to the averages.
            xp.copyto(self.work, s_rows[0])
            self.comm.allreduce_sum_(self.work)
            self.work /= self.comm.size
            s_rows[0] -= self.work
            y_rows[0] -= grad
            theta[...] = self.work
        if o["damping"]:
            for j in range(self.k):
                xp.multiply(s_rows[j], o["damping"], out=self.work)
                y_rows[j] += self.work
        self.comm.allgather_(self._slot(slot_index))
        W[0] = grad
        self.next_slot = (slot_index + 1) % self.slots
        self.filled = min(self.filled + 1, self.slots)
        self._update_gram(slot_index)

    def _armijo(self, theta, grad, u, loss: float, x, y) -> tuple[bool, int]:
        """Backtracking on the global minibatch objective (ALGORITHM.md s.8): shrink the
        step u (n,) in place, halving, until F(theta - (momentum*v + u)) <= F(theta) -
        c1 * g^T u; each trial is one forward pass per rank and one Allreduce of a scalar,
        so every rank takes the same decision (a NaN on any rank rejects the trial
        everywhere). Returns (accepted, forward passes)."""
        xp, o = self.xp, self.o
        slope = float(grad @ u)
        trial = self._trial
        for attempt in range(1, o["ls_max_trials"] + 1):
            xp.multiply(self.velocity, o["momentum"], out=trial)
            trial += u
            xp.subtract(theta, trial, out=trial)
            self._reduced[0] = float(self.model.loss(trial, x, y))
            self.comm.allreduce_sum_(self._reduced)
            if self._reduced[0] / self.comm.size <= loss - o["ls_c1"] * slope:
                return True, attempt
            u *= 0.5
            slope *= 0.5
        return False, o["ls_max_trials"]

    def _update_gram(self, slot_index: int | None) -> None:
        """Recompute the Gram rows and columns of the g row and of ring slot ``slot_index``
        (if any) against every active row: one blocked pass over W (rows read from cache)."""
        xp, W = self.xp, self.W
        active = 1 + self.filled * self.slot_rows
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
        new = xp.asarray(np.array([0, *range(start, start + rows)]))
        self.gram[new, :active] = out
        self.gram[:active, new] = out.T


def secant_options(optim_cfg: dict) -> dict[str, Any]:
    """The keys of ``[optim]`` the secant optimizer reads."""
    keys = ("pairs", "probe", "probe_lr", "probe_sigma", "probe_every", "probe_batch",
            "local_steps", "pairs_per_rank", "memory", "damping", "curvature", "curvature_tol",
            "lsq_mu", "h0", "newton_lr", "momentum", "max_step_ratio", "line_search", "ls_c1",
            "ls_max_trials")
    return {k: optim_cfg[k] for k in keys}

