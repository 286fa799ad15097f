"""Benchmarks, written as JSON (speed and memory live here, never in timed tests).

* ``python -m fairness.bench --out DIR`` (``make bench``): the training-iteration suite
  (:mod:`fairness.bench.suite`);
* ``python -m fairness.bench dft --model M --out FILE``: the adjusted-DFT iteration, official
  flow against ours (:mod:`fairness.bench.dft`).
"""
