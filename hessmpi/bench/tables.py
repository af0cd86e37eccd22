"""Tables of benchmark results: aligned markdown tables, ``median [min-max]`` cells, ratios,
and results saved as JSON under ROOT/bench-results with the machine they were measured on."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import numpy as np


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table whose columns are aligned (cells as str)."""
    cells = [[str(c) for c in row] for row in [header, *rows]]
    width = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, width, strict=True)) + " |"

    return "\n".join([line(cells[0]), line(["-" * w for w in width]),
                      *(line(r) for r in cells[1:])])


def spread(values, fmt=lambda v: f"{v:,.0f}") -> str:
    """``median [min-max]`` of the finite values; '-' if none; the median alone for one."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return "-"
    med = fmt(float(np.median(v)))
    return med if len(v) == 1 else f"{med} [{fmt(min(v))}-{fmt(max(v))}]"


def ratio(x: float) -> str:
    """A ratio to two decimals; '-' if not finite."""
    return f"{x:.2f}" if x is not None and math.isfinite(x) else "-"


def fmt_point(point: dict | None) -> str:
    """A tuned point as text: lr=0.75 memory=10."""
    if point is None:
        return "-"
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in point.items())


def revision(root: Path) -> str:
    """The git commit of ROOT, '+dirty' if hessmpi/ has local changes ('unknown' outside
    git)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=root, text=True, capture_output=True,
                              check=True).stdout.strip()

    try:
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if git(
            "status", "--porcelain", "hessmpi") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine(root: Path | None = None) -> dict:
    """The machine and software a result was measured with."""
    import numpy
    from threadpoolctl import threadpool_info

    from hessmpi import __version__
    from hessmpi.comm import Communicator

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in
                   Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    blas = [{k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
            for i in threadpool_info() if i.get("user_api") == "blas"]
    return dict(host=platform.node(), cpu=cpu, cores=len(os.sched_getaffinity(0)),
                load_average=os.getloadavg()[0], python=platform.python_version(),
                numpy=numpy.__version__, blas=blas, mpi=Communicator.library_version(),
                hessmpi=__version__, revision=revision(root) if root else "unknown",
                date=datetime.now(UTC).isoformat(timespec="seconds"))


def save(name: str, results: dict, root: Path, path: Path | None = None) -> Path:
    """Write ``results`` and the machine to ROOT/bench-results/NAME.json (or ``path``)."""
    path = Path(path or Path(root) / "bench-results" / f"{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    results = {"benchmark": name, "machine": machine(root), **results}
    path.write_text(json.dumps(results, indent=1, default=float) + "\n")
    return path
