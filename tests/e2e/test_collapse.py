"""A run that goes wrong although every number is finite says so and fails (issue 15):
a loss far above its start (divergence) and a model at chance for a window (collapse), on
2 ranks: exit 1 with one message, status "failed", the parameters at the failure written,
the last good checkpoint kept."""

from __future__ import annotations

import numpy as np
import pytest
from clirun import set_args, train
from test_e2e_train import single_error

from hessmpi.checkpoint import list_checkpoints, read_checkpoint
from hessmpi.data import write_dataset
from hessmpi.metrics import read_metrics

pytestmark = pytest.mark.timeout(120)


def failed(out, result, *needles):
    assert result.rc == 1, str(result)
    single_error(result, "run failed", *needles)
    attrs, cols = read_metrics(out / "metrics.h5")
    assert attrs["status"] == "failed" and needles[0] in attrs["failure"]
    [state] = out.glob("failed_state_step_*.h5")
    return attrs, cols, state


def test_a_diverging_run_fails_and_keeps_its_last_good_checkpoint(tmp_path, run_config):
    cfg, sets = run_config
    out = tmp_path / "diverged"
    result = train("--config", cfg, *set_args(sets), "--set", "optim.lr=80",
                   "--set", "checkpoint.every=1", "--set", "train.log_every=1",
                   "--out", out)
    attrs, cols, state = failed(out, result, "rose to", "10 x its first value")
    step = int(state.stem.rsplit("_", 1)[1])
    assert step >= 2
    steps = [s for s, _ in list_checkpoints(out)]
    assert max(steps) == step - 1                     # the last good step's checkpoint
    arrays, _ = read_checkpoint(out / "checkpoints" / f"ckpt_{step - 1:09d}.h5")
    assert np.isfinite(arrays["params"]).all()
    assert cols["train_loss"][-1] <= 10 * cols["train_loss"][0]   # rows before the failure


def test_a_model_at_chance_for_the_window_fails(tmp_path, run_config):
    """Labels independent of the inputs: nothing to learn, the model stays at chance."""
    rng = np.random.default_rng(0)
    data = tmp_path / "noise.h5"
    write_dataset(data, (rng.standard_normal((200, 8)), rng.integers(0, 3, 200)),
                  (rng.standard_normal((90, 8)), rng.integers(0, 3, 90)),
                  source="test", description="random labels", n_classes=3)
    cfg, sets = run_config
    out = tmp_path / "chance"
    result = train("--config", cfg, *set_args(sets), "--set", f"data.path={data}",
                   "--set", "train.steps=200", "--set", "train.eval_every=10",
                   "--set", "train.chance_window=30", "--out", out)
    attrs, cols, _ = failed(out, result, "at chance since step")
    evaluated = np.isfinite(cols["test_acc"])
    assert (cols["test_acc"][evaluated][-4:] <= 0.5).all()
    assert cols["step"][-1] < 200
    # the same run with the check off finishes
    again = train("--config", cfg, *set_args(sets), "--set", f"data.path={data}",
                  "--set", "train.steps=60", "--set", "train.chance_window=0",
                  "--out", tmp_path / "off")
    assert again.rc == 0, str(again)
