"""The built-in convolutional network (model.name = "cnn") against independent references:
a naive float64 implementation read off the documented parameter layout (convolutions as
sums over kernel offsets, max-pool by reshape), central differences of the loss (the
gradient), a dense J^T H J built from central differences of the reference's logits (the
Gauss-Newton product), and PyTorch's own layers with the same weights."""

from __future__ import annotations

import numpy as np
import pytest
from harness import rel

from hessmpi.errors import UsageError
from hessmpi.models import build_model
from hessmpi.models.cnn import ConvNet

# (image_shape, channels, dense, classes): odd sizes drop a row/column at a pool;
# one block; no hidden dense layer; three channels in.
CASES = {
    "2-blocks-odd": ((9, 7, 2), [3, 4], [5], 3),
    "1-block": ((6, 6), [2], [4], 4),
    "no-dense": ((8, 8), [2, 3], [], 3),
    "3-blocks": ((8, 8, 3), [2, 2, 3], [3], 2),
}


def make(case, *, dtype=np.float64, l2=1e-3, max_rows=None, rows=7, seed=0):
    """(model, theta, x, y): the case's ConvNet, perturbed initial parameters (biases
    non-zero) and a batch of ``rows`` random rows."""
    shape, channels, dense, classes = CASES[case]
    model = ConvNet(shape, channels, dense, classes, l2, dtype=dtype, max_rows=max_rows)
    rng = np.random.default_rng(seed)
    theta = (model.init_params(seed) + 0.05 * rng.standard_normal(model.n_params)
             ).astype(dtype)
    x = rng.standard_normal((rows, int(np.prod(shape)))).astype(dtype)
    y = rng.integers(0, classes, rows)
    return model, theta, x, y


# ----- the independent reference ------------------------------------------------------------
def reference_logits(model: ConvNet, theta, x) -> np.ndarray:
    """The network of the module docstring, read off the documented layout of theta:
    'same' 5x5 convolution as a sum over the 25 kernel offsets, ReLU, 2x2 max-pool by
    reshaping (floor), dense ReLU layers, linear logits. float64."""
    theta = np.asarray(theta, dtype=np.float64)
    h, w, c = model.image_shape
    a = np.asarray(x, dtype=np.float64).reshape(len(x), h, w, c)
    offset = 0
    for c_out in model.channels:
        kernel = theta[offset:offset + 25 * c * c_out].reshape(5, 5, c, c_out)
        offset += kernel.size
        bias = theta[offset:offset + c_out]
        offset += c_out
        padded = np.pad(a, ((0, 0), (2, 2), (2, 2), (0, 0)))
        z = np.zeros((len(x), h, w, c_out)) + bias
        for i in range(5):
            for j in range(5):
                z += np.einsum("bhwc,co->bhwo", padded[:, i:i + h, j:j + w], kernel[i, j])
        z = np.maximum(z, 0)
        h, w, c = h // 2, w // 2, c_out
        a = z[:, :2 * h, :2 * w].reshape(len(x), h, 2, w, 2, c).max(axis=(2, 4))
    a = a.reshape(len(x), -1)
    sizes = [a.shape[1], *model.dense, model.n_classes]
    for l, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        weight = theta[offset:offset + fan_in * fan_out].reshape(fan_in, fan_out)
        offset += weight.size
        a = a @ weight + theta[offset:offset + fan_out]
        offset += fan_out
        if l < len(sizes) - 2:
            a = np.maximum(a, 0)
    assert offset == model.n_params == len(theta)
    return a


def reference_loss(model, theta, x, y) -> float:
    z = reference_logits(model, theta, x)
    z = z - z.max(axis=1, keepdims=True)
    ce = np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]
    return float(ce.mean() + 0.5 * model.l2 * np.dot(theta, theta))


def central(f, theta, eps=1e-6):
    """Central differences of f (a scalar or an array) along every coordinate of theta."""
    cols = []
    for k in range(len(theta)):
        e = np.zeros_like(theta)
        e[k] = eps
        cols.append((np.asarray(f(theta + e)) - np.asarray(f(theta - e))) / (2 * eps))
    return np.stack(cols, axis=-1)


# ----- values ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_loss_and_logits_equal_the_reference(case):
    model, theta, x, y = make(case)
    assert rel(model.loss(theta, x, y), reference_loss(model, theta, x, y)) < 1e-12
    convs, layers = model.views(theta)
    logits = model._forward(convs, layers, x)["acts"][-1]
    assert rel(logits, reference_logits(model, theta, x)) < 1e-12


def test_default_is_deepobs_2c2d_on_28x28():
    """conv(32) pool conv(64) pool dense 1024 dense 10: 3,274,634 parameters."""
    cfg = {"name": "cnn", "channels": [32, 64], "dense": [1024], "l2": 0.0}
    model = build_model(cfg, 784, 10, xp=np, dtype=np.float32, image_shape=(28, 28))
    expected = (25 * 32 + 32) + (25 * 32 * 64 + 64) + (7 * 7 * 64 * 1024 + 1024) + (1024 * 10
                                                                                     + 10)
    assert model.n_params == expected == 3_274_634


