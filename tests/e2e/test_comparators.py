"""The comparators through ``hessmpi train`` on 2 ranks (issue 19): a run stopped half-way
and resumed ends bit for bit where the uninterrupted run ends (parameters and optimizer
state), and the results file holds the new columns (curvature products, CG iterations,
lambda) for Hessian-free and NaN there for Entropy-SGD."""

from __future__ import annotations

import numpy as np
import pytest
from clirun import set_args, train

from hessmpi.checkpoint import checkpoint_path, read_checkpoint
from hessmpi.metrics import read_metrics

pytestmark = pytest.mark.timeout(120)

METHODS = {
    "hessian_free": ["optim.name=hessian_free", "optim.hf_max_cg=10", "optim.lr=0.5",
                     "optim.hf_curvature_batch=0.5"],
    "entropy_sgd": ["optim.name=entropy_sgd", "optim.entropy_steps=3", "optim.lr=0.1",
                    "optim.entropy_noise=0.01"],
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_resume_is_bit_for_bit(tmp_path, run_config, method):
    cfg, sets = run_config
    sets = [*sets, *METHODS[method], "train.steps=12", "checkpoint.every=6",
            "train.log_every=3"]
    straight, half = tmp_path / "straight", tmp_path / "half"
    result = train("--config", cfg, *set_args(sets), "--out", straight)
    assert result.rc == 0, str(result)
    result = train("--config", cfg, *set_args([*sets, "train.steps=6"]), "--out", half)
    assert result.rc == 0, str(result)
    result = train("--resume", half, "--set", "train.steps=12")
    assert result.rc == 0, str(result)
    a, _ = read_checkpoint(checkpoint_path(straight, 12))
    b, _ = read_checkpoint(checkpoint_path(half, 12))
    assert sorted(a) == sorted(b)
    for name in (n for n in a if not n.startswith("metrics/")):   # the rows hold timings
        assert np.asarray(a[name]).tobytes() == np.asarray(b[name]).tobytes(), name
    _, cols = read_metrics(straight / "metrics.h5")
    _, resumed = read_metrics(half / "metrics.h5")
    for col in ("train_loss", "curvature_evals", "cg_iters", "hf_lambda", "grad_evals"):
        np.testing.assert_array_equal(cols[col], resumed[col], err_msg=col)
    if method == "hessian_free":
        assert (np.diff(cols["curvature_evals"]) > 0).all()
        assert (cols["cg_iters"] >= 1).all() and (cols["hf_lambda"] > 0).all()
    else:
        assert not cols["curvature_evals"].any() and np.isnan(cols["cg_iters"]).all()
        assert cols["grad_evals"][-1] == 12 * 3
