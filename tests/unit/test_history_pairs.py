"""History pairs (``optim.pairs = "history"``) of the secant optimizer on one rank (a
Communicator over MPI.COMM_SELF), float64: multi-batch L-BFGS pairs s = theta_{t+1} -
theta_t, y = g_B(theta_{t+1}) - g_B(theta_t) on the same batch B (Berahas et al. 2016).

Independent references: the parameters recorded by the test after every step and gradients
recomputed with model.loss_grad at those points on the same rows (the ring contents, slot by
slot, with wrap-around); a Gram matrix recomputed from scratch; the textbook L-BFGS two-loop
recursion (Nocedal & Wright, Alg. 7.4) and the dense n x n block-BFGS inverse of
ALGORITHM.md s.2 written here; a quadratic's exact minimiser np.linalg.solve(A, b); the rows
the model was asked to differentiate inside step(); the UsageError of hessmpi.config.

What "bfgs" computes with history pairs (read from quasi_newton.direction and checked
below): with one pair it is exactly the L-BFGS step with H0 = s^T y / y^T y; with m >= 2
pairs it is the block-BFGS inverse of ALGORITHM.md s.2 (all pairs at once, D = sym(S^T Y)
eigen-filtered, H0 = tr(S^T Y) / tr(Y^T Y) over the kept pairs), which is not the L-BFGS
two-loop recursion (the two agree only when S^T Y is diagonal).
"""

from __future__ import annotations

import numpy as np
import pytest
from harness import block_bfgs, build, counted, optim_options, rel
from toymodels import Quadratic, Recorder, SoftmaxProblem, bare, spd

from hessmpi import config
from hessmpi.errors import UsageError
from hessmpi.objective import Objective

pytestmark = pytest.mark.timeout(30)

#: The intended use: L-BFGS on the global batch.
LBFGS = dict(pairs="history", line_search="armijo", newton_lr=1.0, momentum=0.0,
             damping=0.0, h0="bb", max_step_ratio=1e4)
DUMMY_X, DUMMY_Y = np.zeros((4, 1)), np.zeros(4, dtype=np.int64)


# ----- problems, steps and references ----------------------------------------------------------
def softmax(seed, rows=60, batch=16) -> SoftmaxProblem:
    """Softmax regression [4, 3] with l2 1e-2 (strictly convex) on random rows."""
    return SoftmaxProblem(seed, d=4, classes=3, rows=rows, batch=batch, l2=1e-2,
                          theta_scale=0.5)


def make(model, theta, comm, *, full_batch: bool, **keys):
    """(Secant with ``keys``, its Objective) for ``model``."""
    objective = Objective(model, comm, full_batch=full_batch)
    return build(theta, objective, seed=3, **keys), objective


def take_step(opt, objective, theta, x, y, lr):
    """One step as the trainer's Run.step takes it on one rank, on batch (x, y). Returns
    (info, g, what the objective counted), g the batch gradient at theta recomputed here
    (with the model a Recorder wraps: it records nothing)."""
    g = np.empty_like(theta)
    bare(objective.model).loss_grad(theta, x, y, g)
    objective.use_batch(x, y)
    with counted(objective) as used:
        info = opt.step(theta, objective, lr)
    return info, g, used


def slot_pair(opt, q):
    """(s, y) rows of ring slot q: one global pair per slot, 2 rows."""
    return opt.memory.W[1 + 2 * q], opt.memory.W[2 + 2 * q]


def ring(opt):
    """(filled, next slot, pending, steps)."""
    return opt.memory.filled, opt.memory.next_slot, opt.source.pending, opt.steps


def assert_gram_fresh(opt):
    """The Gram matrix of the active rows of W equals W W^T recomputed from scratch; a slot
    that holds a pending pair (not yet counted) is left out."""
    memory, pending = opt.memory, opt.source.pending
    active = 1 + 2 * memory.filled
    rows = [r for r in range(active)
            if not (pending and r in (1 + 2 * memory.next_slot, 2 + 2 * memory.next_slot))]
    Wa = memory.W[rows]
    fresh = Wa @ Wa.T
    err = np.abs(memory.gram[np.ix_(rows, rows)] - fresh).max()
    assert err <= 1e-13 * np.abs(fresh).max(), err


def two_loop(S, Y, g, h0):
    """H g of textbook L-BFGS (Nocedal & Wright Alg. 7.4), pairs oldest first, H0 = h0 I."""
    q, alphas = g.copy(), []
    for s, y in reversed(list(zip(S, Y, strict=True))):
        a = (s @ q) / (s @ y)
        alphas.append(a)
        q -= a * y
    r = h0 * q
    for (s, y), a in zip(zip(S, Y, strict=True), reversed(alphas), strict=True):
        b = (y @ r) / (s @ y)
        r += s * (a - b)
    return r


