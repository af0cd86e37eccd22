"""Model plug-ins: ``model.name = "python:MODULE:FACTORY"`` or ``"torch:MODULE:FACTORY"``.

MODULE is a dotted module importable from the run's working directory (which is put first
on ``sys.path``) or a path to a ``.py`` file (relative to the working directory); FACTORY
is a function in it. hessmpi calls

    python:  FACTORY(n_features, n_classes, xp=xp, dtype=dtype, **model.options)
             -> an object following :class:`hessmpi.models.protocol.Model`
    torch:   FACTORY(n_features, n_classes, **model.options) -> a torch.nn.Module
             (wrapped by :class:`hessmpi.models.torch_adapter.TorchModel`)

Everything that can go wrong before training is a :class:`UsageError` naming the plug-in
(exit status 2, before any step): a module that does not import, a missing factory, a
factory that raises, an object that is not a model, wrong shapes, a non-finite loss at
the initial parameters (:func:`check_plugin`). Once training runs, an exception inside the
plug-in is a :class:`PluginError` naming the plug-in, the method and the cause; the
command line ends every rank with it (exit status 1).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from hessmpi.config import PLUGIN_FAMILIES
from hessmpi.errors import UsageError

#: The methods every model must have (curvature_product is optional).
REQUIRED = ("init_params", "loss", "loss_grad", "evaluate")
#: Rows of this rank's training shard on which a plug-in is tried before the first step.
CHECK_ROWS = 8


class PluginError(RuntimeError):
    """A model plug-in raised while training (exit status 1, every rank ended)."""


def parse(name: str) -> tuple[str, str, str]:
    """(family, MODULE, FACTORY) of ``"python:MODULE:FACTORY"`` (or ``torch:``)."""
    family, _, rest = name.partition(":")
    module, _, factory = rest.rpartition(":")
    if family not in PLUGIN_FAMILIES or not module or not factory:
        raise ValueError(f"not a plug-in name: {name!r}")
    return family, module, factory


def _import(module: str, name: str):
    """The module MODULE of plug-in ``name``: a dotted name importable from the working
    directory, or a path to a .py file."""
    try:
        if module.endswith(".py"):
            path = Path(module).resolve()
            if not path.is_file():
                raise UsageError(f"model plug-in {name!r}: no file {module} (relative to the "
                                 f"working directory {os.getcwd()})")
            # one module per file, named after its path, so a resumed run finds it again
            unique = "hessmpi_plugin_" + hashlib.blake2b(str(path).encode(),
                                                         digest_size=6).hexdigest()
            if unique in sys.modules:
                return sys.modules[unique]
            spec = importlib.util.spec_from_file_location(unique, path)
            loaded = importlib.util.module_from_spec(spec)
            sys.modules[unique] = loaded
            try:
                spec.loader.exec_module(loaded)
            except BaseException:
                del sys.modules[unique]
                raise
            return loaded
        cwd = os.getcwd()
        if cwd not in sys.path:
            sys.path.insert(0, cwd)
        return importlib.import_module(module)
    except UsageError:
        raise
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            raise UsageError(f"model plug-in {name!r}: no module {module!r} importable from "
                             f"the working directory {os.getcwd()} (a dotted module name, "
                             "or a path ending in .py)") from None
        raise UsageError(f"model plug-in {name!r}: importing {module} failed: "
                         f"{type(e).__name__}: {e}") from None
    except Exception as e:  # noqa: BLE001 - anything the module's own code raises
        raise UsageError(f"model plug-in {name!r}: importing {module} failed: "
                         f"{type(e).__name__}: {e}") from None


def factory_of(name: str):
    """The FACTORY function of plug-in ``name``; UsageError if it cannot be had."""
    _, module, factory = parse(name)
    loaded = _import(module, name)
    fn = getattr(loaded, factory, None)
    if fn is None:
        raise UsageError(f"model plug-in {name!r}: module {module} has no {factory!r}")
    if not callable(fn):
        raise UsageError(f"model plug-in {name!r}: {module}.{factory} is not callable "
                         f"({type(fn).__name__})")
    return fn


def call_factory(name: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; an exception becomes a UsageError naming the plug-in."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the user's code: any failure is bad input
        shown = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items()
                                                  if k not in ("xp", "dtype"))])
        raise UsageError(f"model plug-in {name!r}: {getattr(fn, '__name__', 'FACTORY')}"
                         f"({shown}) raised {type(e).__name__}: {e}") from None


def load_plugin(model_cfg: dict, n_features: int, n_classes: int, *, xp: Any, dtype: Any):
    """The model of plug-in ``model_cfg["name"]`` for data of ``n_features`` inputs and
    ``n_classes`` classes, wrapped in a :class:`PluginModel`; UsageError for anything
    wrong with it that shows before it is tried on data (:func:`check_plugin` does that)."""
    name, options = model_cfg["name"], dict(model_cfg["options"])
    family = parse(name)[0]
    fn = factory_of(name)
    if family == "torch":
        from hessmpi.models.torch_adapter import torch_plugin

        model = torch_plugin(name, fn, n_features, n_classes, options,
                             l2=model_cfg["l2"], xp=xp, dtype=dtype)
    else:
        model = call_factory(name, fn, n_features, n_classes, xp=xp, dtype=dtype, **options)
    missing = [m for m in REQUIRED if not callable(getattr(model, m, None))]
    n_params = getattr(model, "n_params", None)
    if missing:
        raise UsageError(f"model plug-in {name!r}: the factory's {type(model).__name__} "
                         f"has no {', '.join(missing)}: not a model (see the model protocol, "
                         "hessmpi.models.protocol)")
    if isinstance(n_params, bool) or not isinstance(n_params, (int, np.integer)) \
            or n_params < 1:
        raise UsageError(f"model plug-in {name!r}: n_params = {n_params!r} is not a positive "
                         "integer")
    return PluginModel(model, name, xp=xp, dtype=dtype)


class PluginModel:
    """A plug-in's model as hessmpi uses it: the protocol's methods, each passed to the
    plug-in; ``n_params``, ``xp``, ``dtype`` are hessmpi's. An exception inside the
    plug-in becomes a :class:`PluginError` naming it. ``curvature_product`` exists only
    where the plug-in has one. ``name``: the plug-in (model.name); ``inner``: its model."""

    def __init__(self, inner, name: str, *, xp: Any, dtype: Any):
        self.inner, self.name = inner, name
        self.n_params = int(inner.n_params)
        self.xp, self.dtype = xp, np.dtype(dtype)
        if callable(getattr(inner, "curvature_product", None)):
            self.curvature_product = self._curvature_product

    def _call(self, method: str, *args):
        try:
            return getattr(self.inner, method)(*args)
        except Exception as e:  # noqa: BLE001 - the user's code: name it, end the run
            raise PluginError(f"model plug-in {self.name!r} failed in {method}: "
                              f"{type(e).__name__}: {e}") from e

    def init_params(self, seed: int) -> np.ndarray:
        """The plug-in's initial theta as a contiguous host array of hessmpi's dtype;
        PluginError if it is not (n_params,) and finite."""
        theta = self._call("init_params", seed)
        try:
            host = np.array(theta, dtype=self.dtype, copy=True)
        except Exception as e:  # noqa: BLE001 - e.g. a device array
            raise PluginError(f"model plug-in {self.name!r}: init_params({seed}) returned "
                              f"a {type(theta).__name__}, not a host (NumPy) array of "
                              f"floats ({e})") from None
        if host.shape != (self.n_params,):
            raise PluginError(f"model plug-in {self.name!r}: init_params({seed}) returned "
                              f"shape {host.shape}, expected (n_params,) = "
                              f"({self.n_params},)")
        if not np.isfinite(host).all():
            raise PluginError(f"model plug-in {self.name!r}: init_params({seed}) holds "
                              "non-finite values")
        return host

    def loss(self, theta, x, y):
        return self._call("loss", theta, x, y)

    def loss_grad(self, theta, x, y, grad):
        return self._call("loss_grad", theta, x, y, grad)

    def evaluate(self, theta, x, y):
        return self._call("evaluate", theta, x, y)

    def _curvature_product(self, theta, v, x, y, out=None):
        return self._call("curvature_product", theta, v, x, y, out)


def check_plugin(model: PluginModel, x, y, seed: int) -> None:
    """Try plug-in ``model`` at its initial parameters on rows (x, y) of the model's array
    module (a few training rows): init_params, loss, loss_grad, evaluate and any
    curvature_product must run and give the documented shapes and finite values.
    UsageError naming the plug-in and what is wrong otherwise."""
    xp, n, name = model.xp, model.n_params, model.name
    try:
        theta = xp.asarray(model.init_params(seed))
        grad = xp.zeros(n, dtype=model.dtype)
        _finite_float(model.loss_grad(theta, x, y, grad), "loss_grad")
        if not bool(xp.isfinite(grad).all()):
            raise PluginError("loss_grad wrote a non-finite gradient at the initial "
                              "parameters")
        _finite_float(model.loss(theta, x, y), "loss")
        result = model.evaluate(theta, x, y)
        if not (isinstance(result, tuple) and len(result) == 2):
            raise PluginError(f"evaluate returned {type(result).__name__}, not (sum of "
                              "losses, number correct)")
        _finite_float(result[0], "evaluate's sum of losses")
        if hasattr(model, "curvature_product"):
            out = xp.zeros(n, dtype=model.dtype)
            model.curvature_product(theta, grad, x, y, out)
            if not bool(xp.isfinite(out).all()):
                raise PluginError("curvature_product wrote non-finite values")
    except PluginError as e:
        detail = str(e).removeprefix(f"model plug-in {name!r}").lstrip(": ")
        raise UsageError(f"model plug-in {name!r} does not work on the first rows of the "
                         f"training data: {detail}") from None


def _finite_float(value, what: str) -> float:
    """float(value), PluginError unless it is a finite number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PluginError(f"{what} returned {type(value).__name__}, not a number") from None
    if not math.isfinite(number):
        raise PluginError(f"{what} is {number} at the initial parameters (a non-finite "
                          "first loss)") from None
    return number