@pytest.mark.parametrize("case", CASES)
def test_gradient_equals_central_differences(case):
    model, theta, x, y = make(case)
    grad = np.full(model.n_params, np.nan)
    value = model.loss_grad(theta, x, y, grad)
    assert rel(value, reference_loss(model, theta, x, y)) < 1e-12
    fd = central(lambda t: reference_loss(model, t, x, y), theta)
    assert rel(grad, fd) < 1e-6


@pytest.mark.parametrize("case", CASES)
def test_curvature_product_equals_dense_jthj(case):
    """G v against sum_i J_i^T (diag p_i - p_i p_i^T) J_i / B + l2 I, J by central
    differences of the reference logits."""
    model, theta, x, y = make(case, rows=5)
    jac = central(lambda t: reference_logits(model, t, x), theta)       # (B, C, n)
    z = reference_logits(model, theta, x)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    gn = sum(jac[i].T @ (np.diag(p[i]) - np.outer(p[i], p[i])) @ jac[i]
             for i in range(len(y))) / len(y) + model.l2 * np.eye(model.n_params)
    rng = np.random.default_rng(1)
    for _ in range(2):
        v = rng.standard_normal(model.n_params)
        out = np.full(model.n_params, np.nan)
        returned = model.curvature_product(theta, v, x, y, out)
        assert returned is out
        assert rel(out, gn @ v) < 1e-6


def test_curvature_product_is_symmetric_and_positive():
    model, theta, x, y = make("2-blocks-odd")
    rng = np.random.default_rng(2)
    v, w = rng.standard_normal((2, model.n_params))
    gv, gw = model.curvature_product(theta, v, x, y), model.curvature_product(theta, w, x, y)
    assert abs(w @ gv - v @ gw) < 1e-10 * abs(v @ gw)
    assert v @ gv > model.l2 * (v @ v)


@pytest.mark.parametrize("max_rows", [1, 3, 6])
def test_chunks_of_rows_give_the_whole_batch(max_rows):
    """A batch processed in chunks of max_rows rows equals one pass over it."""
    whole, theta, x, y = make("2-blocks-odd", rows=7)
    chunked = make("2-blocks-odd", rows=7, max_rows=max_rows)[0]
    v = np.random.default_rng(3).standard_normal(whole.n_params)
    g1, g2 = np.empty(whole.n_params), np.empty(whole.n_params)
    assert rel(chunked.loss_grad(theta, x, y, g2), whole.loss_grad(theta, x, y, g1)) < 1e-14
    assert rel(g2, g1) < 1e-13
    assert rel(chunked.loss(theta, x, y), whole.loss(theta, x, y)) < 1e-14
    assert rel(chunked.curvature_product(theta, v, x, y),
               whole.curvature_product(theta, v, x, y)) < 1e-13
    assert chunked.evaluate(theta, x, y)[1] == whole.evaluate(theta, x, y)[1]


def test_repeated_calls_and_batch_sizes_reuse_buffers_correctly():
    """Buffers persist between calls: other batch sizes in between change nothing."""
    model, theta, x, y = make("2-blocks-odd", rows=7)
    g1, g2 = np.empty(model.n_params), np.empty(model.n_params)
    first = model.loss_grad(theta, x, y, g1)
    model.loss_grad(theta, x[:3] * 5, y[:3], np.empty(model.n_params))
    model.curvature_product(theta, g1, x[2:], y[2:])
    assert model.loss_grad(theta, x, y, g2) == first
    np.testing.assert_array_equal(g1, g2)


def test_evaluate_sums_the_per_row_losses():
    model, theta, x, y = make("1-block", l2=0.5, rows=9)
    loss_sum, correct = model.evaluate(theta, x, y)
    rows = [reference_loss(model, theta, x[i:i + 1], y[i:i + 1])
            - 0.5 * model.l2 * theta @ theta for i in range(len(y))]
    assert rel(loss_sum, sum(rows)) < 1e-12
    assert correct == int((reference_logits(model, theta, x).argmax(axis=1) == y).sum())


def test_float32_is_close_to_float64():
    m64, theta, x, y = make("2-blocks-odd")
    m32 = make("2-blocks-odd", dtype=np.float32)[0]
    g64, g32 = np.empty(m64.n_params), np.empty(m32.n_params, dtype=np.float32)
    m64.loss_grad(theta, x, y, g64)
    loss32 = m32.loss_grad(theta.astype(np.float32), x.astype(np.float32), y, g32)
    assert g32.dtype == np.float32
    assert rel(loss32, m64.loss(theta, x, y)) < 1e-5
    assert rel(g32, g64) < 1e-4


