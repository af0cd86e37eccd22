"""Optimizers: each takes the averaged gradient of a step and updates theta in place."""

from __future__ import annotations

from hessmpi.optim.info import StepInfo
from hessmpi.optim.sgd import SGD

__all__ = ["SGD", "StepInfo", "build_optimizer"]


def build_optimizer(optim_cfg: dict, theta, *, model, comm):
    """The optimizer of the ``[optim]`` section for parameters like ``theta`` (n,)."""
    if optim_cfg["name"] == "sgd":
        return SGD(theta, momentum=optim_cfg["momentum"], weight_decay=optim_cfg["weight_decay"],
                   nesterov=optim_cfg["nesterov"])
    raise ValueError(f"unknown optimizer {optim_cfg['name']!r}")
