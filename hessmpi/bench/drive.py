"""The one run loop of the benchmarks: a :class:`~hessmpi.trainer.Training` driven to a
budget or to targets, while the full training objective F (every training row) and, if
asked, the test accuracy are evaluated on the side at a doubling schedule of steps.

Evaluation time is not counted in the wall times. Every stop is decided on values every rank
holds alike (F and the accuracy broadcast from rank 0, step counts, the deadline broadcast
from rank 0). A record's ``curve`` rows are [step, grad_evals, forward_evals, wall s, F];
``test_curve`` rows the same with the test accuracy last.
"""

from __future__ import annotations

import math
import time

from hessmpi.errors import RunFailed

#: F above this multiple of F(theta_0) counts as diverged.
BLOWUP = 3.0


def eval_interval(done: int, base: int, per: int = 20) -> int:
    """Steps from ``done`` to the next evaluation: ``base`` for the first ``per``
    evaluations, then doubling, so that the resolution stays near 1/``per`` of the steps
    done."""
    k = max(0, math.floor(math.log2(max(done, 1) / (per * base))) + 1)
    return base * 2 ** k


def shards(path, comm) -> tuple:
    """(train, test) shards of this rank, as Training reads them: read them once per
    worker and pass them to every Training with ``shards=``."""
    from hessmpi.data import read_shard

    return (comm.collectively(read_shard, path, "train", comm.rank, comm.size, equal=True),
            comm.collectively(read_shard, path, "test", comm.rank, comm.size, equal=False))


def parameters_agree(training) -> bool:
    """Whether every rank holds bitwise the same parameters (a collective)."""
    from hessmpi.trainer import parameter_digest

    digest = parameter_digest(training.backend.to_host(training.theta))
    return len(set(training.comm.allgather(digest))) == 1


#: What a forward pass and a Gauss-Newton product cost in gradients, by the matrix products
#: of a dense network: a gradient is a forward pass (1 product a layer) and a backward pass
#: (2), a forward pass 1 of those 3, an R-operator product 5 (forward 1, R-forward 2,
#: backward 2).
FORWARD_COST, PRODUCT_COST = 1 / 3, 5 / 3


def work(objective) -> float:
    """Gradient-equivalent evaluations per rank so far: gradients, plus forward passes and
    Gauss-Newton products at what their matrix products cost."""
    return (objective.grad_evals + FORWARD_COST * objective.forward_evals
            + PRODUCT_COST * objective.curvature_evals)


