"""The benchmark harness: what the scripts in ``benchmarks/`` share, one concept a module.

- :mod:`~hessmpi.bench.launch`: the one mpiexec command, workers started on a JSON spec,
  and the worker side's communicator and backend.
- :mod:`~hessmpi.bench.datasets`: dataset files built from ``../shared/data`` and the softmax
  optimum F* (cached).
- :mod:`~hessmpi.bench.drive`: the one run loop: a :class:`~hessmpi.trainer.Training` driven
  to a budget or to targets, with its curve of the full training objective.
- :mod:`~hessmpi.bench.tune`: the one tuner: a grid widened until its best point is interior.
- :mod:`~hessmpi.bench.split`: one SGD or secant step run by its public parts, each timed.
- :mod:`~hessmpi.bench.timing`: clocks, statistics, a quiet machine, the machine's limits.
- :mod:`~hessmpi.bench.tables`: aligned tables, cells, and results saved as JSON.

Nothing here is imported by the trainer; it uses only hessmpi's public names.
"""
