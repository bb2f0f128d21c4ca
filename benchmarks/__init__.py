"""ldpruner's studies: the measurements behind the numbers in the notes (selection baselines, score vs damage,
analysis cost, distillation quality, full-size tracing), run from a clone as ``python -m benchmarks.<study>``.

They use the public surface of ``ldpruner`` (the API, the passes, ``ldpruner.bench``); nothing in the product
imports them, and they are not shipped in the wheel. The shipped bench stage (``ldpruner bench``) is
``ldpruner.bench``.
"""