# ----- the ring at full batch ----------------------------------------------------------------
@pytest.mark.parametrize("variant", ["lbfgs", "momentum-damping"])
def test_full_batch_ring_holds_the_steps_taken_and_the_gradient_changes(comm, variant):
    """Memory 3, 8 steps on the whole data: after step t the ring holds the pairs of steps
    0..t-1, pair j in slot j % 3 (the oldest evicted first), s_j = theta_{j+1} - theta_j
    (the step taken, momentum included), y_j = grad F(theta_{j+1}) - grad F(theta_j)
    (+ damping * s_j), all recomputed here; no extra gradient; the Gram matrix is fresh."""
    K, steps = 3, 8
    p = softmax(1)
    model = Recorder(p.model)
    if variant == "lbfgs":
        keys, lam, lr = dict(LBFGS, memory=K), 0.0, 0.5
    else:
        keys = dict(pairs="history", memory=K, momentum=0.5, damping=0.1, newton_lr=0.5,
                    line_search="none", h0="lr", max_step_ratio=10.0)
        lam, lr = 0.1, 0.3
    theta = p.theta.copy()
    opt, objective = make(model, theta, comm, full_batch=True, **keys)
    assert opt.source.cost() == 0.0
    thetas = [theta.copy()]
    fallbacks = []
    for t in range(steps):
        model.grad_rows.clear()
        model.points.clear()
        info, g, used = take_step(opt, objective, theta, p.x, p.y, lr)
        thetas.append(theta.copy())
        fallbacks.append(info.reason)
        # no extra gradient for the pairs: without a line search the step's own only; with
        # it at full batch only the trials' (the accepted one is the next step's gradient;
        # step 0 also pays its own), the last of them the new point
        own = keys["line_search"] == "none" or t == 0
        assert used["grad_evals"] == len(model.grad_rows) and used["forward_evals"] == 0
        assert model.grad_rows == [len(p.y)] * len(model.points)
        if keys["line_search"] == "none":
            assert len(model.points) == 1
        else:
            assert len(model.points) >= 1 + own
            np.testing.assert_array_equal(model.points[-1], theta)
        np.testing.assert_array_equal(opt.memory.W[0], g)
        assert ring(opt) == (min(t, K), t % K, False, t + 1)
        for q in range(K):
            s_row, y_row = slot_pair(opt, q)
            held = [j for j in range(t) if j % K == q]           # pairs that went to slot q
            if not held:
                assert not s_row.any() and not y_row.any(), (t, q)
                continue
            j = held[-1]                                         # the newest one survives
            s = thetas[j + 1] - thetas[j]
            y = p.grad(thetas[j + 1], p.x, p.y) - p.grad(thetas[j], p.x, p.y) + lam * s
            np.testing.assert_allclose(s_row, s, rtol=0, atol=1e-14 * np.abs(s).max())
            np.testing.assert_allclose(y_row, y, rtol=0, atol=1e-14 * np.abs(y).max())
        assert_gram_fresh(opt)
    assert fallbacks[0] == "no_pairs" and fallbacks[1:] == [None] * (steps - 1), fallbacks
    state = opt.state()
    assert [int(v) for v in state["ring"]] == [K, (steps - 1) % K, steps, 0]


@pytest.mark.parametrize("T", [2, 3])
def test_full_batch_pairs_only_from_steps_at_multiples_of_probe_every(comm, T):
    """probe_every T: only the steps t with t % T == 0 give a pair (committed at step t+1)."""
    p = softmax(2)
    K = 2
    theta = p.theta.copy()
    opt, objective = make(p.model, theta, comm, full_batch=True, **LBFGS, memory=K,
                          probe_every=T)
    thetas = [theta.copy()]
    for t in range(3 * T + 2):
        _, _, used = take_step(opt, objective, theta, p.x, p.y, 0.5)
        thetas.append(theta.copy())
        formed = [j for j in range(t) if j % T == 0]             # pairs committed so far
        assert opt.memory.filled == min(len(formed), K)
        assert used["grad_evals"] >= (2.0 if t == 0 else 1.0)   # step 0: its own + trials
        for i, j in enumerate(formed[-K:]):
            s_row, y_row = slot_pair(opt, (len(formed) - len(formed[-K:]) + i) % K)
            s = thetas[j + 1] - thetas[j]
            y = p.grad(thetas[j + 1], p.x, p.y) - p.grad(thetas[j], p.x, p.y)
            np.testing.assert_allclose(s_row, s, rtol=0, atol=1e-14 * np.abs(s).max())
            np.testing.assert_allclose(y_row, y, rtol=0, atol=1e-14 * np.abs(y).max())
        assert_gram_fresh(opt)