def test_init_is_seeded_he_with_zero_biases():
    model = ConvNet((28, 28), [8, 16], [64], 10, 0.0, dtype=np.float64)
    a, b = model.init_params(4), model.init_params(4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, model.init_params(5))
    convs, layers = model.views(a)
    for k, bias in convs:
        assert not bias.any()
        assert abs(k.std() / np.sqrt(2.0 / k.shape[0]) - 1) < 0.1
    for l, (w, bias) in enumerate(layers):
        assert not bias.any()
        gain = 2.0 if l < len(layers) - 1 else 1.0
        assert abs(w.std() / np.sqrt(gain / w.shape[0]) - 1) < 0.1


# ----- the PyTorch twin --------------------------------------------------------------------------
def test_equals_torch_layers_with_the_same_weights():
    """Conv2d(5, padding=2) -> ReLU -> MaxPool2d(2), twice, Flatten, Linear: loss and
    gradient in float64 equal ours (weights mapped from our layout to torch's NCHW)."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed (hessmpi[torch])")
    model, theta, x, y = make("2-blocks-odd")
    (h, w, c), rows = model.image_shape, len(y)
    layers, c_in = [], c
    for c_out in model.channels:
        layers += [torch.nn.Conv2d(c_in, c_out, 5, padding=2), torch.nn.ReLU(),
                   torch.nn.MaxPool2d(2)]
        c_in = c_out
    sizes = [model.n_flat, *model.dense, model.n_classes]
    layers.append(torch.nn.Flatten())
    for l in range(len(sizes) - 1):
        layers.append(torch.nn.Linear(sizes[l], sizes[l + 1]))
        if l < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    net = torch.nn.Sequential(*layers).double()
    convs, dense = model.views(theta)
    convs_t = [m for m in net if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    hp, wp, cp = h // 4, w // 4, model.channels[-1]
    with torch.no_grad():
        for m, (k, b) in zip(convs_t, convs, strict=True):
            k5 = k.reshape(5, 5, m.in_channels, m.out_channels)
            m.weight.copy_(torch.from_numpy(k5.transpose(3, 2, 0, 1).copy()))
            m.bias.copy_(torch.from_numpy(b))
        for l, (m, (wl, b)) in enumerate(zip(linears, dense, strict=True)):
            if l == 0:      # our inputs are (h, w, c) ordered, torch's (c, h, w)
                wl = wl.reshape(hp, wp, cp, -1).transpose(2, 0, 1, 3).reshape(wl.shape)
            m.weight.copy_(torch.from_numpy(wl.T.copy()))
            m.bias.copy_(torch.from_numpy(b))
    xt = torch.from_numpy(x.reshape(rows, h, w, c).transpose(0, 3, 1, 2).copy())
    loss_t = torch.nn.functional.cross_entropy(net(xt), torch.from_numpy(y))
    loss_t.backward()
    grad = np.empty(model.n_params)
    loss = model.loss_grad(theta, x, y, grad) - 0.5 * model.l2 * theta @ theta
    assert rel(loss, loss_t.item()) < 1e-12
    gconvs, gdense = model.views(grad - model.l2 * theta)
    for m, (gk, gb) in zip(convs_t, gconvs, strict=True):
        gk5 = gk.reshape(5, 5, m.in_channels, m.out_channels).transpose(3, 2, 0, 1)
        assert rel(gk5, m.weight.grad.numpy()) < 1e-10
        assert rel(gb, m.bias.grad.numpy()) < 1e-10
    assert rel(gdense[-1][0].T, linears[-1].weight.grad.numpy()) < 1e-10


# ----- building it ------------------------------------------------------------------------------
CNN = {"name": "cnn", "channels": [4, 8], "dense": [16], "l2": 1e-4}


def test_build_model_needs_an_image_shape():
    with pytest.raises(UsageError, match="image_shape"):
        build_model(CNN, 64, 10, xp=np, dtype=np.float32)
    model = build_model(CNN, 64, 10, xp=np, dtype=np.float32, image_shape=(8, 8))
    assert isinstance(model, ConvNet) and model.n_flat == 2 * 2 * 8


def test_too_many_blocks_for_the_image_is_a_usage_error():
    with pytest.raises(UsageError, match=r"model.channels = \[4, 8, 8, 8\].*fewer"):
        build_model({**CNN, "channels": [4, 8, 8, 8]}, 64, 10, xp=np, dtype=np.float32,
                    image_shape=(8, 8))


@pytest.mark.parametrize(("args", "match"), [
    (((8,), [2], [], 2, 0.0), "image_shape"),
    (((8, 8), [], [], 2, 0.0), "channels"),
    (((8, 8), [2, 0], [], 2, 0.0), "channels"),
])
def test_bad_geometry_is_refused(args, match):
    with pytest.raises(ValueError, match=match):
        ConvNet(*args)
