"""``hessmpi report``: one row per run, read from each run's metrics.h5 (running runs too),
as an aligned table, a CSV file, and a figure of the training curves.

Columns: ``run``; ``method`` (optimizer and its key options); ``ranks``; ``batch`` (per rank;
grown by ``optim.batch_test``: "FIRST->LAST");
``backend``; ``status`` (running, stopped, finished, failed; killed: marked running, but no
process holds the run directory any more); ``steps`` (the last logged step); ``grad_evals``
(per rank; asynchronous runs: over all workers); ``final_loss`` and ``best_loss`` (the
minibatch training objective of the logged rows); ``test_acc`` (the last evaluation);
``wall_s`` (training wall time); ``fallback_rate`` (share of all steps that fell back to
SGD); ``t_grad_ms``, ``t_comm_ms``, ``t_solve_ms`` (medians over the logged rows of the
per-step seconds in gradient evaluation, MPI collectives and the optimizer update). With a
target, ``to_loss_steps``/``to_loss_s`` (the first logged step, and its wall time, whose
training loss is at or below ``--target-loss``) and ``to_acc_steps``/``to_acc_s`` (the
first evaluation at or above ``--target-acc``); ``-`` where not reached.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from hessmpi import config as config_mod
from hessmpi.errors import UsageError
from hessmpi.metrics import read_metrics
from hessmpi.rundir import abandoned

HEADER = ("run", "method", "ranks", "batch", "backend", "status", "steps", "grad_evals",
          "final_loss", "best_loss", "test_acc", "wall_s", "fallback_rate", "t_grad_ms",
          "t_comm_ms", "t_solve_ms")
LOSS_TARGET_COLUMNS = ("to_loss_steps", "to_loss_s")
BASELINE_COLUMNS = ("x_steps", "x_wall")
ACC_TARGET_COLUMNS = ("to_acc_steps", "to_acc_s")


def _last_finite(a: np.ndarray) -> float:
    finite = a[np.isfinite(a)]
    return float(finite[-1]) if finite.size else math.nan


def _count(value) -> int | float:
    """A cumulative count: an int, or a float where it has a fraction (sub-batch probes)."""
    value = float(value)
    return int(value) if value.is_integer() else round(value, 2)


def _batch(cfg: dict, attrs: dict, cols: dict):
    """The per-rank batch: its configured size ("full": the shard), and with optim.batch_test
    "FIRST->LAST", LAST the last logged step's global batch over the ranks, rounded up."""
    first = cfg["train"]["batch_size"] or "full"
    grown = cols["batch"][np.isfinite(cols["batch"])]
    ranks = int(attrs.get("mpi_size", 0))
    if cfg["optim"]["batch_test"] == "none" or not grown.size or not ranks:
        return first
    return f"{first}->{math.ceil(grown[-1] / ranks)}"


def method_label(cfg: dict) -> str:
    """The optimizer and its key options, e.g. ``secant lr=0.05 mom=0.9 K=1 bfgs probe-sgd
    a=0.2`` (K memory, curvature rule, pair source; k pairs per rank, T probe interval, pb
    probe batch fraction, ls line search where not the default; a the secant step length),
    read from the configuration's typed options."""
    o = config_mod.options(cfg, "optim")
    label = f"{o.name} lr={o.lr:g}"
    if config_mod.applies(cfg, "optim", "momentum"):
        label += f" mom={o.momentum:g}"
    if o.name == "hessian_free":
        label += f" lambda0={o.hf_damping:g} cg<={o.hf_max_cg}" + (
            f" cb={o.hf_curvature_batch:g}" if o.hf_curvature_batch != 1.0 else "") + (
            " precond" if o.hf_precondition else "")
    if o.name == "entropy_sgd":
        label += f" L={o.entropy_steps} gamma={o.entropy_gamma:g}"
    if o.name == "sgd":
        label += " nesterov" * o.nesterov + (f" wd={o.weight_decay:g}" if o.weight_decay
                                             else "")
    if o.schedule != "constant":
        label += f" {o.schedule}"
    if config_mod.applies(cfg, "optim", "batch_test") and o.batch_test != "none":
        label += f" batch-test theta={o.batch_theta:g}"
    parts = []
    if o.name == "secant":
        parts += [f"K={o.memory}", o.curvature,
                  f"probe-{o.probe}" if o.pairs == "probe" else o.pairs]
    if config_mod.applies(cfg, "optim", "pairs_per_rank") and o.pairs_per_rank != 1:
        parts.append(f"k={o.pairs_per_rank}")
    if config_mod.applies(cfg, "optim", "probe_every") and o.probe_every != 1:
        parts.append(f"T={o.probe_every}")
    if config_mod.applies(cfg, "optim", "probe_batch") and o.probe_batch != 1.0:
        parts.append(f"pb={o.probe_batch:g}")
    if config_mod.applies(cfg, "optim", "line_search") and o.line_search != "none":
        parts.append(f"ls={o.line_search}")
    if config_mod.applies(cfg, "optim", "newton_lr"):
        parts.append(f"a={o.newton_lr:g}")
    if o.name == "dcasgd":
        parts.append(f"lambda={o.dc_lambda:g} " + ("adaptive" if o.dc_adaptive else "constant"))
    if config_mod.applies(cfg, "optim", "async_delay") and o.async_delay:
        parts.append(f"delay={o.async_delay}")
    return " ".join([label, *parts])


