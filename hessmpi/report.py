"""``hessmpi report``: one row per run, read from each run's metrics.h5 (running runs too)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from hessmpi import config as config_mod
from hessmpi.errors import UsageError
from hessmpi.metrics import read_metrics

HEADER = ("run", "method", "ranks", "batch", "backend", "status", "steps", "grad_evals",
          "final_loss", "best_loss", "test_acc", "wall_s", "fallback_rate", "t_grad_ms",
          "t_comm_ms", "t_solve_ms")


def _last_finite(a: np.ndarray) -> float:
    finite = a[np.isfinite(a)]
    return float(finite[-1]) if finite.size else math.nan


def summarize(run: Path) -> dict:
    """The table row of one run directory; UsageError naming it if it is missing or damaged."""
    path = run / "metrics.h5"
    if not path.is_file():
        raise UsageError(f"{run}: no metrics.h5 (not a hessmpi run directory)")
    try:
        attrs, cols = read_metrics(path)
        cfg = config_mod.from_toml(attrs["config"])
    except (OSError, KeyError, ValueError, UsageError) as e:
        raise UsageError(f"{run}: metrics.h5 is damaged or not a hessmpi results file "
                         f"({e})") from None
    ocfg = cfg["optim"]
    method = f"{ocfg['name']} lr={ocfg['lr']:g} mom={ocfg['momentum']:g}"
    steps = int(cols["step"][-1]) if len(cols["step"]) else 0
    def median_ms(c):
        return (float(np.median(cols[c])) * 1e3 if len(cols[c]) else math.nan)
    return {
        "run": str(run), "method": method, "ranks": int(attrs.get("mpi_size", 0)),
        "batch": cfg["train"]["batch_size"], "backend": attrs.get("backend", "?"),
        "status": attrs.get("status", "?"), "steps": steps,
        "grad_evals": int(cols["grad_evals"][-1]) if steps else 0,
        "final_loss": float(cols["train_loss"][-1]) if steps else math.nan,
        "best_loss": float(np.nanmin(cols["train_loss"])) if steps else math.nan,
        "test_acc": _last_finite(cols["test_acc"]),
        "wall_s": float(cols["wall_time"][-1]) if steps else math.nan,
        "fallback_rate": float(np.mean(cols["fallback"])) if steps else math.nan,
        "t_grad_ms": median_ms("t_grad"), "t_comm_ms": median_ms("t_comm"),
        "t_solve_ms": median_ms("t_solve"),
    }


def _cell(value) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def report(runs: list[Path], csv_path: Path | None = None) -> str:
    """The table over ``runs`` as aligned text; also written as CSV to ``csv_path``."""
    rows = [summarize(Path(r)) for r in runs]
    if csv_path is not None:
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=HEADER)
            writer.writeheader()
            writer.writerows(rows)
    table = [HEADER] + [tuple(_cell(r[h]) for h in HEADER) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in table)
