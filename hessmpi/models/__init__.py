"""Models on a flat parameter vector: loss, gradient and curvature product for a batch."""

from __future__ import annotations

from typing import Any

from hessmpi.models.dense import DenseNet

__all__ = ["DenseNet", "build_model"]


def build_model(model_cfg: dict, n_features: int, n_classes: int, *, xp: Any, dtype: Any):
    """The model of the ``[model]`` config section for data of ``n_features`` inputs and
    ``n_classes`` classes: ``softmax`` is the network with no hidden layer."""
    hidden = model_cfg["hidden"] if model_cfg["name"] == "mlp" else []
    return DenseNet([n_features, *hidden, n_classes], model_cfg["activation"],
                    model_cfg["l2"], xp=xp, dtype=dtype)
