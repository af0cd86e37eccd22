"""What hessmpi asks of a model: the protocol every model follows, built-in or the user's.

Parameters are one flat vector theta (n_params,) of the model's array module ``xp``
(numpy on CPU, cupy on GPU) and floating type ``dtype``; a batch is x (B, n_features) of
that type and y (B,) int64 class labels on the same module. Losses are means over the rows
plus the model's own regularisation, returned as Python floats or 0-d arrays.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Model(Protocol):
    """n_params: length of theta; xp: the array module; dtype: the floating type."""

    n_params: int
    xp: Any
    dtype: Any

    def init_params(self, seed: int):
        """The initial theta (n_params,) as a NumPy (host) array, a function of ``seed``."""

    def loss(self, theta, x, y):
        """F on the batch at theta: the mean loss over the rows plus the regularisation;
        a forward pass only."""

    def loss_grad(self, theta, x, y, grad):
        """F on the batch at theta, as ``loss``; writes grad F (n_params,) into ``grad``."""

    def evaluate(self, theta, x, y) -> tuple[float, float]:
        """(sum over the rows of the loss without regularisation, number classified
        correctly; NaN for a model that does not classify)."""


@runtime_checkable
class CurvatureModel(Model, Protocol):
    """A model that also gives Gauss-Newton-vector products (methods that need curvature
    products refuse a model without them)."""

    def curvature_product(self, theta, v, x, y, out=None):
        """G v (n_params,): the Gauss-Newton matrix of F on the batch at theta times v,
        written into ``out`` (allocated if None) and returned."""
