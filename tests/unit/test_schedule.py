"""Learning-rate schedules against their closed forms."""

from __future__ import annotations

import math

import pytest

from hessmpi.optim.schedule import Schedule

BASE = dict(lr=0.4, schedule="constant", warmup_steps=0, decay_every=10, decay_factor=0.5,
            min_lr=0.0, total_steps=100)


def lrs(**kw):
    args = {**BASE, **kw}
    schedule = Schedule(**args)
    return [schedule(s) for s in range(args["total_steps"])]


def test_constant():
    assert lrs() == [0.4] * 100


@pytest.mark.parametrize("warmup", [1, 4, 10])
@pytest.mark.parametrize("schedule", ["constant", "step", "cosine"])
def test_warmup_ramps_linearly_to_lr(schedule, warmup):
    got = lrs(schedule=schedule, warmup_steps=warmup, min_lr=0.01)
    for s in range(warmup):
        assert got[s] == pytest.approx(0.4 * (s + 1) / warmup, rel=1e-15)
    assert got[0] == pytest.approx(0.4 / warmup, rel=1e-15)
    assert got[warmup - 1] == pytest.approx(0.4, rel=1e-15)
    assert got[warmup] == pytest.approx(0.4, rel=1e-15)  # first step after warm-up: full lr
    assert all(a < b for a, b in zip(got[:warmup - 1], got[1:warmup], strict=True))


@pytest.mark.parametrize("warmup", [0, 3])
def test_constant_after_warmup(warmup):
    assert lrs(warmup_steps=warmup)[warmup:] == [0.4] * (100 - warmup)


@pytest.mark.parametrize(("warmup", "every", "factor"), [(0, 10, 0.5), (5, 7, 0.1), (2, 1, 0.9)])
def test_step_decay(warmup, every, factor):
    got = lrs(schedule="step", warmup_steps=warmup, decay_every=every, decay_factor=factor)
    for s in range(warmup, 100):
        decays = (s - warmup) // every
        assert got[s] == pytest.approx(0.4 * factor ** decays, rel=1e-12)
    # the decays happen exactly at multiples of decay_every after warm-up
    assert got[warmup + every - 1] == pytest.approx(0.4, rel=1e-15)
    assert got[warmup + every] == pytest.approx(0.4 * factor, rel=1e-12)


@pytest.mark.parametrize(("warmup", "total", "min_lr"),
                         [(0, 100, 0.0), (0, 11, 0.05), (10, 60, 0.01), (3, 5, 0.1)])
def test_cosine(warmup, total, min_lr):
    got = lrs(schedule="cosine", warmup_steps=warmup, min_lr=min_lr, total_steps=total)
    span = total - warmup - 1
    for s in range(warmup, total):
        t = s - warmup
        expected = min_lr + (0.4 - min_lr) * (1 + math.cos(math.pi * t / span)) / 2
        assert got[s] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert got[warmup] == pytest.approx(0.4, rel=1e-15)
    assert got[-1] == pytest.approx(min_lr, abs=1e-15)  # ends at min_lr at the last step
    after = got[warmup:]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))
    # half-way through the decay the rate is the mean of lr and min_lr
    if span % 2 == 0:
        assert got[warmup + span // 2] == pytest.approx((0.4 + min_lr) / 2, rel=1e-12)
    # steps beyond the planned total stay at min_lr
    assert Schedule(**{**BASE, "schedule": "cosine", "warmup_steps": warmup,
                       "min_lr": min_lr, "total_steps": total})(total + 5) == \
        pytest.approx(min_lr, abs=1e-15)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="linear"):
        Schedule(**{**BASE, "schedule": "linear"})


def test_from_config_reads_the_optim_keys_and_the_steps():
    from hessmpi import config

    cfg = config.load(None, ["optim.lr=0.3", "optim.schedule=step", "optim.decay_every=7",
                             "optim.decay_factor=0.5", "optim.warmup_steps=2",
                             "train.steps=40"])
    assert Schedule.from_config(cfg) == Schedule(lr=0.3, schedule="step", warmup_steps=2,
                                                 decay_every=7, decay_factor=0.5, min_lr=0.0,
                                                 total_steps=40)
