"""Models on a flat parameter vector: loss, gradient and curvature product for a batch
(the protocol: :class:`~hessmpi.models.protocol.Model`)."""

from __future__ import annotations

from typing import Any

from hessmpi.models.dense import DenseNet
from hessmpi.models.protocol import CurvatureModel, Model

__all__ = ["CurvatureModel", "DenseNet", "Model", "build_model"]


def build_model(model_cfg: dict, n_features: int, n_classes: int, *, xp: Any, dtype: Any):
    """The model of the ``[model]`` config section for data of ``n_features`` inputs and
    ``n_classes`` classes: ``softmax`` is the network with no hidden layer; ``autoencoder``
    is n_features-encoder-mirror-n_features with logistic units, a linear code layer, the
    sigmoid cross-entropy output and Martens' sparse initialisation."""
    if model_cfg["name"] == "autoencoder":
        enc = model_cfg["encoder"]
        acts = ["sigmoid"] * (len(enc) - 1) + ["linear"] + ["sigmoid"] * (len(enc) - 1)
        return DenseNet([n_features, *enc, *enc[-2::-1], n_features], "sigmoid",
                        model_cfg["l2"], activations=acts, output="sigmoid", init="sparse",
                        xp=xp, dtype=dtype)
    hidden = model_cfg["hidden"] if model_cfg["name"] == "mlp" else []
    return DenseNet([n_features, *hidden, n_classes], model_cfg["activation"],
                    model_cfg["l2"], xp=xp, dtype=dtype)