def load_run(run: Path) -> tuple[dict, dict, dict[str, np.ndarray]]:
    """(root attributes, configuration, {column: array}) of run directory ``run``; the
    columns cut to a common length. A run marked running whose directory no process holds
    any more (``rundir.abandoned``: killed by a signal it could not see) has status killed.
    UsageError naming the run if it is missing or damaged."""
    path = run / "metrics.h5"
    if not path.is_file():
        raise UsageError(f"{run}: no metrics.h5 (not a hessmpi run directory)")
    attrs, cols = read_metrics(path)
    try:
        cfg = config_mod.from_toml(attrs["config"])
    except (KeyError, TypeError, ValueError, UsageError) as e:
        raise UsageError(f"{path} is not a hessmpi results file: no usable configuration "
                         f"({e})") from None
    if attrs.get("status") == "running" and abandoned(run):
        attrs["status"] = "killed"
    n = min((len(c) for c in cols.values()), default=0)
    return attrs, cfg, {name: c[:n] for name, c in cols.items()}


def _first_reached(cols: dict, column: str, reached) -> tuple[float, float]:
    """(step, wall seconds) of the first row whose ``column`` satisfies ``reached``."""
    values = cols[column]
    with np.errstate(invalid="ignore"):
        hits = np.flatnonzero(np.isfinite(values) & reached(values))
    if not hits.size:
        return math.nan, math.nan
    i = int(hits[0])
    return int(cols["step"][i]), float(cols["wall_time"][i])


def _fallback_rate(attrs: dict, steps: int, cols: dict) -> float:
    """Share of all steps that fell back to SGD, from the optimizer's counts of every step
    (``fallback_reasons``); for a run without them, the share of the logged steps."""
    if not steps:
        return math.nan
    reasons = attrs.get("fallback_reasons")
    if reasons:
        counts = json.loads(reasons)
        return sum(v for k, v in counts.items() if k != "clipped") / steps
    return float(np.mean(cols["fallback"]))


def summarize(run: Path, *, target_loss: float | None = None,
              target_acc: float | None = None) -> dict:
    """The table row of one run directory; UsageError naming it if it is missing or damaged.
    The target columns are there only when their target is given."""
    return _row(run, *load_run(run), target_loss=target_loss, target_acc=target_acc)


def _row(run: Path, attrs: dict, cfg: dict, cols: dict, *, target_loss: float | None,
         target_acc: float | None) -> dict:
    steps = int(cols["step"][-1]) if len(cols["step"]) else 0

    def median_ms(c):
        return float(np.median(cols[c])) * 1e3 if len(cols[c]) else math.nan

    loss = cols["train_loss"]
    finite_loss = loss[np.isfinite(loss)]
    row = {
        "run": str(run), "method": method_label(cfg),
        "ranks": int(attrs.get("mpi_size", 0)), "batch": _batch(cfg, attrs, cols),
        "backend": attrs.get("backend", "?"), "status": attrs.get("status", "?"),
        "steps": steps,
        "grad_evals": _count(cols["grad_evals"][-1]) if steps else 0,
        "final_loss": float(loss[-1]) if steps else math.nan,
        "best_loss": float(finite_loss.min()) if finite_loss.size else math.nan,
        "test_acc": _last_finite(cols["test_acc"]),
        "wall_s": float(cols["wall_time"][-1]) if steps else math.nan,
        "fallback_rate": _fallback_rate(attrs, steps, cols),
        "t_grad_ms": median_ms("t_grad"), "t_comm_ms": median_ms("t_comm"),
        "t_solve_ms": median_ms("t_solve"),
    }
    if target_loss is not None:
        row.update(zip(LOSS_TARGET_COLUMNS,
                       _first_reached(cols, "train_loss", lambda v: v <= target_loss),
                       strict=True))
    if target_acc is not None:
        row.update(zip(ACC_TARGET_COLUMNS,
                       _first_reached(cols, "test_acc", lambda v: v >= target_acc),
                       strict=True))
    return row


def header(target_loss: float | None = None, target_acc: float | None = None,
           baseline: bool = False) -> tuple:
    """The columns of a report with these targets (and ratios to a baseline run)."""
    return (HEADER + (LOSS_TARGET_COLUMNS if target_loss is not None else ())
            + (BASELINE_COLUMNS if baseline else ())
            + (ACC_TARGET_COLUMNS if target_acc is not None else ()))


