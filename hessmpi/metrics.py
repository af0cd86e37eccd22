"""The results file OUT/metrics.h5 (layout in CONTRACT.md), written by rank 0 only.

Rank 0 keeps the rows in memory and, at every log interval, writes the whole file to a
temporary name, seals it (``sealed``) and renames it into place: readers (plain h5py,
pandas, xarray) and a run killed at any instant only ever see a complete file, and any
damage after it was written is refused by name (``read_metrics``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from hessmpi.sealed import USERBLOCK, DamagedFile, check, seal

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
    "batch": "f8",         # rows of the logged step's global batch (asgd/dcasgd: one push's)
}
#: Columns added after the first release, with the value they hold in older files' rows.
ADDED = {"curvature_evals": 0.0, "cg_iters": np.nan, "hf_lambda": np.nan,
         "staleness_mean": np.nan, "staleness_max": np.nan, "batch": np.nan}
#: The columns that only some methods fill (NaN in the others' rows): a synchronous
#: optimizer's from its StepInfo.diagnostics, the asynchronous server the staleness.
DIAGNOSTICS = ("cg_iters", "hf_lambda", "staleness_mean", "staleness_max")


class MetricsFile:
    """Create ``path`` with the root attributes ``attrs`` and ``cols`` (default: no rows)."""

    def __init__(self, path: str | Path, attrs: dict, cols: dict | None = None):
        self.path = Path(path)
        self.attrs = {"status": "running", **attrs}
        self.cols = {name: np.asarray(cols[name] if cols else [], dtype=dtype)
                     for name, dtype in COLUMNS.items()}
        self._write()

    @classmethod
    def reopen(cls, path: str | Path, step: int, attrs: dict) -> MetricsFile:
        """Continue a run's file after a resume from ``step``: rows after that step (written
        after the checkpoint) are dropped, ``attrs`` updated, status back to running."""
        old, cols = read_metrics(path)
        keep = int(np.searchsorted(cols["step"], step, side="right"))
        resumed = [*old.get("resumed_at", []), step]
        return cls(path, {**old, **attrs, "status": "running", "resumed_at": resumed},
                   {name: c[:keep] for name, c in cols.items()})

    def append(self, rows: list[dict], **attrs) -> None:
        """Append ``rows`` (dicts with every column) and set root attributes ``attrs``."""
        for name, dtype in COLUMNS.items():
            if rows:
                new = np.array([r[name] for r in rows], dtype=dtype)
                self.cols[name] = np.concatenate([self.cols[name], new])
        self.attrs.update(attrs)
        self._write()

    def record_crash(self, error: BaseException) -> None:
        """Status "failed" with ``error``'s type and message; never raises (the error being
        handled is the one to surface)."""
        try:
            self.append([], status="failed", failure=f"{type(error).__name__}: {error}")
        except Exception:  # noqa: BLE001 - never hide the original error
            pass

    def _write(self) -> None:
        import h5py

        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        try:
            with h5py.File(tmp, "w", userblock_size=USERBLOCK) as f:
                f.attrs.update(self.attrs)
                g = f.create_group("metrics")
                for name, values in self.cols.items():
                    g.create_dataset(name, data=values, maxshape=(None,), chunks=(1024,))
            seal(tmp)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)


def read_metrics(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(root attributes, {column: array}) of a metrics file; FileNotFoundError if there is
    none, DamagedFile naming it if it is damaged or not one."""
    import h5py

    check(path)
    try:
        with h5py.File(path, "r", locking=False) as f:
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            g = f["metrics"]
            rows = g["step"].shape[0]
            cols = {name: g[name][()] if name in g or name not in ADDED
                    else np.full(rows, ADDED[name]) for name in COLUMNS}
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, UnicodeDecodeError) as e:
        raise DamagedFile(f"{path} is damaged or not a hessmpi results file ({e})") from None
    return attrs, cols


def rebuild(path: str | Path, arrays: dict, attrs: dict, source: str) -> str:
    """Write the results file ``path`` anew from the checkpoint ``source`` (its ``arrays``
    and ``attrs``): its configuration and its ``metrics/<column>`` rows, status stopped. A
    file already there is kept beside it as ``NAME.damaged`` (numbered if taken). Returns
    what was kept and what was lost, in words."""
    path = Path(path)
    said = []
    if path.exists():
        aside = path.with_name(f"{path.name}.damaged")
        n = 0
        while aside.exists():
            n += 1
            aside = path.with_name(f"{path.name}.damaged.{n}")
        os.replace(path, aside)
        said.append(f"the old file is kept as {aside.name}")
    step = int(attrs["step"])
    rows = arrays.get("metrics/step")
    count = 0 if rows is None else len(rows)
    MetricsFile(path, {"config": attrs["config"], "status": "stopped", "rebuilt_from": source},
                {name: arrays.get(f"metrics/{name}", np.full(count, ADDED.get(name, 0)))
                 for name in COLUMNS})
    if rows is None:
        said.append(f"{source} holds no rows (written by an older hessmpi): the rows of "
                    f"steps 1-{step} are lost")
    else:
        said.append(f"its {len(rows)} rows up to step {step} are restored from {source}; lost: "
                    "the rows after that step (logged again as the run goes on) and the "
                    "old file's root attributes (such as resumed_at)")
    return f"{path} rebuilt: " + "; ".join(said)
