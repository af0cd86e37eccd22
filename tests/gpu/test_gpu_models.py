"""The cnn, the torch adapter and a python: plug-in on CuPy against NumPy: the same code on
the same inputs gives the same values; torch works on the CuPy arrays' own memory (DLPack);
a plug-in run on the GPU trains end to end. Skipped without a GPU."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from harness import rel
from toymodels import PLUGINS

from hessmpi.backend import _cupy_or_reason
from hessmpi.data import write_dataset
from hessmpi.models import build_model
from hessmpi.models.cnn import ConvNet

cupy, why = _cupy_or_reason()
if cupy is None:
    pytest.skip(f"no GPU: {why}", allow_module_level=True)


@pytest.mark.parametrize(("dtype", "tol"), [(np.float64, 1e-10), (np.float32, 1e-4)])
def test_cnn_matches_cpu(dtype, tol):
    rng = np.random.default_rng(0)
    cpu = ConvNet((12, 10, 2), [3, 5], [7], 4, 1e-3, xp=np, dtype=dtype, max_rows=8)
    gpu = ConvNet((12, 10, 2), [3, 5], [7], 4, 1e-3, xp=cupy, dtype=dtype, max_rows=8)
    theta = (cpu.init_params(0) + 0.05 * rng.standard_normal(cpu.n_params)).astype(dtype)
    v = rng.standard_normal(cpu.n_params).astype(dtype)
    x = rng.standard_normal((20, 240)).astype(dtype)
    y = rng.integers(0, 4, 20)
    tg, vg, xg, yg = (cupy.asarray(a) for a in (theta, v, x, y))
    g_cpu, g_gpu = np.empty_like(theta), cupy.empty(cpu.n_params, dtype=dtype)
    assert rel(float(gpu.loss_grad(tg, xg, yg, g_gpu)), cpu.loss_grad(theta, x, y, g_cpu)) <= tol
    assert rel(g_gpu.get(), g_cpu) <= tol
    assert rel(gpu.curvature_product(tg, vg, xg, yg).get(),
               cpu.curvature_product(theta, v, x, y)) <= tol
    assert gpu.evaluate(tg, xg, yg)[1] == cpu.evaluate(theta, x, y)[1]


def test_torch_adapter_on_cupy_shares_memory_and_matches_cpu():
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("this PyTorch build has no CUDA")
    cfg = {"name": f"torch:{PLUGINS}:torch_mlp", "options": {"hidden": 9}, "l2": 1e-3}
    cpu = build_model(cfg, 6, 3, xp=np, dtype=np.float64).inner
    gpu = build_model(cfg, 6, 3, xp=cupy, dtype=np.float64).inner
    rng = np.random.default_rng(1)
    theta = rng.standard_normal(cpu.n_params)
    x, y = rng.standard_normal((11, 6)), rng.integers(0, 3, 11)
    tg = cupy.asarray(theta)
    assert gpu._tensor(tg).is_cuda and gpu._tensor(tg).data_ptr() == tg.data.ptr
    g_cpu, g_gpu = np.empty(cpu.n_params), cupy.empty(cpu.n_params)
    f_gpu = gpu.loss_grad(tg, cupy.asarray(x), cupy.asarray(y), g_gpu)
    assert rel(f_gpu, cpu.loss_grad(theta, x, y, g_cpu)) <= 1e-10
    assert rel(g_gpu.get(), g_cpu) <= 1e-10
    v = rng.standard_normal(cpu.n_params)
    assert rel(gpu.curvature_product(tg, cupy.asarray(v), cupy.asarray(x),
                                     cupy.asarray(y)).get(),
               cpu.curvature_product(theta, v, x, y)) <= 1e-10


@pytest.mark.parametrize("model", [
    [f"model.name=python:{PLUGINS}:dense_plugin", "model.options.hidden=[16]"],
    ["model.name=cnn", "model.channels=[4, 8]", "model.dense=[16]"]])
def test_a_run_on_the_gpu(tmp_path, launch, model):
    rng = np.random.default_rng(2)
    x, y = rng.random((120, 64)).astype(np.float32), rng.integers(0, 3, 120)
    data = tmp_path / "d.h5"
    write_dataset(data, (x[:100], y[:100]), (x[100:], y[100:]), source="t", description="",
                  n_classes=3, image_shape=(8, 8))
    mpiexec = os.environ.get("HESSMPI_MPIEXEC", os.path.join(os.path.dirname(sys.executable),
                                                             "mpiexec"))
    sets = [f"data.path={data}", "backend.device=gpu", "backend.share_gpus=true",
            "train.steps=6", "train.batch_size=10", "optim.name=secant", *model]
    result = launch([*mpiexec.split(), "-n", "2", sys.executable, "-m", "hessmpi", "train",
                     *[a for s in sets for a in ("--set", s)], "--out", str(tmp_path / "run")])
    assert result.returncode == 0, result.stdout + result.stderr