# ----- the step direction against independent references -------------------------------------
def softmax_problem():
    p = softmax(0, rows=40)
    return p.model, p.theta.copy(), p.x, p.y, 0.5


def quadratic_problem():
    A, b, _ = spd(6, seed=7)
    return Quadratic(A, b), np.random.default_rng(8).standard_normal(6), DUMMY_X, DUMMY_Y, 0.05


@pytest.mark.parametrize("problem", [softmax_problem, quadratic_problem],
                         ids=["softmax-l2", "quadratic"])
def test_one_pair_gives_the_lbfgs_two_loop_step(comm, problem):
    """Step 0 is the searched SGD step (no pair yet: from lr, halving); step 1 holds one
    pair. Its first trial point (newton_lr 1, momentum 0) is theta - H g with H the two-loop
    recursion on the pair that the test recomputes, H0 = s^T y / y^T y (with one pair,
    h0 = "bb" of quasi_newton.py, tr(S^T Y) / tr(Y^T Y) over the kept pairs, is exactly
    this). At full batch the trials are gradient evaluations (the accepted one is the next
    step's gradient): step 0 evaluates theta0, then its trials; step 1 only its trials."""
    inner, theta, x, y, lr = problem()
    model = Recorder(inner)
    opt, objective = make(model, theta, comm, full_batch=True, **LBFGS, memory=5)
    theta0 = theta.copy()
    info, g0, _ = take_step(opt, objective, theta, x, y, lr)
    trials = model.points[1:]
    assert info.reason == "no_pairs" and len(trials) >= 1
    t = lr / 2 ** (len(trials) - 1)
    np.testing.assert_array_equal(trials[-1], theta0 - t * g0)
    np.testing.assert_array_equal(theta, theta0 - t * g0)
    model.points.clear()
    theta1 = theta.copy()
    g1 = np.empty_like(theta)
    inner.loss_grad(theta1, x, y, g1)
    s, yv = theta1 - theta0, g1 - g0
    assert s @ yv > 0
    info, _, used = take_step(opt, objective, theta, x, y, lr)
    assert info.reason is None and info.rank_kept == 1 and not opt.counts["clipped"]
    d = theta1 - model.points[0]
    want = two_loop([s], [yv], g1, (s @ yv) / (yv @ yv))
    assert rel(d, want) < 1e-10, rel(d, want)
    if used["grad_evals"] == 1:                                  # the unit step was taken
        np.testing.assert_array_equal(theta, model.points[0])


def test_several_pairs_give_the_block_bfgs_step_of_algorithm_md(comm):
    """Memory 4 on softmax with l2: at every step the first trial is theta - H g with H the
    dense block-BFGS inverse of ALGORITHM.md s.2 on the pairs recomputed here (filter
    included: the kept count must agree). With one pair this is also L-BFGS (above); with
    several it is not the two-loop recursion, which the last check makes sure this
    problem can tell apart (so a two-loop implementation would fail here)."""
    K, tau = 4, optim_options().curvature_tol
    inner, theta, x, y, lr = softmax_problem()
    model = Recorder(inner)
    opt, objective = make(model, theta, comm, full_batch=True, **LBFGS, memory=K)
    thetas, grads, compared, lbfgs_gap = [], [], 0, 0.0
    for t in range(10):
        thetas.append(theta.copy())
        model.points.clear()
        info, g, _ = take_step(opt, objective, theta, x, y, lr)
        grads.append(g)
        if t == 0:
            continue
        S = [thetas[j + 1] - thetas[j] for j in range(max(0, t - K), t)]
        Y = [grads[j + 1] - grads[j] for j in range(max(0, t - K), t)]
        want, kept = block_bfgs(g, np.array(S).T, np.array(Y).T, "bb", tau)
        assert info.rank_kept == kept, (t, info, kept)
        if info.reason is not None:
            continue
        d = thetas[t] - model.points[0]          # the gradient came from step t-1's trial
        assert rel(d, want) < 1e-10, (t, rel(d, want))
        compared += 1
        if kept == len(S) >= 2:
            lbfgs_gap = max(lbfgs_gap, rel(d, two_loop(S, Y, g, (S[-1] @ Y[-1])
                                                      / (Y[-1] @ Y[-1]))))
    assert compared >= 7
    assert lbfgs_gap > 1e-2, "the problem does not separate block BFGS from L-BFGS"


