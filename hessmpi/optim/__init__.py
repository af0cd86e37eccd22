"""Optimizers: each takes one step on the distributed objective and updates theta in place.

``sgd``: :class:`SGD`; ``secant``: :class:`Secant` (a pair source, the pair memory, the
step rule, a line search); ``deflated``: :class:`Deflated` (basis probes over the same
memory and exchange). Every one follows :class:`~hessmpi.optim.base.Optimizer`.
"""

from __future__ import annotations

from hessmpi.models.protocol import require_curvature
from hessmpi.optim.base import Optimizer, StepInfo
from hessmpi.optim.deflated import Deflated
from hessmpi.optim.secant import Secant
from hessmpi.optim.sgd import SGD

__all__ = ["SGD", "Deflated", "Optimizer", "Secant", "StepInfo", "build_optimizer"]


def build_optimizer(opts, theta, objective, *, seed: int) -> Optimizer:
    """The optimizer of the typed ``[optim]`` options ``opts`` (``config.options(cfg,
    "optim")``) for parameters like ``theta`` (n,) on ``objective``; ``seed`` seeds what is
    random in it (probes, the first basis). A method whose class declares
    ``needs_curvature = True`` refuses a model without curvature products (UsageError)."""
    if opts.name == "sgd":
        optimizer = SGD(theta, momentum=opts.momentum, weight_decay=opts.weight_decay,
                        nesterov=opts.nesterov)
    elif opts.name == "secant":
        optimizer = Secant(theta, objective, opts, seed=seed)
    elif opts.name == "deflated":
        optimizer = Deflated(theta, objective, opts, seed=seed)
    else:
        raise ValueError(f"unknown optimizer {opts.name!r}")
    if getattr(optimizer, "needs_curvature", False):
        require_curvature(objective.model, opts.name)
    return optimizer
