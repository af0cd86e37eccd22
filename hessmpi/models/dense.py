"""A fully connected classifier on one flat parameter vector, with softmax cross-entropy.

With no hidden layer it is multinomial logistic regression (``model.name = "softmax"``);
with hidden layers and ReLU or tanh units it is the MLP. The objective is

    F(theta) = mean_i CE(softmax(f(x_i; theta)), y_i) + (l2/2) * ||theta||^2

Layout of theta (n,): for each layer l, W_l (fan_in, fan_out) row-major, then b_l (fan_out,).
Everything is vectorised over the batch: a batch is x (B, d) and y (B,) int64 labels.
Written once against the array module ``xp`` (numpy or cupy).
"""

from __future__ import annotations

from typing import Any

import numpy as np


class DenseNet:
    """sizes: [d, h_1, ..., h_k, C] layer widths; activation: "relu" or "tanh" (hidden
    layers only); l2: the L2 coefficient; xp, dtype: array module and floating type."""

    def __init__(self, sizes: list[int], activation: str, l2: float, *, xp: Any = np,
                 dtype: Any = np.float64):
        if activation not in ("relu", "tanh"):
            raise ValueError(f"activation must be 'relu' or 'tanh', not {activation!r}")
        self.sizes = list(sizes)
        self.activation = activation
        self.l2 = float(l2)
        self.xp = xp
        self.dtype = np.dtype(dtype)
        self._layers = []  # (offset of W, fan_in, fan_out)
        offset = 0
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            self._layers.append((offset, fan_in, fan_out))
            offset += fan_in * fan_out + fan_out
        self.n_params = offset

    # ----- parameters -------------------------------------------------------------------
    def views(self, flat) -> list[tuple[Any, Any]]:
        """[(W_l (fan_in, fan_out), b_l (fan_out,))] as views into the flat vector ``flat``."""
        out = []
        for off, fi, fo in self._layers:
            w_end = off + fi * fo
            out.append((flat[off:w_end].reshape(fi, fo), flat[w_end:w_end + fo]))
        return out

    def init_params(self, seed: int) -> np.ndarray:
        """Initial theta (n,) on the host: zeros for softmax regression; for the MLP Gaussian
        weights of variance gain/fan_in (gain 2 before ReLU, 1 otherwise), zero biases."""
        theta = np.zeros(self.n_params, dtype=self.dtype)
        if len(self._layers) == 1:
            return theta
        rng = np.random.default_rng(seed)
        for layer, (w, _) in enumerate(self.views(theta)):
            hidden = layer < len(self._layers) - 1
            gain = 2.0 if hidden and self.activation == "relu" else 1.0
            w[...] = rng.standard_normal(w.shape) * np.sqrt(gain / w.shape[0])
        return theta

    # ----- forward and backward -----------------------------------------------------------
    def _forward(self, layers, x) -> list:
        """Activations [x, a_1, ..., a_k, logits]; a_l is post-activation."""
        xp = self.xp
        acts = [x]
        for l, (w, b) in enumerate(layers):
            z = xp.matmul(acts[-1], w)
            z += b
            if l < len(layers) - 1:
                if self.activation == "relu":
                    xp.maximum(z, 0, out=z)
                else:
                    xp.tanh(z, out=z)
            acts.append(z)
        return acts

    def _act_derivative_(self, u, a) -> None:
        """u *= sigma'(z) where a = sigma(z), in place."""
        if self.activation == "relu":
            u *= a > 0
        else:
            u *= 1 - a * a

    def _softmax_ce(self, logits, y):
        """(mean cross-entropy as a 0-d array, probabilities (B, C)). Overwrites logits."""
        xp = self.xp
        logits -= logits.max(axis=1, keepdims=True)
        picked = logits[xp.arange(len(y)), y]
        xp.exp(logits, out=logits)
        total = logits.sum(axis=1, keepdims=True)
        loss = xp.mean(xp.log(total[:, 0]) - picked)
        logits /= total
        return loss, logits

    def _backward(self, layers, acts, delta, grad) -> None:
        """grad <- J^T delta: back-propagate the output sensitivities delta (B, C) through
        the network at activations ``acts``, writing dW, db into the flat vector ``grad``."""
        xp = self.xp
        grads = self.views(grad)
        for l in range(len(layers) - 1, -1, -1):
            gw, gb = grads[l]
            xp.matmul(acts[l].T, delta, out=gw)
            delta.sum(axis=0, out=gb)
            if l > 0:
                delta = xp.matmul(delta, layers[l][0].T)
                self._act_derivative_(delta, acts[l])

    def _penalty(self, theta):
        return 0.5 * self.l2 * self.xp.dot(theta, theta)

    def loss(self, theta, x, y):
        """F on the batch (x (B, d), y (B,)) at theta, as a 0-d array; forward pass only."""
        acts = self._forward(self.views(theta), x)
        loss, _ = self._softmax_ce(acts[-1], y)
        return loss + self._penalty(theta)

    def loss_grad(self, theta, x, y, grad):
        """F on the batch at theta (0-d array); writes grad F (n,) into ``grad``."""
        xp = self.xp
        layers = self.views(theta)
        acts = self._forward(layers, x)
        loss, delta = self._softmax_ce(acts[-1], y)
        delta[xp.arange(len(y)), y] -= 1
        delta /= len(y)
        self._backward(layers, acts, delta, grad)
        if self.l2:
            grad += self.l2 * theta
        return loss + self._penalty(theta)

    def curvature_product(self, theta, v, x, y, out=None):
        """G v (n,): the Gauss-Newton matrix of F on the batch times v, exact, by the
        R-operator (Pearlmutter 1994; Schraudolph 2002): J^T H_CE J v + l2 v, where J is the
        Jacobian of the logits and H_CE the Hessian of the mean cross-entropy in the logits.
        For softmax regression G is the exact Hessian of F."""
        xp = self.xp
        layers = self.views(theta)
        dlayers = self.views(v)
        acts = self._forward(layers, x)
        r_act = None  # R{a_l}: directional derivative of the activations along v
        for l, (w, _) in enumerate(layers):
            dw, db = dlayers[l]
            r_z = xp.matmul(acts[l], dw)
            r_z += db
            if r_act is not None:
                r_z += xp.matmul(r_act, w)
            if l < len(layers) - 1:
                self._act_derivative_(r_z, acts[l + 1])
            r_act = r_z
        _, p = self._softmax_ce(acts[-1], y)
        delta = p * r_act
        delta -= p * delta.sum(axis=1, keepdims=True)
        delta /= len(y)
        if out is None:
            out = xp.empty_like(theta)
        self._backward(layers, acts, delta, out)
        if self.l2:
            out += self.l2 * v
        return out

    def evaluate(self, theta, x, y, chunk: int = 4096) -> tuple[float, int]:
        """(sum over samples of the cross-entropy, number classified correctly) on x, y,
        in chunks of ``chunk`` rows; the L2 term is not included."""
        layers = self.views(theta)
        loss_sum, correct = 0.0, 0
        for start in range(0, len(y), chunk):
            xb, yb = x[start:start + chunk], y[start:start + chunk]
            logits = self._forward(layers, xb)[-1]
            correct += int((logits.argmax(axis=1) == yb).sum())
            loss, _ = self._softmax_ce(logits, yb)
            loss_sum += float(loss) * len(yb)
        return loss_sum, correct
