"""hessmpi: data-parallel SGD accelerated by an inverse-Hessian approximation built from the workers."""

__version__ = "0.1.0"
