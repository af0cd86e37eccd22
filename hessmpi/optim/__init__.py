"""Optimizers: each takes the averaged gradient of a step and updates theta in place."""

from __future__ import annotations

from hessmpi.optim.deflated import Deflated
from hessmpi.optim.info import StepInfo
from hessmpi.optim.secant import Secant, secant_options
from hessmpi.optim.sgd import SGD

__all__ = ["SGD", "Deflated", "Secant", "StepInfo", "build_optimizer"]


def build_optimizer(optim_cfg: dict, theta, *, model, comm, draw_batch, seed: int,
                    full_batch: bool = False):
    """The optimizer of the ``[optim]`` section for parameters like ``theta`` (n,).
    ``draw_batch()`` gives this rank's next minibatch (x, y); ``seed`` seeds random probes;
    ``full_batch``: every minibatch of every rank is its whole shard."""
    if optim_cfg["name"] == "sgd":
        return SGD(theta, momentum=optim_cfg["momentum"], weight_decay=optim_cfg["weight_decay"],
                   nesterov=optim_cfg["nesterov"])
    if optim_cfg["name"] == "secant":
        return Secant(theta, model=model, comm=comm, draw_batch=draw_batch, seed=seed,
                      opts=secant_options(optim_cfg), full_batch=full_batch)
    if optim_cfg["name"] == "deflated":
        return Deflated(theta, model=model, comm=comm, draw_batch=draw_batch, seed=seed,
                        opts=secant_options(optim_cfg))
    raise ValueError(f"unknown optimizer {optim_cfg['name']!r}")
