"""The augmented inner-product test of progressive batching (hessmpi.progressive) on
constructed piece gradients, against closed forms; its options' refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hessmpi import config
from hessmpi.data import Sampler
from hessmpi.errors import UsageError
from hessmpi.progressive import BatchTest

ROWS, K = 40, 4      # a batch of 40 rows in 4 pieces of 10 (one rank)


def asked(comm, piece_grads, *, theta=0.9, nu=5.84) -> float:
    """The test's batch for constructed piece gradients (K, n) of pieces of ROWS / K rows."""
    test = BatchTest(comm, np, np.float64, piece_grads.shape[1], k=K, theta=theta, nu=nu)
    for (_, buffer), g in zip(test.pieces(ROWS), piece_grads, strict=True):
        buffer[...] = g
    return test.requested(piece_grads.mean(axis=0))


def along(delta: float) -> np.ndarray:
    """Pieces (1 +- delta, 0): all of their spread along g = (1, 0)."""
    return np.array([[1 + delta, 0], [1 - delta, 0], [1 + delta, 0], [1 - delta, 0]])


def across(eps: float) -> np.ndarray:
    """Pieces (1, +-eps): all of their spread orthogonal to g = (1, 0)."""
    return np.array([[1, eps], [1, -eps], [1, eps], [1, -eps]], dtype=float)


def test_the_inner_product_test_in_closed_form(comm):
    """g = (1, 0), pieces of b rows at g_j^T g = 1 +- delta: Var = K b delta^2 / (K - 1),
    the batch asked for Var / theta^2, so the batch of K b rows passes exactly while
    delta^2 <= theta^2 (K - 1)."""
    theta = 0.9
    for delta in (0.3, 1.2, 2.0):
        want = K * (ROWS / K) * delta ** 2 / (K - 1) / theta ** 2
        assert asked(comm, along(delta), theta=theta) == pytest.approx(want, rel=1e-12)
    edge = theta * math.sqrt(K - 1)
    assert asked(comm, along(edge * (1 - 1e-6)), theta=theta) <= ROWS
    assert asked(comm, along(edge * (1 + 1e-6)), theta=theta) > ROWS


def test_the_orthogonality_test_in_closed_form(comm):
    """Pieces (1, +-eps): no spread along g, orthogonal Var = K b eps^2 / (K - 1); the
    batch asked for is Var / nu^2 (||g|| = 1), passing exactly while eps^2 <= nu^2 (K - 1);
    the inner-product test alone would pass at any eps."""
    nu = 1.5
    for eps in (0.5, 3.0):
        want = K * (ROWS / K) * eps ** 2 / (K - 1) / nu ** 2
        assert asked(comm, across(eps), nu=nu) == pytest.approx(want, rel=1e-12)
        assert asked(comm, across(eps), nu=1e9) == pytest.approx(0, abs=1e-9)
    edge = nu * math.sqrt(K - 1)
    assert asked(comm, across(edge * (1 - 1e-6)), nu=nu) <= ROWS
    assert asked(comm, across(edge * (1 + 1e-6)), nu=nu) > ROWS


def test_one_row_a_piece_gives_the_per_row_sample_variances(comm):
    """K = B: the estimate is the papers' per-row definition, Var with B - 1 degrees of
    freedom of g_i^T g and E||.||^2 of the part of g_i - g orthogonal to g, written out."""
    rows = 7
    rng = np.random.default_rng(3)
    per_row = rng.standard_normal((rows, 5)) + np.array([2.0, 0, 1, 0, 0])
    test = BatchTest(comm, np, np.float64, 5, k=rows, theta=0.7, nu=1.3)
    for (_, buffer), g in zip(test.pieces(rows), per_row, strict=True):
        buffer[...] = g
    g = per_row.mean(axis=0)
    var_ip = np.var(per_row @ g, ddof=1)
    orth = (per_row - g) - np.outer((per_row - g) @ g / (g @ g), g)
    var_orth = np.sum(orth * orth) / (rows - 1)
    want = max(var_ip / (0.49 * (g @ g) ** 2), var_orth / (1.69 * (g @ g)))
    assert test.requested(g) == pytest.approx(want, rel=1e-10)


def test_the_larger_of_the_two_asks_wins(comm):
    grads = along(1.0) + across(2.0) - np.array([1, 0])
    alone = max(asked(comm, along(1.0), theta=0.5), asked(comm, across(2.0), nu=0.5))
    assert asked(comm, grads, theta=0.5, nu=0.5) == pytest.approx(alone, rel=1e-12)


def test_a_zero_gradient_asks_for_every_row(comm):
    assert asked(comm, np.array([[1.0, 0], [-1, 0], [1, 0], [-1, 0]])) == math.inf


def test_pieces_cover_the_batch_in_order(comm):
    test = BatchTest(comm, np, np.float64, 3, k=K, theta=0.9, nu=5.84)
    for rows in (4, 10, 41):
        cuts = [piece for piece, _ in test.pieces(rows)]
        assert cuts[0].start == 0 and cuts[-1].stop == rows
        assert all(a.stop == b.start for a, b in zip(cuts[:-1], cuts[1:], strict=True))
        assert max(c.stop - c.start for c in cuts) - min(c.stop - c.start for c in cuts) <= 1
    with pytest.raises(UsageError, match="batch_pieces = 4 is more than the 3 rows"):
        test.pieces(3)


def test_the_sampler_resizes_from_the_next_batch():
    sampler = Sampler(20, 4, seed=1, rank=0)
    first = sampler.next()
    sampler.resize(7)
    second = sampler.next()
    assert len(first) == 4 and len(second) == 7 and not set(first) & set(second)
    with pytest.raises(ValueError):
        sampler.resize(21)
    with pytest.raises(ValueError):
        Sampler(20, 4, seed=1, rank=0, overlap=1).resize(6)


@pytest.mark.parametrize("sets, needle", [
    (["train.batch_size=0"], "train.batch_size = 0"),
    (["optim.exchange=sharded"], "optim.exchange = 'sharded'"),
    (["optim.batch_pieces=32"], "every piece needs a row"),
    (["optim.batch_pieces=17"], "every piece needs a row"),
    (["optim.name=secant", "optim.pairs=overlap"], "does not apply"),
    (["optim.name=secant", "optim.pairs=probe"], "does not apply"),
    (["optim.name=deflated"], "does not apply"),
    (["optim.name=entropy_sgd"], "does not apply"),
    (["optim.batch_pieces=1"], "batch_pieces"),
])
def test_conflicting_options_are_refused(sets, needle):
    with pytest.raises(UsageError, match=needle):
        config.load(None, ["train.batch_size=16", "optim.batch_test=inner_product", *sets])


def test_test_constants_without_the_test_are_refused():
    with pytest.raises(UsageError, match="optim.batch_theta .* does not apply"):
        config.load(None, ["optim.batch_theta=0.5"])
