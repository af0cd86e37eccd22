"""The comparators on P ranks (issue 19), under ``mpiexec -n P``: distributed Hessian-free
against one process holding every rank's rows (to round-off), identical on every rank; a
NaN in one rank's curvature product ends CG on every rank alike; Entropy-SGD's ranks stay
bitwise identical, its Langevin noise included. Verdicts through mpicheck."""

from __future__ import annotations

import numpy as np
import pytest
from harness import build, gathered, rel
from mpicheck import assert_all, assert_identical
from toymodels import rank_rows

from hessmpi.models.dense import DenseNet
from hessmpi.objective import Objective

pytestmark = pytest.mark.timeout(60)


def rows_of(rank: int):
    return rank_rows(rank, seed=41, label_seed=5, spread=0.5, rows=20)


class NanProduct:
    """A DenseNet whose curvature products on this rank turn NaN from product ``at`` on."""

    def __init__(self, model, at):
        self.inner, self.at, self.calls = model, at, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def curvature_product(self, theta, v, x, y, out=None):
        out = self.inner.curvature_product(theta, v, x, y, out)
        self.calls += 1
        if self.at is not None and self.calls >= self.at:
            out[0] = np.nan
        return out


def hf_run(comm, x, y, steps=4, model=None, **keys):
    model = model or DenseNet([x.shape[1], 6, 3], "tanh", 1e-2, dtype=np.float64)
    theta = DenseNet([x.shape[1], 6, 3], "tanh", 1e-2, dtype=np.float64).init_params(3)
    obj = Objective(model, comm, full_batch=True)
    obj.use_batch(x, y)
    opt = build(theta, obj, name="hessian_free", hf_max_cg=15, **keys)
    infos = [opt.step(theta, obj, 0.5) for _ in range(steps)]
    return theta, opt, infos


@pytest.mark.mpi(min_size=2)
def test_hessian_free_on_p_ranks_is_one_process_on_every_row(comm, solo):
    x, y = rows_of(comm.rank)
    theta, opt, infos = hf_run(comm, x, y)
    ref, ref_opt, ref_infos = hf_run(solo, *gathered(comm, x, y))
    assert_all(comm, rel(theta, ref) < 1e-10, f"rel {rel(theta, ref):.2e}")
    assert_all(comm, [i.diagnostics["cg_iters"] for i in infos]
               == [i.diagnostics["cg_iters"] for i in ref_infos])
    assert_all(comm, abs(opt.lam - ref_opt.lam) <= 1e-12 * ref_opt.lam)
    assert_identical(comm, theta=theta, lam=opt.lam, counts=opt.counters())


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("who", ["first", "last"])
def test_a_nan_in_one_ranks_product_ends_cg_everywhere(comm, who):
    x, y = rows_of(comm.rank)
    spoiled = 0 if who == "first" else comm.size - 1
    inner = DenseNet([x.shape[1], 6, 3], "tanh", 1e-2, dtype=np.float64)
    model = NanProduct(inner, at=4 if comm.rank == spoiled else None)
    theta, opt, infos = hf_run(comm, x, y, steps=1, model=model)
    # products 1 (A x0) to 3 are finite: CG's iterations 1 and 2 ran, the 3rd product is NaN
    assert_all(comm, infos[0].diagnostics["cg_iters"] == 2, f"{infos[0]}")
    assert_all(comm, opt.counts["cg_not_finite"] == 1, f"{opt.counts}")
    assert_all(comm, np.isfinite(theta).all())
    assert_identical(comm, theta=theta, counts=opt.counters())


class Stream:
    """This rank's sampler: row indices from a rank-seeded generator."""

    def __init__(self, rank, rows):
        self.rng, self.rows = np.random.default_rng([7, rank]), rows

    def next(self):
        return self.rng.choice(self.rows, 8, replace=False)


@pytest.mark.mpi(min_size=2)
def test_entropy_sgd_ranks_stay_identical_with_noise(comm):
    x, y = rows_of(comm.rank)
    model = DenseNet([x.shape[1], 6, 3], "tanh", 1e-2, dtype=np.float64)
    theta = model.init_params(4)
    obj = Objective(model, comm, x, y, Stream(comm.rank, len(y)))
    opt = build(theta, obj, name="entropy_sgd", entropy_steps=5, entropy_noise=0.1, seed=9)
    for _ in range(4):
        obj.next_batch()
        opt.step(theta, obj, 0.1)
    assert_all(comm, obj.grad_evals == 20, f"{obj.grad_evals} gradient evaluations")
    assert_identical(comm, theta=theta, mu=opt._mu, gamma=opt.gamma)
