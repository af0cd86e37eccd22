"""The distributed objective: F on the step's global batch, the union of every rank's part.

Every rank evaluates the model on its own part of the batch; collectives combine the parts.
Optimizers receive an :class:`Objective` instead of the model, the communicator and the
data: it gives the loss and the averaged gradient (one Allreduce), this rank's gradient
before the reduction (the workers' probes need it), gradients at other points and on
sub-batches, forward-only values (line searches) and Gauss-Newton-vector products, and it
counts and times every evaluation it makes.
"""

from __future__ import annotations

import math
import time

import numpy as np

from hessmpi.backend import synchronize
from hessmpi.errors import NonFiniteLoss


class Objective:
    """F(theta) = mean loss over the global batch + the model's regularisation.

    model: a model (protocol in :mod:`hessmpi.models`); comm: the Communicator.
    x, y, sampler: this rank's training shard (arrays of the model's module) and its
    minibatch sampler, for :meth:`next_batch` (omit them and call :meth:`use_batch`).
    full_batch: every rank's batch is its whole shard (then F is the training objective).

    ``grad`` (n,): after :meth:`local_gradient`, this rank's gradient; after
    :meth:`reduce_gradient`, the average over the ranks. ``exchange``: the reduction mode
    (:mod:`hessmpi.optim.exchange`, set by the optimizer): averaged n-vectors are delivered
    as this rank's part of them, ``grad_part`` for the gradient (with ``allgather`` the
    part is the whole: ``grad_part`` is ``grad``; ``sharded``: a reduce-scatter fills only
    ``grad_part``, and :meth:`whole_gradient` gathers the rest). Counters, per rank and cumulative:
    ``grad_evals`` (an evaluation on r of the batch's B rows counts r / B), ``forward_evals``,
    ``curvature_evals``; ``seconds``: wall time inside model evaluations. ``stop_flag``:
    this rank's value sent with the next gradient Allreduce; ``stop_requested``: whether any
    rank's was non-zero. ``batch_test``: a :class:`hessmpi.progressive.BatchTest` that
    :meth:`gradient` runs (needs the whole gradient: allgather exchange);
    ``requested_batch``: the global batch (rows) it last asked for.
    """

    def __init__(self, model, comm, x=None, y=None, sampler=None, *, full_batch: bool = False):
        self.model, self.comm, self.xp = model, comm, model.xp
        self._shard_x, self._shard_y, self._sampler = x, y, sampler
        self.full_batch = full_batch
        n = model.n_params
        # one Allreduce carries the gradient (n), the loss and the stop flag; the buffer may
        # be this rank's segment of the node's shared-memory window (comm.gradient_buffer)
        self._buf = comm.gradient_buffer(n + 2, model.dtype, self.xp, owner=self)
        self.grad = self._buf[:n]
        self.grad_part = self.grad
        self._grad_whole = False  # grad holds the whole averaged gradient
        self._work = None         # (n,) scratch of a sharded reduction
        self._piece = None        # (n,) scratch of a gradient evaluated in pieces
        self._scalar = np.zeros(1)
        self._trial = None        # (n + 1,): a trial point's gradient and loss
        self._adopted = False     # _trial holds the gradient at the next step's point
        self._flag = np.zeros(1)
        self.x = self.y = None
        self.grad_evals = 0.0
        self.forward_evals = 0
        self.curvature_evals = 0.0
        self.seconds = 0.0
        self.stop_flag = 0
        self.stop_requested = False
        self.batch_test = None       # a progressive.BatchTest run with every gradient()
        self.requested_batch = 0.0   # the global batch its last run asked for (rows)
        from hessmpi.optim.exchange import AllgatherExchange

        self.exchange = AllgatherExchange(comm, n)

    def use_exchange(self, exchange) -> None:
        """Deliver averaged n-vectors in ``exchange``'s layout from now on (this rank's
        part of them: reduce-scatter where the part is less than the whole)."""
        self.exchange = exchange
        self.grad_part = exchange.part_buffer(self.grad)
        if exchange.part_size != self.model.n_params:
            self._work = self.xp.zeros(self.model.n_params, dtype=self.model.dtype)

    @property
    def gradient_collective(self) -> str:
        """How the step's gradient is reduced, in words (the results file's attribute)."""
        return self.comm.gradient_path(self._buf, sharded=self.grad_part is not self.grad)

    def _whole_for(self, out):
        """``out`` itself if it is whole (n,), else the scratch the reduction starts from."""
        return out if out.shape[-1] == self.model.n_params else self._work

    # ----- the step's batch ---------------------------------------------------------------
    def next_batch(self) -> None:
        """Make this rank's next minibatch from its sampler the batch of the step. At full
        batch it is the whole shard as stored (the sampler still counts the epochs; no rows
        are copied), so an adopted trial gradient stays valid."""
        idx = self._sampler.next()
        if self.full_batch:
            self.x, self.y = self._shard_x, self._shard_y
            return
        idx = self.xp.asarray(idx)
        self.x, self.y = self._shard_x[idx], self._shard_y[idx]
        self._adopted = False

    def use_batch(self, x, y) -> None:
        """Make (x (B, d), y (B,)) this rank's part of the step's batch (the same arrays
        again keep an adopted trial gradient)."""
        self._adopted &= x is self.x and y is self.y
        self.x, self.y = x, y

    @property
    def batch_rows(self) -> int:
        """B: rows of this rank's part of the batch."""
        return len(self.y)

    # ----- evaluations ---------------------------------------------------------------------
    def _timed(self, fn, *args):
        synchronize(self.xp)
        started = time.perf_counter()
        result = fn(*args)
        synchronize(self.xp)
        self.seconds += time.perf_counter() - started
        return result

    def local_gradient(self, theta, out=None, rows: slice | None = None, pieces=()) -> float:
        """This rank's loss on its batch (or on ``rows`` of it) at ``theta``, its gradient
        written into ``out`` (default ``grad``); no collective. ``pieces``: [(rows, out_i)]
        of the batch, in order and disjoint, whose own gradients (means over their rows)
        are also wanted: the batch is then evaluated piece by piece (the rest between them
        too) and its gradient is their row-weighted sum; the work is the same."""
        if out is None:
            out, self._grad_whole = self.grad, False
        if pieces:
            return self._pieced_gradient(theta, out, pieces)
        x, y = (self.x, self.y) if rows is None else (self.x[rows], self.y[rows])
        self.grad_evals += len(y) / self.batch_rows
        return float(self._timed(self.model.loss_grad, theta, x, y, out))

    def _pieced_gradient(self, theta, out, pieces) -> float:
        rows = self.batch_rows
        cuts, at = [], 0
        for piece, piece_out in pieces:
            if piece.start > at:
                cuts.append((slice(at, piece.start), None))
            cuts.append((piece, piece_out))
            at = piece.stop
        if at < rows:
            cuts.append((slice(at, rows), None))
        if self._piece is None:
            self._piece = self.xp.zeros(self.model.n_params, dtype=self.model.dtype)
        out[...] = 0
        loss, counted = 0.0, self.grad_evals
        for piece, piece_out in cuts:
            target = self._piece if piece_out is None else piece_out
            weight = (piece.stop - piece.start) / rows
            loss += weight * self.local_gradient(theta, target, rows=piece)
            out += weight * target
        self.grad_evals = counted + 1.0    # one whole gradient, not a sum of rounded parts
        return loss

    def reduce_gradient(self, local_loss: float) -> float:
        """Average ``grad`` and the loss over the ranks (one Allreduce, which also carries
        the stop flag; sharded: a reduce-scatter into ``grad_part`` and an Allreduce of the
        two scalars); returns the global loss. NonFiniteLoss on every rank if it is NaN or
        infinite."""
        n = self.model.n_params
        self._buf[n] = local_loss
        self._buf[n + 1] = self.stop_flag
        self.exchange.sum_(self._buf, n, self.grad_part)
        self.stop_requested = bool(self._buf[n + 1] != 0)
        self.grad_part /= self.comm.size
        self._buf[n:] /= self.comm.size
        self._grad_whole = self.grad_part is self.grad
        loss = float(self._buf[n])
        if not math.isfinite(loss):
            raise NonFiniteLoss(loss)
        return loss

    def gradient(self, theta) -> float:
        """The global loss at ``theta``; ``grad`` becomes the averaged gradient. If a line
        search adopted its accepted trial (at full batch, ``theta`` is that trial), its
        gradient is taken without evaluating again; the stop flag still travels (an
        Allreduce of one float). With a ``batch_test`` the batch is evaluated in its pieces
        (the same work) and ``requested_batch`` set (one more Allreduce, of two floats)."""
        if not self._adopted:
            if self.batch_test is None:
                return self.reduce_gradient(self.local_gradient(theta))
            loss = self.reduce_gradient(self.local_gradient(
                theta, pieces=self.batch_test.pieces(self.batch_rows)))
            self.requested_batch = self.batch_test.requested(self.grad)
            return loss
        self._adopted = False
        n = self.model.n_params
        self.grad[...] = self._trial[:n]
        if self.grad_part is not self.grad:
            self.grad_part[...] = self.exchange.part(self.grad)
        self._grad_whole = True
        self._flag[0] = self.stop_flag
        self.comm.allreduce_sum_(self._flag)
        self.stop_requested = bool(self._flag[0] != 0)
        return float(self._trial[n])

    def whole_gradient(self):
        """The averaged gradient (n,) whole: ``grad``, gathered from the ranks' parts first
        if only this rank's part of it is known (sharded, after a reduce-scatter)."""
        if not self._grad_whole:
            self.exchange.whole(self.grad_part, self.grad)
            self._grad_whole = True
        return self.grad

    def grad_norm(self) -> float:
        """||the averaged gradient|| of the step (sharded: a collective)."""
        return self.exchange.norm(self.grad_part)

    def average_(self, local, out) -> None:
        """``out`` <- this rank's part ((n,) with allgather) of the mean over the ranks of
        ``local`` (n,) (one Allreduce of n, or a reduce-scatter; ``local`` may be
        overwritten)."""
        n = self.model.n_params
        self.exchange.sum_(local, n, out)
        if out.shape[-1] == n and out is not local:   # a whole part is reduced in place
            out[...] = local
        out /= self.comm.size

    def mean_gradient_at(self, point, out) -> None:
        """``out`` <- this rank's part ((n,) with allgather) of the averaged gradient at
        ``point`` on the step's batch (one Allreduce of n, or a reduce-scatter)."""
        whole = self._whole_for(out)
        self.local_gradient(point, whole)
        self.average_(whole, out)

    def value(self, point) -> float:
        """F on the step's global batch at ``point``: one forward pass per rank and one
        Allreduce of a scalar (a NaN on any rank makes it NaN everywhere)."""
        self.forward_evals += 1
        self._scalar[0] = float(self._timed(self.model.loss, point, self.x, self.y))
        self.comm.allreduce_sum_(self._scalar)
        return self._scalar[0] / self.comm.size

    def adopt_trial(self) -> None:
        """The last :meth:`value_and_gradient` point becomes the next step's parameters:
        at full batch its gradient serves the next :meth:`gradient` (the trial's evaluation
        is not repeated); below it nothing is kept."""
        self._adopted = self.full_batch

    def value_and_gradient(self, point) -> tuple[float, object]:
        """(F, the averaged gradient (n,)) on the step's global batch at ``point``, in one
        Allreduce of n + 1 floats; the gradient is a view of a buffer the next call
        overwrites. ``grad`` is left alone."""
        n = self.model.n_params
        if self._trial is None:
            self._trial = self.xp.zeros(n + 1, dtype=self.grad.dtype)
        self._trial[n] = self.local_gradient(point, self._trial[:n])
        self.comm.allreduce_sum_(self._trial)
        self._trial /= self.comm.size
        return float(self._trial[n]), self._trial[:n]

    def curvature_product(self, theta, v, out, rows: slice | None = None) -> None:
        """``out`` <- this rank's part ((n,) with allgather) of G v, the Gauss-Newton matrix
        of F on the step's global batch (or on ``rows`` of every rank's part) at ``theta``
        (n,) times ``v`` (n,): one R-operator pass per rank, one Allreduce of n (or a
        reduce-scatter); counted like gradients, r / B for r of B rows."""
        x, y = (self.x, self.y) if rows is None else (self.x[rows], self.y[rows])
        self.curvature_evals += len(y) / self.batch_rows
        whole = self._whole_for(out)
        self._timed(self.model.curvature_product, theta, v, x, y, whole)
        self.average_(whole, out)

    def fisher_diagonal(self, theta, out, rows: slice | None = None) -> None:
        """``out`` (n,) <- the diagonal of the empirical Fisher matrix (mean over the rows of
        the squared per-row gradients of the loss) on the step's global batch (or ``rows``
        of every rank's part); counted as a gradient."""
        x, y = (self.x, self.y) if rows is None else (self.x[rows], self.y[rows])
        self.grad_evals += len(y) / self.batch_rows
        self._timed(self.model.fisher_diagonal, theta, x, y, out)
        self.comm.allreduce_sum_(out)
        out /= self.comm.size

    def full_value(self, theta, chunk: int = 4096) -> float:
        """F over every training row of every rank (equal shards), in chunks of ``chunk``
        rows; a collective, not counted as training work."""
        x, y = self._shard_x, self._shard_y
        total = 0.0
        for start in range(0, len(y), chunk):
            rows = len(y[start:start + chunk])
            total += rows * float(self.model.loss(theta, x[start:start + chunk],
                                                  y[start:start + chunk]))
        self._scalar[0] = total / len(y)
        self.comm.allreduce_sum_(self._scalar)
        return float(self._scalar[0] / self.comm.size)

    def evaluate(self, theta, x, y) -> tuple[float, float]:
        """(mean loss, accuracy) over every rank's rows (x, y), e.g. the test split; a
        collective. Not counted as training work."""
        loss_sum, correct = self.model.evaluate(theta, x, y)
        totals = np.array([loss_sum, correct, len(y)], dtype=np.float64)
        self.comm.allreduce_sum_(totals)
        return totals[0] / totals[2], totals[1] / totals[2]

    # ----- state ------------------------------------------------------------------------------
    def state(self) -> dict:
        """What a checkpoint keeps so that a resumed run continues bit for bit: an adopted
        trial's gradient and loss (n + 1,), if any."""
        return {"adopted": self._trial} if self._adopted else {}

    def load_state(self, state: dict) -> None:
        """Restore :meth:`state` (saved on as many ranks)."""
        if "adopted" in state:
            self._trial = self.xp.asarray(state["adopted"], dtype=self.grad.dtype).copy()
            self._adopted = True

    # ----- counters --------------------------------------------------------------------------
    def counters(self) -> dict[str, float]:
        """The cumulative evaluation counts, as stored in checkpoints and metrics."""
        return {"grad_evals": self.grad_evals, "forward_evals": self.forward_evals,
                "curvature_evals": self.curvature_evals}

    def restore_counters(self, counts: dict) -> None:
        """Continue the counts of a checkpoint (missing ones from older files: 0)."""
        self.grad_evals = float(counts.get("grad_evals", 0.0))
        self.forward_evals = int(counts.get("forward_evals", 0))
        self.curvature_evals = float(counts.get("curvature_evals", 0.0))
