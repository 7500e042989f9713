#!/usr/bin/env python
"""Benchmark time to quality of DDP, Local SGD, DiLoCo and PALSGD over an emulated slow link.

    sudo -E .venv/bin/python scripts/bench.py --rate-mbit 100          # the full benchmark (~1 h on 2 cores)
    python scripts/bench.py --tiny --netns off                          # seconds; harness check, loopback
    python scripts/bench.py project --from bench_out/results.json       # the projection to cluster scale

Also available as ``palsgd-hf bench ...``. See BENCHMARKS.md for the method and the latest results.
"""

import sys

from palsgd_hf.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
