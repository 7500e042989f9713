"""``sync_policy='auto'`` against fixed sync intervals, as modeled time to DDP's final eval loss on three links.

    .venv/bin/python -m benchmarks.sim.auto_policy run    --out bench_out/wire --seeds 0,1,2,3,4
    .venv/bin/python -m benchmarks.sim.auto_policy report --out bench_out/wire --seeds 0,1,2,3,4

Simulated K = 2 workers, PALSGD's defaults (warm-up 32, p 0.2, pull c 0.1, outer Nesterov 0.7 / 0.5) at peak LR
3e-3, 512 steps: fixed H = 8, 16 (the default), 32, and ``auto`` starting from H 16, once per link, since it decides
from the link's modeled sync time (:mod:`benchmarks.sim.modeled_clock`). Target: DDP's eval loss after its 256
steps. One table per seed, then the medians over the seeds. Times are *modeled*; losses are real. Shares ``<out>``
(runs and costs) with :mod:`benchmarks.sim.wire`.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path
from typing import Iterable, Optional, Sequence

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


def seconds_by_link(store: Store, seed: int) -> Optional[dict[str, dict[str, Optional[float]]]]:
    """Modeled seconds to DDP's final loss of seed ``seed``: {link: {"ddp", "H=8", ..., "auto": s or None}}."""
    ddp, fixed, auto = specs(seed)
    ddp_rec = store.runs.get(key_of(ddp))
    if ddp_rec is None:
        return None
    target = ddp_rec["evals"][-1][1]

    def seconds(spec: SimSpec, link) -> Optional[float]:
        rec = store.runs.get(key_of(spec))
        return None if rec is None else time_to_target(rec["evals"], modeled(rec, store, link), target)

    return {link.name: {"ddp": seconds(ddp, link), **{f"H={h}": seconds(s, link) for h, s in fixed.items()},
                        "auto": seconds(auto[link.name], link)} for link in LINKS}


def verdict(times: dict[str, Optional[float]]) -> tuple[Optional[float], bool, bool]:
    """(auto / best fixed, auto beats every fixed H, auto within 5 % of the best fixed H)."""
    fixed = [t for k, t in times.items() if k.startswith("H=")]
    reached = [t for t in fixed if t is not None]
    auto = times["auto"]
    if auto is None or not reached:
        return None, False, False
    ratio = auto / min(reached)
    return ratio, all(t is None or auto < t for t in fixed), ratio <= 1.05


def table(rows: dict[str, dict[str, Optional[float]]], decisions: dict[str, str]) -> list[str]:
    lines = ["| link | DDP | " + " | ".join(f"fixed H={h}" for h in FIXED) + " | auto | auto vs best fixed | "
             "auto's intervals (step: H) |", "|---|" + "---:|" * (len(FIXED) + 3) + "---|"]
    wins = within = 0
    for link, times in rows.items():
        ddp_s = times["ddp"]
        cell = lambda t: "not reached" if t is None else f"{t:.2f} ({t / ddp_s:.2f}x)"  # noqa: E731
        ratio, beats, close = verdict(times)
        wins, within = wins + beats, within + close
        lines.append(f"| {link} | {ddp_s:.2f} | " + " | ".join(cell(times[f"H={h}"]) for h in FIXED)
                     + f" | {cell(times['auto'])} | {'' if ratio is None else f'{ratio:.2f}'} | "
                     f"{decisions.get(link, '')} |")
    lines += ["", f"auto beats every fixed H on {wins} of {len(rows)} links; within 5 % of the best fixed H on "
              f"{within} of {len(rows)}."]
    return lines


def report(store: Store, seeds: Sequence[int]) -> str:
    """One table per seed, then the medians over the seeds (the verdict the issue asks for)."""
    per_seed, out = {}, []
    for seed in seeds:
        rows = seconds_by_link(store, seed)
        if rows is None:
            out.append(f"Seed {seed}: DDP's run is missing: run the 'run' phase first.\n")
            continue
        per_seed[seed] = rows
        _, _, auto = specs(seed)
        decisions = {}
        for link in LINKS:
            rec = store.runs.get(key_of(auto[link.name]))
            if rec is not None:
                decisions[link.name] = ", ".join(f"{s}: {h}" for s, h in rec["traffic"]["intervals"])
        target = store.runs[key_of(specs(seed)[0])]["evals"][-1][1]
        out += [f"### Seed {seed} (target: DDP's final eval loss {target:.4f})", "", *table(rows, decisions), ""]
    if len(per_seed) > 1:
        medians = {}
        for link in LINKS:
            medians[link.name] = {}
            for key in per_seed[next(iter(per_seed))][link.name]:
                values = [rows[link.name][key] for rows in per_seed.values()]
                medians[link.name][key] = None if any(v is None for v in values) else statistics.median(values)
        out += [f"### Median over seeds {', '.join(map(str, per_seed))}", "", *table(medians, {}), ""]
    out.append("Seconds are MODELED (x DDP in parentheses); losses are real. auto's intervals are listed per seed.")
    return "\n".join(out) + "\n"


def main(argv: Optional[Iterable[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=("run", "report"))
    ap.add_argument("--out", type=Path, default=Path("bench_out/wire"))
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (the report takes medians over them)")
    ap.add_argument("--cpu", type=int, default=None, help="the one CPU core to run on (default: the last allowed)")
    args = ap.parse_args(argv)
    store = Store(args.out)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.phase == "run":
        os.sched_setaffinity(0, {args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))})
        torch.set_num_threads(1)
        for seed in seeds:
            ddp, fixed, auto = specs(seed)
            for spec in [ddp, *fixed.values(), *auto.values()]:
                store.run(spec)
    text = report(store, seeds)
    (args.out / "auto_policy.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