@pytest.mark.parametrize("n", [4, 6, 10])
def test_quadratic_reaches_the_minimiser_in_n_plus_2_steps(comm, n):
    """F = 1/2 x^T A x - b^T x, cond(A) = 100, exact gradients, full batch, memory n, Armijo.
    The first step has no pair (the SGD step); the first n steps give n pairs y = A s that
    span R^n, and block BFGS satisfies every secant equation H Y = S (ALGORITHM.md s.3), so
    step n+1 is Newton's step, H = A^{-1}, whatever the earlier step lengths (L-BFGS's
    n-step termination needs exact line searches; the textbook two-loop with these unit
    Armijo steps needed 22-31 steps at n = 10). Measured over 20 seeds: 1e-8 after n+1
    steps on most, the others one step later (the last pairs are short, S^T A S is
    ill-conditioned and Newton's step from them is accurate to ~1e-7 only), hence n+2.
    curvature_tol 1e-12: with the default 1e-6 the filter drops directions of such pairs
    and n = 8 took up to 28 steps."""
    for seed in range(6):
        A, b, _ = spd(n, seed, low=1.0, high=100.0)
        minimiser = np.linalg.solve(A, b)
        model = Quadratic(A, b)
        theta = np.random.default_rng(seed + 100).standard_normal(n)
        opt, objective = make(model, theta, comm, full_batch=True, **LBFGS, memory=n,
                              curvature_tol=1e-12)
        errors = []
        for _ in range(n + 2):
            take_step(opt, objective, theta, DUMMY_X, DUMMY_Y, 0.005)
            errors.append(np.linalg.norm(theta - minimiser) / max(1.0, np.linalg.norm(minimiser)))
        assert errors[n - 1] > 1e-4, (seed, errors)            # not there before the n-th pair
        assert errors[n] < 1e-5, (seed, errors)                # Newton's step, to roundoff
        assert errors[n + 1] < 1e-8, (seed, errors)


# ----- below full batch ----------------------------------------------------------------------
def test_below_full_batch_pairs_are_measured_on_the_steps_batch_and_committed_next_step(comm):
    """Batches of 16 of 60 rows, probe_every 3, memory 2: on steps t % 3 == 0 the optimizer
    differentiates the step's batch once more at the new point (16 rows more, grad_evals 2)
    and keeps s = theta_{t+1} - theta_t, y = g_B(theta_{t+1}) - g_B(theta_t) (recomputed
    here on that batch B) pending in the next slot; step t+1 commits it unchanged; other
    steps cost one gradient and touch no slot."""
    T, K = 3, 2
    p = softmax(3, batch=16)
    model = Recorder(p.model)
    theta = p.theta.copy()
    opt, objective = make(model, theta, comm, full_batch=False, **LBFGS, memory=K,
                          probe_every=T)
    assert opt.source.cost() == 1.0
    memory = opt.memory
    committed = 0
    pending = None                                # (slot, s, y) measured on the last step
    for t in range(3 * T + 2):
        x, y = p.draw()
        before, W_before = theta.copy(), memory.W.copy()
        model.grad_rows.clear()
        _, g, used = take_step(opt, objective, theta, x, y, 0.5)
        forming = t % T == 0
        assert opt.source.forming == forming
        assert used["grad_evals"] == (2.0 if forming else 1.0)
        assert model.grad_rows == [len(y)] * (2 if forming else 1), (t, model.grad_rows)
        if pending is not None:                   # committed by this step, unchanged
            committed += 1
            q, s, yv = pending
            np.testing.assert_array_equal(np.stack(slot_pair(opt, q)), np.stack([s, yv]))
        assert memory.filled == min(committed, K)
        changed = {q for q in range(K) if not np.array_equal(
            np.stack(slot_pair(opt, q)), W_before[1 + 2 * q:3 + 2 * q])}
        if forming:
            q = committed % K
            assert opt.source.pending and memory.next_slot == q and changed <= {q}
            s_row, y_row = slot_pair(opt, q)
            s = theta - before
            yv = p.grad(theta, x, y) - g
            np.testing.assert_allclose(s_row, s, rtol=0, atol=1e-14 * np.abs(s).max())
            np.testing.assert_allclose(y_row, yv, rtol=0, atol=1e-14 * np.abs(yv).max())
            x2, y2 = p.draw()                     # what a next-batch difference would give
            assert rel(y_row, p.grad(theta, x2, y2) - g) > 1e-2
            pending = (q, s_row.copy(), y_row.copy())
        else:
            assert not opt.source.pending and changed == set(), (t, changed)
            pending = None
        assert_gram_fresh(opt)
        assert [int(v) for v in opt.state()["ring"]] == [memory.filled, memory.next_slot,
                                                         t + 1, int(opt.source.pending)]
    assert committed == 4


