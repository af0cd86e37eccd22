"""The results file OUT/metrics.h5 (layout in CONTRACT.md), written by rank 0 only.

The file is opened, appended to and closed at every log interval, so between intervals it
is a complete, closed HDF5 file that plain h5py, pandas or xarray can read while the run
goes on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: Columns of /metrics, one row per logged step, and their dtypes.
COLUMNS: dict[str, str] = {
    "step": "i8",          # optimizer steps done when the row was logged
    "epoch": "f8",         # passes over each rank's training shard
    "wall_time": "f8",     # seconds since the start of training
    "train_loss": "f8",    # global minibatch objective F at the step's parameters
    "grad_evals": "f8",    # cumulative gradient evaluations per rank (sub-batch probes: fraction)
    "grad_norm": "f8",     # ||g_bar|| of the step
    "step_norm": "f8",     # ||theta_new - theta_old|| of the step
    "fallback": "i1",      # 1 if the step fell back to SGD
    "rank_kept": "i4",     # curvature directions kept by the filter
    "t_grad": "f8",        # seconds per step in gradient evaluation (rank 0, mean over interval)
    "t_comm": "f8",        # seconds per step inside MPI collectives
    "t_solve": "f8",       # seconds per step in the optimizer update
    "bytes_sent": "i8",    # payload bytes per step handed to collectives by rank 0
    "test_loss": "f8",     # mean test cross-entropy (NaN where not evaluated)
    "test_acc": "f8",      # test accuracy in [0, 1] (NaN where not evaluated)
    "forward_evals": "i8",  # cumulative forward-only passes per rank (line-search trials)
    "curvature_evals": "f8",  # cumulative curvature products per rank (r of B rows: r / B)
    "cg_iters": "f8",      # hessian_free: CG iterations of the step (NaN for other methods)
    "hf_lambda": "f8",     # hessian_free: Levenberg-Marquardt lambda after the step (NaN else)
    "staleness_mean": "f8",  # asgd/dcasgd: mean over the row's updates of the updates applied
    "staleness_max": "f8",   # between the worker's fetch and its push, and the max (NaN else)
}
#: Columns added after the first release, with the value they hold in older files' rows.
ADDED = {"curvature_evals": 0.0, "cg_iters": np.nan, "hf_lambda": np.nan,
         "staleness_mean": np.nan, "staleness_max": np.nan}
#: The columns that only some methods fill (NaN in the others' rows): a synchronous
#: optimizer's from its StepInfo.diagnostics, the asynchronous server the staleness.
DIAGNOSTICS = ("cg_iters", "hf_lambda", "staleness_mean", "staleness_max")


class MetricsFile:
    """Create ``path`` with the root attributes ``attrs`` and empty columns."""

    def __init__(self, path: str | Path, attrs: dict):
        import h5py

        self.path = Path(path)
        with h5py.File(self.path, "w", locking=False) as f:
            f.attrs.update(attrs)
            f.attrs["status"] = "running"
            g = f.create_group("metrics")
            for name, dtype in COLUMNS.items():
                g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype,
                                 chunks=(1024,))

    @classmethod
    def reopen(cls, path: str | Path, step: int, attrs: dict) -> MetricsFile:
        """Continue a run's file after a resume from ``step``: rows after that step (written
        after the checkpoint) are dropped, ``attrs`` updated, status back to running."""
        import h5py

        self = cls.__new__(cls)
        self.path = Path(path)
        with h5py.File(self.path, "a", locking=False) as f:
            g = f["metrics"]
            keep = int(np.searchsorted(g["step"][()], step, side="right"))
            for name, fill in ADDED.items():        # a file written before they existed
                if name not in g:
                    g.create_dataset(name, data=np.full(g["step"].shape, fill),
                                     maxshape=(None,), dtype=COLUMNS[name], chunks=(1024,))
            for name in COLUMNS:
                g[name].resize((keep,))
            resumed = list(f.attrs.get("resumed_at", [])) + [step]
            f.attrs.update(attrs)
            f.attrs.update(status="running", resumed_at=resumed)
        return self

    def append(self, rows: list[dict], **attrs) -> None:
        """Append ``rows`` (dicts with every column) and set root attributes ``attrs``."""
        import h5py

        with h5py.File(self.path, "a", locking=False) as f:
            g = f["metrics"]
            if rows:
                start = g["step"].shape[0]
                for name, dtype in COLUMNS.items():
                    d = g[name]
                    d.resize((start + len(rows),))
                    d[start:] = np.array([r[name] for r in rows], dtype=dtype)
            f.attrs.update(attrs)


def read_metrics(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(root attributes, {column: array}) of a metrics file; raises OSError or KeyError
    if it is not one."""
    import h5py

    with h5py.File(path, "r", locking=False) as f:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        g = f["metrics"]
        rows = g["step"].shape[0]
        cols = {name: g[name][()] if name in g or name not in ADDED
                else np.full(rows, ADDED[name]) for name in COLUMNS}
    return attrs, cols
