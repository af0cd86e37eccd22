"""The PyTorch adapter against its twin: a torch.nn.Sequential of Linear layers, given the
weights of a built-in DenseNet, must have the DenseNet's loss, gradient, Gauss-Newton
product and evaluation (float64); theta is shared with torch, never copied."""

from __future__ import annotations

import numpy as np
import pytest
from harness import rel
from toymodels import PLUGINS, torch_mlp, torch_theta_from_dense, torch_with_buffers

from hessmpi.errors import UsageError
from hessmpi.models import DenseNet, build_model
from hessmpi.models.plugin import PluginModel

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install "
                            "'hessmpi[torch]'; make install does)")
from hessmpi.models.torch_adapter import TorchModel  # noqa: E402

CASES = {"softmax": ([], "relu"), "relu": ([6], "relu"), "tanh-2": ([5, 4], "tanh")}


def twins(case, *, l2=1e-3, rows=9, d=7, classes=3, seed=0):
    """(DenseNet, its theta, TorchModel of the torch twin, the twin's theta, x, y)."""
    hidden, act = CASES[case]
    net = DenseNet([d, *hidden, classes], act, l2, xp=np, dtype=np.float64)
    layers = []
    for l, (fi, fo) in enumerate(zip(net.sizes[:-1], net.sizes[1:], strict=True)):
        layers.append(torch.nn.Linear(fi, fo))
        if l < len(net.sizes) - 2:
            layers.append({"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}[act]())
    model = TorchModel(torch.nn.Sequential(*layers), l2=l2, xp=np, dtype=np.float64)
    rng = np.random.default_rng(seed)
    theta = 0.5 * rng.standard_normal(net.n_params)
    x, y = rng.standard_normal((rows, d)), rng.integers(0, classes, rows)
    return net, theta, model, torch_theta_from_dense(net, theta), x, y


@pytest.mark.parametrize("case", CASES)
def test_loss_and_gradient_equal_the_densenet(case):
    net, theta, model, theta_t, x, y = twins(case)
    assert model.n_params == net.n_params
    g_net, g_t = np.empty(net.n_params), np.full(net.n_params, np.nan)
    want = float(net.loss_grad(theta, x, y, g_net))
    assert rel(model.loss_grad(theta_t, x, y, g_t), want) < 1e-13
    assert rel(model.loss(theta_t, x, y), want) < 1e-13
    assert rel(g_t, torch_theta_from_dense(net, g_net)) < 1e-12


@pytest.mark.parametrize("case", CASES)
def test_curvature_product_equals_the_densenet(case):
    net, theta, model, theta_t, x, y = twins(case)
    v = np.random.default_rng(5).standard_normal(net.n_params)
    want = torch_theta_from_dense(net, net.curvature_product(theta, v, x, y))
    out = np.full(net.n_params, np.nan)
    assert model.curvature_product(theta_t, torch_theta_from_dense(net, v), x, y, out) is out
    assert rel(out, want) < 1e-12


def test_evaluate_equals_the_densenet():
    net, theta, model, theta_t, x, y = twins("relu", rows=40)
    model.chunk = 7
    (loss_t, correct_t), (loss, correct) = model.evaluate(theta_t, x, y), \
        net.evaluate(theta, x, y)
    assert rel(loss_t, loss) < 1e-13 and correct_t == correct


def test_float32():
    net, theta, model, theta_t, x, y = twins("relu")
    m32 = TorchModel(torch_mlp(7, 3, hidden=6), l2=1e-3, xp=np, dtype=np.float32)
    g = np.empty(m32.n_params, dtype=np.float32)
    value = m32.loss_grad(theta_t.astype(np.float32), x.astype(np.float32), y, g)
    g64 = np.empty(net.n_params)
    assert rel(value, net.loss_grad(theta, x, y, g64)) < 1e-5
    assert rel(g, torch_theta_from_dense(net, g64)) < 1e-4


def test_theta_is_shared_with_torch_not_copied():
    """The module's parameters in a call are views of theta's memory; the module's own
    parameters are never written."""
    _, _, model, theta_t, x, y = twins("relu")
    before = [p.detach().clone() for p in model.module.parameters()]
    flat = model._tensor(theta_t)
    assert flat.data_ptr() == theta_t.ctypes.data
    params = model._params(flat)
    assert all(p.data_ptr() == theta_t.ctypes.data + 8 * int(off)
               for p, off in zip(params.values(), model.offsets, strict=False))
    model.loss_grad(theta_t, x, y, np.empty(model.n_params))
    assert all(torch.equal(a, b) for a, b in zip(before, model.module.parameters(),
                                                 strict=True))


def test_init_params_is_the_factory_under_the_seed():
    """init(seed) under torch.manual_seed(seed): seeded, the global RNG state left alone."""
    model = TorchModel(torch_mlp(7, 3), xp=np, dtype=np.float64,
                       init=lambda seed: torch_mlp(7, 3))
    state = torch.random.get_rng_state()
    a, b, c = model.init_params(1), model.init_params(1), model.init_params(2)
    assert torch.equal(state, torch.random.get_rng_state())
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and a.dtype == np.float64 and a.shape == (model.n_params,)
    torch.manual_seed(1)
    want = torch.nn.utils.parameters_to_vector(torch_mlp(7, 3).parameters()).detach()
    np.testing.assert_array_equal(a, want.double().numpy())


def test_modules_with_buffers_are_refused():
    with pytest.raises(ValueError, match="buffers"):
        TorchModel(torch_with_buffers(5, 3), xp=np)


def test_the_torch_plugin_through_build_model():
    cfg = {"name": f"torch:{PLUGINS}:torch_mlp", "options": {"hidden": 5}, "l2": 0.0}
    model = build_model(cfg, 7, 3, xp=np, dtype=np.float32)
    assert isinstance(model, PluginModel) and isinstance(model.inner, TorchModel)
    assert model.n_params == 7 * 5 + 5 + 5 * 3 + 3
    assert hasattr(model, "curvature_product")
    theta = model.init_params(3)
    assert theta.dtype == np.float32
    np.testing.assert_array_equal(theta, model.init_params(3))


@pytest.mark.parametrize(("factory", "options", "match"), [
    ("torch_not_a_module", {}, "returned a str, not a torch.nn.Module"),
    ("torch_with_buffers", {}, "buffers"),
    ("torch_mlp", {"width": 3}, "unexpected keyword argument 'width'"),
])
def test_bad_torch_plugins_are_usage_errors(factory, options, match):
    cfg = {"name": f"torch:{PLUGINS}:{factory}", "options": options, "l2": 0.0}
    with pytest.raises(UsageError, match=match) as e:
        build_model(cfg, 7, 3, xp=np, dtype=np.float32)
    assert cfg["name"] in str(e.value)
