"""The benchmarks' datasets, built from the real data in ``../shared/data``, and the optimum
F* of softmax regression on them.

Files go to ``ROOT/data/NAME.h5`` (git-ignored), built once with :mod:`hessmpi.importers`;
the shared files are read in place, never copied into the repository. The shared directory
is ``ROOT/../shared/data`` unless ``HESSMPI_SHARED_DATA`` names another.

=================  =====================================================================
name               rows
=================  =====================================================================
digits             scikit-learn digits: 1,438 train / 359 test (``hessmpi data digits``)
mnist-t10k         MNIST t10k: the first 8,000 train, the last 2,000 test
fashion-mnist      Fashion-MNIST: the 60,000 train-* rows train, the 10,000 t10k-* test
fashion-mnist-8k   the first 8,000 Fashion-MNIST training rows, the same 10,000 test
=================  =====================================================================
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np

MNIST_ROWS = 8000     # the ../shared/data convention for the t10k files: first 8,000 train
NAMES = ("digits", "mnist-t10k", "fashion-mnist", "fashion-mnist-8k")


def shared_dir(root: Path) -> Path:
    """Where the real data lies: HESSMPI_SHARED_DATA, else ROOT/../shared/data."""
    return Path(os.environ.get("HESSMPI_SHARED_DATA") or Path(root).resolve().parent
                / "shared" / "data")


def _idx(shared: Path, folder: str, *names: str) -> list[Path]:
    paths = [shared / folder / name for name in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"hessmpi.bench: the dataset needs {', '.join(missing)}, which is "
                         "missing: the benchmarks read the real data in ../shared/data (or "
                         "where HESSMPI_SHARED_DATA points) and never download it")
    return paths


def _build(name: str, shared: Path):
    from hessmpi import importers

    if name == "digits":
        return importers.digits()
    if name == "mnist-t10k":
        files = _idx(shared, "mnist-t10k", "t10k-images-idx3-ubyte.gz",
                     "t10k-labels-idx1-ubyte.gz")
        return importers.mnist(*files, n_train=MNIST_ROWS)
    files = _idx(shared, "fashion-mnist", "train-images-idx3-ubyte.gz",
                 "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz")
    train, test, attrs = importers.mnist(*files, kind="fashion-mnist")
    if name == "fashion-mnist-8k":
        train = (train[0][:MNIST_ROWS], train[1][:MNIST_ROWS])
        attrs["description"] += f"; the first {MNIST_ROWS} training rows only"
    return train, test, attrs


def dataset(name: str, root: Path) -> Path:
    """ROOT/data/NAME.h5, built from the shared files if it is missing (SystemExit naming
    the file if they are absent)."""
    from hessmpi.data import write_dataset

    if name not in NAMES:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(NAMES)}")
    path = Path(root) / "data" / f"{name}.h5"
    if not path.is_file():
        train, test, attrs = _build(name, shared_dir(root))
        write_dataset(path, train, test, **attrs)
    return path


def newton_cg(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float, *,
              tol: float = 1e-10) -> dict:
    """min F of softmax regression on (x (N, d), y (N,)) in float64: Newton's method on the
    exact Hessian (``DenseNet.curvature_product``), each system solved by conjugate gradients
    to a relative residual min(0.5, sqrt(||g||)) (tighter near the end), Armijo backtracking;
    until ||grad F|| <= ``tol``. Returns fstar, grad_norm, newton_iters, cg_iters, seconds."""
    from hessmpi.models import DenseNet

    x = np.asarray(x, dtype=np.float64)
    model = DenseNet([x.shape[1], n_classes], "relu", l2, dtype=np.float64)
    theta, g, hv = (np.zeros(model.n_params) for _ in range(3))
    total_cg = newton = 0
    started = time.perf_counter()
    for _ in range(200):
        f = float(model.loss_grad(theta, x, y, g))
        gnorm = float(np.linalg.norm(g))
        if gnorm <= tol:
            break
        newton += 1
        rtol = max(min(0.5, math.sqrt(gnorm), (0.1 * tol + 1e-12) / gnorm), 1e-14)
        p, r = np.zeros_like(theta), -g
        d, rr = r.copy(), float(r @ r)
        for _ in range(5000):
            model.curvature_product(theta, d, x, y, out=hv)
            total_cg += 1
            alpha = rr / float(d @ hv)
            p += alpha * d
            r = r - alpha * hv
            rr_new = float(r @ r)
            if math.sqrt(rr_new) <= rtol * gnorm:
                break
            d = r + (rr_new / rr) * d
            rr = rr_new
        t, slope = 1.0, float(g @ p)
        while t > 1e-12 and float(model.loss(theta + t * p, x, y)) > f + 1e-4 * t * slope:
            t *= 0.5
        theta += t * p
    f = float(model.loss_grad(theta, x, y, g))
    return dict(fstar=f, grad_norm=float(np.linalg.norm(g)), newton_iters=newton,
                cg_iters=total_cg, seconds=time.perf_counter() - started)


def softmax_optimum(path: Path, l2: float, root: Path, rows: int | None = None,
                    log=print) -> dict:
    """F* of softmax regression with ``l2`` on the first ``rows`` training rows of dataset
    ``path`` (all by default; P ranks with equal shards use the first N // P * P), by
    :func:`newton_cg`; cached in ROOT/bench-results/fstar.json under a digest of those rows
    and l2 (the mnist-t10k solve takes minutes the first time)."""
    import h5py

    with h5py.File(path, "r") as f:
        x, y = f["train/x"][:rows], f["train/y"][:rows]
        n_classes = int(f.attrs["n_classes"])
    digest = hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()[:16]
    key = f"{digest}:{l2!r}"
    cache_path = Path(root) / "bench-results" / "fstar.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    if key not in cache:
        log(f"F* of softmax regression on {len(y)} rows of {Path(path).name} (l2 {l2:g}) by "
            "Newton-CG in float64 ...")
        cache[key] = dict(newton_cg(x, y, n_classes, l2), dataset=Path(path).name,
                          rows=len(y), l2=l2)
        log(f"  F* = {cache[key]['fstar']:.12g}, ||grad|| {cache[key]['grad_norm']:.1e}, "
            f"{cache[key]['cg_iters']} Hessian products, {cache[key]['seconds']:.0f} s")
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(cache, indent=1) + "\n")
    return dict(cache[key], key=key)
