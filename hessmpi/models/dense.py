"""A fully connected network on one flat parameter vector, with a cross-entropy loss.

With no hidden layer and the softmax output it is multinomial logistic regression
(``model.name = "softmax"``); with hidden layers and ReLU or tanh units it is the MLP; with
logistic units, a linear code layer and the sigmoid output it is the deep autoencoder
(Hinton & Salakhutdinov 2006), whose targets are its inputs. The objective is

    F(theta) = mean_i CE(softmax(f(x_i; theta)), y_i) + (l2/2) * ||theta||^2     (softmax)
    F(theta) = mean_i sum_j BCE(sigmoid(f(x_i; theta))_j, x_ij) + (l2/2) * ||theta||^2
                                                                                (sigmoid)

Layout of theta (n,): for each layer l, W_l (fan_in, fan_out) row-major, then b_l (fan_out,).
Everything is vectorised over the batch: a batch is x (B, d) and y (B,) int64 labels.
Written once against the array module ``xp`` (numpy or cupy).
"""

from __future__ import annotations

from typing import Any

import numpy as np

ACTIVATIONS = ("relu", "tanh", "sigmoid", "linear")


class DenseNet:
    """sizes: [d, h_1, ..., h_k, C] layer widths; activation: of every hidden layer, one of
    ACTIVATIONS, or ``activations``: one per hidden layer; l2: the L2 coefficient; output:
    "softmax" (classes, labels y) or "sigmoid" (independent outputs, targets = the inputs x,
    so C = d); init: "gaussian" (variance gain/fan_in, zeros without hidden layers) or
    "sparse" (Martens 2010: 15 non-zero unit-Gaussian weights into each unit); xp, dtype:
    array module and floating type."""

    def __init__(self, sizes: list[int], activation: str, l2: float, *, xp: Any = np,
                 dtype: Any = np.float64, activations: list[str] | None = None,
                 output: str = "softmax", init: str = "gaussian"):
        acts = list(activations) if activations is not None else [activation] * (len(sizes) - 2)
        if len(acts) != len(sizes) - 2 or any(a not in ACTIVATIONS for a in acts):
            raise ValueError(f"activations must be {len(sizes) - 2} of {ACTIVATIONS}, not {acts}")
        if output not in ("softmax", "sigmoid") or init not in ("gaussian", "sparse"):
            raise ValueError(f"unknown output {output!r} or init {init!r}")
        if output == "sigmoid" and sizes[-1] != sizes[0]:
            raise ValueError("the sigmoid output reconstructs its input: sizes[-1] == sizes[0]")
        self.sizes = list(sizes)
        self.activations, self.output, self.init = acts, output, init
        self.l2 = float(l2)
        self.xp = xp
        self.dtype = np.dtype(dtype)
        self._layers = []  # (offset of W, fan_in, fan_out)
        offset = 0
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            self._layers.append((offset, fan_in, fan_out))
            offset += fan_in * fan_out + fan_out
        self.n_params = offset
        self._rows = None   # arange(B), the row index of the label picks, cached per B

    # ----- parameters -------------------------------------------------------------------
    def views(self, flat) -> list[tuple[Any, Any]]:
        """[(W_l (fan_in, fan_out), b_l (fan_out,))] as views into the flat vector ``flat``."""
        out = []
        for off, fi, fo in self._layers:
            w_end = off + fi * fo
            out.append((flat[off:w_end].reshape(fi, fo), flat[w_end:w_end + fo]))
        return out

    def init_params(self, seed: int) -> np.ndarray:
        """Initial theta (n,) on the host, zero biases. "gaussian": zeros without hidden
        layers, else weights of variance gain/fan_in (gain 2 before ReLU, 1 otherwise).
        "sparse": 15 (or fan_in, if fewer) unit-Gaussian weights into each unit, the rest 0."""
        theta = np.zeros(self.n_params, dtype=self.dtype)
        if len(self._layers) == 1 and self.init == "gaussian":
            return theta
        rng = np.random.default_rng(seed)
        for layer, (w, _) in enumerate(self.views(theta)):
            if self.init == "sparse":
                k = min(15, w.shape[0])
                for unit in range(w.shape[1]):
                    rows = rng.choice(w.shape[0], size=k, replace=False)
                    w[rows, unit] = rng.standard_normal(k)
                continue
            relu = layer < len(self.activations) and self.activations[layer] == "relu"
            w[...] = rng.standard_normal(w.shape) * np.sqrt((2.0 if relu else 1.0) / w.shape[0])
        return theta

    # ----- forward and backward -----------------------------------------------------------
    def _forward(self, layers, x) -> list:
        """Activations [x, a_1, ..., a_k, logits]; a_l is post-activation."""
        xp = self.xp
        acts = [x]
        for l, (w, b) in enumerate(layers):
            z = xp.matmul(acts[-1], w)
            z += b
            kind = self.activations[l] if l < len(layers) - 1 else "linear"
            if kind == "relu":
                xp.maximum(z, 0, out=z)
            elif kind == "tanh":
                xp.tanh(z, out=z)
            elif kind == "sigmoid":
                _sigmoid_(xp, z)
            acts.append(z)
        return acts

    def _act_derivative_(self, u, a, l: int) -> None:
        """u *= sigma'(z) for hidden layer l, where a = sigma(z), in place."""
        kind = self.activations[l]
        if kind == "relu":
            u *= a > 0
        elif kind == "tanh":
            u *= 1 - a * a
        elif kind == "sigmoid":
            u *= a * (1 - a)

    def _output(self, logits, x, y):
        """(mean loss over the batch as a 0-d array, output probabilities (B, C)).
        Overwrites logits; the targets are y (softmax) or x (sigmoid)."""
        if self.output == "softmax":
            return self._softmax_ce(logits, y)
        xp = self.xp
        # sum_j softplus(z) - t z, with softplus(z) = max(z, 0) + log1p(exp(-|z|))
        loss = (xp.maximum(logits, 0) - logits * x + xp.log1p(xp.exp(-xp.abs(logits)))).sum()
        _sigmoid_(xp, logits)
        return loss / len(x), logits

    def _row_index(self, batch: int):
        if self._rows is None or len(self._rows) != batch:
            self._rows = self.xp.arange(batch)
        return self._rows

    def _softmax_ce(self, logits, y):
        """(mean cross-entropy as a 0-d array, probabilities (B, C)). Overwrites logits."""
        xp = self.xp
        logits -= logits.max(axis=1, keepdims=True)
        picked = logits[self._row_index(len(y)), y].sum()
        xp.exp(logits, out=logits)
        total = logits.sum(axis=1, keepdims=True)
        loss = (xp.log(total).sum() - picked) / len(y)
        logits /= total
        return loss, logits

    def _output_delta(self, p, x, y):
        """dF/dlogits (B, C) from the output probabilities p (overwritten)."""
        if self.output == "softmax":
            p[self._row_index(len(y)), y] -= 1
        else:
            p -= x
        p /= len(p)
        return p

    def _backward(self, layers, acts, delta, grad, squares: bool = False) -> None:
        """grad <- J^T delta: back-propagate the output sensitivities delta (B, C) through
        the network at activations ``acts``, writing dW, db into the flat vector ``grad``.
        ``squares``: write instead the sums over the rows of the squared per-row terms,
        sum_i a_i^2 delta_i^2 and sum_i delta_i^2 (the empirical Fisher's diagonal)."""
        xp = self.xp
        grads = self.views(grad)
        for l in range(len(layers) - 1, -1, -1):
            gw, gb = grads[l]
            if squares:
                xp.matmul((acts[l] ** 2).T, delta ** 2, out=gw)
                (delta ** 2).sum(axis=0, out=gb)
            else:
                xp.matmul(acts[l].T, delta, out=gw)
                delta.sum(axis=0, out=gb)
            if l > 0:
                delta = xp.matmul(delta, layers[l][0].T)
                self._act_derivative_(delta, acts[l], l - 1)

    def _penalty(self, theta):
        return 0.5 * self.l2 * self.xp.dot(theta, theta)

    def loss(self, theta, x, y):
        """F on the batch (x (B, d), y (B,)) at theta, as a 0-d array; forward pass only."""
        acts = self._forward(self.views(theta), x)
        loss, _ = self._output(acts[-1], x, y)
        return loss + self._penalty(theta)

    def loss_grad(self, theta, x, y, grad):
        """F on the batch at theta (0-d array); writes grad F (n,) into ``grad``."""
        layers = self.views(theta)
        acts = self._forward(layers, x)
        loss, p = self._output(acts[-1], x, y)
        self._backward(layers, acts, self._output_delta(p, x, y), grad)
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
                self._act_derivative_(r_z, acts[l + 1], l)
            r_act = r_z
        _, p = self._output(acts[-1], x, y)
        delta = p * r_act
        if self.output == "softmax":    # H = diag(p) - p p^T per sample
            delta -= p * delta.sum(axis=1, keepdims=True)
        else:                           # H = diag(p (1 - p))
            delta -= p * delta
        delta /= len(x)
        if out is None:
            out = xp.empty_like(theta)
        self._backward(layers, acts, delta, out)
        if self.l2:
            out += self.l2 * v
        return out

    def fisher_diagonal(self, theta, x, y, out) -> None:
        """out (n,) <- the diagonal of the empirical Fisher matrix of the mean loss on the
        batch, (1/B) sum_i (grad L_i)^2 elementwise (the L2 term left out)."""
        layers = self.views(theta)
        acts = self._forward(layers, x)
        _, p = self._output(acts[-1], x, y)
        delta = self._output_delta(p, x, y)       # dL_i/dlogits / B, row by row
        self._backward(layers, acts, delta, out, squares=True)
        out *= len(x)                             # (1/B) sum_i (B a_i delta_i)^2

    def evaluate(self, theta, x, y, chunk: int = 4096) -> tuple[float, float]:
        """(sum over samples of the loss, number classified correctly) on x, y, in chunks of
        ``chunk`` rows; the L2 term is not included. The sigmoid output classifies nothing:
        its count is NaN."""
        layers = self.views(theta)
        softmax = self.output == "softmax"
        loss_sum, correct = 0.0, 0 if softmax else float("nan")
        for start in range(0, len(y), chunk):
            xb, yb = x[start:start + chunk], y[start:start + chunk]
            logits = self._forward(layers, xb)[-1]
            if softmax:
                correct += int((logits.argmax(axis=1) == yb).sum())
            loss, _ = self._output(logits, xb, yb)
            loss_sum += float(loss) * len(yb)
        return loss_sum, correct


def _sigmoid_(xp, z) -> None:
    """z <- 1 / (1 + exp(-z)) in place, without overflow for large |z|."""
    xp.negative(z, out=z)
    xp.exp(xp.minimum(z, 80.0, out=z), out=z)
    z += 1
    xp.reciprocal(z, out=z)
