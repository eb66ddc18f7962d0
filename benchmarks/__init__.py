"""sessionbus benchmarks: a registry of named measurements and a runner.

``python -m benchmarks`` runs everything (``--quick`` for small sizes, ``--only NAME``
for some) and writes ``benchmarks/results/<UTC timestamp>.json``. A new measurement is a
``@measurement(...)`` set-up in a module listed in ``benchmarks.runner.MODULES``; see
``benchmarks.registry``. Nothing is imported here, so a measurement module can also run
as a child process (``python -m benchmarks.memory``).
"""
