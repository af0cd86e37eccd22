"""hessmpi: data-parallel SGD accelerated by an inverse-Hessian approximation built from the
workers' secant pairs (Arnold & Wang 2017)."""

__version__ = "0.1.0"
