"""Model plug-ins: the configuration of model.name = "python:MODULE:FACTORY" and
"torch:MODULE:FACTORY" and model.options; loading a plug-in (dotted module from the working
directory or a .py path), the checks before the first step (each bad plug-in a UsageError
naming it), failures while training, methods that need curvature products; and a run with
a plug-in equal, bit for bit, to the built-in model it wraps."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
from harness import make_dataset, run_config, start_run
from toymodels import PLUGINS

from hessmpi import config
from hessmpi.data import Shard
from hessmpi.errors import UsageError
from hessmpi.models import (
    PluginError,
    PluginModel,
    build_model,
    model_for,
    model_identity,
    require_curvature,
)
from hessmpi.objective import Objective
from hessmpi.optim import build_optimizer

PY = f"python:{PLUGINS}"


# ----- configuration ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["python:mod:make", "python:pkg.sub.mod:Make_2",
                                  "torch:nets:build", "python:dir/my model.py:f",
                                  "torch:/abs/path/m.py:f", "python:../up.py:factory"])
def test_plugin_names_are_accepted(name):
    assert config.load(None, [f"model.name={name!r}"])["model"]["name"] == name


@pytest.mark.parametrize("name", ["python:mod", "python::f", "python:mod:", "torch:mod:1f",
                                  "jax:mod:f", "python:mod.:f", "python:mod:f.g",
                                  "python:a:b:c"])
def test_malformed_plugin_names_are_refused_with_the_forms(name):
    with pytest.raises(UsageError) as e:
        config.load(None, [f"model.name={name!r}"])
    for needle in ("model.name", "'cnn'", "python:MODULE:FACTORY", "torch:MODULE:FACTORY"):
        assert needle in str(e.value)


@pytest.mark.parametrize(("name", "family"), [
    ("python:a.b:f", "python"), ("torch:x.py:f", "torch"), ("cnn", "cnn"), ("mlp", "mlp"),
    ("secant", "secant"), ("python", "python"), (None, None)])
def test_family(name, family):
    assert config.family(name) == family


def test_options_by_file_dotted_set_and_inline_table(tmp_path):
    path = tmp_path / "plug.toml"
    path.write_text(f'[model]\nname = "{PY}:dense_plugin"\n[model.options]\n'
                    'hidden = [4]\nactivation = "tanh"\n')
    cfg = config.load(path, ["model.options.l2=0.5", "model.options.hidden=[3, 2]"])
    assert cfg["model"]["options"] == {"hidden": [3, 2], "activation": "tanh", "l2": 0.5}
    cfg = config.load(path, ["model.options={nested = {a = 1}, s = 'x'}"])
    assert cfg["model"]["options"] == {"nested": {"a": 1}, "s": "x"}
    assert config.from_toml(config.to_toml(cfg)) == cfg      # stored and read back
    opts = config.options(cfg, "model")
    assert opts.options == {"nested": {"a": 1}, "s": "x"} and not hasattr(opts, "l2")


@pytest.mark.parametrize(("sets", "needles"), [
    (["model.options.width=3"], ["model.options", "does not apply", "model.name = 'softmax'",
                                 "'python:MODULE:FACTORY'"]),
    (["model.name=cnn", "model.options={width = 3}"], ["model.options", "'cnn'"]),
    ([f"model.name={PY}:f", "model.l2=0.5"], ["model.l2", "does not apply", "'cnn'",
                                              "'torch:MODULE:FACTORY'"]),
    (["model.name=mlp", "model.channels=[8]"], ["model.channels", "model.name = 'cnn'"]),
    ([f"model.name={PY}:f", "model.hidden=[8]"], ["model.hidden", "'mlp'"]),
    ([f"model.name={PY}:f", "model.options=3"], ["model.options", "a table"]),
    ([f"model.name={PY}:f", "model.options={when = 1979-05-27}"], ["model.options"]),
])
def test_plugin_keys_where_they_do_not_apply_are_refused(sets, needles):
    with pytest.raises(UsageError) as e:
        config.load(None, sets)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_plugin_and_cnn_keys_fix_the_model():
    a = config.load(None, [f"model.name={PY}:f", "model.options.w=1"])
    b = config.load(None, [f"model.name={PY}:f", "model.options.w=2"])
    assert config.fixed_keys_differ(a, b) == ["model.options"]
    c = config.load(None, ["model.name=cnn"])
    d = config.load(None, ["model.name=cnn", "model.channels=[8]", "model.dense=[]"])
    assert config.fixed_keys_differ(c, d) == ["model.channels", "model.dense"]


def test_model_identity_keeps_the_dense_signatures_and_names_plugins():
    """Checkpoints of the dense networks written before these keys existed still match;
    a plug-in's signature holds its name and options, the cnn's its widths."""
    dense = model_identity(config.load(None, ["model.name=mlp"]))
    assert set(dense) == {"name", "hidden", "activation", "encoder", "l2"}
    plug = model_identity(config.load(None, [f"model.name={PY}:f", "model.options.w=1"]))
    assert plug["name"] == f"{PY}:f" and plug["options"] == {"w": 1}
    assert {"channels", "dense"} <= set(model_identity(config.load(None, ["model.name=cnn"])))


# ----- loading ----------------------------------------------------------------------------------
def plugin_cfg(factory, module=PLUGINS, family="python", **options):
    return {"name": f"{family}:{module}:{factory}", "options": options, "l2": 0.0}


def shard(rows=20, d=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return Shard(x=rng.standard_normal((rows, d)).astype(np.float32),
                 y=rng.integers(0, classes, rows), offset=0, total=rows, n_classes=classes,
                 source="test")


def test_options_xp_and_dtype_reach_the_factory():
    model = build_model(plugin_cfg("dense_plugin", hidden=[5, 4]), 6, 3, xp=np,
                        dtype=np.float32)
    assert isinstance(model, PluginModel)
    assert model.n_params == 6 * 5 + 5 + 5 * 4 + 4 + 4 * 3 + 3
    assert model.xp is np and model.dtype == np.float32
    assert model.inner._net.dtype == np.float32
    assert not hasattr(model, "curvature_product")
    assert hasattr(build_model(plugin_cfg("dense_plugin", curvature=True), 6, 3, xp=np,
                               dtype=np.float32), "curvature_product")


def test_a_dotted_module_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "userpkg").mkdir()
    (tmp_path / "userpkg" / "__init__.py").write_text("")
    (tmp_path / "userpkg" / "nets_a1.py").write_text(textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {str(PLUGINS.rsplit('/', 1)[0])!r})
        from toymodels import dense_plugin

        def make(n_features, n_classes, *, xp, dtype, width):
            return dense_plugin(n_features, n_classes, xp=xp, dtype=dtype, hidden=[width])
        """))
    monkeypatch.chdir(tmp_path)
    model = model_for(plugin_cfg("make", "userpkg.nets_a1", width=7), shard(), xp=np,
                      dtype=np.float64, seed=0)
    assert model.n_params == 6 * 7 + 7 + 7 * 3 + 3


