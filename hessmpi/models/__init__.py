"""Models on a flat parameter vector: loss, gradient and curvature product for a batch
(the protocol: :class:`~hessmpi.models.protocol.Model`). Built in: the dense networks
(softmax, mlp, autoencoder) and the convolutional network (cnn); plug-ins: the user's own
model (``python:MODULE:FACTORY``) or torch.nn.Module (``torch:MODULE:FACTORY``)."""

from __future__ import annotations

from typing import Any

from hessmpi import config
from hessmpi.errors import UsageError
from hessmpi.models.cnn import ConvNet
from hessmpi.models.dense import DenseNet
from hessmpi.models.plugin import CHECK_ROWS, PluginError, PluginModel, check_plugin, load_plugin
from hessmpi.models.protocol import CurvatureModel, Model, require_curvature

__all__ = ["ConvNet", "CurvatureModel", "DenseNet", "Model", "PluginError", "PluginModel",
           "build_model", "model_for", "model_identity", "require_curvature"]


def build_model(model_cfg: dict, n_features: int, n_classes: int, *, xp: Any, dtype: Any,
                image_shape: tuple[int, ...] | None = None):
    """The model of the ``[model]`` config section for data of ``n_features`` inputs and
    ``n_classes`` classes (``image_shape``: of each row, for ``cnn``): ``softmax`` is the
    network with no hidden layer; ``autoencoder`` is n_features-encoder-mirror-n_features
    with logistic units, a linear code layer, the sigmoid cross-entropy output and
    Martens' sparse initialisation; ``cnn`` the :class:`ConvNet`; a plug-in name its
    :class:`PluginModel`. UsageError for a model that cannot be built."""
    name = model_cfg["name"]
    if config.family(name) in config.PLUGIN_FAMILIES:
        return load_plugin(model_cfg, n_features, n_classes, xp=xp, dtype=dtype)
    if name == "cnn":
        if image_shape is None:
            raise UsageError("model.name = 'cnn' needs images: the dataset (data.path) has no "
                             "image_shape attribute; the digits, mnist and fashion-mnist "
                             "importers of 'hessmpi data' write it")
        try:
            return ConvNet(image_shape, model_cfg["channels"], model_cfg["dense"], n_classes,
                           model_cfg["l2"], xp=xp, dtype=dtype)
        except ValueError as e:
            raise UsageError(f"model.name = 'cnn' with model.channels = "
                             f"{model_cfg['channels']}: {e}") from None
    if name == "autoencoder":
        enc = model_cfg["encoder"]
        acts = ["sigmoid"] * (len(enc) - 1) + ["linear"] + ["sigmoid"] * (len(enc) - 1)
        return DenseNet([n_features, *enc, *enc[-2::-1], n_features], "sigmoid",
                        model_cfg["l2"], activations=acts, output="sigmoid", init="sparse",
                        xp=xp, dtype=dtype)
    hidden = model_cfg["hidden"] if name == "mlp" else []
    return DenseNet([n_features, *hidden, n_classes], model_cfg["activation"],
                    model_cfg["l2"], xp=xp, dtype=dtype)


def model_for(model_cfg: dict, shard, *, xp: Any, dtype: Any, seed: int):
    """:func:`build_model` for this rank's training ``shard`` (a
    :class:`~hessmpi.data.Shard`); a plug-in is also tried on the shard's first rows at its
    initial parameters for ``seed`` (:func:`check_plugin`). UsageError naming what is
    wrong, before any step."""
    model = build_model(model_cfg, shard.x.shape[1], shard.n_classes, xp=xp, dtype=dtype,
                        image_shape=shard.image_shape)
    if isinstance(model, PluginModel):
        rows = slice(0, CHECK_ROWS)
        check_plugin(model, xp.asarray(shard.x[rows], dtype=dtype), xp.asarray(shard.y[rows]),
                     seed)
    return model


#: Model keys added after checkpoints existed: they enter a checkpoint's model signature
#: only where they apply, so the dense networks' signatures stay what they were.
_LATER_KEYS = ("options", "channels", "dense")


def model_identity(cfg: dict) -> dict:
    """The ``[model]`` keys that identify the model in a checkpoint's signature: the
    plug-in's name and options, the cnn's widths, the dense networks' keys."""
    return {k: v for k, v in cfg["model"].items()
            if k not in _LATER_KEYS or config.applies(cfg, "model", k)}
