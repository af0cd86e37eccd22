"""Model plug-ins, the cnn and the Python API through the command line under mpiexec: each bad
plug-in exits 2 with one message naming it, before any step; a plug-in failing mid-run
exits 1 naming the rank and the cause; a torch: plug-in resumed with --resume ends bit for
bit where the uninterrupted run ends; the cnn trains on a Fashion-MNIST-format dataset
built by `hessmpi data fashion-mnist`; the example script of the Python API runs."""

from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from clirun import ABORTED, hessmpi, mpiexec, run, set_args, train
from test_e2e_train import single_error
from toymodels import PLUGINS

from hessmpi.data import write_dataset
from hessmpi.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
FASHION = REPO.parent / "shared" / "data" / "fashion-mnist"
PY = f"python:{PLUGINS}"
TORCH = f"torch:{PLUGINS}"
CPU = ["backend.device=cpu", "backend.threads=1"]


def has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


needs_torch = pytest.mark.skipif(not has_torch(), reason="PyTorch is not installed "
                                 "(pip install 'hessmpi[torch]'; make install does)")

# (--set items, what the single error line must say)
BAD = {
    "malformed name": (["model.name=python:toymodels"], ["model.name", "python:MODULE:FACTORY"]),
    "no module": (["model.name=python:no_such_module_e2e:make"],
                  ["no module 'no_such_module_e2e'"]),
    "no factory": ([f"model.name={PY}:no_such_factory"], ["has no 'no_such_factory'"]),
    "factory raises": ([f"model.name={PY}:raising_plugin", "model.options.width=5"],
                       ["raising_plugin(8, 3, width=5)", "ValueError: width 5 must be even"]),
    "not a model": ([f"model.name={PY}:not_a_model"], ["not a model"]),
    "wrong shapes": ([f"model.name={PY}:wrong_shape_plugin"], ["failed in loss_grad"]),
    "wrong length": ([f"model.name={PY}:wrong_length_plugin"], ["init_params(0) returned"]),
    "non-finite first loss": ([f"model.name={PY}:nan_loss_plugin"],
                              ["non-finite first loss"]),
    "option of a built-in": (["model.options.width=5"], ["model.options", "does not apply"]),
    "cnn without images": (["model.name=cnn"], ["'cnn' needs images", "image_shape"]),
}
TORCH_BAD = {
    "torch not a module": ([f"model.name={TORCH}:torch_not_a_module"],
                           ["not a torch.nn.Module"]),
    "torch buffers": ([f"model.name={TORCH}:torch_with_buffers"], ["buffers"]),
}


def bad_run(tmp_path, dataset, sets):
    out = tmp_path / "out"
    result = train("--set", f"data.path={dataset}", *set_args([*CPU, *sets]), "--out", out)
    return result, out


@pytest.mark.parametrize("case", BAD)
def test_a_bad_plugin_exits_2_naming_it_before_any_step(case, tmp_path, dataset):
    sets, needles = BAD[case]
    result, out = bad_run(tmp_path, dataset, sets)
    assert result.rc == 2, str(result)
    name = sets[0].partition("=")[2]
    single_error(result, *needles, *([repr(name)] if ":" in name and case != "malformed name"
                                     else []))
    assert not (out / "metrics.h5").exists()


@needs_torch
@pytest.mark.parametrize("case", TORCH_BAD)
def test_a_bad_torch_plugin_exits_2_naming_it(case, tmp_path, dataset):
    sets, needles = TORCH_BAD[case]
    result, _ = bad_run(tmp_path, dataset, sets)
    assert result.rc == 2, str(result)
    single_error(result, *needles, repr(sets[0].partition("=")[2]))


def test_a_plugin_failing_mid_run_exits_1_naming_the_rank_and_cause(tmp_path, dataset):
    result, out = bad_run(tmp_path, dataset, [f"model.name={PY}:dense_plugin",
                                              "model.options.fail=[1, 4]",
                                              "train.steps=100000"])
    assert result.rc in ABORTED and result.elapsed < 60, str(result)
    single_error(result, "rank 1 of 2", f"model plug-in '{PY}:dense_plugin' failed in "
                 "loss_grad", "RuntimeError: injected plug-in failure")


def params_of(out: Path, step: int) -> np.ndarray:
    with h5py.File(out / "checkpoints" / f"ckpt_{step:09d}.h5") as f:
        return f["params"][()]