def _versus(rows: list[dict], base: dict, target_loss: float) -> str:
    """The ratio columns of every row against the baseline row, and one line saying them."""
    lines = []
    for row in rows:
        row["x_steps"] = row["to_loss_steps"] / base["to_loss_steps"]
        row["x_wall"] = row["to_loss_s"] / base["to_loss_s"]
        if row is not base:
            reached = (f"in {row['x_steps']:.2f}x its steps ({row['to_loss_steps']} against "
                       f"{base['to_loss_steps']}) and {row['x_wall']:.2f}x its wall time"
                       if math.isfinite(row["x_steps"]) else "not within its steps")
            lines.append(f"{row['run']} reached the training loss {target_loss:.6g} of "
                         f"{base['run']} {reached}")
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def check_targets(target_loss: float | None, target_acc: float | None) -> None:
    """UsageError for a target that no run can meaningfully reach."""
    if target_loss is not None and not (math.isfinite(target_loss) and target_loss >= 0):
        raise UsageError(f"--target-loss {target_loss}: expected a training loss >= 0")
    if target_acc is not None and not (0 < target_acc <= 1):
        raise UsageError(f"--target-acc {target_acc}: expected a test accuracy in (0, 1], "
                         "e.g. 0.95")


def report(runs: list[Path], csv_path: Path | None = None, *, plot_path: Path | None = None,
           target_loss: float | None = None, target_acc: float | None = None,
           baseline: Path | None = None) -> str:
    """The table over ``runs`` as aligned text; also written as CSV to ``csv_path`` and drawn
    to ``plot_path`` (PNG). Every run is read before anything is written. ``baseline``: a
    run (added first if not among ``runs``) whose final training loss is the loss target
    unless one is given; columns x_steps, x_wall and a line under the table give each run's
    steps and wall time to that target as multiples of the baseline's."""
    check_targets(target_loss, target_acc)
    runs = [Path(r) for r in runs]
    if baseline is not None and Path(baseline) not in runs:
        runs.insert(0, Path(baseline))
    loaded = [(r, *load_run(r)) for r in runs]
    if baseline is not None and target_loss is None:
        target_loss = float(loaded[runs.index(Path(baseline))][3]["train_loss"][-1])
    rows = [_row(*run, target_loss=target_loss, target_acc=target_acc) for run in loaded]
    columns = header(target_loss, target_acc, baseline is not None)
    versus = (_versus(rows, rows[runs.index(Path(baseline))], target_loss)
              if baseline is not None else "")
    if plot_path is not None:
        plot(loaded, plot_path, target_loss=target_loss, target_acc=target_acc)
    if csv_path is not None:
        try:
            with open(csv_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)
        except OSError as e:
            raise UsageError(f"cannot write {csv_path}: {e.strerror or e}") from None
    table = [columns] + [tuple(_cell(r[h]) for h in columns) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in table)
    return text + ("\n" + versus if versus else "")


def plot(runs: list, path: Path, *, target_loss: float | None = None,
         target_acc: float | None = None) -> None:
    """A PNG of three panels, one labelled line per run: training loss against steps and
    against wall time, and test accuracy against steps. ``runs``: run directories, or
    (run, attrs, cfg, cols) tuples of :func:`load_run` already read."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'hessmpi[report]'") from None

    fig, (ax_step, ax_time, ax_acc) = plt.subplots(1, 3, figsize=(16, 5.2),
                                                   layout="constrained")
    log_scale = True
    loaded = [r if isinstance(r, tuple) else (Path(r), *load_run(Path(r))) for r in runs]
    for i, (run, attrs, cfg, cols) in enumerate(loaded):
        status = attrs.get("status", "?")
        ranks = attrs.get("mpi_size", "?")
        label = (f"{run.name or run}: {method_label(cfg)}, {ranks} "
                 f"rank{'' if ranks == 1 else 's'}")
        if status != "finished":
            label += f" ({status})"
        color = f"C{i % 10}"
        loss = cols["train_loss"]
        ok = np.isfinite(loss)
        log_scale &= bool(np.all(loss[ok] > 0))
        ax_step.plot(cols["step"][ok], loss[ok], color=color, lw=1.4, label=label)
        ax_time.plot(cols["wall_time"][ok], loss[ok], color=color, lw=1.4)
        acc = cols["test_acc"]
        evaluated = np.isfinite(acc)
        ax_acc.plot(cols["step"][evaluated], acc[evaluated], color=color, lw=1.4,
                    marker="o", ms=4)
    for ax in (ax_step, ax_time):
        if log_scale:
            ax.set_yscale("log")
        ax.set_ylabel("training loss (minibatch objective)")
        if target_loss is not None:
            ax.axhline(target_loss, color="0.4", ls="--", lw=1)
    ax_step.set_xlabel("optimizer steps")
    ax_step.set_title("training loss against steps")
    ax_time.set_xlabel("wall time (s)")
    ax_time.set_title("training loss against wall time")
    ax_acc.set_xlabel("optimizer steps")
    ax_acc.set_ylabel("test accuracy")
    ax_acc.set_title("test accuracy")
    if target_acc is not None:
        ax_acc.axhline(target_acc, color="0.4", ls="--", lw=1)
    for ax in (ax_step, ax_time, ax_acc):
        ax.grid(True, which="major", alpha=0.3)
    handles, labels = ax_step.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 2) or 1,
               frameon=False)
    try:
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
