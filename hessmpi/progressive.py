"""Progressive batching: grow the batch when a variance test says noise dominates the step.

The augmented inner-product test (Bollapragada, Byrd & Nocedal 2018, "Adaptive sampling
strategies for stochastic optimization"; used with L-BFGS in Bollapragada, Mudigere,
Nocedal, Shi & Tang 2018) accepts a batch S of |S| rows with averaged gradient g when, over
the per-row gradients g_i,

    inner product:  Var_i(g_i^T g) / |S|                          <= theta^2 ||g||^4
    orthogonality:  Var_i(||g_i - (g_i^T g / ||g||^2) g||) / |S|  <= nu^2 ||g||^2

(the second variance is E||.||^2 of the part of g_i orthogonal to g). When either fails the
next batch has the smallest size that would pass both with the same variances:

    |S'| = max(Var_ip / (theta^2 ||g||^4), Var_orth / (nu^2 ||g||^2)).

Per-row gradients are too dear, so each rank evaluates its part of the batch in K pieces
(the same work: the batch's gradient is their row-weighted sum) and the variances come from
the M = P K piece means g_j of n_j rows (the between-group estimator, unbiased for
independent rows): Var = sum_j n_j ||v_j - v||^2 / (M - 1). Two scalars per rank then
make the test, in one Allreduce:

    A = sum_j n_j (g_j^T g)^2,   D = sum_j n_j ||g_j||^2,
    sum_j n_j (g_j^T g - ||g||^2)^2 = A - N ||g||^4,   sum_j n_j ||g_j - proj||^2 = D - A / ||g||^2

(N = sum_j n_j, the global batch; sum_j n_j g_j = N g when every rank's part has B rows).
"""

from __future__ import annotations

import math

import numpy as np

from hessmpi.backend import to_host
from hessmpi.errors import UsageError


def requested_rows(a: float, d: float, g2: float, rows: int, pieces: int, theta: float,
                   nu: float) -> float:
    """The global batch (rows, may be fractional or inf) the augmented inner-product test
    asks for, given the sums ``a`` = A and ``d`` = D over every piece (module docstring),
    ``g2`` = ||g||^2 of the batch's averaged gradient, ``rows`` = N of the batch and
    ``pieces`` = M >= 2. The batch passes the test iff the result is <= ``rows``."""
    if g2 <= 0.0:
        return math.inf
    var_ip = max(a - rows * g2 * g2, 0.0) / (pieces - 1)
    var_orth = max(d - a / g2, 0.0) / (pieces - 1)
    return max(var_ip / (theta * theta * g2 * g2), var_orth / (nu * nu * g2))


class BatchTest:
    """The test on one rank: ``pieces`` splits its part of the batch for the step's
    gradient, ``requested`` (a collective, after the gradient's reduction) gives the global
    batch the test asks for.

    comm: the Communicator; xp, dtype, n: the parameters' array module, type and length;
    k: pieces per rank (>= 1; P k >= 2); theta, nu: the test's constants.
    """

    def __init__(self, comm, xp, dtype, n: int, *, k: int, theta: float, nu: float):
        self.comm, self.xp, self.k, self.theta, self.nu = comm, xp, k, theta, nu
        self._grads = xp.zeros((k, n), dtype=dtype)   # (K, n): the pieces' mean gradients
        self._sizes = np.zeros(k)
        self._sums = np.zeros(2)

    def pieces(self, rows: int) -> list[tuple[slice, object]]:
        """[(rows of the piece, its gradient's buffer (n,))] of a part of ``rows`` >= k
        rows, in order, sizes differing by at most one."""
        if rows < self.k:
            raise UsageError(f"optim.batch_pieces = {self.k} is more than the {rows} rows of "
                             "this rank's part of the batch: every piece needs a row")
        cuts = [j * rows // self.k for j in range(self.k + 1)]
        self._sizes[:] = np.diff(cuts)
        return [(slice(cuts[j], cuts[j + 1]), self._grads[j]) for j in range(self.k)]

    def requested(self, grad) -> float:
        """The global batch the test asks for, from the pieces of the last ``pieces`` call
        (evaluated since) and the averaged gradient ``grad`` (n,) of the batch; one
        Allreduce of two floats."""
        xp = self.xp
        dots = to_host(xp, self._grads @ grad).astype(np.float64)
        norms = to_host(xp, xp.einsum("ij,ij->i", self._grads, self._grads)).astype(np.float64)
        self._sums[0] = float(np.sum(self._sizes * dots * dots))
        self._sums[1] = float(np.sum(self._sizes * norms))
        self.comm.allreduce_sum_(self._sums)
        g2 = float(xp.dot(grad, grad))
        rows = int(self._sizes.sum()) * self.comm.size
        return requested_rows(float(self._sums[0]), float(self._sums[1]), g2, rows,
                              self.k * self.comm.size, self.theta, self.nu)