@needs_torch
def test_a_torch_plugin_resumes_bit_for_bit(tmp_path, dataset):
    sets = [*CPU, f"data.path={dataset}", f"model.name={TORCH}:torch_mlp",
            "model.options={hidden = 6, activation = 'tanh'}", "optim.name=secant",
            "optim.memory=2", "optim.lr=0.05", "train.batch_size=8", "train.log_every=2",
            "checkpoint.every=5", "backend.dtype=float64"]
    whole = tmp_path / "whole"
    result = train(*set_args([*sets, "train.steps=10"]), "--out", whole)
    assert result.rc == 0, str(result)
    half = tmp_path / "half"
    result = train(*set_args([*sets, "train.steps=5"]), "--out", half)
    assert result.rc == 0, str(result)
    result = train("--resume", half, "--set", "train.steps=10")
    assert result.rc == 0, str(result)
    np.testing.assert_array_equal(params_of(half, 10), params_of(whole, 10))
    a, b = read_metrics(whole / "metrics.h5")[1], read_metrics(half / "metrics.h5")[1]
    same = np.isin(b["step"], a["step"])         # the first run's last step is a row too
    np.testing.assert_array_equal(a["step"], b["step"][same])
    np.testing.assert_array_equal(a["train_loss"], b["train_loss"][same])
    refused = train("--resume", half, "--set", "train.steps=12", "--set",
                    "model.options.hidden=7")
    assert refused.rc == 2 and "model.options" in refused.stderr, str(refused)


def fashion_like(tmp_path: Path) -> Path:
    """`hessmpi data fashion-mnist` on small IDX files of 28x28 images whose label shows in
    their brightness pattern."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 300)
    images = rng.integers(0, 60, (300, 28, 28))
    for k in range(10):
        images[labels == k, 2 * k:2 * k + 4, :] += 180
    img, lab = tmp_path / "images-idx3-ubyte.gz", tmp_path / "labels-idx1-ubyte"
    img.write_bytes(gzip.compress(struct.pack(">IIII", 0x803, 300, 28, 28)
                                  + images.astype(np.uint8).tobytes()))
    lab.write_bytes(struct.pack(">II", 0x801, 300) + labels.astype(np.uint8).tobytes())
    out = tmp_path / "fashion.h5"
    result = hessmpi("data", "fashion-mnist", "--images", img, "--labels", lab, "--n-train",
                     "240", "--out", out)
    assert result.rc == 0, str(result)
    return out


def test_the_cnn_trains_on_a_fashion_mnist_file(tmp_path):
    data = fashion_like(tmp_path)
    with h5py.File(data) as f:
        np.testing.assert_array_equal(f.attrs["image_shape"], [28, 28])
        assert "Fashion-MNIST" in f.attrs["source"]
    out = tmp_path / "cnn"
    result = train(*set_args([*CPU, f"data.path={data}", "model.name=cnn",
                              "model.channels=[4, 8]", "model.dense=[16]", "train.steps=12",
                              "train.batch_size=16", "train.log_every=4", "optim.lr=0.05"]),
                   "--out", out)
    assert result.rc == 0, str(result)
    attrs, cols = read_metrics(out / "metrics.h5")
    assert attrs["n_params"] == (25 * 4 + 4) + (25 * 4 * 8 + 8) + (7 * 7 * 8 * 16 + 16) \
        + (16 * 10 + 10)
    assert cols["train_loss"][-1] < cols["train_loss"][0]


@needs_torch
def test_the_example_script_trains_on_two_ranks(tmp_path):
    """examples/torch_fashion_mnist.py: on 2,000 rows of the real Fashion-MNIST test
    files where this machine has them, else on the Fashion-MNIST-format stand-in. The
    script seeds the module's initial weights, so the run is the same every time (unseeded,
    40 steps fell below 0.4 in about one run in five)."""
    if FASHION.is_dir():
        data = tmp_path / "fashion.h5"
        result = hessmpi("data", "fashion-mnist", "--images",
                         FASHION / "t10k-images-idx3-ubyte.gz", "--labels",
                         FASHION / "t10k-labels-idx1-ubyte.gz", "--n-train", "2000",
                         "--out", data)
        assert result.rc == 0, str(result)
    else:
        data = fashion_like(tmp_path)
    result = run([*mpiexec(2), sys.executable, "-m", "mpi4py",
                  REPO / "examples" / "torch_fashion_mnist.py", "--data", data, "--steps",
                  "80", "--batch", "32"], cwd=tmp_path, timeout=120)
    assert result.rc == 0, str(result)
    last = result.stdout.strip().splitlines()[-1]
    assert "80 steps on 2 ranks" in last and "identical parameters on every rank" in last
    accuracy = float(last.split("test accuracy ")[1].split(";")[0])
    assert accuracy > 0.4, last                 # chance is 0.1


def test_write_dataset_with_images_is_used_by_the_cnn(tmp_path):
    """image_shape (H, W, C) with 3 channels reaches the cnn through the command line."""
    rng = np.random.default_rng(1)
    x, y = rng.random((40, 6 * 6 * 3)).astype(np.float32), rng.integers(0, 2, 40)
    data = tmp_path / "rgb.h5"
    write_dataset(data, (x[:30], y[:30]), (x[30:], y[30:]), source="t", description="rgb",
                  n_classes=2, image_shape=(6, 6, 3))
    out = tmp_path / "run"
    result = train(*set_args([*CPU, f"data.path={data}", "model.name=cnn",
                              "model.channels=[2]", "model.dense=[]", "train.steps=2",
                              "train.batch_size=5"]), "--out", out)
    assert result.rc == 0, str(result)
    assert read_metrics(out / "metrics.h5")[0]["n_params"] == 25 * 3 * 2 + 2 + 3 * 3 * 2 * 2 + 2
