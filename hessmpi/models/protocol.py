"""What hessmpi asks of a model: the protocol every model follows, built-in or the user's.

Arrays. Parameters are one flat vector ``theta`` (n_params,) of the array module ``xp``
(numpy on CPU, cupy on GPU) and the floating type ``dtype`` (numpy.float32 or float64,
``backend.dtype``); hessmpi owns it and updates it in place between calls, so a model
must not keep references to it. A batch is ``x`` (B, n_features) of that module and type
(C-contiguous rows; for image data each row is an image (H, W[, C]) in row-major order, the
dataset's ``image_shape``) and ``y`` (B,) int64 class labels in [0, n_classes) on the same
module. Gradients and products are written into (n_params,) arrays hessmpi allocates.

Values. Losses are means over the B rows plus the model's own regularisation, returned
as Python floats or 0-d arrays of xp (hessmpi takes ``float()`` of them). Every method
must be a deterministic function of its arguments (line searches and secant pairs
evaluate F at several points of one batch; every rank must take the same step).

A plug-in (``model.name = "python:MODULE:FACTORY"``) is built by
``FACTORY(n_features, n_classes, xp=xp, dtype=dtype, **model.options)``; hessmpi supplies
``xp`` and ``dtype``, so the object itself need only have ``n_params`` and the methods.
Methods that need curvature products (``curvature_product``) refuse a model without it,
with exit status 2 (:func:`require_curvature`).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from hessmpi.errors import UsageError


@runtime_checkable
class Model(Protocol):
    """n_params: length of theta; xp: the array module; dtype: the floating type."""

    n_params: int
    xp: Any
    dtype: Any

    def init_params(self, seed: int):
        """The initial theta (n_params,) as a NumPy (host) array, a function of ``seed``
        only (every rank calls it; rank 0's value is broadcast)."""

    def loss(self, theta, x, y):
        """F on the batch at theta: the mean loss over the rows plus the regularisation;
        a forward pass only."""

    def loss_grad(self, theta, x, y, grad):
        """F on the batch at theta, as ``loss``; writes grad F (n_params,) into ``grad``
        (every entry: its previous contents are undefined)."""

    def evaluate(self, theta, x, y) -> tuple[float, float]:
        """(sum over the rows of the loss without regularisation, number classified
        correctly; NaN for a model that does not classify). ``x`` may be a whole test
        split: evaluate in chunks if memory needs it."""


@runtime_checkable
class CurvatureModel(Model, Protocol):
    """A model that also gives Gauss-Newton-vector products (methods that need curvature
    products refuse a model without them)."""

    def curvature_product(self, theta, v, x, y, out=None):
        """G v (n_params,): the Gauss-Newton matrix of F on the batch at theta times v
        (J^T H J v + the regularisation's Hessian times v, J the Jacobian of the outputs,
        H the Hessian of the mean loss in the outputs), written into ``out`` (allocated if
        None) and returned."""


def require_curvature(model, method: str) -> None:
    """UsageError (exit 2) unless ``model`` gives curvature products: for a method
    (``method``: its optim.name) that declares ``needs_curvature``."""
    if not callable(getattr(model, "curvature_product", None)):
        name = getattr(model, "name", type(model).__name__)
        raise UsageError(f"optim.name = {method!r} needs the model's Gauss-Newton-vector "
                         f"products, and model {name!r} has no curvature_product (see the "
                         "model protocol, hessmpi.models.protocol)")
