"""A convolutional network on one flat parameter vector (``model.name = "cnn"``).

For each width c_l of ``channels``: a 5x5 convolution (stride 1, zero padding 2, so the
image keeps its size), ReLU, and a 2x2 max-pool of stride 2 (an odd last row or column is
dropped, as by ``torch.nn.MaxPool2d(2)``); then dense ReLU layers of widths ``dense`` and a
linear layer to the class logits; softmax cross-entropy. The objective is the DenseNet's:

    F(theta) = mean_i CE(softmax(f(x_i; theta)), y_i) + (l2/2) * ||theta||^2

The defaults, channels [32, 64] and dense [1024] on 28x28 images, are DeepOBS's "2c2d".

Data: a row of x (B, H*W*C) is an image (H, W, C) in row-major order (channels last; a
grayscale image is its H*W pixels); activations are (B, H, W, C).

Layout of theta (n,): for each conv block, its kernel (5, 5, c_in, c_out) row-major, then its
bias (c_out,); then for each dense layer W (fan_in, fan_out) row-major and b (fan_out,), the
first dense layer's inputs in (h, w, c) order of the last pooled map.

Convolutions are matrix products on im2col windows: a strided view of the padded input
(every window row of 5 * c_in values is contiguous in it) copied into a preallocated matrix
(rows*H*W, 25*c_in), a few images at a time so that the matrix stays in cache
(``cols_bytes``), and formed again where the backward pass needs it. The gradient of a
block's input is the 'same' convolution of its output gradient with the kernel flipped
(again im2col and a product). Max-pool and ReLU commute (ReLU is monotone), in values and
gradients, so the pool is taken first and ReLU touches a quarter of the values. The pooling
switches of the forward pass route the backward pass and the R-pass of the Gauss-Newton
product. Batches larger than ``max_rows`` are processed in chunks of rows (bounded memory).
Written once against the array module ``xp`` (numpy or cupy); only the size of the im2col
chunks depends on the device (:data:`COLS_BYTES`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

KERNEL = 5                  # the convolutions' kernel size
PAD = KERNEL // 2           # zero padding that keeps the image size
#: Bytes of an im2col chunk by array module: within a CPU core's share of the cache
#: (measured: 1-2 MiB is 25-40 % faster than whole batches on an EPYC); large on a GPU,
#: where small products waste the device.
COLS_BYTES = {"numpy": 3 << 19, "cupy": 1 << 28}


class ConvBlock:
    """Geometry of one conv block: its kernel's offset in theta, its input (h, w, c_in), its
    output channels c_out, its pooled output (h // 2, w // 2)."""

    def __init__(self, offset: int, h: int, w: int, c_in: int, c_out: int):
        self.offset, self.h, self.w, self.c_in, self.c_out = offset, h, w, c_in, c_out
        self.ho, self.wo = h // 2, w // 2
        self.n_kernel = KERNEL * KERNEL * c_in * c_out
        self.n_params = self.n_kernel + c_out


class ConvNet:
    """image_shape: (H, W) or (H, W, C) of each row; channels: output channels of each conv
    block (at least one); dense: hidden dense widths; n_classes: C; l2: the L2
    coefficient; xp, dtype: array module and floating type; max_rows: rows per chunk of a
    batch (default: as many as keep the activations within about 2**26 values); cols_bytes:
    the size of an im2col chunk (default COLS_BYTES of xp)."""

    def __init__(self, image_shape, channels: list[int], dense: list[int], n_classes: int,
                 l2: float, *, xp: Any = np, dtype: Any = np.float64,
                 max_rows: int | None = None, cols_bytes: int | None = None):
        shape = tuple(int(v) for v in image_shape)
        if len(shape) not in (2, 3) or min(shape) < 1:
            raise ValueError(f"image_shape must be (H, W) or (H, W, C), not {image_shape}")
        if not channels or min(channels) < 1 or (dense and min(dense) < 1):
            raise ValueError(f"channels must be one or more positive widths and dense "
                             f"positive widths, not {channels} and {dense}")
        h, w, c = (*shape, 1)[:3]
        self.image_shape, self.n_classes = (h, w, c), int(n_classes)
        self.channels, self.dense = list(channels), list(dense)
        self.l2, self.xp, self.dtype = float(l2), xp, np.dtype(dtype)
        self.blocks: list[ConvBlock] = []
        offset = 0
        for c_out in channels:
            if h < 2 or w < 2:
                raise ValueError(f"{len(channels)} conv blocks pool a {image_shape} image "
                                 "below 1x1: use fewer channels entries")
            block = ConvBlock(offset, h, w, c, c_out)
            self.blocks.append(block)
            offset += block.n_params
            h, w, c = block.ho, block.wo, c_out
        self.n_flat = h * w * c
        self.sizes = [self.n_flat, *dense, self.n_classes]
        self._layers = []   # dense layers: (offset of W, fan_in, fan_out)
        for fan_in, fan_out in zip(self.sizes[:-1], self.sizes[1:], strict=True):
            self._layers.append((offset, fan_in, fan_out))
            offset += fan_in * fan_out + fan_out
        self.n_params = offset
        per_row = sum((b.h + 2 * PAD) * (b.w + 2 * PAD) * (b.c_in + b.c_out) * 2
                      + b.h * b.w * b.c_out * 3 for b in self.blocks)
        self.max_rows = max_rows or max(1, 2**26 // per_row)
        self.cols_bytes = cols_bytes or COLS_BYTES.get(xp.__name__, 3 << 19)
        self._buffers: dict = {}
        self._rows = None

    # ----- parameters -------------------------------------------------------------------
    def views(self, flat) -> tuple[list, list]:
        """([(K_l (25*c_in, c_out), b_l (c_out,))] of the conv blocks, [(W_l (fan_in,
        fan_out), b_l (fan_out,))] of the dense layers), views into ``flat`` (n,). K_l's
        rows are (kernel row, kernel column, input channel), the order of a window."""
        convs = []
        for b in self.blocks:
            end = b.offset + b.n_kernel
            convs.append((flat[b.offset:end].reshape(KERNEL * KERNEL * b.c_in, b.c_out),
                          flat[end:end + b.c_out]))
        layers = []
        for off, fi, fo in self._layers:
            end = off + fi * fo
            layers.append((flat[off:end].reshape(fi, fo), flat[end:end + fo]))
        return convs, layers

    def init_params(self, seed: int) -> np.ndarray:
        """Initial theta (n,) on the host: weights of variance 2/fan_in before a ReLU (He),
        1/fan_in into the logits, zero biases; a function of ``seed``."""
        theta = np.zeros(self.n_params, dtype=self.dtype)
        rng = np.random.default_rng(seed)
        convs, layers = self.views(theta)
        for k, _ in convs:
            k[...] = rng.standard_normal(k.shape) * np.sqrt(2.0 / k.shape[0])
        for l, (w, _) in enumerate(layers):
            gain = 2.0 if l < len(layers) - 1 else 1.0
            w[...] = rng.standard_normal(w.shape) * np.sqrt(gain / w.shape[0])
        return theta

    # ----- buffers ------------------------------------------------------------------------
    def _buf(self, name: str, shape: tuple, dtype=None):
        """A zero-initialised buffer allocated once per (name, shape) and reused after:
        its contents persist between calls (the padding borders stay zero)."""
        key = (name, shape, dtype)
        buf = self._buffers.get(key)
        if buf is None:
            if len(self._buffers) > 200:     # many batch sizes seen: start again
                self._buffers.clear()
            buf = self._buffers[key] = self.xp.zeros(shape, dtype or self.dtype)
        return buf

    def _padded(self, name: str, block: ConvBlock, rows: int, channels: int | None = None):
        """(padded buffer (B, h+4, w+4, c) with zero borders, its interior view) at block's
        image size; c: ``channels``, default the block's input channels."""
        pad = self._buf(name, (rows, block.h + 2 * PAD, block.w + 2 * PAD,
                               channels or block.c_in))
        return pad, pad[:, PAD:PAD + block.h, PAD:PAD + block.w]

    def _pooled_out(self, name: str, l: int, rows: int):
        """Where block l's pooled output goes: the next block's padded input interior, or
        the flat input of the dense layers (B, ho, wo, c_out)."""
        if l + 1 < len(self.blocks):
            return self._padded(name, self.blocks[l + 1], rows)[1]
        b = self.blocks[l]
        return self._buf(name + "flat", (rows, b.ho, b.wo, b.c_out))

    def _im2col(self, pad, block: ConvBlock, cols) -> None:
        """cols (B*h*w, 25*c) <- the 5x5 windows of ``pad`` (B, h+4, w+4, c), C-contiguous:
        one strided view (row (b, y, x), kernel row i, then 5*c values contiguous in pad)
        and one copy."""
        rows, hp, wp, c = pad.shape
        s = pad.strides
        windows = self.xp.lib.stride_tricks.as_strided(
            pad, shape=(rows, block.h, block.w, KERNEL, KERNEL * c),
            strides=(s[0], s[1], s[2], s[1], s[3]))
        cols.reshape(windows.shape)[...] = windows

    def _col_chunks(self, pad, block: ConvBlock, name: str):
        """(row slice of pad, row slice of the output (B*h*w, .), im2col matrix of those
        images) for chunks of images whose im2col matrix fits ``cols_bytes``."""
        rows, c = pad.shape[0], pad.shape[3]
        pixels = block.h * block.w
        per_image = pixels * KERNEL * KERNEL * c * self.dtype.itemsize
        step = max(1, min(rows, self.cols_bytes // per_image))
        cols = self._buf(name, (step * pixels, KERNEL * KERNEL * c))
        for s in range(0, rows, step):
            e = min(s + step, rows)
            part = cols[:(e - s) * pixels]
            self._im2col(pad[s:e], block, part)
            yield slice(s * pixels, e * pixels), part

    def _conv(self, pad, block: ConvBlock, kernel, out, *, add: bool = False) -> None:
        """out (B*h*w, c_out) <- (or += with ``add``) the 'same' 5x5 convolution of ``pad``
        (B, h+4, w+4, c) with ``kernel`` (25*c, c_out), without bias."""
        xp = self.xp
        for rows, cols in self._col_chunks(pad, block, "cols"):
            if add:
                out[rows] += xp.matmul(cols, kernel)
            else:
                xp.matmul(cols, kernel, out=out[rows])

    def _kernel_grad(self, pad, block: ConvBlock, dz, gk) -> None:
        """gk (25*c_in, c_out) <- the kernel gradient: cols^T dz summed over the chunks."""
        xp = self.xp
        part = self._buf("gk", gk.shape)
        for i, (rows, cols) in enumerate(self._col_chunks(pad, block, "cols")):
            xp.matmul(cols.T, dz[rows], out=gk if i == 0 else part)
            if i:
                gk += part

    def _input_grad(self, dz, k, block: ConvBlock, l: int):
        """dL/d(input) (B, h, w, c_in) of conv block l from dL/dz (B, h, w, c_out): the
        'same' convolution of dz with the kernel flipped in space and transposed in
        channels (an im2col and one matrix product, cheaper than scattering the windows
        back)."""
        rows = len(dz)
        flipped = self._buf(f"kflip{l}", (KERNEL * KERNEL * block.c_out, block.c_in))
        flipped.reshape(KERNEL, KERNEL, block.c_out, block.c_in)[...] = k.reshape(
            KERNEL, KERNEL, block.c_in, block.c_out)[::-1, ::-1].transpose(0, 1, 3, 2)
        dpad, inner = self._padded(f"dzpad{l}", block, rows, block.c_out)
        inner[...] = dz
        d_in = self._buf(f"din{l}", (rows, block.h, block.w, block.c_in))
        self._conv(dpad, block, flipped, d_in.reshape(-1, block.c_in))
        return d_in

    # ----- max-pool ---------------------------------------------------------------------------
    @staticmethod
    def _quarters(a, block: ConvBlock) -> list:
        """The four (B, ho, wo, c) views of a (B, h, w, c) at the 2x2 window positions
        (0,0), (0,1), (1,0), (1,1)."""
        ho2, wo2 = 2 * block.ho, 2 * block.wo
        return [a[:, i:ho2:2, j:wo2:2] for i in (0, 1) for j in (0, 1)]

    def _pool(self, z, block: ConvBlock, out, switch) -> None:
        """out (B, ho, wo, c) <- the 2x2 max of z (B, h, w, c); switch (4, B, ho, wo, c)
        bool <- which of the four positions holds it (the first in scan order on ties,
        as torch)."""
        xp = self.xp
        q = self._quarters(z, block)
        right_top, right_bottom = q[1] > q[0], q[3] > q[2]
        top = xp.maximum(q[0], q[1])
        bottom = xp.maximum(q[2], q[3])
        lower = bottom > top
        xp.maximum(top, bottom, out=out)
        switch[0] = ~(right_top | lower)
        switch[1] = right_top & ~lower
        switch[2] = lower & ~right_bottom
        switch[3] = lower & right_bottom

    def _unpool(self, d_out, block: ConvBlock, switch, dz) -> None:
        """dz (B, h, w, c) <- d_out (B, ho, wo, c) routed to the positions of the maxima
        (zero elsewhere; a dropped odd row or column stays zero)."""
        for k, view in enumerate(self._quarters(dz, block)):
            self.xp.multiply(d_out, switch[k], out=view)

    def _pool_r(self, rz, block: ConvBlock, switch, out) -> None:
        """out <- R{pool(z)}: rz (B, h, w, c) at the forward pass's maxima."""
        q = self._quarters(rz, block)
        self.xp.multiply(q[0], switch[0], out=out)
        for k in (1, 2, 3):
            out += q[k] * switch[k]

    # ----- forward and backward -------------------------------------------------------------
    def _forward(self, convs, layers, x) -> dict:
        """The forward pass on rows x (B, d): {"pad": per block its padded input (B, h+4,
        w+4, c_in), "switch": per block, "pooled": per block its post-ReLU pooled output (a
        view), "acts": [flat input, dense activations ..., logits]}."""
        xp, rows = self.xp, len(x)
        h, w, c = self.image_shape
        pad, inner = self._padded("pad0", self.blocks[0], rows)
        inner[...] = x.reshape(rows, h, w, c)
        state = {"pad": [], "switch": [], "pooled": []}
        for l, (block, (k, b)) in enumerate(zip(self.blocks, convs, strict=True)):
            z = self._buf(f"z{l}", (rows * block.h * block.w, block.c_out))
            self._conv(pad, block, k, z)
            z += b
            out = self._pooled_out(f"pad{l + 1}", l, rows)
            switch = self._buf(f"switch{l}", (4, rows, block.ho, block.wo, block.c_out), bool)
            self._pool(z.reshape(rows, block.h, block.w, block.c_out), block, out, switch)
            xp.maximum(out, 0, out=out)
            state["pad"].append(pad)
            state["switch"].append(switch)
            state["pooled"].append(out)
            if l + 1 < len(self.blocks):
                pad = self._padded(f"pad{l + 1}", self.blocks[l + 1], rows)[0]
        acts = [out.reshape(rows, self.n_flat)]
        for l, (wl, bl) in enumerate(layers):
            a = self._buf(f"act{l}", (rows, wl.shape[1]))
            xp.matmul(acts[-1], wl, out=a)
            a += bl
            if l < len(layers) - 1:
                xp.maximum(a, 0, out=a)
            acts.append(a)
        state["acts"] = acts
        return state

    def _backward(self, convs, layers, state, delta, grad) -> None:
        """grad <- J^T delta: back-propagate the logit sensitivities delta (B, C) through
        the forward pass ``state``, writing every parameter's gradient into ``grad`` (n,)."""
        xp, acts, rows = self.xp, state["acts"], len(delta)
        gconvs, glayers = self.views(grad)
        for l in range(len(layers) - 1, -1, -1):
            gw, gb = glayers[l]
            xp.matmul(acts[l].T, delta, out=gw)
            delta.sum(axis=0, out=gb)
            d_in = self._buf(f"dact{l}", acts[l].shape)
            xp.matmul(delta, layers[l][0].T, out=d_in)
            if l > 0:
                d_in *= acts[l] > 0
            delta = d_in
        d_out = delta.reshape(state["pooled"][-1].shape)
        for l in range(len(self.blocks) - 1, -1, -1):
            block, (k, _), (gk, gb) = self.blocks[l], convs[l], gconvs[l]
            d_out *= state["pooled"][l] > 0
            dz = self._buf(f"dz{l}", (rows, block.h, block.w, block.c_out))
            self._unpool(d_out, block, state["switch"][l], dz)
            dz_rows = dz.reshape(-1, block.c_out)
            self._kernel_grad(state["pad"][l], block, dz_rows, gk)
            dz_rows.sum(axis=0, out=gb)
            if l > 0:
                d_out = self._input_grad(dz, k, block, l)

    def _r_forward(self, convs, layers, dconvs, dlayers, state):
        """R{logits} (B, C): the directional derivative of the logits along v (whose views
        are dconvs, dlayers) at the forward pass ``state``, the same switches and ReLU masks."""
        xp = self.xp
        rows = len(state["acts"][0])
        r_pad = None    # R{input} of the block, padded: the previous block's R-output
        for l, block in enumerate(self.blocks):
            (k, _), (dk, db) = convs[l], dconvs[l]
            rz = self._buf(f"rz{l}", (rows * block.h * block.w, block.c_out))
            self._conv(state["pad"][l], block, dk, rz)
            rz += db
            if r_pad is not None:
                self._conv(r_pad, block, k, rz, add=True)
            r_out = self._pooled_out(f"rpad{l + 1}", l, rows)
            self._pool_r(rz.reshape(rows, block.h, block.w, block.c_out), block,
                         state["switch"][l], r_out)
            r_out *= state["pooled"][l] > 0
            if l + 1 < len(self.blocks):
                r_pad = self._padded(f"rpad{l + 1}", self.blocks[l + 1], rows)[0]
        acts = state["acts"]
        r_act = r_out.reshape(rows, self.n_flat)
        for l, (w, _) in enumerate(layers):
            dw, db = dlayers[l]
            r_z = xp.matmul(acts[l], dw)
            r_z += db
            r_z += xp.matmul(r_act, w)
            if l < len(layers) - 1:
                r_z *= acts[l + 1] > 0
            r_act = r_z
        return r_act

    # ----- output ---------------------------------------------------------------------------
    def _row_index(self, rows: int):
        if self._rows is None or len(self._rows) != rows:
            self._rows = self.xp.arange(rows)
        return self._rows

    def _softmax_ce_sum(self, logits, y):
        """(sum of the cross-entropies as a 0-d array, probabilities (B, C)); overwrites
        logits."""
        xp = self.xp
        logits -= logits.max(axis=1, keepdims=True)
        picked = logits[self._row_index(len(y)), y].sum()
        xp.exp(logits, out=logits)
        total = logits.sum(axis=1, keepdims=True)
        loss = xp.log(total).sum() - picked
        logits /= total
        return loss, logits

    def _chunks(self, rows: int):
        return [(s, min(s + self.max_rows, rows)) for s in range(0, rows, self.max_rows)]

    def _penalty(self, theta):
        return 0.5 * self.l2 * self.xp.dot(theta, theta)

    # ----- the protocol ---------------------------------------------------------------------------
    def loss(self, theta, x, y):
        """F on the batch (x (B, d), y (B,)) at theta, as a 0-d array; forward pass only."""
        convs, layers = self.views(theta)
        total = 0.0
        for s, e in self._chunks(len(y)):
            logits = self._forward(convs, layers, x[s:e])["acts"][-1]
            total = total + self._softmax_ce_sum(logits, y[s:e])[0]
        return total / len(y) + self._penalty(theta)

    def loss_grad(self, theta, x, y, grad):
        """F on the batch at theta (0-d array); writes grad F (n,) into ``grad``."""
        convs, layers = self.views(theta)
        total, rows = 0.0, len(y)
        for i, (s, e) in enumerate(self._chunks(rows)):
            state = self._forward(convs, layers, x[s:e])
            loss, p = self._softmax_ce_sum(state["acts"][-1], y[s:e])
            total = total + loss
            p[self._row_index(e - s), y[s:e]] -= 1
            p /= rows
            target = grad if i == 0 else self._buf("gchunk", grad.shape)
            self._backward(convs, layers, state, p, target)
            if i:
                grad += target
        if self.l2:
            grad += self.l2 * theta
        return total / rows + self._penalty(theta)

    def curvature_product(self, theta, v, x, y, out=None):
        """G v (n,): the Gauss-Newton matrix of F on the batch times v, J^T H_CE J v + l2 v,
        by the R-operator (Pearlmutter 1994; Schraudolph 2002) through the forward pass's
        pooling switches and ReLU masks; written into ``out`` (allocated if None)."""
        xp = self.xp
        convs, layers = self.views(theta)
        dconvs, dlayers = self.views(v)
        if out is None:
            out = xp.empty_like(theta)
        rows = len(y)
        for i, (s, e) in enumerate(self._chunks(rows)):
            state = self._forward(convs, layers, x[s:e])
            r_logits = self._r_forward(convs, layers, dconvs, dlayers, state)
            _, p = self._softmax_ce_sum(state["acts"][-1], y[s:e])
            delta = p * r_logits                     # H = diag(p) - p p^T per row
            delta -= p * delta.sum(axis=1, keepdims=True)
            delta /= rows
            target = out if i == 0 else self._buf("gchunk", out.shape)
            self._backward(convs, layers, state, delta, target)
            if i:
                out += target
        if self.l2:
            out += self.l2 * v
        return out

    def evaluate(self, theta, x, y) -> tuple[float, float]:
        """(sum over the rows of the cross-entropy, number classified correctly) on x, y;
        the L2 term is not included."""
        convs, layers = self.views(theta)
        loss_sum, correct = 0.0, 0
        for s, e in self._chunks(len(y)):
            logits = self._forward(convs, layers, x[s:e])["acts"][-1]
            correct += int((logits.argmax(axis=1) == y[s:e]).sum())
            loss_sum += float(self._softmax_ce_sum(logits, y[s:e])[0])
        return loss_sum, correct