def test_below_full_batch_every_step_forms_a_pair(comm):
    """probe_every 1: every step costs 2 gradients and adds one pair; after t steps the ring
    holds min(t - 1, K) committed pairs and one pending."""
    K = 3
    p = softmax(4, batch=12)
    theta = p.theta.copy()
    opt, objective = make(p.model, theta, comm, full_batch=False, **LBFGS, memory=K)
    for t in range(7):
        x, y = p.draw()
        _, _, used = take_step(opt, objective, theta, x, y, 0.5)
        assert used["grad_evals"] == 2.0 == 1 + opt.source.cost() and opt.source.pending
        assert opt.memory.filled == min(t, K) and opt.memory.next_slot == t % K


# ----- state ---------------------------------------------------------------------------------
@pytest.mark.parametrize("full_batch", [True, False], ids=["full-batch", "minibatch"])
@pytest.mark.parametrize("same_layout", [True, False], ids=["same-size", "other-size"])
def test_state_round_trip_continues_exactly_and_keeps_history(comm, full_batch, same_layout):
    """state() after 5 steps (below full batch: a pending pair in it) loaded into a fresh
    optimizer, also with same_layout False (another rank count): the next 4 steps are
    bitwise those of the uninterrupted optimizer."""
    p = softmax(5, batch=60 if full_batch else 16)
    batches = [p.draw() for _ in range(9)]
    theta = p.theta.copy()
    opt, objective = make(p.model, theta, comm, full_batch=full_batch, **LBFGS, memory=3)
    for x, y in batches[:5]:
        take_step(opt, objective, theta, x, y, 0.5)
    saved = {k: np.array(v, copy=True) for k, v in opt.state().items()}
    assert len(saved["ring"]) == 4 and bool(saved["ring"][3]) == (not full_batch)
    theta2 = theta.copy()
    opt2, objective2 = make(p.model, theta2, comm, full_batch=full_batch, **LBFGS, memory=3)
    opt2.load_state(saved, same_layout=same_layout)
    for x, y in batches[5:]:
        take_step(opt, objective, theta, x, y, 0.5)
        take_step(opt2, objective2, theta2, x, y, 0.5)
    np.testing.assert_array_equal(theta2, theta)
    for k, v in opt.state().items():
        np.testing.assert_array_equal(opt2.state()[k], v, err_msg=k)


def test_probe_pairs_are_dropped_on_another_layout_but_history_is_not(comm):
    """The control of the test above: for pairs = "probe" same_layout False starts the
    memory empty, so the round trip does tell the two apart."""
    p = softmax(6)
    theta = p.theta.copy()
    opt, objective = make(p.model, theta, comm, full_batch=False, memory=2, probe_lr=0.01)
    for _ in range(3):
        take_step(opt, objective, theta, *p.draw(), 0.1)
    opt2, _ = make(p.model, theta.copy(), comm, full_batch=False, memory=2, probe_lr=0.01)
    opt2.load_state(opt.state(), same_layout=False)
    assert opt.memory.filled == 2 and opt2.memory.filled == 0 and not opt2.memory.W.any()


# ----- configuration -------------------------------------------------------------------------
@pytest.mark.parametrize("override, key", [("optim.pairs_per_rank=2", "pairs_per_rank"),
                                           ("optim.probe_batch=0.5", "probe_batch")])
def test_history_refuses_pairs_per_rank_and_probe_batch(override, key):
    """Refused, naming the key and where it applies (pairs = 'probe'), and fine there."""
    with pytest.raises(UsageError, match=f"optim.{key} = .* does not apply") as caught:
        config.load(None, ["optim.name=secant", "optim.pairs=history", override])
    assert "applies with optim.name = 'secant' with pairs = 'probe'" in str(caught.value)
    config.load(None, ["optim.name=secant", "optim.pairs=probe", override])  # fine there


def test_history_with_the_intended_lbfgs_options_is_valid():
    opts = optim_options(**LBFGS, memory=10, probe_every=2)
    assert opts.pairs == "history" and opts.memory == 10 and opts.probe_every == 2
