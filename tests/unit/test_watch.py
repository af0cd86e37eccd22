"""Divergence and collapse (hessmpi.watch) against hand-made loss and accuracy sequences."""

from __future__ import annotations

import math

import pytest

from hessmpi.errors import RunFailed
from hessmpi.watch import Watch


def watch(**kw) -> Watch:
    return Watch(**({"max_loss_ratio": 10.0, "chance_window": 200, "n_classes": 10} | kw))


def test_a_loss_above_ratio_times_the_first_fails_at_that_step():
    w = watch()
    for done, loss in enumerate([2.3, 5.0, 22.9, 23.0], start=1):
        w.step(done, loss)                        # 23.0 = 10 x 2.3 exactly: not above
    with pytest.raises(RunFailed, match="rose to 23.1 at step 5.*10 x its first value 2.3"):
        w.step(5, 23.1)


@pytest.mark.parametrize("kw, first", [({"max_loss_ratio": 0.0}, 2.3),
                                       ({}, -4.0), ({}, 0.0)])
def test_no_ratio_check_when_disabled_or_the_first_loss_is_not_positive(kw, first):
    w = watch(**kw)
    w.step(1, first)
    w.step(2, 1e30)


def test_the_first_loss_comes_from_a_checkpoint():
    w = watch(first_loss=1.0)
    with pytest.raises(RunFailed, match="first value 1"):
        w.step(101, 10.5)


def test_chance_for_the_window_fails_and_any_better_evaluation_resets_it():
    w = watch()
    chance_loss = math.log(10)
    w.evaluation(100, 0.10, chance_loss)          # at chance since 100
    w.evaluation(200, 0.12, 18.5)                 # still (a loss above ln C counts)
    w.evaluation(250, 0.50, 1.0)                  # learned something: reset
    w.evaluation(300, 0.09, 2.2)                  # at chance since 300
    w.evaluation(450, 0.11, 2.3)
    with pytest.raises(RunFailed, match="at chance since step 300"):
        w.evaluation(500, 0.10, 2.3)


@pytest.mark.parametrize("accuracy, loss", [(0.16, 2.3),      # accuracy above 1.5 / C
                                            (0.10, 2.0),      # loss below 0.9 ln C
                                            (math.nan, 50.0)])  # a model that does not classify
def test_not_at_chance(accuracy, loss):
    w = watch(chance_window=1)
    for done in range(0, 1000, 100):
        w.evaluation(done, accuracy, loss)


def test_window_zero_never_fails():
    w = watch(chance_window=0)
    for done in range(0, 5000, 100):
        w.evaluation(done, 0.1, 2.3)
