"""The time-to-quality benchmark: DDP, Local SGD, DiLoCo and PALSGD side by side over a slow link.

* :mod:`.netns`: one network namespace per worker, links shaped with ``tc tbf``, teardown.
* :mod:`.launch`: one torchrun per worker inside its namespace (or one on loopback).
* :mod:`.probe`: the link as the workers see it (all-reduce time vs size).
* :mod:`.runner`: one training run per method with the same model, data, seed and token budget.
* :mod:`.overhead`: PALSGD's own cost per step and its memory, without communication.
* :mod:`.report`: JSON, a markdown table and PNG plots.
* :mod:`.projection`: an alpha-beta model of cluster scale from the measured compute time.
* :mod:`.cli`: ``python benchmarks/bench.py`` / ``palsgd-hf bench``.

Nothing here is imported by the training path; it only drives it.
"""
