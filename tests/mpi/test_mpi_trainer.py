"""The SPMD trainer on P ranks against a serial reference computed in-process on every rank.

Data parallelism is exact: P ranks with batch b each, averaging their gradients with one
Allreduce, take the same steps (to round-off) as one process with the concatenated batch of
P*b rows and a plain-numpy momentum SGD recursion.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from harness import read_split, run_config, start_run
from mpicheck import assert_all, assert_identical, check_all, raises_everywhere

from hessmpi.data import Sampler, read_shard, shard_bounds
from hessmpi.errors import RunFailed, UsageError
from hessmpi.metrics import read_metrics
from hessmpi.models.dense import DenseNet
from hessmpi.trainer import Interval

pytestmark = pytest.mark.timeout(60)

STEPS = 12


def make_cfg(data_path, *overrides: str) -> dict:
    return run_config(data_path, f"train.steps={STEPS}", "train.batch_size=4", "train.seed=3",
                      "train.log_every=1", "train.eval_every=5", "optim.check_every=2",
                      *overrides)


def serial_reference(cfg, data_path, size, lrs):
    """One process, one DenseNet, batch = concatenation of the P ranks' batches in rank
    order; SGD with momentum written out in numpy. ``lrs``: the learning rate of each step.
    Returns (model, [per-step dict of loss, grad_norm, step_norm, epoch, theta, velocity])."""
    x, y, n_classes = read_split(data_path, "train")
    mcfg, tcfg, ocfg = cfg["model"], cfg["train"], cfg["optim"]
    hidden = mcfg["hidden"] if mcfg["name"] == "mlp" else []
    model = DenseNet([x.shape[1], *hidden, n_classes], mcfg["activation"], mcfg["l2"],
                     xp=np, dtype=np.float64)
    bounds = [shard_bounds(len(y), r, size, equal=True) for r in range(size)]
    samplers = [Sampler(hi - lo, tcfg["batch_size"], tcfg["seed"], r)
                for r, (lo, hi) in enumerate(bounds)]
    mom, wd, nesterov = ocfg["momentum"], ocfg["weight_decay"], ocfg["nesterov"]
    theta = model.init_params(tcfg["seed"])
    velocity = np.zeros_like(theta)
    history = []
    for step in range(len(lrs)):
        rows = np.concatenate([lo + s.next() for (lo, _), s in zip(bounds, samplers,
                                                                    strict=True)])
        assert len(rows) == size * tcfg["batch_size"]
        grad = np.empty(model.n_params)
        loss = float(model.loss_grad(theta, x[rows], y[rows], grad))
        g = grad + wd * theta
        velocity = mom * velocity + g
        direction = g + mom * velocity if nesterov else velocity
        update = lrs[step] * direction
        theta = theta - update
        history.append(dict(loss=loss, grad_norm=np.linalg.norm(grad),
                            step_norm=np.linalg.norm(update), epoch=samplers[0].epochs_done,
                            theta=theta.copy(), velocity=velocity.copy()))
    return model, history


def assert_gradient_traffic(bytes_per_step, n_params: int, itemsize: int) -> None:
    """Payload per step of one Allreduce of the gradient plus at most a few scalars."""
    b = np.asarray(bytes_per_step)
    assert ((b > n_params * itemsize) & (b <= (n_params + 8) * itemsize)).all(), \
        f"{b} bytes per step for {n_params} parameters of {itemsize} bytes"


def close(a, b, rtol=1e-12):
    """|a - b| <= rtol * max|b| elementwise (round-off relative to the vector's scale)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(float(np.max(np.abs(b))), 1e-300)
    err = float(np.max(np.abs(a - b)))
    assert a.shape == b.shape and err <= rtol * scale, \
        f"max error {err:.3g} > {rtol:g} * {scale:.3g}"


LR = 0.2
CASES = {
    "softmax": (["model.name=softmax", "optim.lr=0.5", "optim.momentum=0.9"], [0.5] * STEPS),
    "mlp-tanh-nesterov-wd": (
        ["model.name=mlp", "model.hidden=[7, 5]", "model.activation=tanh", "optim.lr=0.1",
         "optim.momentum=0.5", "optim.nesterov=true", "optim.weight_decay=1e-3"],
        [0.1] * STEPS),
    # warm-up over 2 steps, then halved every 4 steps
    "mlp-relu-step-schedule": (
        ["model.name=mlp", "model.hidden=[6]", "model.activation=relu", f"optim.lr={LR}",
         "optim.momentum=0.9", "optim.schedule=step", "optim.warmup_steps=2",
         "optim.decay_every=4", "optim.decay_factor=0.5"],
        [LR / 2] + [LR] * 5 + [LR / 2] * 4 + [LR / 4] * 2),
}


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("case", list(CASES))
def test_data_parallel_run_equals_serial_large_batch(comm, shared_dir, dataset, case):
    overrides, lrs = CASES[case]
    assert len(lrs) == STEPS
    cfg = make_cfg(dataset, *overrides)
    out = shared_dir / "run"
    run = start_run(cfg, comm, out)
    summary = run.run()
    model, ref = serial_reference(cfg, dataset, comm.size, lrs)
    theta0 = model.init_params(cfg["train"]["seed"])
    x_test, y_test, _ = read_split(dataset, "test")

    def check_parameters():
        assert not np.allclose(ref[-1]["theta"], theta0), "reference did not move"
        close(run.theta, ref[-1]["theta"])
        close(run.optimizer.velocity, ref[-1]["velocity"])
        assert math.isclose(summary["train_loss"], ref[-1]["loss"], rel_tol=1e-12)
        loss_sum, correct = model.evaluate(ref[-1]["theta"], x_test, y_test)
        assert math.isclose(summary["test_loss"], loss_sum / len(y_test), rel_tol=1e-12)
        assert summary["test_acc"] == correct / len(y_test)

    check_all(comm, check_parameters)

    def check_metrics():
        if comm.rank != 0:
            return
        attrs, cols = read_metrics(out / "metrics.h5")
        assert attrs["status"] == "finished" and attrs["mpi_size"] == comm.size
        np.testing.assert_array_equal(cols["step"], np.arange(1, STEPS + 1))
        close(cols["train_loss"], [h["loss"] for h in ref])
        close(cols["grad_norm"], [h["grad_norm"] for h in ref], rtol=1e-11)
        close(cols["step_norm"], [h["step_norm"] for h in ref], rtol=1e-11)
        np.testing.assert_array_equal(cols["epoch"], [h["epoch"] for h in ref])
        np.testing.assert_array_equal(cols["grad_evals"], cols["step"])
        # one Allreduce per step: the float64 gradient and a few scalars (loss, flags)
        assert_gradient_traffic(cols["bytes_sent"], model.n_params, 8)
        for i, step in enumerate(cols["step"]):
            if step % 5 == 0 or step == STEPS:
                loss_sum, correct = model.evaluate(ref[i]["theta"], x_test, y_test)
                assert math.isclose(cols["test_loss"][i], loss_sum / len(y_test),
                                    rel_tol=1e-12), f"test_loss at step {step}"
                assert cols["test_acc"][i] == correct / len(y_test)
            else:
                assert np.isnan(cols["test_loss"][i]) and np.isnan(cols["test_acc"][i])

    check_all(comm, check_metrics)


@pytest.mark.mpi(min_size=2)
def test_step_by_step_losses_equal_serial_reference(comm, shared_dir, dataset):
    """Driving Run.step directly: the returned global loss of every step is the serial
    loss of the concatenated batch."""
    overrides, lrs = CASES["mlp-tanh-nesterov-wd"]
    cfg = make_cfg(dataset, *overrides)
    run = start_run(cfg, comm, shared_dir / "run")
    _, ref = serial_reference(cfg, dataset, comm.size, lrs)
    interval = Interval()
    losses = [run.step(s, interval).loss for s in range(STEPS)]

    def check():
        close(losses, [h["loss"] for h in ref])
        close(run.theta, ref[-1]["theta"])
        assert interval.steps == STEPS
        assert_gradient_traffic(interval.bytes_sent / STEPS, run.model.n_params, 8)

    check_all(comm, check)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_rank_holds_bitwise_identical_parameters(comm, shared_dir, dataset, dtype):
    cfg = make_cfg(dataset, "model.name=mlp", "model.hidden=[9]", "optim.check_every=0",
                   f"backend.dtype={dtype}", "optim.lr=0.3")
    run = start_run(cfg, comm, shared_dir / "run")
    start = run.theta.copy()
    interval = Interval()
    for s in range(15):
        run.step(s, interval)
    assert_identical(comm, parameters=run.theta, velocity=run.optimizer.velocity)
    assert_all(comm, not np.array_equal(run.theta, start) and run.theta.dtype == dtype,
               "parameters did not move")


@pytest.mark.mpi(min_size=2)
def test_check_consistency_stops_every_rank_when_one_rank_drifts(comm, shared_dir, dataset):
    cfg = make_cfg(dataset, "model.name=softmax")
    run = start_run(cfg, comm, shared_dir / "run")
    interval = Interval()
    for s in range(3):
        run.step(s, interval)
    try:
        run.check_consistency(3)
        fine = ""
    except Exception as e:  # noqa: BLE001
        fine = f"identical parameters were refused: {e}"
    assert_all(comm, not fine, fine)
    if comm.rank == comm.size - 1:  # one ulp on one entry of the last rank
        run.theta[0] = np.nextafter(run.theta[0], np.inf)
    raises_everywhere(comm, RunFailed, run.check_consistency, 3,
                      match="parameters differ across ranks at step 3")


@pytest.mark.mpi(min_size=2)
def test_run_fails_on_every_rank_and_marks_metrics_when_ranks_drift(comm, shared_dir,
                                                                    dataset):
    cfg = make_cfg(dataset, "model.name=softmax", "optim.check_every=1")
    out = shared_dir / "run"
    run = start_run(cfg, comm, out)
    if comm.rank == 1:
        run.theta[2] += 1e-3
    raises_everywhere(comm, RunFailed, run.run, match="parameters differ across ranks at step 1")

    def check():
        if comm.rank == 0:
            attrs, cols = read_metrics(out / "metrics.h5")
            assert attrs["status"] == "failed", attrs["status"]
            assert "parameters differ" in attrs["failure"]
            assert len(cols["step"]) == 0

    check_all(comm, check)


@pytest.mark.mpi(min_size=2)
def test_non_finite_data_on_one_rank_stops_every_rank(comm, shared_dir, dataset):
    """A NaN seen by one rank reaches every rank through the Allreduce: all stop together
    at the same step with RunFailed, and rank 0 marks the results file failed."""
    cfg = make_cfg(dataset, "model.name=softmax", "train.log_every=2")
    out = shared_dir / "run"
    run = start_run(cfg, comm, out)
    original = run.model.loss_grad
    calls = [0]

    def poisoned(theta, x, y, grad):
        calls[0] += 1
        loss = original(theta, x, y, grad)
        if comm.rank == comm.size - 1 and calls[0] == 5:
            grad[0] = np.nan
            return np.nan
        return loss

    run.model.loss_grad = poisoned
    raises_everywhere(comm, RunFailed, run.run, match="training loss is nan at step 5")

    def check():
        if comm.rank == 0:
            attrs, cols = read_metrics(out / "metrics.h5")
            assert attrs["status"] == "failed"
            assert "training loss is nan" in attrs["failure"]
            np.testing.assert_array_equal(cols["step"], [2, 4])
            assert np.isfinite(cols["train_loss"]).all()

    check_all(comm, check)


# ----- bad input is refused on every rank alike ---------------------------------------------

@pytest.mark.mpi(min_size=2)
def test_missing_dataset_is_a_usage_error_on_every_rank(comm, shared_dir):
    cfg = make_cfg(shared_dir / "missing.h5")
    raises_everywhere(comm, UsageError, start_run, cfg, comm, shared_dir / "run",
                      match="missing.h5 does not exist")


@pytest.mark.mpi(min_size=2)
def test_batch_larger_than_shard_is_a_usage_error_on_every_rank(comm, shared_dir, dataset):
    rows = 61 // comm.size
    cfg = make_cfg(dataset, f"train.batch_size={rows + 1}")
    raises_everywhere(comm, UsageError, start_run, cfg, comm, shared_dir / "run",
                      match=f"train.batch_size = {rows + 1}")
    # exactly the shard is fine
    run = start_run(make_cfg(dataset, f"train.batch_size={rows}"), comm, shared_dir / "run2")
    assert_all(comm, run.sampler.rows == rows, f"{run.sampler.rows} rows")


@pytest.mark.mpi(min_size=2)
def test_existing_results_are_refused_on_every_rank(comm, shared_dir, dataset):
    """Only rank 0 looks at the output directory, but every rank must stop."""
    out = shared_dir / "run"
    if comm.rank == 0:
        out.mkdir()
        (out / "metrics.h5").write_bytes(b"earlier run")
    comm.barrier()
    raises_everywhere(comm, UsageError, start_run, make_cfg(dataset), comm, out,
                      match="already holds a run")
    assert_all(comm, comm.rank != 0 or (out / "metrics.h5").read_bytes() == b"earlier run")


@pytest.mark.mpi(min_size=2)
def test_shards_partition_the_file(comm, dataset):
    """Equal train shards: total // P contiguous rows each; test shards cover every row once."""
    x_train, y_train, _ = read_split(dataset, "train")
    x_test, y_test, _ = read_split(dataset, "test")
    train = read_shard(dataset, "train", comm.rank, comm.size, equal=True)
    test = read_shard(dataset, "test", comm.rank, comm.size, equal=False)
    rows = len(y_train) // comm.size
    pieces = comm.allgather((test.offset, test.x, test.y))

    def check():
        assert train.offset == comm.rank * rows and len(train.y) == rows
        np.testing.assert_array_equal(train.x, x_train[train.offset:train.offset + rows])
        np.testing.assert_array_equal(train.y, y_train[train.offset:train.offset + rows])
        assert [o for o, _, _ in pieces] == sorted(o for o, _, _ in pieces)
        np.testing.assert_array_equal(np.concatenate([x for _, x, _ in pieces]), x_test)
        np.testing.assert_array_equal(np.concatenate([y for _, _, y in pieces]), y_test)
        assert max(len(y) for *_, y in pieces) - min(len(y) for *_, y in pieces) <= 1

    check_all(comm, check)
