"""DC-ASGD's update rule (hessmpi.optim.dcasgd) against the formula written out by hand, the
server's state, and the pieces of the asynchronous mode that need no MPI job (the replay
schedule, the layout checks, the message buffers, the options)."""

from __future__ import annotations

import numpy as np
import pytest

from hessmpi.asynchronous import Message, Mirror, Replay, check_layout
from hessmpi.errors import UsageError
from hessmpi.optim.dcasgd import DelayCompensation, compensated_step
from hessmpi.optim.sgd import SGD


def vectors(n=7, seed=0, count=3):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n) for _ in range(count)]


@pytest.mark.parametrize("lam", [0.3, "vector"])
def test_compensated_step_is_the_papers_formula(lam):
    theta, grad, backup = vectors()
    if lam == "vector":
        lam = np.abs(vectors(seed=1, count=1)[0]) + 0.1
    start, keep_grad, keep_backup = theta.copy(), grad.copy(), backup.copy()
    want = start - 0.05 * (grad + lam * grad * grad * (start - backup))
    # the compensation matters here, so a rule that drops or mis-signs it fails
    assert not np.allclose(want, start - 0.05 * grad, rtol=1e-3)
    out = np.empty_like(theta)
    compensated_step(np, theta, grad, backup, 0.05, lam, out)
    np.testing.assert_allclose(theta, want, rtol=1e-14)
    np.testing.assert_allclose(out, start - want, rtol=1e-12)     # the step taken
    np.testing.assert_array_equal(grad, keep_grad)
    np.testing.assert_array_equal(backup, keep_backup)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lambda_zero_is_the_sgd_step_bitwise(dtype):
    theta, grad, backup = (v.astype(dtype) for v in vectors())
    sgd_theta = theta.copy()
    SGD(sgd_theta, momentum=0.0, weight_decay=0.0, nesterov=False).update(sgd_theta, grad, 0.3)
    out = np.empty_like(theta)
    compensated_step(np, theta, grad, backup, 0.3, 0.0, out)
    assert theta.tobytes() == sgd_theta.tobytes()


def test_adaptive_lambda_follows_mean_square_by_hand():
    n, lam0, decay, eps, lr = 5, 2.0, 0.9, 1e-7, 0.1
    rng = np.random.default_rng(3)
    theta = rng.standard_normal(n)
    opt = DelayCompensation(theta, 2, lam0=lam0, adaptive=True, decay=decay, eps=eps)
    w, bak, ms = theta.copy(), [theta.copy(), theta.copy()], np.zeros(n)
    opt.fetch(0, theta, 0)
    opt.fetch(1, theta, 0)
    for version, worker in enumerate([0, 1, 1, 0, 0, 1]):
        g = rng.standard_normal(n)
        ms = decay * ms + (1 - decay) * g * g
        lam = lam0 / np.sqrt(ms + eps)
        w = w - lr * (g + lam * g * g * (w - bak[worker]))
        bak[worker] = w.copy()
        opt.update(theta, g, worker, lr)
        opt.fetch(worker, theta, version + 1)
        np.testing.assert_allclose(theta, w, rtol=1e-13)
        np.testing.assert_allclose(opt.mean_square, ms, rtol=1e-13)
    assert opt.fetched.tolist() == [5, 6]
    assert opt.staleness(0, 6) == 1 and opt.staleness(1, 6) == 0


def test_constant_lambda_keeps_no_mean_square_and_lambda_zero_no_compensation():
    theta = np.ones(3)
    assert DelayCompensation(theta, 1, lam0=0.04).mean_square is None
    assert DelayCompensation(theta, 1, lam0=0.0, adaptive=True).mean_square is None
    assert "mean_square" in DelayCompensation(theta, 1, lam0=2, adaptive=True).state()


