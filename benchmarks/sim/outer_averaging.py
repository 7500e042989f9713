"""Does PALSGD with plain-averaging outer steps catch up with Local SGD? Modeled time to DDP's final eval loss.

    .venv/bin/python -m benchmarks.sim.outer_averaging --out bench_out/outer --workers 2 --seeds 0,1,2

The defaults sitting (BENCHMARKS.md) found PALSGD behind Local SGD at K = 2: it needs more steps to DDP's loss.
This compares, at one K and peak LR 3e-3 (the scale table's setup: 256 steps, or 512 when 256 do not reach the
target, each with its own schedule), Local SGD at H 8 and 16, PALSGD with its defaults (outer Nesterov 0.7 / 0.5)
and PALSGD with outer SGD lr 1 (plain averaging, Local SGD's outer step) at H 16 and 8; all with 32 warm-up steps
and, for PALSGD, p 0.2 and pull c 0.1. Prints each run's modeled seconds to DDP's loss per seed and the median on
the three links of :mod:`benchmarks.sim.wall_time`. Times are *modeled*; losses are real. Reuses ``<out>``'s runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
from pathlib import Path
from typing import Iterable, Optional

import torch

from .sweep import Store, spec_of, times_of
from .wall_time import LINKS, time_to_target

LR = 3e-3
STEPS = 256
_PALSGD = dict(method="palsgd", warmup_steps=32, pull=0.1)
SETTINGS = {
    "Local SGD H 16": dict(method="localsgd", sync_interval=16, warmup_steps=32),
    "Local SGD H 8": dict(method="localsgd", sync_interval=8, warmup_steps=32),
    "PALSGD defaults (Nesterov 0.7 / 0.5, H 16)": dict(_PALSGD, sync_interval=16, outer_lr=0.7, outer_momentum=0.5),
    "PALSGD averaging (SGD 1, H 16)": dict(_PALSGD, sync_interval=16, outer_lr=1.0, outer_momentum=0.0),
    "PALSGD averaging (SGD 1, H 8)": dict(_PALSGD, sync_interval=8, outer_lr=1.0, outer_momentum=0.0),
}


def seconds_to_target(store: Store, workers: int, seed: int) -> dict[str, dict[str, Optional[float]]]:
    """{setting: {link: modeled seconds to DDP's final loss, or None}} for one seed (runs what is missing)."""
    args = argparse.Namespace(steps=STEPS, global_batch=16, eval_every=16, preset="tiny", seed=seed)
    ddp_spec = spec_of(dict(method="ddp"), workers, LR, args)
    target = store.run(ddp_spec)["evals"][-1][1]
    costs = store.cost(ddp_spec)
    out = {}
    for name, setting in SETTINGS.items():
        for factor in (1, 2):  # a second, twice as long run (its own schedule) when the first misses the target
            rec = store.run(dataclasses.replace(spec_of(setting, workers, LR, args), steps=STEPS * factor))
            if min(loss for _, loss in rec["evals"]) <= target:
                break
        out[name] = {link.name: time_to_target(rec["evals"], times_of(rec, costs, link), target) for link in LINKS}
    return out


def table(per_seed: dict[int, dict[str, dict[str, Optional[float]]]]) -> str:
    rows = ["| setting | " + " | ".join(f"{link.name}: per seed → median" for link in LINKS) + " |",
            "|---|" + "---|" * len(LINKS)]
    for name in SETTINGS:
        cells = []
        for link in LINKS:
            values = [per_seed[s][name][link.name] for s in per_seed]
            shown = ", ".join("n/r" if v is None else f"{v:.2f}" for v in values)
            median = statistics.median(float("inf") if v is None else v for v in values)
            cells.append(f"{shown} → **{median:.2f}**")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n\nModeled seconds to DDP's final eval loss (n/r: not reached in 512 steps).\n"


def main(argv: Optional[Iterable[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench_out/outer"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--cpu", type=int, default=None, help="the one CPU core to run on (default: the last allowed)")
    args = ap.parse_args(argv)
    os.sched_setaffinity(0, {args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))})
    torch.set_num_threads(1)
    store = Store(args.out)
    per_seed = {int(s): seconds_to_target(store, args.workers, int(s)) for s in args.seeds.split(",") if s.strip()}
    text = f"K = {args.workers}, peak LR {LR:g}, seeds {', '.join(map(str, per_seed))}\n\n" + table(per_seed)
    (args.out / f"outer_averaging_k{args.workers}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
