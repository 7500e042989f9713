"""Measure the link the workers actually got: gloo all-reduce time against message size.

Run on every rank (``torchrun -m benchmarks.harness.probe --out DIR``); rank 0 writes
``probe.json`` with the median time per size and a least-squares fit ``t = a + b * bytes``.
``1 / b`` is the effective all-reduce bandwidth (the bus bandwidth of the ring: bytes moved per
rank are 2(n-1)/n times the message), ``a`` the fixed cost per call (the alpha term). The
benchmark records it beside each run so that its table says what link the numbers were measured
on, and the projection can be checked against it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

DEFAULT_SIZES_KIB = (4, 64, 512, 2048, 8192)


def measure(sizes_bytes: list[int], reps: int, budget_s: float) -> list[dict]:
    """Median seconds of a blocking all-reduce (sum, float32) per size, every rank in lockstep."""
    out = []
    deadline = time.perf_counter() + budget_s
    for nbytes in sizes_bytes:
        t = torch.ones(max(1, nbytes // 4))
        dist.all_reduce(t)  # warm the connection for this size
        times = []
        for _ in range(reps):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(t)
            times.append(time.perf_counter() - start)
            # Every rank must run the same number of calls, so agree on stopping early.
            stop = torch.tensor([1.0 if time.perf_counter() > deadline else 0.0])
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
            if stop.item():
                break
        # A rank's own time includes waiting for the slowest: take the max across ranks per call.
        times_t = torch.tensor(times, dtype=torch.float64)
        dist.all_reduce(times_t, op=dist.ReduceOp.MAX)
        out.append({"bytes": t.numel() * 4, "median_s": statistics.median(times_t.tolist()), "reps": len(times)})
    return out


def fit(points: list[dict], world: int) -> dict:
    """Least-squares ``t = a + b*bytes``; report alpha (a), all-reduce bandwidth and bus bandwidth."""
    xs = [p["bytes"] for p in points]
    ys = [p["median_s"] for p in points]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
    a = my - b * mx
    ring = 2 * (world - 1) / world if world > 1 else 1.0
    return {
        "alpha_s": max(a, 0.0),
        "seconds_per_byte": b,
        "allreduce_mbit_s": 8 / b / 1e6 if b > 0 else float("inf"),
        # A ring moves 2(n-1)/n of the message per rank, so the link carried this much:
        "link_mbit_s": ring * 8 / b / 1e6 if b > 0 else float("inf"),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for probe.json (written by rank 0)")
    ap.add_argument("--sizes-kib", type=int, nargs="+", default=list(DEFAULT_SIZES_KIB))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=30.0, help="stop repeating a size after this much time")
    args = ap.parse_args(argv)
    dist.init_process_group("gloo")
    try:
        world = dist.get_world_size()
        points = measure([k * 1024 for k in args.sizes_kib], args.reps, args.budget_s)
        if dist.get_rank() == 0:
            result = {"world_size": world, "points": points, "fit": fit(points, world)}
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "probe.json").write_text(json.dumps(result, indent=1))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
