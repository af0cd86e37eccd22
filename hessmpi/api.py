"""hessmpi inside your own SPMD script: the distributed optimizer around your model.

Every rank runs the same script (``mpiexec -n 4 python -m mpi4py train.py``: mpi4py's
runner ends every rank when one raises), builds the same model and the same optimizer, and
steps it on its own rows; each step is taken on the global batch (the union of every rank's
rows, gradients averaged by one Allreduce), so every rank holds the same parameters::

    import hessmpi

    model = hessmpi.TorchModel(net, l2=1e-4)        # a torch.nn.Module, or any model of
                                                     # the protocol (hessmpi.models.protocol),
                                                     # or hessmpi.FunctionModel(...)
    opt = hessmpi.DistributedOptimizer(model, optim={"name": "secant", "lr": 0.05})
    for step in range(1000):
        x, y = my_rows(opt.rank)                     # this rank's part of the batch
        info = opt.step(x, y)                        # info.loss: F on the global batch
    loss, accuracy = opt.evaluate(x_test, y_test)    # over every rank's rows

``optim`` takes the keys of the configuration's ``[optim]`` section (README), validated
as a file's; ``opt.theta`` is the parameter vector (n,) (numpy, or cupy for a model on
cupy), updated in place.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hessmpi import config
from hessmpi.comm import Communicator
from hessmpi.data import Sampler, Shard, overlap_rows
from hessmpi.data import read_shard as _read_shard
from hessmpi.errors import NonFiniteLoss, RunFailed, UsageError
from hessmpi.models.torch_adapter import TorchModel
from hessmpi.objective import Objective
from hessmpi.optim import StepInfo, build_optimizer
from hessmpi.optim.schedule import Schedule
from hessmpi.progressive import BatchTest

__all__ = ["DistributedOptimizer", "FunctionModel", "Sampler", "StepInfo", "TorchModel",
           "read_shard"]


def _communicator(comm) -> Communicator:
    if isinstance(comm, Communicator):
        return comm
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    return Communicator(comm)


class FunctionModel:
    """A model of the protocol from plain functions, for an objective that is not a
    network: ``loss_grad(theta, x, y, grad) -> float`` (F on the rows, grad F written
    into ``grad``); optionally ``loss(theta, x, y)`` (default: loss_grad into a scratch
    vector), ``curvature_product(theta, v, x, y, out)``, ``evaluate(theta, x, y) ->
    (sum of losses, number correct)`` (default: B * F and NaN), ``init(seed)`` -> theta
    (default: zeros). n_params: the length of theta; xp, dtype: its array module and type."""

    def __init__(self, n_params: int, loss_grad, *, loss=None, curvature_product=None,
                 evaluate=None, init=None, xp: Any = np, dtype: Any = np.float64):
        self.n_params, self.xp, self.dtype = int(n_params), xp, np.dtype(dtype)
        self._loss_grad, self._loss, self._evaluate, self._init = loss_grad, loss, evaluate, init
        self._scratch = None
        if curvature_product is not None:
            self.curvature_product = curvature_product

    def init_params(self, seed: int) -> np.ndarray:
        if self._init is None:
            return np.zeros(self.n_params, dtype=self.dtype)
        return np.asarray(self._init(seed), dtype=self.dtype)

    def loss_grad(self, theta, x, y, grad):
        return self._loss_grad(theta, x, y, grad)

    def loss(self, theta, x, y):
        if self._loss is not None:
            return self._loss(theta, x, y)
        if self._scratch is None:
            self._scratch = self.xp.empty(self.n_params, dtype=self.dtype)
        return self._loss_grad(theta, x, y, self._scratch)

    def evaluate(self, theta, x, y):
        if self._evaluate is not None:
            return self._evaluate(theta, x, y)
        return float(self.loss(theta, x, y)) * len(y), float("nan")


class DistributedOptimizer:
    """The optimizer of ``optim`` (``[optim]`` keys; default SGD with momentum) for
    ``model`` on the ranks of ``comm`` (an mpi4py communicator, default COMM_WORLD; a
    Dup is used). ``theta``: the initial parameters (a host array, rank 0's broadcast;
    default ``model.init_params(seed)``); ``seed``: of the initialisation and of what is
    random in the method; ``steps``: the planned number of steps (for the cosine
    schedule); ``full_batch``: each rank's rows are its whole shard (history pairs then
    need no extra gradient). Collective: every rank must build it, in the same order.
    hessmpi.errors.UsageError for bad options, naming the key."""

    def __init__(self, model, *, optim: dict | None = None, comm=None, theta=None,
                 seed: int = 0, steps: int = 1, full_batch: bool = False):
        self.comm = _communicator(comm)
        self.model = model
        cfg = config.from_dict({"optim": dict(optim or {}),
                                "train": {"steps": max(1, int(steps)), "seed": int(seed)}})
        self.options = config.options(cfg, "optim")
        self.schedule = Schedule.from_config(cfg)
        host = np.array(model.init_params(seed) if theta is None else theta,
                        dtype=model.dtype, copy=True)
        if host.shape != (model.n_params,):
            raise ValueError(f"theta has shape {host.shape}, expected ({model.n_params},)")
        self.comm.bcast_(host)
        self.theta = model.xp.asarray(host)
        self.objective = Objective(model, self.comm, full_batch=full_batch)
        self.optimizer = build_optimizer(self.options, self.theta, self.objective, seed=seed)
        self.steps = 0
        if getattr(self.options, "batch_test", "none") != "none":
            o = self.options
            if full_batch:
                raise UsageError(f"optim.batch_test = {o.batch_test!r} is invalid with "
                                 "full_batch=True: there is no larger batch to grow to")
            self.objective.batch_test = BatchTest(self.comm, model.xp, model.dtype,
                                                  model.n_params, k=o.batch_pieces,
                                                  theta=o.batch_theta, nu=o.batch_nu)
        # pairs = "overlap": the rows the next batch must start with
        overlap = getattr(self.options, "pairs", None) == "overlap"
        self._shared = [] if overlap else None

    @property
    def requested_batch(self) -> float:
        """With ``optim.batch_test``: the global batch (rows, all ranks) its variance test
        asked for at the last step; draw the next batch at least that large, every rank's
        part the same size (0 without the test)."""
        return self.objective.requested_batch

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def size(self) -> int:
        return self.comm.size

    def step(self, x, y) -> StepInfo:
        """One step on the global batch whose part on this rank is (x (B, d), y (B,)),
        arrays of the model's module; a collective. Returns the step's StepInfo (``loss``:
        F on the global batch at the parameters the step started from). RunFailed on
        every rank if that loss is not finite. With ``pairs = "overlap"`` the first O rows
        of a batch must be the last O of the one before (``Sampler(..., overlap=O)``, O =
        round(overlap x B)): UsageError on every rank if they are not."""
        if self._shared is not None:
            self._check_shared(x, y)
        if self.objective.batch_test is not None:
            parts = self.comm.allgather(len(y))
            if len(set(parts)) > 1:
                raise UsageError(f"optim.batch_test: step {self.steps + 1}'s parts of the "
                                 f"batch have {parts} rows on the ranks; give every rank "
                                 "the same number")
        self.objective.use_batch(x, y)
        try:
            info = self.optimizer.step(self.theta, self.objective, self.schedule(self.steps))
        except NonFiniteLoss as e:
            raise RunFailed(f"the training loss is {e.value} at step {self.steps + 1}") \
                from None
        self.steps += 1
        return info

    def _check_shared(self, x, y) -> None:
        shared = overlap_rows(self.options.overlap, len(y))
        if shared < 1:
            raise UsageError(f"optim.overlap = {self.options.overlap} of a batch of {len(y)} "
                             "rows is less than one row: raise either")
        ok = not self._shared or all(
            bool(self.model.xp.array_equal(a, b))
            for a, b in zip(self._shared, (x[:shared], y[:shared]), strict=True))
        if not all(self.comm.allgather(ok)):
            raise UsageError(f"optim.pairs = 'overlap': step {self.steps + 1}'s batch does not "
                             f"start with the last {shared} rows of the batch before on every "
                             "rank: draw batches with hessmpi.Sampler(rows, batch, seed, rank, "
                             f"overlap={shared})")
        self._shared = [x[len(y) - shared:].copy(), y[len(y) - shared:].copy()]

    def evaluate(self, x, y) -> tuple[float, float]:
        """(mean loss, accuracy) over every rank's rows (x, y); a collective."""
        return self.objective.evaluate(self.theta, x, y)

    def check_consistency(self) -> None:
        """RunFailed on every rank unless every rank holds bitwise identical parameters."""
        from hessmpi.backend import to_host
        from hessmpi.trainer import parameter_digest

        digests = self.comm.allgather(parameter_digest(to_host(self.model.xp, self.theta)))
        if len(set(digests)) != 1:
            raise RunFailed(f"parameters differ across ranks after step {self.steps}")

    def state(self) -> dict[str, np.ndarray]:
        """Host copies of what continues the optimization: ``params``, ``steps`` and the
        optimizer's arrays (``optim/NAME``); save them as you like (rank 0's suffice)."""
        from hessmpi.backend import to_host

        xp = self.model.xp
        state = {"params": np.array(to_host(xp, self.theta)),
                 "steps": np.array(self.steps)}
        state.update({f"optim/{k}": np.array(to_host(xp, v))
                      for k, v in self.optimizer.state().items()})
        return state

    def load_state(self, state: dict) -> None:
        """Continue from :meth:`state` (saved on as many ranks as run now)."""
        xp = self.model.xp
        self.theta[...] = xp.asarray(state["params"])
        self.steps = int(state["steps"])
        self.optimizer.load_state({k.removeprefix("optim/"): v for k, v in state.items()
                                   if k.startswith("optim/")}, same_layout=True)


def read_shard(path, split: str = "train", *, comm=None) -> Shard:
    """This rank's rows of ``split`` of a hessmpi dataset file (``hessmpi data ...``):
    training rows in equal slabs (the ranks step through epochs together), test rows
    covering every row. ``.x`` (rows, d) float32, ``.y`` (rows,) int64, ``.image_shape``."""
    c = _communicator(comm)
    return c.collectively(_read_shard, path, split, c.rank, c.size, equal=split == "train")
