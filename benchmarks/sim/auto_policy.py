"""``sync_policy='auto'`` against fixed sync intervals, as modeled time to DDP's final eval loss on three links.

    .venv/bin/python -m benchmarks.sim.auto_policy run    --out bench_out/wire
    .venv/bin/python -m benchmarks.sim.auto_policy report --out bench_out/wire

Simulated K = 2 workers, PALSGD's defaults (warm-up 32, p 0.2, pull c 0.1, outer Nesterov 0.7 / 0.5) at peak LR
3e-3, 512 steps: fixed H = 8, 16 (the default), 32, and ``auto`` starting from H 16, once per link, since it decides
from the link's modeled sync time (:mod:`benchmarks.sim.modeled_clock`). Target: DDP's eval loss after its 256
steps. Times are *modeled*; losses are real. Shares ``<out>`` (runs and costs) with :mod:`benchmarks.sim.wire`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Iterable, Optional

import torch

from .run import SimSpec
from .sweep import Store, key_of
from .wall_time import LINKS, time_to_target
from .wire import DDP_STEPS, DEFAULTS, LR, WORKERS, modeled

FIXED = (8, 16, 32)


def specs(seed: int) -> tuple[SimSpec, dict[int, SimSpec], dict[str, SimSpec]]:
    base = dict(workers=WORKERS, lr=LR, steps=2 * DDP_STEPS, seed=seed, **DEFAULTS)
    fixed = {h: SimSpec(**{**base, "sync_interval": h}) for h in FIXED}
    auto = {link.name: SimSpec(**base, sync_policy="auto", link_bps=link.bits_per_second) for link in LINKS}
    return SimSpec(method="ddp", workers=WORKERS, lr=LR, steps=DDP_STEPS, seed=seed), fixed, auto


def report(store: Store, seed: int) -> str:
    ddp, fixed, auto = specs(seed)
    ddp_rec = store.runs.get(key_of(ddp))
    if ddp_rec is None:
        return "DDP's run is missing: run the 'run' phase first.\n"
    target = ddp_rec["evals"][-1][1]
    lines = ["| link | DDP | " + " | ".join(f"fixed H={h}" for h in FIXED) + " | auto | auto vs best fixed | "
             "auto's intervals (step: H) |", "|---|" + "---:|" * (len(FIXED) + 3) + "---|"]
    wins, within = 0, 0
    for link in LINKS:
        def seconds(spec: SimSpec) -> Optional[float]:
            rec = store.runs.get(key_of(spec))
            return None if rec is None else time_to_target(rec["evals"], modeled(rec, store, link), target)

        ddp_s = seconds(ddp)
        fixed_s = {h: seconds(s) for h, s in fixed.items()}
        auto_rec = store.runs.get(key_of(auto[link.name]))
        auto_s = seconds(auto[link.name])
        reached = [t for t in fixed_s.values() if t is not None]
        best = min(reached) if reached else None
        ratio = None if auto_s is None or best is None else auto_s / best
        wins += ratio is not None and all(t is None or auto_s < t for t in fixed_s.values())
        within += ratio is not None and ratio <= 1.05
        cell = lambda t: "not reached" if t is None else f"{t:.2f} ({t / ddp_s:.2f}x)"  # noqa: E731
        decisions = "" if auto_rec is None else ", ".join(f"{s}: {h}" for s, h in auto_rec["traffic"]["intervals"])
        lines.append(f"| {link.name} | {ddp_s:.2f} | " + " | ".join(cell(fixed_s[h]) for h in FIXED)
                     + f" | {cell(auto_s)} | {'' if ratio is None else f'{ratio:.2f}'} | {decisions} |")
    lines += ["", f"auto beats every fixed H on {wins} of {len(LINKS)} links; within 5 % of the best fixed H on "
              f"{within} of {len(LINKS)}. Seconds are MODELED (x DDP in parentheses); target = DDP's final eval loss "
              f"{target:.4f} (seed {seed})."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Iterable[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=("run", "report"))
    ap.add_argument("--out", type=Path, default=Path("bench_out/wire"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu", type=int, default=None, help="the one CPU core to run on (default: the last allowed)")
    args = ap.parse_args(argv)
    store = Store(args.out)
    if args.phase == "run":
        os.sched_setaffinity(0, {args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))})
        torch.set_num_threads(1)
        ddp, fixed, auto = specs(args.seed)
        for spec in [ddp, *fixed.values(), *auto.values()]:
            store.run(spec)
    text = report(store, args.seed)
    (args.out / "auto_policy.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