# (factory or module:factory, options, what the message must say)
BAD = {
    "no module": ("no_such_module_x:make", {}, ["no module 'no_such_module_x'"]),
    "no file": ("missing/file.py:make", {}, ["no file missing/file.py"]),
    "no factory": ("no_such_factory", {}, ["has no 'no_such_factory'"]),
    "not callable": ("PLUGINS", {}, ["is not callable (str)"]),
    "factory raises": ("raising_plugin", {"width": 3}, ["raising_plugin(6, 3, width=3)",
                                                        "ValueError: width 3 must be even"]),
    "unknown option": ("dense_plugin", {"widht": 3}, ["unexpected keyword argument 'widht'"]),
    "not a model": ("not_a_model", {}, ["dict has no init_params, loss, loss_grad, evaluate",
                                        "not a model"]),
    "wrong length": ("wrong_length_plugin", {}, ["init_params(0) returned shape (84,)",
                                                 "(n_params,) = (83,)"]),
    "wrong shapes": ("wrong_shape_plugin", {}, ["failed in loss_grad", "ValueError"]),
    "non-finite first loss": ("nan_loss_plugin", {}, ["loss_grad is nan",
                                                      "non-finite first loss"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_plugins_are_usage_errors_naming_them(case):
    factory, options, needles = BAD[case]
    cfg = plugin_cfg(factory, **options) if ":" not in factory else {
        "name": f"python:{factory}", "options": options, "l2": 0.0}
    with pytest.raises(UsageError) as e:
        model_for(cfg, shard(d=6), xp=np, dtype=np.float64, seed=0)
    assert repr(cfg["name"]) in str(e.value)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_a_module_failing_to_import_is_named(tmp_path, monkeypatch):
    (tmp_path / "broken_b2.py").write_text("import no_such_dependency_b2\n")
    (tmp_path / "syntax_b2.py").write_text("def f(:\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="importing broken_b2 failed: ModuleNotFoundError.*"
                                         "no_such_dependency_b2"):
        build_model(plugin_cfg("f", "broken_b2"), 6, 3, xp=np, dtype=np.float64)
    with pytest.raises(UsageError, match="importing syntax_b2.py failed: SyntaxError"):
        build_model(plugin_cfg("f", "syntax_b2.py"), 6, 3, xp=np, dtype=np.float64)


def test_a_failure_while_training_is_a_plugin_error_naming_it():
    model = build_model(plugin_cfg("dense_plugin", fail=[0, 2]), 6, 3, xp=np,
                        dtype=np.float64)
    data = shard()
    theta, grad = model.init_params(0), np.empty(model.n_params)
    model.loss_grad(theta, data.x.astype(np.float64), data.y, grad)
    with pytest.raises(PluginError, match=f"model plug-in '{PY}:dense_plugin' failed in "
                                          "loss_grad: RuntimeError: injected plug-in failure"):
        model.loss_grad(theta, data.x.astype(np.float64), data.y, grad)


# ----- methods that need curvature products -------------------------------------------------------
def test_require_curvature_names_the_method_and_the_model():
    bare = build_model(plugin_cfg("dense_plugin"), 6, 3, xp=np, dtype=np.float64)
    with pytest.raises(UsageError, match=f"optim.name = 'hessian_free' needs.*model "
                                         f"'{PY}:dense_plugin' has no curvature_product"):
        require_curvature(bare, "hessian_free")
    require_curvature(build_model(plugin_cfg("dense_plugin", curvature=True), 6, 3, xp=np,
                                  dtype=np.float64), "hessian_free")


def test_build_optimizer_refuses_for_a_method_that_declares_it(solo):
    """Hessian-free needs Gauss-Newton products: a plug-in without them is refused."""
    opts = config.options(config.load(None, ["optim.name=hessian_free"]), "optim")
    for curvature, refused in ((False, True), (True, False)):
        model = build_model(plugin_cfg("dense_plugin", curvature=curvature), 6, 3, xp=np,
                            dtype=np.float64)
        theta = np.zeros(model.n_params)
        if refused:
            with pytest.raises(UsageError, match="optim.name = 'hessian_free' needs"):
                build_optimizer(opts, theta, Objective(model, solo), seed=0)
        else:
            build_optimizer(opts, theta, Objective(model, solo), seed=0)


# ----- a run with a plug-in is the run of the model it wraps ----------------------------------
@pytest.mark.parametrize("optim", [["optim.name=sgd"],
                                   ["optim.name=secant", "optim.pairs=history",
                                    "optim.line_search=armijo", "optim.momentum=0"]])
def test_a_plugin_run_equals_the_builtin_run_bit_for_bit(solo, tmp_path, optim):
    data = make_dataset(solo, tmp_path)
    common = ["train.steps=9", "train.batch_size=8", "train.log_every=3", *optim]
    builtin = start_run(run_config(data, "model.name=mlp", "model.hidden=[5]",
                                   "model.l2=0.001", *common), solo, tmp_path / "a")
    plugin = start_run(run_config(data, f"model.name={PY}:dense_plugin",
                                  "model.options={hidden = [5], l2 = 0.001}", *common),
                       solo, tmp_path / "b")
    assert isinstance(plugin.model, PluginModel)
    a, b = builtin.run(), plugin.run()
    np.testing.assert_array_equal(plugin.theta, builtin.theta)
    assert a["train_loss"] == b["train_loss"] and a["test_acc"] == b["test_acc"]


@pytest.mark.parametrize(("name", "label"), [
    ("mlp", "-mlp-sgd"),
    (f"python:{PLUGINS}:dense_plugin", "-python-toymodels.py-dense_plugin-sgd"),
    ("torch:pkg.nets:make", "-torch-pkg.nets-make-sgd")])
def test_the_default_run_directory_of_a_plugin_is_one_folder_under_runs(name, label):
    from hessmpi.cli import _default_out

    out = _default_out({"model": {"name": name}, "optim": {"name": "sgd"}})
    assert out.parent.name == "runs" and out.name.endswith(label), out
