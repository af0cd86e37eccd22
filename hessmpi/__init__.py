"""hessmpi: data-parallel SGD accelerated by an inverse-Hessian approximation built from the
workers' secant pairs (Arnold & Wang 2017).

The Python API for your own SPMD script (:mod:`hessmpi.api`): ``DistributedOptimizer``,
``TorchModel``, ``FunctionModel``, ``read_shard``, ``Sampler``. They are imported on first
use, so that ``import hessmpi`` alone does not start MPI.
"""

__version__ = "0.1.0"

_API = ("DistributedOptimizer", "FunctionModel", "Sampler", "StepInfo", "TorchModel",
        "read_shard")


def __getattr__(name: str):
    if name in _API:
        from hessmpi import api

        return getattr(api, name)
    raise AttributeError(f"module 'hessmpi' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])
