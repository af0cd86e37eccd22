"""The distributed objective on P ranks against a serial reference on the union of the ranks'
rows (run under ``mpiexec -n P python -m pytest --with-mpi``).

Every rank holds its own 24 rows (equal counts: the mean over the union is the mean of the
ranks' means). The reference is the model called directly, in-process on every rank, on the
rows gathered here. Gradient, loss, forward value, gradient at another point and the
Gauss-Newton-vector product must equal it to 1e-12 in float64 and be bitwise identical on
every rank; a NaN on one rank stops every rank; one rank's stop flag reaches every rank.
Every verdict is collective (mpicheck).
"""

from __future__ import annotations

import numpy as np
import pytest
from harness import gathered, rel
from mpicheck import assert_checks, assert_identical, raises_everywhere
from toymodels import rank_rows

from hessmpi.errors import NonFiniteLoss
from hessmpi.models.dense import DenseNet
from hessmpi.objective import Objective

pytestmark = pytest.mark.timeout(60)

TOL = 1e-12


@pytest.fixture
def setup(comm):
    """(Objective on this rank's rows, model, theta, the union's rows X, Y)."""
    x, y = rank_rows(comm.rank, seed=31, label_seed=6, spread=0.5)
    model = DenseNet([x.shape[1], 3], "tanh", 1e-3, xp=np, dtype=np.float64)
    theta = 0.3 * np.random.default_rng(2).standard_normal(model.n_params)
    objective = Objective(model, comm)
    objective.use_batch(x, y)
    X, Y = gathered(comm, x, y)
    return objective, model, theta, X, Y


@pytest.mark.mpi(min_size=2)
def test_evaluations_equal_the_serial_reference_on_the_union(comm, setup):
    objective, model, theta, X, Y = setup
    point = theta + 0.05 * np.random.default_rng(4).standard_normal(len(theta))
    v = np.random.default_rng(5).standard_normal(len(theta))
    ref_grad = np.empty_like(theta)
    ref_loss = float(model.loss_grad(theta, X, Y, ref_grad))

    loss = objective.gradient(theta)
    grad = objective.grad.copy()
    value = objective.value(point)
    at_point = np.empty_like(theta)
    objective.mean_gradient_at(point, at_point)
    gv = np.empty_like(theta)
    objective.curvature_product(theta, v, gv)
    ref_at_point = np.empty_like(theta)
    ref_value = float(model.loss_grad(point, X, Y, ref_at_point))
    ref_gv = model.curvature_product(theta, v, X, Y)

    assert_checks(comm, [
        (abs(loss - ref_loss) <= TOL * abs(ref_loss), f"loss {loss} vs {ref_loss}"),
        (rel(grad, ref_grad) <= TOL, f"gradient rel {rel(grad, ref_grad):.2e}"),
        (abs(value - ref_value) <= TOL * abs(ref_value), f"value {value} vs {ref_value}"),
        (rel(at_point, ref_at_point) <= TOL,
         f"gradient at the point rel {rel(at_point, ref_at_point):.2e}"),
        (rel(gv, ref_gv) <= TOL, f"curvature product rel {rel(gv, ref_gv):.2e}"),
        (np.array_equal(objective.grad, grad), "mean_gradient_at changed grad"),
        (objective.counters() == {"grad_evals": 2.0, "forward_evals": 1,
                                  "curvature_evals": 1}, f"counters {objective.counters()}"),
    ])
    assert_identical(comm, loss=loss, gradient=grad, value=value, gradient_at_point=at_point,
                     curvature_product=gv, counters=objective.counters())


@pytest.mark.mpi(min_size=2)
def test_evaluate_weights_every_row_of_unequal_shards(comm, setup):
    """evaluate: the mean loss and accuracy over every rank's rows, also when the ranks hold
    different numbers of rows (the test split)."""
    objective, model, theta, _, _ = setup
    x, y = rank_rows(comm.rank, seed=41, label_seed=6, spread=0.5, rows=10 + 3 * comm.rank)
    X, Y = gathered(comm, x, y)
    loss, accuracy = objective.evaluate(theta, x, y)
    loss_sum, correct = model.evaluate(theta, X, Y)
    assert_checks(comm, [
        (abs(loss - loss_sum / len(Y)) <= TOL * abs(loss), f"loss {loss}"),
        (accuracy == correct / len(Y), f"accuracy {accuracy} vs {correct / len(Y)}"),
    ])
    assert_identical(comm, loss=loss, accuracy=accuracy)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("who", ["first", "last"])
def test_a_nan_on_one_rank_raises_on_every_rank(comm, setup, who):
    objective, _, theta, _, _ = setup
    if comm.rank == (0 if who == "first" else comm.size - 1):
        x = objective.x.copy()
        x[0, 0] = np.nan
        objective.use_batch(x, objective.y)
    with np.errstate(all="ignore"):
        raises_everywhere(comm, NonFiniteLoss, objective.gradient, theta,
                          match="the training loss is nan")


@pytest.mark.mpi(min_size=2)
def test_one_ranks_stop_flag_reaches_every_rank(comm, setup):
    objective, _, theta, _, _ = setup
    objective.gradient(theta)
    quiet = objective.stop_requested
    objective.stop_flag = 10 if comm.rank == comm.size - 1 else 0
    objective.gradient(theta)
    asked = objective.stop_requested
    assert_checks(comm, [(not quiet, "a stop without a flag"),
                         (asked, "the last rank's flag did not arrive")])
