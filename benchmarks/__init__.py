"""The time-to-quality benchmarks of palsgd_hf: not installed with the library (run from a checkout).

``benchmarks/bench.py`` (also ``palsgd-hf bench`` in an editable install) runs DDP, Local SGD,
DiLoCo and PALSGD over an emulated slow link; ``benchmarks/harness/`` is its machinery (network
namespaces, launch, worker, reports, projection); ``benchmarks/overlap_bench.py`` compares the
overlap and bf16 variants. See BENCHMARKS.md.
"""