def test_state_round_trip_and_another_worker_count():
    rng = np.random.default_rng(5)
    theta = rng.standard_normal(4)
    a = DelayCompensation(theta, 2, lam0=1.0, adaptive=True)
    a.fetch(0, theta, 3)
    a.fetch(1, theta + 1, 7)
    a.update(theta, rng.standard_normal(4), 1, 0.1)
    state = {k: np.array(v, copy=True) for k, v in a.state().items()}
    b = DelayCompensation(theta, 2, lam0=1.0, adaptive=True)
    b.load_state(state, same_layout=True)
    for name, value in b.state().items():
        np.testing.assert_array_equal(value, state[name], err_msg=name)
    c = DelayCompensation(theta, 3, lam0=1.0, adaptive=True)
    c.load_state(state, same_layout=False)
    np.testing.assert_array_equal(c.mean_square, state["mean_square"])
    assert not c.backups.any() and not c.fetched.any()


def test_replay_is_cyclic_and_empty_means_any_source():
    from mpi4py import MPI

    replay = Replay((1, 2, 2))
    assert [replay.source(u) for u in range(7)] == [1, 2, 2, 1, 2, 2, 1]
    assert Replay().source(5) == MPI.ANY_SOURCE


@pytest.mark.parametrize(("sets", "size", "needle"), [
    ([], 1, "at least 2 ranks"),
    (["optim.async_replay=[1, 3]"], 3, "rank(s) [3]"),
    (["optim.async_replay=[1, 1]"], 3, "never takes a push of rank(s) [2]"),
    (["optim.async_delay=[0.1, 0.2]"], 4, "one per worker (3)"),
])
def test_layout_checks_name_the_problem(sets, size, needle):
    with pytest.raises(UsageError) as e:
        check_layout(_opts(sets), size)
    assert needle in str(e.value)


def _opts(sets):
    from hessmpi import config

    return config.options(config.load(None, ["optim.name=asgd", *sets]), "optim")


def test_layout_accepts_one_delay_for_all_and_a_full_replay():
    check_layout(_opts(["optim.async_delay=[0.1]", "optim.async_replay=[2, 1, 2]"]), 3)
    check_layout(_opts(["optim.async_delay=[0, 0.1]"]), 3)
    check_layout(_opts([]), 2)


def test_message_views_share_one_aligned_buffer():
    m = Message(5, np.float32, 4, 3)
    m.ints[:] = (1, 2, 3, 4)
    m.floats[:] = (0.5, 1.5, 2.5)
    m.payload[:] = np.arange(5)
    assert m.raw.nbytes == 8 * 7 + 5 * 4 and m.header_bytes == 56
    again = np.frombuffer(m.raw.tobytes(), dtype=np.uint8)
    assert again[:32].view(np.int64).tolist() == [1, 2, 3, 4]
    assert again[32:56].view(np.float64).tolist() == [0.5, 1.5, 2.5]
    assert again[56:].view(np.float32).tolist() == [0, 1, 2, 3, 4]
    assert Mirror(np, m.payload).array is m.payload


@pytest.mark.parametrize(("sets", "needle"), [
    (["optim.name=asgd", "optim.dc_lambda=1"], "optim.dc_lambda = 1.0 does not apply"),
    (["optim.name=dcasgd", "optim.momentum=0.5"], "optim.momentum = 0.5 does not apply"),
    (["optim.name=dcasgd", "optim.check_every=5"], "optim.check_every = 5 does not apply"),
    (["optim.name=dcasgd", "optim.dc_adaptive=false", "optim.dc_decay=0.9"],
     "optim.dc_decay = 0.9 does not apply"),
    (["optim.name=sgd", "optim.async_timeout=5"], "optim.async_timeout = 5.0 does not apply"),
    (["optim.name=asgd", "optim.async_delay=[0.1, -1]"], "a list of numbers >= 0"),
    (["optim.name=asgd", "optim.async_delay=0.1"], "a list of numbers >= 0"),
    (["optim.name=asgd", "optim.async_replay=[0, 1]"], "a list of positive integers"),
])
def test_asynchronous_options_are_validated(sets, needle):
    from hessmpi import config

    with pytest.raises(UsageError) as e:
        config.load(None, sets)
    assert needle in str(e.value)


def test_asynchronous_options_round_trip_through_toml():
    from hessmpi import config

    cfg = config.load(None, ["optim.name=dcasgd", "optim.async_delay=[0, 0.25]",
                             "optim.async_replay=[2, 1]", "optim.dc_adaptive=false"])
    assert config.from_toml(config.to_toml(cfg)) == cfg
    assert cfg["optim"]["async_delay"] == [0.0, 0.25]
