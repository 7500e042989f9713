#!/usr/bin/env python
"""Benchmark time to quality of DDP, Local SGD, DiLoCo and PALSGD over an emulated slow link.

    sudo -E .venv/bin/python benchmarks/bench.py --rate-mbit 100          # the full benchmark (~1 h on 2 cores)
    python benchmarks/bench.py --tiny --netns off                          # seconds; harness check, loopback
    python benchmarks/bench.py project --from bench_out/results.json       # the projection to cluster scale

Also available as ``palsgd-hf bench ...``. See BENCHMARKS.md for the method and the latest results.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: benchmarks/ is not installed
from benchmarks.harness.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
