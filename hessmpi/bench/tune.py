"""The one tuner of the benchmarks: a grid of points (a learning rate and a method's
options) widened outward until the best point of every selection is interior on every axis.

A point is a dict {"lr": float, option: value, ...}; ``points`` maps :func:`key` of a point
to {"point": point, "records": [one record of :mod:`~hessmpi.bench.drive` per seed]}. A
selection maps records to a score, lower is better, ``inf`` for a point that does not
qualify (never reached the target). Selections read the training curves only: nothing here
reads the test split.
"""

from __future__ import annotations

import json
import math

import numpy as np

from hessmpi.bench.drive import final_value, first_hit

#: The options' lattices: where an option's grid widens to, and the ends of its range.
LATTICE = {"newton_lr": [0.05, 0.1, 0.2, 0.5, 1.0, 2.0],
           "memory": [1, 2, 5, 10, 20, 40],
           "probe_every": [1, 2, 4, 10, 20, 50]}


def key(point: dict) -> str:
    return json.dumps(point, sort_keys=True)


def _median_mean(values) -> tuple[float, float]:
    v = np.asarray(list(values), dtype=np.float64)
    return float(np.median(v)), float(np.mean(v))


def to_target(threshold: float, measure: str = "steps", seeds: int | None = None):
    """Selection by ``measure`` (steps, grad_evals, wall) to the first F <= ``threshold``:
    (median, mean) over the first ``seeds`` records (all by default), a seed that never
    reached it counting as inf."""
    def score(records):
        hits = [first_hit(r, threshold) for r in records[:seeds]]
        return _median_mean(h[measure] if h else math.inf for h in hits)
    return score


def final(records) -> tuple[float, float]:
    """Selection by F where the runs ended: (median, mean) over seeds (diverged: inf)."""
    return _median_mean(final_value(r) for r in records)


def best(points: dict, select) -> str | None:
    """The key of the point of lowest ``select`` score (ties: the smaller learning rate);
    None if no point's score is finite."""
    scored = [(*select(p["records"]), p["point"]["lr"], k) for k, p in points.items()]
    scored = [s for s in scored if math.isfinite(s[0])]
    return min(scored)[-1] if scored else None


def neighbours(points: dict, k: str, axis: str) -> tuple[list, list]:
    """Values of ``axis`` below and above point ``k``'s among the points that agree with it
    on every other axis."""
    p = points[k]["point"]
    others = {a: v for a, v in p.items() if a != axis}
    values = [q["point"][axis] for q in points.values()
              if {a: v for a, v in q["point"].items() if a != axis} == others]
    return [v for v in values if v < p[axis]], [v for v in values if v > p[axis]]


def placement(points: dict, k: str, widen_axes: bool = True) -> dict[str, str]:
    """Where point ``k`` sits on each axis: ``interior`` (evaluated neighbours on both
    sides), ``bound`` (at the end of the option's lattice, the other side evaluated),
    ``EDGE`` (an end of the evaluated grid) or ``fixed`` (an option not tuned)."""
    p, out = points[k]["point"], {}
    for axis, value in p.items():
        below, above = neighbours(points, k, axis)
        lattice = LATTICE.get(axis) if axis != "lr" else None
        if axis != "lr" and not below and not above and (not widen_axes or not lattice):
            out[axis] = "fixed"
        elif below and above:
            out[axis] = "interior"
        elif (below or (lattice and value == lattice[0])) and (
                above or (lattice and value == lattice[-1])):
            out[axis] = "bound"
        else:
            out[axis] = "EDGE"
    return out


def outward(points: dict, k: str, axis: str, factor: float = 2.0,
            widen_axes: bool = True) -> list[dict]:
    """Points one step beyond point ``k`` along ``axis`` on the sides where it has no
    evaluated neighbour: the learning rate by ``factor``, an option to the next value of its
    lattice."""
    p = points[k]["point"]
    below, above = neighbours(points, k, axis)
    if axis == "lr":
        new = ([p["lr"] / factor] if not below else []) + ([p["lr"] * factor] if not above
                                                           else [])
    elif widen_axes and axis in LATTICE:
        lower = [v for v in LATTICE[axis] if v < p[axis]]
        higher = [v for v in LATTICE[axis] if v > p[axis]]
        new = ([lower[-1]] if not below and lower else []) + (
            [higher[0]] if not above and higher else [])
    else:
        new = []
    return [{**p, axis: v} for v in new]


def tune(run, first: list[dict], selections: dict, *, max_points: int, factor: float = 2.0,
         widen_axes: bool = True, late=lambda: False, log=lambda text: None) -> dict:
    """Run the points ``first``, then widen: for every selection {name: score}, the points
    :func:`outward` of its best point on every axis, until every best point is interior (or
    at the bound of its range), ``max_points`` points have run, or ``late()``. A selection
    that no point qualifies for is widened once toward the point of lowest final F; while
    every point diverged, the learning rate halves (divided by ``factor``) below the lowest.
    ``run(point, points)`` -> the point's records (``points``: those so far, for racing).

    Returns points, chosen {name: key}, placement {name: {axis: where}}, notes."""
    points: dict[str, dict] = {}
    notes: list[str] = []
    stopped = []

    def add(point: dict) -> bool:
        why = ("deadline: the tuning stopped" if late() else
               f"the grid stopped at {max_points} points" if len(points) >= max_points
               else None)
        if why:
            stopped.append(why)
            notes.append(why)
            return False
        points[key(point)] = dict(point=point, records=run(point, points))
        return True

    for point in first:
        if not add(point):
            break
    blind: set[str] = set()
    while points and not stopped:
        new: list[dict] = []
        if best(points, final) is None:     # every point diverged: lower learning rates
            low = min((p["point"] for p in points.values()), key=lambda p: p["lr"])
            new.append({**low, "lr": low["lr"] / factor})
            if not notes or "every point diverged" not in notes[-1]:
                notes.append("every point diverged: the grid widens to lower learning rates")
        for name, select in ([] if new else selections.items()):
            k = best(points, select)
            if k is None and name not in blind:
                blind.add(name)
                k = best(points, final)
                if k is not None:
                    notes.append(f"no point reached '{name}': the grid widens once toward "
                                 "the lowest final F")
            if k is None:
                continue
            for axis in points[k]["point"]:
                new += [p for p in outward(points, k, axis, factor, widen_axes)
                        if key(p) not in points and p not in new]
        if not new:
            break
        for p in new:
            log(f"widening to {p}")
            if not add(p):
                break
    chosen = {name: k for name, select in selections.items()
              if (k := best(points, select)) is not None}
    return dict(points=points, chosen=chosen, notes=notes,
                placement={name: placement(points, k, widen_axes) for name, k in chosen.items()})


def upper_median(values) -> float:
    """The upper median: at least half the values are <= it (a target half the seeds meet)."""
    values = sorted(values)
    return values[len(values) // 2]
