"""Model plug-ins and the cnn under MPI (mpiexec -n 2 and -n 3): every rank holds bitwise
identical parameters; a python: plug-in run is the built-in run it wraps, bit for bit; a
run checkpointed half-way and resumed ends, bit for bit, where the uninterrupted run ends."""

from __future__ import annotations

import numpy as np
import pytest
from harness import run_config, start_run
from mpicheck import assert_all, assert_identical, raises_everywhere
from toymodels import PLUGINS

from hessmpi import config
from hessmpi.backend import make_backend
from hessmpi.checkpoint import checkpoint_path, read_checkpoint
from hessmpi.data import write_dataset
from hessmpi.errors import UsageError
from hessmpi.models import PluginModel
from hessmpi.trainer import Run

pytestmark = pytest.mark.timeout(90)

COMMON = ("train.batch_size=6", "train.seed=2", "train.log_every=2", "train.eval_every=4",
          "optim.check_every=3", "checkpoint.every=6")
SECANT = ("optim.name=secant", "optim.lr=0.05", "optim.memory=2")
MODELS = {
    "python": (f"model.name=python:{PLUGINS}:dense_plugin",
               "model.options={hidden = [7], l2 = 0.001}"),
    "torch": (f"model.name=torch:{PLUGINS}:torch_mlp", "model.options.hidden=7"),
    "cnn": ("model.name=cnn", "model.channels=[2, 3]", "model.dense=[5]"),
}


@pytest.fixture
def images(comm, shared_dir):
    """A 60-train / 20-test dataset of 8x8 images (the cnn needs image_shape)."""
    path = shared_dir / "images.h5"
    if comm.rank == 0:
        rng = np.random.default_rng(4)
        y = rng.integers(0, 3, 80)
        x = (rng.random((80, 64)) + 0.5 * y[:, None] * (np.arange(64) % 3 == 0)) / 2
        write_dataset(path, (x[:60], y[:60]), (x[60:], y[60:]), source="test",
                      description="images", n_classes=3, image_shape=(8, 8))
    comm.barrier()
    return path


def cfg_for(data, model: str, steps: int, *extra: str) -> dict:
    return run_config(data, f"train.steps={steps}", *COMMON, *SECANT, *MODELS[model], *extra)


def needs(model: str) -> None:
    if model == "torch":
        pytest.importorskip("torch", reason="PyTorch is not installed (hessmpi[torch])")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("model", MODELS)
def test_every_rank_holds_identical_parameters(comm, shared_dir, images, model):
    needs(model)
    run = start_run(cfg_for(images, model, 10), comm, shared_dir / model)
    start = run.theta.copy()
    summary = run.run()
    assert_identical(comm, parameters=run.theta)
    assert_all(comm, np.isfinite(summary["train_loss"]) and not np.array_equal(start,
                                                                               run.theta),
               "the run did not train")


@pytest.mark.mpi(min_size=2)
def test_a_python_plugin_run_is_the_builtin_run(comm, shared_dir, images):
    plugin = start_run(cfg_for(images, "python", 8), comm, shared_dir / "plugin")
    builtin = start_run(run_config(images, "train.steps=8", *COMMON, *SECANT,
                                   "model.name=mlp", "model.hidden=[7]", "model.l2=0.001"),
                        comm, shared_dir / "builtin")
    assert_all(comm, isinstance(plugin.model, PluginModel), "not the plug-in")
    plugin.run()
    builtin.run()
    assert_all(comm, np.array_equal(plugin.theta, builtin.theta), "parameters differ")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("model", MODELS)
def test_checkpoint_and_resume_bit_for_bit(comm, shared_dir, images, model):
    """12 steps straight against 6 steps, a checkpoint, and a resumed run to 12."""
    needs(model)
    whole = start_run(cfg_for(images, model, 12), comm, shared_dir / "whole")
    whole.run()
    half = shared_dir / "half"
    start_run(cfg_for(images, model, 6), comm, half).run()
    comm.barrier()                                     # rank 0 has written the checkpoint
    arrays, attrs = read_checkpoint(checkpoint_path(half, 6))
    saved = config.from_toml(attrs["config"])
    assert_all(comm, saved["model"] == config.load(None, MODELS[model])["model"],
               f"the checkpoint's [model] is {saved['model']}")
    cfg = config.load(None, ["train.steps=12"], base=saved)
    backend = make_backend("cpu", cfg["backend"]["dtype"], 1)
    resumed = Run(cfg, comm, backend, half, resume=(arrays, attrs))
    resumed.run()
    comm.barrier()
    assert_identical(comm, parameters=resumed.theta)
    state = resumed.optimizer.state()
    assert_all(comm, np.array_equal(resumed.theta, whole.theta)
               and all(np.array_equal(v, whole.optimizer.state()[k]) for k, v in state.items()),
               "the resumed run differs from the uninterrupted one")
    ckpt = read_checkpoint(checkpoint_path(half, 12))[0]["params"]
    assert_all(comm, np.array_equal(ckpt, whole.theta), "the last checkpoint differs")


@pytest.mark.mpi(min_size=2)
def test_a_checkpoint_of_other_plugin_options_is_refused(comm, shared_dir, images):
    out = shared_dir / "run"
    start_run(cfg_for(images, "python", 6), comm, out).run()
    comm.barrier()
    arrays, attrs = read_checkpoint(checkpoint_path(out, 6))
    other = config.load(None, ["train.steps=12", "model.options={hidden = [7], l2 = 0.002}"],
                        base=config.from_toml(attrs["config"]))
    backend = make_backend("cpu", "float64", 1)
    raises_everywhere(comm, UsageError, Run, other, comm, backend, out,
                      resume=(arrays, attrs), match="different model")
