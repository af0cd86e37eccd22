"""Optimizers: each takes one step on the distributed objective and updates theta in place.

``sgd``: :class:`SGD`; ``secant``: :class:`Secant` (a pair source, the pair memory, the
step rule, a line search); ``deflated``: :class:`Deflated` (basis probes over the same
memory and exchange); the comparators ``hessian_free``: :class:`HessianFree` and
``entropy_sgd``: :class:`EntropySGD`; the baseline ``adam``: :class:`Adam`. Every one follows
:class:`~hessmpi.optim.base.Optimizer`. The asynchronous methods ``asgd`` and ``dcasgd``
have no synchronous step: their parameter server (:mod:`hessmpi.asynchronous`) applies
each worker's push with :class:`~hessmpi.optim.dcasgd.DelayCompensation`.
"""

from __future__ import annotations

from hessmpi.models.protocol import require_curvature
from hessmpi.optim.adam import Adam
from hessmpi.optim.base import Optimizer, StepInfo, state_bytes
from hessmpi.optim.deflated import Deflated
from hessmpi.optim.entropy_sgd import EntropySGD
from hessmpi.optim.exchange import exchange_for
from hessmpi.optim.hessian_free import HessianFree
from hessmpi.optim.secant import Secant
from hessmpi.optim.sgd import SGD

__all__ = ["SGD", "Adam", "Deflated", "EntropySGD", "HessianFree", "Optimizer", "Secant",
           "StepInfo", "build_optimizer", "state_bytes"]

#: The optimizers by ``optim.name`` (SGD is built from its options alone).
METHODS = {"secant": Secant, "deflated": Deflated, "hessian_free": HessianFree,
           "entropy_sgd": EntropySGD}


def build_optimizer(opts, theta, objective, *, seed: int) -> Optimizer:
    """The optimizer of the typed ``[optim]`` options ``opts`` (``config.options(cfg,
    "optim")``) for parameters like ``theta`` (n,) on ``objective``; ``seed`` seeds what is
    random in it (probes, the first basis). A method whose class declares
    ``needs_curvature = True`` refuses a model without curvature products (UsageError)."""
    if opts.name == "sgd":
        return SGD(theta, momentum=opts.momentum, weight_decay=opts.weight_decay,
                   nesterov=opts.nesterov,
                   exchange=exchange_for(opts, objective, theta.shape[0]))
    if opts.name == "adam":
        return Adam(theta, beta1=opts.momentum, beta2=opts.adam_beta2, eps=opts.adam_eps)
    if opts.name in ("asgd", "dcasgd"):
        raise ValueError(f"optim.name = {opts.name!r} is asynchronous: it runs on a parameter "
                         "server (hessmpi.trainer.make_run, hessmpi.asynchronous.AsyncRun), "
                         "not as a synchronous step")
    if opts.name not in METHODS:
        raise ValueError(f"unknown optimizer {opts.name!r}")
    if getattr(METHODS[opts.name], "needs_curvature", False):
        require_curvature(objective.model, opts.name)
    return METHODS[opts.name](theta, objective, opts, seed=seed)
