"""A ``torch.nn.Module`` as a hessmpi model (``model.name = "torch:MODULE:FACTORY"``, extra
``hessmpi[torch]``).

hessmpi keeps theta as its own flat vector (numpy on CPU, cupy on GPU); the module's
parameters are views into it, made per call through DLPack (no copy: a torch tensor over
the same memory, on the CPU or the GPU), and ``torch.func.functional_call`` runs the module
with them. The objective is the built-ins':

    F(theta) = mean_i CE(softmax(module(x_i)), y_i) + (l2/2) * ||theta||^2

Gradients come from autograd; Gauss-Newton-vector products J^T H_CE J v + l2 v from
``torch.func.jvp`` (J v) and ``torch.func.vjp`` (J^T u). Layout of theta: the module's
``named_parameters()`` in order, each flattened row-major (torch's own layout, so
``torch.nn.utils.parameters_to_vector`` of the module is theta).

The module maps (B, n_features) floats to (B, n_classes) logits. It runs in eval mode (no
dropout: F must be a deterministic function of theta and the batch), and may hold no
buffers (BatchNorm's running statistics are state outside theta: use GroupNorm or
LayerNorm). Every parameter is trained, ``requires_grad`` or not.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hessmpi.errors import UsageError


def _torch():
    """The torch module; UsageError if it is not installed."""
    try:
        import torch
        import torch.func  # noqa: F401
    except ImportError as e:
        raise UsageError(f"a torch: model needs PyTorch ({e}): pip install 'hessmpi[torch]'") \
            from None
    return torch


class TorchModel:
    """module: the torch.nn.Module (its parameters give theta's layout; its own values
    are only the initial theta when ``init`` is None); l2: the L2 coefficient; xp, dtype:
    hessmpi's array module and floating type (the module is moved to xp's device and
    dtype); init: a function seed -> a module of the same parameter shapes, whose
    parameters are the initial theta (default: the module's current parameters,
    whatever the seed); chunk: rows per forward pass in :meth:`evaluate`."""

    def __init__(self, module, *, l2: float = 0.0, xp: Any = np, dtype: Any = np.float64,
                 init=None, chunk: int = 4096):
        torch = self.torch = _torch()
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"expected a torch.nn.Module, got {type(module).__name__}")
        buffers = [name for name, _ in module.named_buffers()]
        if buffers:
            raise ValueError(f"the module holds buffers ({', '.join(buffers[:4])}): state "
                             "outside theta (e.g. BatchNorm's running statistics) is not "
                             "supported; use GroupNorm or LayerNorm")
        self.xp, self.dtype, self.l2 = xp, np.dtype(dtype), float(l2)
        self.torch_dtype = {np.dtype(np.float32): torch.float32,
                            np.dtype(np.float64): torch.float64}[self.dtype]
        self.device = self._tensor(xp.zeros(1, dtype=self.dtype)).device
        self.module = module.to(device=self.device, dtype=self.torch_dtype).eval()
        self.names = [name for name, _ in module.named_parameters()]
        self.shapes = [tuple(p.shape) for _, p in module.named_parameters()]
        if not self.names:
            raise ValueError("the module has no parameters")
        self.offsets = np.cumsum([0, *(int(np.prod(s)) for s in self.shapes)])
        self.n_params = int(self.offsets[-1])
        self._init, self.chunk = init, chunk

    # ----- arrays and parameters --------------------------------------------------------
    def _tensor(self, a):
        """A torch tensor sharing the memory of array ``a`` of xp (DLPack)."""
        try:
            return self.torch.from_dlpack(a)
        except BufferError:          # a read-only array cannot be shared: copy it
            return self.torch.from_dlpack(self.xp.array(a, copy=True))

    def _params(self, flat) -> dict:
        """{name: view of the flat tensor ``flat`` (n,) shaped as the parameter}."""
        return {name: flat[self.offsets[i]:self.offsets[i + 1]].view(shape)
                for i, (name, shape) in enumerate(zip(self.names, self.shapes, strict=True))}

    def _logits(self, params: dict, xt):
        return self.torch.func.functional_call(self.module, params, (xt,))

    def _batch(self, x, y):
        return self._tensor(x), self._tensor(y)

    def init_params(self, seed: int) -> np.ndarray:
        """The initial theta (n,) on the host: the parameters of ``init(seed)`` (under
        torch.manual_seed(seed), the global RNG state kept), else of the module."""
        torch = self.torch
        if self._init is None:
            module = self.module
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                module = self._init(seed)
            shapes = [tuple(p.shape) for _, p in module.named_parameters()]
            if shapes != self.shapes:
                raise ValueError(f"the module built for seed {seed} has parameter shapes "
                                 f"{shapes}, not {self.shapes}")
        with torch.no_grad():
            flat = torch.nn.utils.parameters_to_vector(module.parameters())
        return flat.detach().to(device="cpu", dtype=self.torch_dtype).numpy().copy()

    # ----- the protocol ---------------------------------------------------------------------
    def _penalty(self, theta):
        return 0.5 * self.l2 * float(self.xp.dot(theta, theta))

    def loss(self, theta, x, y):
        """F on the batch (x (B, d), y (B,)) at theta, a float; forward pass only."""
        torch = self.torch
        xt, yt = self._batch(x, y)
        with torch.no_grad():
            ce = torch.nn.functional.cross_entropy(self._logits(self._params(
                self._tensor(theta)), xt), yt)
        return float(ce) + self._penalty(theta)

    def loss_grad(self, theta, x, y, grad):
        """F on the batch at theta (a float); writes grad F (n,) into ``grad``."""
        torch = self.torch
        xt, yt = self._batch(x, y)
        leaves = {k: v.detach().requires_grad_() for k, v in
                  self._params(self._tensor(theta)).items()}
        with torch.enable_grad():
            ce = torch.nn.functional.cross_entropy(self._logits(leaves, xt), yt)
            grads = torch.autograd.grad(ce, list(leaves.values()), allow_unused=True)
        with torch.no_grad():
            for view, g in zip(self._params(self._tensor(grad)).values(), grads, strict=True):
                view.copy_(g) if g is not None else view.zero_()
        if self.l2:
            grad += self.l2 * theta
        return float(ce.detach()) + self._penalty(theta)

    def curvature_product(self, theta, v, x, y, out=None):
        """G v (n,): the Gauss-Newton matrix of F on the batch times v, J^T H_CE J v + l2 v
        (J v by torch.func.jvp, J^T u by torch.func.vjp); written into ``out``."""
        torch = self.torch
        xt, yt = self._batch(x, y)
        primals = self._params(self._tensor(theta))
        tangents = self._params(self._tensor(v))

        def logits(params):
            return self._logits(params, xt)

        with torch.no_grad():
            z, jv = torch.func.jvp(logits, (primals,), (tangents,))
            p = torch.softmax(z, dim=1)
            u = p * jv                                    # H = diag(p) - p p^T per row
            u -= p * u.sum(dim=1, keepdim=True)
            u /= len(yt)
            _, pullback = torch.func.vjp(logits, primals)
            (gv,) = pullback(u)
        if out is None:
            out = self.xp.empty_like(theta)
        with torch.no_grad():
            for view, name in zip(self._params(self._tensor(out)).values(), self.names,
                                  strict=True):
                view.copy_(gv[name])
        if self.l2:
            out += self.l2 * v
        return out

    def evaluate(self, theta, x, y) -> tuple[float, float]:
        """(sum over the rows of the cross-entropy, number classified correctly), in
        chunks of ``chunk`` rows; the L2 term is not included."""
        torch = self.torch
        params = self._params(self._tensor(theta))
        loss_sum, correct = 0.0, 0
        with torch.no_grad():
            for s in range(0, len(y), self.chunk):
                xt, yt = self._batch(x[s:s + self.chunk], y[s:s + self.chunk])
                z = self._logits(params, xt)
                loss_sum += float(torch.nn.functional.cross_entropy(z, yt, reduction="sum"))
                correct += int((z.argmax(dim=1) == yt).sum())
        return loss_sum, correct


def _blas_threads() -> int | None:
    """The BLAS thread limit this process runs under (set by the backend), if known."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    counts = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]
    return min(counts) if counts else None


def torch_plugin(name: str, factory, n_features: int, n_classes: int, options: dict, *,
                 l2: float, xp: Any, dtype: Any) -> TorchModel:
    """The TorchModel of plug-in ``name`` (``torch:MODULE:FACTORY``): ``factory(n_features,
    n_classes, **options)`` builds the module (again under each seed for init_params);
    torch's threads follow the BLAS limit of the backend. UsageError naming the plug-in
    for anything wrong."""
    from hessmpi.models.plugin import call_factory

    torch = _torch()
    threads = _blas_threads()
    if threads:
        torch.set_num_threads(threads)
    module = call_factory(name, factory, n_features, n_classes, **options)
    if not isinstance(module, torch.nn.Module):
        raise UsageError(f"model plug-in {name!r}: the factory returned a "
                         f"{type(module).__name__}, not a torch.nn.Module")

    def init(seed):
        return call_factory(name, factory, n_features, n_classes, **options)

    try:
        return TorchModel(module, l2=l2, xp=xp, dtype=dtype, init=init)
    except ValueError as e:
        raise UsageError(f"model plug-in {name!r}: {e}") from None
