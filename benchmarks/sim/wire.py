"""The wire benchmark: what travels at a sync (fp32 / bf16 / int8 / int4), in how many pieces (fragments 1 / 4),
and whether it hides behind compute (overlap 0 / 2), as modeled time to DDP's final eval loss over slow links.

    .venv/bin/python -m benchmarks.sim.wire run    --out bench_out/wire --seeds 0,1
    .venv/bin/python -m benchmarks.sim.wire report --out bench_out/wire

Simulated K = 2 workers of the real core (:mod:`benchmarks.sim.run`), PALSGD with its shipped defaults (H 16,
p 0.2, warm-up 32, pull c 0.1, outer Nesterov 0.7 / 0.5) at peak LR 3e-3; DDP 256 steps, every PALSGD variant 512
steps (its own schedule, as the scale table of BENCHMARKS.md: at 256 steps no local method reaches DDP's loss
here). The global model (the anchor) is evaluated every 16 steps in every variant. Times are *modeled*
(:func:`benchmarks.sim.wall_time.modeled_times_traffic`: each sync charged the bytes it really booked) from the
compute costs in ``<out>/costs.json`` (copy ``docs/benchmarks/sim/costs.json`` there to share the scale table's
costs); losses are real. ``report`` writes ``report.md`` and ``wire.png`` (eval loss against modeled time at the
slowest link, and every replica's drift at each of its syncs).
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path
from typing import Iterable, Optional

import torch

from .run import SimSpec
from .sweep import KIND_NAMES, Store, key_of, past, times_of
from .wall_time import Link, modeled_times_traffic, time_to_target

LINKS = (Link("100 Mbit/s", 100e6), Link("20 Mbit/s", 20e6))
DEFAULTS = dict(method="palsgd", sync_interval=16, warmup_steps=32, pull=0.1, outer_lr=0.7, outer_momentum=0.5)
WORKERS, LR, DDP_STEPS = 2, 3e-3, 256
BASELINE = ("bf16", 1, 0)  # the variant the target compares with: plain bf16
# Run order, most informative first (a run cut short by --deadline keeps those): the whole model in each dtype, then
# fragments and overlap on the small wire formats.
ORDER = [("fp32", 1, 0), ("bf16", 1, 0), ("int8", 1, 0), ("int4", 1, 0), ("int4", 4, 2), ("int8", 4, 2),
         ("int8", 4, 0), ("int4", 4, 0), ("bf16", 4, 2), ("int8", 1, 2), ("int4", 1, 2), ("bf16", 4, 0),
         ("bf16", 1, 2), ("fp32", 1, 2), ("fp32", 4, 0), ("fp32", 4, 2)]


def specs(seed: int) -> tuple[SimSpec, dict[tuple, SimSpec]]:
    ddp = SimSpec(method="ddp", workers=WORKERS, lr=LR, steps=DDP_STEPS, seed=seed)
    variants = {(d, f, o): SimSpec(workers=WORKERS, lr=LR, steps=2 * DDP_STEPS, seed=seed, comm_dtype=d, fragments=f,
                                   overlap_steps=o, **DEFAULTS) for d, f, o in ORDER}
    return ddp, variants


def name(variant: tuple) -> str:
    d, f, o = variant
    return f"{d}, F={f}, d={o}"


def modeled(rec: dict, store: Store, link: Link) -> list[float]:
    sp = rec["spec"]
    if "traffic" not in rec:  # recorded before traffic was (DDP, or fp32 whole-model blocking syncs): the same model
        return times_of(rec, store.cost(SimSpec(**sp)), link)
    kinds = [KIND_NAMES[k] for k in rec["kinds"]]
    synced = [False] * len(kinds)
    for i in rec["synced"]:
        synced[i] = True
    return modeled_times_traffic(kinds, synced, rec["traffic"], rec["model_bytes"], sp["workers"],
                                 store.cost(SimSpec(**sp)), link, sp.get("overlap_steps", 0), sp.get("fragments", 1))


def sent_bytes(rec: dict) -> tuple[float, float]:
    """(bytes one worker sent in the whole run, the largest single sync's payload)."""
    if "traffic" not in rec:  # fp32, whole model, blocking: one model's bytes per warm-up step and per sync
        return rec["model_bytes"] * (rec["kinds"].count("w") + len(rec["synced"])), rec["model_bytes"]
    tr = rec["traffic"]
    local = [b for b, k in zip(tr["wire"], rec["kinds"]) if k != "w" and b]
    warm = sum(b for b, k in zip(tr["wire"], rec["kinds"]) if k == "w")
    if rec["spec"].get("overlap_steps", 0):  # an overlapped sync books its halves at two steps: sum per launch
        starts = tr["launched"] + [len(tr["wire"])]
        local = [sum(tr["wire"][a:b]) for a, b in zip(starts, starts[1:])]
        local[-1:] = [local[-1] + tr["tail"]] if local else []
    final_per_exchange = tr["final"] / rec["spec"].get("fragments", 1)
    return warm + sum(local) + tr["final"], max(local + [final_per_exchange])


def table(store: Store, seeds: list[int]) -> tuple[str, dict]:
    rows, summary = [], {}
    for link in LINKS:
        head = (f"| variant ({link.name}) | final eval loss (mean) | modeled s to DDP's loss, per seed | median | "
                f"x DDP | x plain bf16 | MB sent per worker | peak MB per sync |")
        lines = [head, "|---|---:|---|---:|---:|---:|---:|---:|"]
        ddp_t, per = {}, {}
        for seed in seeds:
            ddp, variants = specs(seed)
            rec = store.runs.get(key_of(ddp))
            if rec is None:
                continue
            target = rec["evals"][-1][1]
            ddp_t[seed] = time_to_target(rec["evals"], modeled(rec, store, link), target)
            per.setdefault("DDP", []).append((rec, ddp_t[seed]))
            for v, spec in variants.items():
                r = store.runs.get(key_of(spec))
                if r is not None:
                    per.setdefault(v, []).append((r, time_to_target(r["evals"], modeled(r, store, link), target)))
        ddp_median = statistics.median(ddp_t.values()) if ddp_t else None
        medians = {}
        for v, runs in per.items():
            times = [t for _, t in runs]
            reached = [t for t in times if t is not None]
            medians[v] = statistics.median(reached) if len(reached) == len(times) else None
        for v, runs in sorted(per.items(), key=lambda kv: (kv[0] != "DDP", medians[kv[0]] or 1e9)):
            times, med = [t for _, t in runs], medians[v]
            total, peak = sent_bytes(runs[0][0])
            base = medians.get(BASELINE)
            lines.append(
                f"| {'DDP (256 steps)' if v == 'DDP' else name(v)} | "
                f"{statistics.mean(r['evals'][-1][1] for r, _ in runs):.4f} | "
                f"{' / '.join('not reached' if t is None else f'{t:.2f}' for t in times)} | "
                f"{'not reached' if med is None else f'{med:.2f}'} | "
                f"{'' if med is None or not ddp_median else f'{med / ddp_median:.2f}'} | "
                f"{'' if med is None or not base else f'{med / base:.2f}'} | {total / 1e6:.2f} | {peak / 1e6:.3f} |")
        summary[link.name] = medians
        rows.append("\n".join(lines))
    return "\n\n".join(rows) + "\n", summary


def plot(store: Store, seeds: list[int], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    by_time, drift = fig.subplots(1, 2)
    link = LINKS[-1]
    ddp, variants = specs(seeds[0])
    shown = [("DDP", ddp)] + [(name(v), variants[v]) for v in
                              [("fp32", 1, 0), ("bf16", 1, 0), ("int8", 1, 0), ("int4", 4, 2)]]
    for label, spec in shown:
        rec = store.runs.get(key_of(spec))
        if rec is None:
            continue
        times = modeled(rec, store, link)
        by_time.plot([times[s - 1] for s, _ in rec["evals"]], [loss for _, loss in rec["evals"]], label=label)
    target = store.runs.get(key_of(ddp))
    if target is not None:
        by_time.axhline(target["evals"][-1][1], color="gray", lw=0.5, ls="--")
    by_time.set_xlabel(f"MODELED wall time at {link.name} (s)")
    by_time.set_ylabel("eval loss of the global model")
    by_time.set_ylim(top=7.0)
    by_time.legend(fontsize=7)
    rec = store.runs.get(key_of(variants[("int8", 4, 2)]))
    if rec is not None and rec.get("drifts"):
        for replica, rows in enumerate(rec["drifts"]):
            drift.plot([s for s, _ in rows], [d for _, d in rows], marker=".", lw=0.8, label=f"replica {replica}")
        drift.set_title("int8, F=4, d=2: each replica's drift at its syncs", fontsize=9)
        drift.set_xlabel("step")
        drift.set_ylabel("||x - x_bar|| / ||x_bar|| (fragment synced)")
        drift.legend(fontsize=7)
    fig.suptitle(f"Simulated K={WORKERS}, tiny GPT-Neo, seed {seeds[0]}: what travels at a sync")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: Optional[Iterable[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=("run", "report"))
    ap.add_argument("--out", type=Path, default=Path("bench_out/wire"))
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (model init and coins; same data)")
    ap.add_argument("--cpu", type=int, default=None, help="the one CPU core to run on (default: the last allowed)")
    ap.add_argument("--deadline", default=None, help="HH:MM (UTC): start no new run after it")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    store = Store(args.out)
    if args.phase == "run":
        # One core, one thread, as benchmarks.sim.sweep: the worker threads take turns on it.
        os.sched_setaffinity(0, {args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))})
        torch.set_num_threads(1)
        for seed in seeds:
            ddp, variants = specs(seed)
            store.run(ddp)
            for spec in variants.values():
                if past(args.deadline):
                    break
                store.run(spec)
    text, _ = table(store, seeds)
    report = (f"Simulated K={WORKERS}, peak LR {LR:g}, PALSGD defaults; times MODELED (costs.json), losses real.\n\n"
              + text)
    (args.out / "report.md").write_text(report)
    plot(store, seeds, args.out / "wire.png")
    print(report)


if __name__ == "__main__":
    main()