def drive(training, *, budget: float, unit: str = "steps", train_targets=None,
          test_targets=None, limits=None, with_test: bool = False, base: int = 5,
          per: int = 20, deadline: float = math.inf, blowup: float = BLOWUP,
          check_every: int = 0) -> dict:
    """Step ``training`` until one of, checked at every evaluation:

    - ``diverged``: a non-finite loss, or F > ``blowup`` x F(theta_0);
    - ``reached``: every target of ``train_targets`` {name: F threshold} and
      ``test_targets`` {name: accuracy} is met (never, with no targets);
    - ``raced``: every unreached training target has passed its ``limits`` {name: amount};
    - ``deadline``: ``time.time()`` on rank 0 is past ``deadline``;
    - ``budget``: ``budget`` of ``unit`` ("steps", "grad_evals" or "work": see :func:`work`,
      per rank) is spent.

    Evaluations at steps ``base``, then :func:`eval_interval`, and at the end.
    ``with_test``: evaluate the test accuracy even without test targets. ``check_every``:
    steps between checks that the ranks' parameters agree (RuntimeError if not).
    Returns the record: status, steps, grad_evals, forward_evals, wall (s), t_step, t_grad,
    t_comm, t_solve (s per step), curve, test_curve, fallback counts and rates, and per step
    ``losses`` (the global minibatch objective at the parameters the step started from: at
    full batch, F(theta_k)), ``walls`` (cumulative seconds after it), ``works``
    (cumulative gradient-equivalent evaluations after it, :func:`work`) and ``rows`` (the
    rows of its global batch: they grow with ``optim.batch_test``)."""
    from hessmpi.trainer import Interval

    comm, objective = training.comm, training.objective
    train_targets, test_targets = dict(train_targets or {}), dict(test_targets or {})
    limits = dict(limits or {})
    with_test = with_test or bool(test_targets)

    def spent() -> float:
        return done if unit == "steps" else objective.grad_evals if unit == "grad_evals" \
            else work(objective)

    def evaluate() -> float:
        values = [objective.full_value(training.theta)]
        if with_test:
            values.append(float(training.evaluate()[1]))
        values = comm.bcast([v if math.isfinite(v) else math.inf for v in values])
        row = [done, objective.grad_evals, objective.forward_evals, wall]
        curve.append([*row, values[0]])
        if with_test:
            test_curve.append([*row, values[1]])
        return values[0]

    done, wall, status = 0, 0.0, "budget"
    curve, test_curve = [], [] if with_test else None
    losses, walls, works, rows = [], [], [], []
    f0 = evaluate()
    reached: set[str] = set()
    interval, fallbacks, kept = Interval(), 0, 0
    next_eval = eval_interval(0, base, per)
    while spent() < budget - 1e-9:
        started = time.perf_counter()
        try:
            info = training.step(done, interval)
        except RunFailed:
            status = "diverged"
            break
        wall += time.perf_counter() - started
        done += 1
        losses.append(info.loss)
        walls.append(wall)
        works.append(work(objective))
        rows.append(objective.batch_rows * comm.size)
        fallbacks += info.fallback
        kept += info.rank_kept
        if check_every and done % check_every == 0 and not parameters_agree(training):
            raise RuntimeError(f"the ranks' parameters differ after step {done}")
        if done != next_eval and spent() < budget - 1e-9:
            continue
        next_eval = done + eval_interval(done, base, per)
        f = evaluate()
        if not f <= blowup * f0:
            status = "diverged"
            break
        reached |= {n for n, v in train_targets.items() if v is not None and f <= v}
        reached |= {n for n, v in test_targets.items() if test_curve[-1][4] >= v}
        unreached = [n for n in train_targets if n not in reached]
        if (train_targets or test_targets) and len(reached) == len(train_targets) + len(
                test_targets):
            status = "reached"
            break
        if unreached and all(n in limits and spent() >= limits[n] for n in unreached):
            status = "raced"
            break
        if comm.bcast(time.time() > deadline):
            status = "deadline"
            break
    if check_every and status != "diverged" and not parameters_agree(training):
        raise RuntimeError(f"the ranks' parameters differ after step {done}")
    counts = training.optimizer.counters()
    steps = max(done, 1)
    return dict(status=status, steps=done, grad_evals=float(objective.grad_evals),
                forward_evals=int(objective.forward_evals), wall=wall, t_step=wall / steps,
                grad_evals_per_step=objective.grad_evals / steps, curve=curve,
                test_curve=test_curve, fallback_rate=fallbacks / steps,
                fallback_reasons={k: v for k, v in counts.items() if k != "clipped" and v},
                clipped_rate=counts.get("clipped", 0) / steps, rank_kept_mean=kept / steps,
                t_grad=interval.mean("t_grad"), t_comm=interval.mean("t_comm"),
                t_solve=interval.mean("t_solve"), bytes_sent=interval.mean("bytes_sent"),
                losses=losses, walls=walls, works=works, rows=rows)


def first_hit(record: dict, threshold: float, test: bool = False) -> dict | None:
    """The first evaluation with F <= ``threshold`` (``test``: test accuracy >=): steps,
    grad_evals, forward_evals, wall, work (:func:`work`; NaN in records without ``works``);
    None if there was none."""
    works = record.get("works")
    for step, ge, fe, wall, value in (record["test_curve"] or []) if test else record["curve"]:
        if (value >= threshold) if test else (value <= threshold):
            return dict(steps=step, grad_evals=ge, forward_evals=fe, wall=wall,
                        work=(works[step - 1] if step else 0.0) if works else math.nan)
    return None


def final_value(record: dict) -> float:
    """F where the run ended (inf if it diverged)."""
    f = record["curve"][-1][4]
    return math.inf if record["status"] == "diverged" or not math.isfinite(f) else f
