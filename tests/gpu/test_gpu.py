"""The CuPy backend against the NumPy one: same numerics, same training, portable checkpoints.

Every comparison is GPU result vs the CPU result of the same code on the same inputs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from harness import build, rel, step_on
from mpi4py import MPI

from hessmpi import importers
from hessmpi.backend import _cupy_or_reason, to_host
from hessmpi.comm import Communicator, cuda_aware_mpi
from hessmpi.data import write_dataset
from hessmpi.models import DenseNet
from hessmpi.objective import Objective
from hessmpi.optim.quasi_newton import direction

cupy, why = _cupy_or_reason()
if cupy is None:
    pytest.skip(f"no GPU: {why}", allow_module_level=True)

BIN = Path(sys.executable).parent
MPIEXEC = os.environ.get("HESSMPI_MPIEXEC", str(BIN / "mpiexec"))
HESSMPI = [sys.executable, "-m", "hessmpi"]


@pytest.mark.parametrize(("dtype", "tol"), [(np.float64, 1e-10), (np.float32, 1e-4)])
@pytest.mark.parametrize("sizes", [[30, 7], [30, 40, 20, 7]])
def test_model_gradient_and_curvature_match_cpu(dtype, tol, sizes):
    rng = np.random.default_rng(0)
    cpu = DenseNet(sizes, "tanh", 1e-3, xp=np, dtype=dtype)
    gpu = DenseNet(sizes, "tanh", 1e-3, xp=cupy, dtype=dtype)
    theta = (0.3 * rng.standard_normal(cpu.n_params)).astype(dtype)
    v = rng.standard_normal(cpu.n_params).astype(dtype)
    x = rng.standard_normal((50, sizes[0])).astype(dtype)
    y = rng.integers(0, sizes[-1], 50)
    g_cpu = np.empty_like(theta)
    f_cpu = cpu.loss_grad(theta, x, y, g_cpu)
    g_gpu = cupy.empty(cpu.n_params, dtype=dtype)
    f_gpu = gpu.loss_grad(cupy.asarray(theta), cupy.asarray(x), cupy.asarray(y), g_gpu)
    assert abs(float(f_gpu) - float(f_cpu)) <= tol * abs(float(f_cpu))
    assert rel(g_gpu.get(), g_cpu) <= tol
    hv_cpu = cpu.curvature_product(theta, v, x, y)
    hv_gpu = gpu.curvature_product(cupy.asarray(theta), cupy.asarray(v), cupy.asarray(x),
                                   cupy.asarray(y))
    assert rel(hv_gpu.get(), hv_cpu) <= tol
    loss_cpu, correct_cpu = cpu.evaluate(theta, x, y, chunk=16)
    loss_gpu, correct_gpu = gpu.evaluate(cupy.asarray(theta), cupy.asarray(x), cupy.asarray(y),
                                         chunk=16)
    assert correct_gpu == correct_cpu
    assert abs(loss_gpu - loss_cpu) <= tol * abs(loss_cpu)


@pytest.mark.parametrize("curvature", ["bfgs", "lsq", "subspace"])
def test_secant_direction_matches_cpu(curvature):
    rng = np.random.default_rng(1)
    n, m = 200, 6
    A = rng.standard_normal((n, n))
    A = A @ A.T / n + np.eye(n)
    S = rng.standard_normal((n, m))
    Y = A @ S + 0.05 * rng.standard_normal((n, m))     # noisy pairs
    W = np.vstack([rng.standard_normal(n), S.T, Y.T])
    opts = dict(eta=0.1, curvature=curvature, curvature_tol=1e-6, h0="bb", lsq_mu=1e-12,
                max_step_ratio=10.0)
    idx = (np.arange(1, m + 1), np.arange(m + 1, 2 * m + 1), 0)
    d_cpu = direction(W @ W.T, *idx, xp=np, **opts)
    Wg = cupy.asarray(W)
    d_gpu = direction(Wg @ Wg.T, *idx, xp=cupy, **opts)
    assert d_gpu.reason == d_cpu.reason is None
    assert d_gpu.kept == d_cpu.kept
    vec_cpu = d_cpu.coef_g * W[0] + d_cpu.coef_s @ W[1:m + 1] + d_cpu.coef_y @ W[m + 1:]
    vec_gpu = (d_gpu.coef_g * Wg[0] + d_gpu.coef_s @ Wg[1:m + 1] + d_gpu.coef_y @ Wg[m + 1:])
    assert rel(vec_gpu.get(), vec_cpu) <= 1e-9


@pytest.mark.parametrize("memory", [1, 3])
def test_secant_step_matches_cpu(solo, memory):
    """The whole Secant optimizer (gradient, pairs, Gram, small system, combination) on the
    GPU against the CPU, on the same model, batch and parameters, over several steps."""
    rng = np.random.default_rng(2)
    sizes = [30, 40, 7]
    x = rng.standard_normal((64, sizes[0]))
    y = rng.integers(0, sizes[-1], 64)
    thetas = []
    for xp in (np, cupy):
        model = DenseNet(sizes, "relu", 1e-3, xp=xp, dtype=np.float64)
        theta = xp.asarray(model.init_params(0))
        objective = Objective(model, solo)
        opt = build(theta, objective, memory=memory)
        xb, yb = xp.asarray(x), xp.asarray(y)
        for _ in range(6):
            step_on(opt, objective, theta, 0.05, xb, yb)
        thetas.append(to_host(xp, theta))
        assert sum(opt.counts.values()) - opt.counts["clipped"] == 0, opt.counts
        assert objective.grad_evals == 6 * (1 + opt.source.cost())
    assert rel(thetas[1], thetas[0]) <= 1e-10


def test_staged_path_moves_device_buffers():
    """Two ranks' worth of staging in one process: a split of COMM_SELF has one rank, so use
    an intercommunicator-free check instead: the staged copy path on a Dup of COMM_WORLD."""
    comm = Communicator(MPI.COMM_WORLD, device_path="staged")
    comm.size = 2            # force the staging path; with one process Allreduce is identity
    buf = cupy.arange(10, dtype=cupy.float64)
    comm.allreduce_sum_(buf)
    assert cupy.array_equal(buf, cupy.arange(10, dtype=cupy.float64))
    assert comm._pinned, "the staged path must have used a pinned host buffer"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "synthetic.h5"
    train, test, attrs = importers.synthetic(n_train=512, n_test=128, features=20, classes=4,
                                             cond=30.0, seed=3)
    write_dataset(path, train, test, **attrs)
    return path


def _train(launch, out: Path, dataset: Path, *extra: str, ranks: int = 2):
    cmd = [MPIEXEC, "-n", str(ranks), *HESSMPI, "train", "--out", str(out),
           "--set", f"data.path='{dataset}'", "--set", "model.name='mlp'",
           "--set", "model.hidden=[32]", "--set", "backend.dtype='float64'",
           "--set", "train.steps=40", "--set", "train.batch_size=32",
           "--set", "optim.lr=0.05", "--set", "checkpoint.every=20", *extra]
    proc = launch(cmd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _params(out: Path) -> np.ndarray:
    with h5py.File(out / "checkpoints" / "ckpt_000000040.h5") as f:
        return f["params"][()]


@pytest.mark.parametrize("optim", ["sgd", "secant"])
def test_two_rank_gpu_run_matches_cpu(launch, tmp_path, dataset, optim):
    name = f"--set=optim.name='{optim}'"
    _train(launch, tmp_path / "cpu", dataset, name, "--set", "backend.device='cpu'")
    _train(launch, tmp_path / "gpu", dataset, name, "--set", "backend.device='gpu'",
           "--set", "backend.share_gpus=true")
    with h5py.File(tmp_path / "gpu" / "metrics.h5") as f:
        assert f.attrs["backend"] == "cupy"
        assert f.attrs["mpi_device_path"] in ("direct", "staged")
    assert rel(_params(tmp_path / "gpu"), _params(tmp_path / "cpu")) <= 1e-9


@pytest.mark.skipif(not cuda_aware_mpi(), reason="the MPI library is not CUDA-aware: "
                                                 "no direct device path to compare")
def test_staged_and_direct_paths_agree(launch, tmp_path, dataset):
    gpu = ("--set", "backend.device='gpu'", "--set", "backend.share_gpus=true",
           "--set", "optim.name='secant'")
    _train(launch, tmp_path / "staged", dataset, *gpu, "--set", "backend.mpi_device_path='staged'")
    _train(launch, tmp_path / "direct", dataset, *gpu, "--set", "backend.mpi_device_path='direct'")
    assert np.array_equal(_params(tmp_path / "staged"), _params(tmp_path / "direct"))


def test_gpu_checkpoint_resumes_on_cpu(launch, tmp_path, dataset):
    common = ("--set", "optim.name='secant'", "--set", "optim.memory=2")
    _train(launch, tmp_path / "whole", dataset, *common, "--set", "backend.device='cpu'")
    half = tmp_path / "half"
    _train(launch, half, dataset, *common, "--set", "backend.device='gpu'",
           "--set", "backend.share_gpus=true", "--set", "train.steps=20")
    proc = launch([MPIEXEC, "-n", "2", *HESSMPI, "train", "--resume", str(half),
                    "--set", "train.steps=40", "--set", "backend.device='cpu'"])
    assert proc.returncode == 0, proc.stderr
    with h5py.File(half / "metrics.h5") as f:
        assert f.attrs["backend"] == "numpy"
    assert rel(_params(half), _params(tmp_path / "whole")) <= 1e-9
