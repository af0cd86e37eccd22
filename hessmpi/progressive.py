"""Progressive batching: grow the batch when a variance test says noise dominates the step.

The augmented inner-product test (Bollapragada, Byrd & Nocedal 2018, "Adaptive sampling
strategies for stochastic optimization"; used with L-BFGS in Bollapragada, Mudigere,
Nocedal, Shi & Tang 2018) accepts a batch S of |S| rows with averaged gradient g when, over
the per-row gradients g_i,

    inner product:  Var_i(g_i^T g) / |S|                            <= theta^2 ||g||^4
    orthogonality:  E_i ||g_i - (g_i^T g / ||g||^2) g - its mean||^2 / |S|  <= nu^2 ||g||^2

When either fails the next batch has the smallest size that would pass both with the same
variances:

    |S'| = max(Var_ip / (theta^2 ||g||^4), Var_orth / (nu^2 ||g||^2)).

Per-row gradients are too dear, so each rank evaluates its part of the batch in K pieces
(the same work: the batch's gradient is their row-weighted sum) and the variances come from
the piece means g_j (n_j rows) about their rank's mean g_r (B rows): each rank draws from
its own shard, so the batch is stratified and only the spread within a shard is noise
(differences between the shards' means are not; pooling them would count them).
The between-group estimator, unbiased for independent rows:

    Var = sum_r sum_j n_j ||v_j - v_r||^2 / (P (K - 1))      (P (K - 1) degrees of freedom)

With e_j = g_j - g_r, two scalars per rank make the test, in one Allreduce:

    a_r = sum_j n_j (e_j^T g)^2 = sum_j n_j (g_j^T g)^2 - B (g_r^T g)^2
    d_r = sum_j n_j ||e_j||^2   = sum_j n_j ||g_j||^2   - B ||g_r||^2

Var_ip = sum_r a_r / dof and Var_orth = (sum_r d_r - sum_r a_r / ||g||^2) / dof. With
K = B (one row a piece) they are the per-row sample variances within the shards.
"""

from __future__ import annotations

import math

import numpy as np

from hessmpi.backend import to_host
from hessmpi.errors import UsageError


def requested_rows(a: float, d: float, g2: float, dof: int, theta: float,
                   nu: float) -> float:
    """The global batch (rows, may be fractional or inf) the augmented inner-product test
    asks for, from the sums ``a`` = sum_r a_r and ``d`` = sum_r d_r (module docstring) with
    ``dof`` >= 1 degrees of freedom and ``g2`` = ||g||^2 of the batch's averaged gradient.
    A batch of N rows passes the test iff the result is <= N."""
    if g2 <= 0.0:
        return math.inf
    var_ip = max(a, 0.0) / dof
    var_orth = max(d - a / g2, 0.0) / dof
    return max(var_ip / (theta * theta * g2 * g2), var_orth / (nu * nu * g2))


class BatchTest:
    """The test on one rank: ``pieces`` splits its part of the batch for the step's
    gradient, ``requested`` (a collective, after the gradient's reduction) gives the global
    batch the test asks for.

    comm: the Communicator; xp, dtype, n: the parameters' array module, type and length;
    k: pieces per rank (>= 2); theta, nu: the test's constants. Every rank's part must have
    the same number of rows.
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
        xp, n_j = self.xp, self._sizes
        rows = float(n_j.sum())
        dots = to_host(xp, self._grads @ grad).astype(np.float64)           # g_j^T g
        gram = to_host(xp, self._grads @ self._grads.T).astype(np.float64)  # g_i^T g_j
        weights = n_j / rows                                     # g_r = sum_j w_j g_j
        self._sums[0] = float(n_j @ dots ** 2 - rows * (weights @ dots) ** 2)
        self._sums[1] = float(n_j @ np.diag(gram) - rows * (weights @ gram @ weights))
        self.comm.allreduce_sum_(self._sums)
        g2 = float(xp.dot(grad, grad))
        return requested_rows(float(self._sums[0]), float(self._sums[1]), g2,
                              self.comm.size * (self.k - 1), self.theta, self.nu)
