"""How the unit and MPI suites build and drive optimizers and runs, and the dense references
they compare with: written once here.

An optimizer step is what the trainer does: the objective's batch is this rank's (x, y),
then ``opt.step(theta, objective, lr)``. A test that inspects or spoils this rank's own
pairs before they are exchanged hooks the pair source's ``before_reduce``
(:func:`after_pairs`), or does only what a step does before its Allreduce
(:func:`form_pairs`).
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import numpy as np

from hessmpi import config
from hessmpi.backend import make_backend
from hessmpi.optim import build_optimizer
from hessmpi.trainer import Run


# ----- options and optimizers --------------------------------------------------------------
def optim_options(name: str = "secant", **keys):
    """The typed ``[optim]`` options of ``optim.name = name`` with ``keys`` set, through
    ``config.load`` (a key that does not apply there is refused, as for a user)."""
    sets = [f"optim.name={name}", *(f"optim.{k}={json.dumps(v)}" for k, v in keys.items())]
    return config.options(config.load(None, sets), "optim")


def build(theta, objective, name: str = "secant", *, seed: int = 0, **keys):
    """``build_optimizer`` of :func:`optim_options` (name, keys) for theta on objective."""
    return build_optimizer(optim_options(name, **keys), theta, objective, seed=seed)


# ----- driving a step ----------------------------------------------------------------------
def step_on(opt, objective, theta, lr, x, y):
    """One step of ``opt`` on this rank's batch (x, y), theta in place; its StepInfo."""
    objective.use_batch(x, y)
    return opt.step(theta, objective, lr)


def form_pairs(opt, objective, theta, lr, x, y) -> None:
    """What a step does before its gradient's Allreduce: this rank's gradient on (x, y),
    then the pair source's work; this rank's own pair rows are then in ``opt.memory``
    (``own_rows(next_slot)``), not yet exchanged. Theta is not changed."""
    objective.use_batch(x, y)
    objective.local_gradient(theta)
    opt.source.before_reduce(opt.steps, theta, objective, lr, opt.memory)


@contextmanager
def after_pairs(opt, hook):
    """Inside the block every step of ``opt`` calls ``hook(opt)`` right after its pair
    source's ``before_reduce``: on this rank's own pairs, before the Allreduce and the
    exchange (where a test records or spoils them)."""
    real = opt.source.before_reduce

    def before_reduce(*args, **kwargs):
        real(*args, **kwargs)
        hook(opt)

    opt.source.before_reduce = before_reduce
    try:
        yield
    finally:
        del opt.source.before_reduce


@contextmanager
def counted(objective):
    """Yields a dict that after the block holds what ``objective`` counted inside it
    (grad_evals, forward_evals, curvature_evals)."""
    before = objective.counters()
    used: dict = {}
    yield used
    used.update({k: v - before[k] for k, v in objective.counters().items()})


def own_rows(opt):
    """(s rows (k, n), y rows (k, n)) of this rank in the slot the next pairs go to."""
    return opt.memory.own_rows(opt.memory.next_slot)


# ----- dense references ----------------------------------------------------------------------
def rel(a, b) -> float:
    """||a - b|| / ||b||, in float64."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def bfgs_matrix(S, Y, h, Di=None):
    """The block-BFGS inverse of ALGORITHM.md s.2 as an n x n matrix, pairs S, Y (n, m
    columns): H = S D^-1 S^T + (I - S D^-1 Y^T) h I (I - Y D^-1 S^T), D = sym(S^T Y);
    ``Di``: D^-1 if known (default: inverted here)."""
    if Di is None:
        Di = np.linalg.inv(0.5 * (S.T @ Y + Y.T @ S))
    L = np.eye(S.shape[0]) - S @ Di @ Y.T
    return S @ Di @ S.T + h * L @ L.T


def block_bfgs(g, S, Y, h, tau=1e-6):
    """(H g, kept): the curvature filter on D = sym(S^T Y) (keep lam > tau max(lam),
    lam > 0), the pairs rotated onto the kept eigenvectors, then :func:`bfgs_matrix` of
    those; ``h``: a number, or "bb" for tr(S^T Y) / tr(Y^T Y) over the kept pairs."""
    lam, Q = np.linalg.eigh(0.5 * (S.T @ Y + Y.T @ S))
    keep = (lam > tau * lam.max()) & (lam > 0)
    S, Y, lam = S @ Q[:, keep], Y @ Q[:, keep], lam[keep]
    if h == "bb":
        h = float(np.trace(S.T @ Y) / np.trace(Y.T @ Y))
    return bfgs_matrix(S, Y, h, np.diag(1.0 / lam)) @ g, int(keep.sum())


# ----- runs and data -------------------------------------------------------------------------
CPU64 = ("backend.device=cpu", "backend.dtype=float64", "backend.threads=1")


def run_config(data, *sets: str) -> dict:
    """The configuration of a run on the dataset file ``data``, on the CPU in float64 with
    one BLAS thread, then ``sets`` (section.key=value; later ones win)."""
    return config.load(None, [f"data.path={json.dumps(str(data))}", *CPU64, *sets])


def start_run(cfg: dict, comm, out) -> Run:
    """A Run of ``cfg`` on comm writing into ``out``, on the backend cfg names."""
    b = cfg["backend"]
    return Run(cfg, comm, make_backend(b["device"], b["dtype"], b["threads"]), out)


def read_split(path, split: str = "train"):
    """(x float64, y, n_classes) of a split of a dataset file, every row."""
    import h5py

    with h5py.File(path, "r") as f:
        return (f[f"{split}/x"][()].astype(np.float64), f[f"{split}/y"][()],
                int(f.attrs["n_classes"]))


def make_dataset(comm, directory, *, n_train: int = 61, n_test: int = 31, features: int = 6,
                 classes: int = 3, seed: int = 5):
    """Rank 0 writes a small synthetic dataset file ``directory``/data.h5; every rank gets
    its path (or every rank raises if rank 0 could not write it)."""
    from hessmpi.data import write_dataset
    from hessmpi.importers import synthetic

    path = directory / "data.h5"
    error = None
    if comm.rank == 0:
        try:
            train, test, attrs = synthetic(n_train, n_test, features, classes, 10.0, 2.0, seed)
            write_dataset(path, train, test, **attrs)
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            error = f"{type(e).__name__}: {e}"
    error = comm.bcast(error)
    if error:
        raise RuntimeError(f"rank 0 could not write the dataset: {error}")
    return path


def gathered(comm, x, y):
    """The ranks' rows (x, y) concatenated in rank order, on every rank (a collective)."""
    parts = comm.allgather((x, y))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
