"""Sweeps of simulated runs: which PALSGD defaults hold across learning rates and worker counts, and the
simulated-scale table (modeled time to DDP's final eval loss per method, K and link).

    .venv/bin/python -m benchmarks.sim.sweep all --out bench_out/sim

Phases (each skips runs already in ``<out>/runs.jsonl``, so an interrupted sweep resumes where it stopped):

* ``grid``: in every cell (peak LR x K) DDP, PALSGD with today's defaults, a grid of PALSGD settings
  (outer momentum x outer lr x H at a center, then the pull c and the warm-up W one at a time), Local SGD and
  DiLoCo. Eval loss at the end of a fixed step budget (same schedule for all): quality at equal tokens.
* ``scale``: at one peak LR and K in ``--scale-workers``: DDP, Local SGD, DiLoCo and PALSGD with the
  recommended setting (picked from the grid: the smallest worst-case gap to each cell's best) and PALSGD with
  today's defaults. A local method that does not reach DDP's final loss within DDP's steps gets a second run
  with twice the steps (its own schedule), as in ALGORITHM.md's practical notes.
* ``report``: ``<out>/report.md`` (the tables) and ``<out>/scale.png`` (eval loss against modeled time).

Every time here is *modeled* (:mod:`benchmarks.sim.wall_time`) from costs measured on this machine
(``<out>/costs.json``); losses are real. One process on one CPU core (pinned), one torch thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Iterable, Optional

import torch

from .run import SimSpec, measure_costs, simulate
from .wall_time import LINKS, Costs, modeled_times, time_to_target

# The settings PALSGD ships with today (PALSGDConfig's defaults): c = lr * eta / p follows the LR.
CURRENT = dict(method="palsgd", sync_interval=32, warmup_steps=32, mixing_rate=1.0, outer_lr=0.7, outer_momentum=0.9)
# The grid's center: the settings BENCHMARKS.md's 2-worker tuning found (c 0.1, momentum 0.5), at H 16, W 8.
CENTER = dict(method="palsgd", sync_interval=16, warmup_steps=8, pull=0.1, outer_lr=0.7, outer_momentum=0.5)
OUTERS = [(1.0, 0.0), (1.0, 0.5), (0.7, 0.9), (0.7, 0.7), (1.0, 0.9), (0.7, 0.5), (1.0, 0.7)]  # (lr, momentum)


def grid_settings() -> list[dict]:
    """PALSGD and baseline settings of one cell, most informative first (a sweep cut short keeps those):
    the baselines and today's defaults, the pull and the warm-up around the center, the outer optimizer at the
    center's H, H itself, then H x outer optimizer."""
    first = [dict(method="ddp"), CURRENT, CENTER, dict(method="localsgd", sync_interval=16, warmup_steps=8),
             dict(CENTER, method="diloco", pull=None)]
    one_at_a_time = [dict(CENTER, pull=c) for c in (0.01, 0.03)] + [dict(CENTER, warmup_steps=w) for w in (0, 32)]
    outer = [dict(CENTER, outer_lr=lr, outer_momentum=m) for lr, m in OUTERS]
    intervals = [dict(CENTER, sync_interval=h) for h in (8, 32)]
    both = [dict(CENTER, sync_interval=h, outer_lr=lr, outer_momentum=m)
            for h in (8, 32) for lr, m in OUTERS if m != 0.7]
    last = [dict(method="diloco", sync_interval=32, warmup_steps=32, outer_lr=0.7, outer_momentum=0.9)]
    out, seen = [], set()
    for s in first + one_at_a_time + outer + intervals + last + both:
        key = json.dumps(s, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def spec_of(setting: dict, workers: int, lr: float, args) -> SimSpec:
    return SimSpec(workers=workers, lr=lr, steps=args.steps, global_batch=args.global_batch,
                   eval_every=args.eval_every, preset=args.preset, seed=args.seed, **setting)


# Fields added for the wire benchmark: left out of a run's key at their defaults, so runs recorded before they
# existed keep their keys.
WIRE_DEFAULTS = {"comm_dtype": "fp32", "fragments": 1, "overlap_steps": 0, "sync_policy": "fixed", "link_bps": None}


def spec_key(spec: dict) -> str:
    return json.dumps({k: v for k, v in spec.items() if WIRE_DEFAULTS.get(k, object()) != v}, sort_keys=True)


def key_of(spec: SimSpec) -> str:
    return spec_key(dataclasses.asdict(spec))


class Store:
    """The runs so far (``runs.jsonl``, one JSON object per line) and the measured costs (``costs.json``)."""

    def __init__(self, out: Path):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.runs_path, self.costs_path = out / "runs.jsonl", out / "costs.json"
        self.runs = {}
        if self.runs_path.exists():
            for line in self.runs_path.read_text().splitlines():
                rec = json.loads(line)
                self.runs[spec_key(rec["spec"])] = rec
        self.costs = json.loads(self.costs_path.read_text()) if self.costs_path.exists() else {}

    def run(self, spec: SimSpec) -> dict:
        key = key_of(spec)
        if key not in self.runs:
            res = simulate(spec, self.cost(spec))
            rec = dict(spec=dataclasses.asdict(spec), evals=res.evals, kinds="".join(k[0] for k in res.kinds),
                       synced=[i for i, s in enumerate(res.synced) if s], model_bytes=res.model_bytes,
                       seconds=round(res.seconds, 2), load=os.getloadavg()[0], traffic=res.traffic,
                       drifts=res.drifts)
            with self.runs_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            self.runs[key] = rec
            print(f"[{time.strftime('%H:%M:%S')}] {res.seconds:5.1f} s  loss {res.final_loss:.4f}  {spec.label()}",
                  flush=True)
        return self.runs[key]

    def cost(self, spec: SimSpec) -> Costs:
        """Costs of one worker's micro-batch at this K, measured once per (preset, batch, K)."""
        key = f"{spec.preset}/{spec.global_batch}/{spec.workers}"
        if key not in self.costs:
            c = measure_costs(spec, repeats=40)
            self.costs[key] = dict(dataclasses.asdict(c), load=os.getloadavg()[0])
            self.costs_path.write_text(json.dumps(self.costs, indent=1))
        fields = {f.name for f in dataclasses.fields(Costs)}
        return Costs(**{k: v for k, v in self.costs[key].items() if k in fields})


# ---------------------------------------------------------------------------- analysis
KIND_NAMES = {"w": "warmup", "g": "gradient", "p": "pseudo_sync"}


def times_of(rec: dict, costs: Costs, link) -> list[float]:
    kinds = [KIND_NAMES[k] for k in rec["kinds"]]
    synced = [False] * len(kinds)
    for i in rec["synced"]:
        synced[i] = True
    return modeled_times(kinds, synced, rec["model_bytes"], rec["spec"]["workers"], costs, link)


def setting_name(s: dict) -> str:
    """A short name of a setting (the fields that differ between the grid's runs)."""
    m = s["method"]
    if m == "ddp":
        return "DDP"
    if m == "localsgd":
        return f"Local SGD H{s['sync_interval']} W{s['warmup_steps']}"
    outer = "avg (SGD 1.0)" if s["outer_momentum"] in (0, 0.0) else f"N {s['outer_lr']}/{s['outer_momentum']}"
    base = f"{'DiLoCo' if m == 'diloco' else 'PALSGD'} H{s['sync_interval']} W{s['warmup_steps']} {outer}"
    if m == "palsgd":
        base += f" c={s['pull']}" if s.get("pull") is not None else f" eta={s['mixing_rate']} (c=lr/p)"
    return base


SETTING_FIELDS = ("method", "sync_interval", "warmup_steps", "pull", "mixing_rate", "outer_lr", "outer_momentum")


def setting_of(spec: dict) -> dict:
    s = {k: spec[k] for k in SETTING_FIELDS}
    if s["pull"] is not None or s["method"] != "palsgd":
        s.pop("mixing_rate")  # eta is derived from c (or unused): not part of the setting's identity
    if s["method"] in ("ddp", "localsgd"):
        unused = ("outer_lr", "outer_momentum", "pull")
        if s["method"] == "ddp":
            unused += ("sync_interval", "warmup_steps")
        for k in unused:
            s.pop(k)
    return s


def grid_table(store: Store, args) -> tuple[str, Optional[dict]]:
    """The sweep table (final eval loss per setting and cell, gap to the cell's best PALSGD) and the pick."""
    cells = [(k, lr) for k in args.workers for lr in args.lrs]
    loss: dict[str, dict] = {}
    settings: dict[str, dict] = {}
    for rec in store.runs.values():
        sp = rec["spec"]
        if sp["steps"] != args.steps or sp["seed"] != args.seed or (sp["workers"], sp["lr"]) not in cells:
            continue
        s = setting_of(sp)
        name = setting_name(s)
        settings[name] = s
        loss.setdefault(name, {})[(sp["workers"], sp["lr"])] = rec["evals"][-1][1]
    best = {c: min((v[c] for n, v in loss.items() if settings[n]["method"] == "palsgd" and c in v), default=None)
            for c in cells}
    gap = {n: {c: v[c] / best[c] - 1 for c in v if best[c]} for n, v in loss.items()}
    complete = [n for n in loss if len(loss[n]) == len(cells)]
    worst = {n: max(gap[n].values()) for n in complete}
    head = "| setting | " + " | ".join(f"K={k} lr={lr:g}" for k, lr in cells) + " | worst gap |"
    lines = [head, "|---|" + "---:|" * (len(cells) + 1)]
    order = sorted(loss, key=lambda n: (settings[n]["method"] != "ddp", worst.get(n, 9.0)))
    for n in order:
        row = [f"{loss[n][c]:.4f} ({gap[n][c]:+.1%})" if c in loss[n] else "-" for c in cells]
        w = f"{worst[n]:+.1%}" if n in worst else "incomplete"
        lines.append(f"| {n} | " + " | ".join(row) + f" | {w} |")
    lines.append("| best PALSGD in the cell | " + " | ".join(
        next((n for n in loss if settings[n]["method"] == "palsgd" and loss[n].get(c) == best[c]), "-")
        for c in cells) + " | |")
    palsgd = [n for n in complete if settings[n]["method"] == "palsgd"]
    pick = min(palsgd, key=lambda n: worst[n]) if palsgd else None
    within = [n for n in palsgd if worst[n] <= 0.02]
    text = "\n".join(lines) + "\n\n"
    text += _wrap(f"Gaps are to the best PALSGD setting of the cell. Within 2 % in every cell: "
             f"{', '.join(sorted(within, key=lambda n: worst[n])) or 'none'}.\n"
             f"Smallest worst-case gap (the pick for the scale table): {pick} ({worst[pick]:+.1%}).\n" if pick else "")
    return text, (settings[pick] if pick else None)


def noise_line(store: Store, pick: dict, args, execute: bool) -> str:
    """The pick rerun with another seed (model init and coins; same data) in every cell: the noise floor."""
    gaps = []
    for k in args.workers:
        for lr in args.lrs:
            spec = spec_of(pick, k, lr, args)
            other = dataclasses.replace(spec, seed=args.seed + 1)
            if key_of(spec) not in store.runs or (key_of(other) not in store.runs and not execute):
                continue
            if execute and past(args.deadline):
                break
            a, b = store.run(spec)["evals"][-1][1], store.run(other)["evals"][-1][1]
            gaps.append(abs(b / a - 1))
    if not gaps:
        return ""
    return _wrap(f"Seed noise (the pick rerun with seed {args.seed + 1}: another initialization and coins, same data) "
            f"in {len(gaps)} cells: |loss change| mean {sum(gaps) / len(gaps):.2%}, max {max(gaps):.2%}.\n")


def _wrap(text: str) -> str:
    """Prose lines of the report kept under 120 characters (tables are left alone)."""
    return "".join(textwrap.fill(line, 118, break_long_words=False) + "\n" for line in text.splitlines())


def scale_settings(pick: dict) -> list[tuple[str, dict]]:
    hw = dict(sync_interval=pick["sync_interval"], warmup_steps=pick["warmup_steps"])
    outer = dict(outer_lr=pick["outer_lr"], outer_momentum=pick["outer_momentum"])
    return [("DDP", dict(method="ddp")), ("Local SGD", dict(method="localsgd", **hw)),
            ("DiLoCo", dict(method="diloco", **hw, **outer)), ("PALSGD (recommended)", pick),
            ("PALSGD (today's defaults)", CURRENT)]


def scale_runs(store: Store, pick: dict, args, execute: bool) -> dict:
    """{(K, method): (DDP's final loss, runs)} for the scale table; runs what is missing when ``execute``
    (until ``--deadline``: later runs are left out of the table)."""
    out = {}
    for k in args.scale_workers:
        execute = execute and not past(args.deadline)
        ddp = spec_of(dict(method="ddp"), k, args.scale_lr, args)
        if not execute and key_of(ddp) not in store.runs:
            continue
        target = store.run(ddp)["evals"][-1][1]
        for name, setting in scale_settings(pick):
            recs = []
            for factor in (1, 2) if setting["method"] != "ddp" else (1,):
                spec = dataclasses.replace(spec_of(setting, k, args.scale_lr, args), steps=args.steps * factor)
                if key_of(spec) not in store.runs and not (execute and not past(args.deadline)):
                    break
                rec = store.run(spec)
                recs.append(rec)
                if min(loss for _, loss in rec["evals"]) <= target:
                    break
            if recs:
                out[(k, name)] = (target, recs)
    return out


def scale_table(store: Store, pick: dict, args) -> str:
    runs = scale_runs(store, pick, args, execute=False)
    head = " | ".join(f"modeled s to DDP's loss, {link.name} (x DDP)" for link in LINKS)
    lines = [f"| K | method | steps run | final eval loss | {head} |", "|---:|---|---:|---:|" + "---:|" * len(LINKS)]
    for (k, name), (target, recs) in sorted(runs.items(), key=lambda kv: kv[0][0]):
        costs = store.cost(spec_of(dict(method="ddp"), k, args.scale_lr, args))
        ddp_recs = runs.get((k, "DDP"))[1]
        cells = []
        for link in LINKS:
            ddp_t = time_to_target(ddp_recs[0]["evals"], times_of(ddp_recs[0], costs, link), target)
            t = next((tt for tt in (time_to_target(r["evals"], times_of(r, costs, link), target) for r in recs)
                      if tt is not None), None)
            cells.append("not reached" if t is None else f"{t:.2f} ({t / ddp_t:.2f})")
        steps = "/".join(str(r["spec"]["steps"]) for r in recs)
        lines.append(f"| {k} | {name} | {steps} | {recs[-1]['evals'][-1][1]:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(store: Store, pick: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = scale_runs(store, pick, args, execute=False)
    ks = sorted({k for k, _ in runs})
    if not ks:
        return
    fig, axes = plt.subplots(len(LINKS), len(ks), figsize=(4 * len(ks), 3.2 * len(LINKS)), squeeze=False)
    for j, k in enumerate(ks):
        costs = store.cost(spec_of(dict(method="ddp"), k, args.scale_lr, args))
        for i, link in enumerate(LINKS):
            ax = axes[i][j]
            for (kk, name), (target, recs) in runs.items():
                if kk != k:
                    continue
                rec = recs[-1]
                times = times_of(rec, costs, link)
                ax.plot([times[s - 1] for s, _ in rec["evals"]], [l for _, l in rec["evals"]], label=name)
                ax.axhline(target, color="gray", lw=0.5, ls="--")
            ax.set_title(f"K={k}, {link.name}", fontsize=9)
            ax.set_xlabel("modeled wall time (s)", fontsize=8)
            ax.set_ylabel("eval loss", fontsize=8)
            ax.set_ylim(top=min(7.0, ax.get_ylim()[1]))
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Simulated workers, tiny GPT-Neo, peak LR {args.scale_lr:g}: eval loss vs MODELED time")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


# ---------------------------------------------------------------------------- CLI
def parse(argv: Optional[Iterable[str]] = None) -> argparse.Namespace:
    floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=("grid", "scale", "report", "all"))
    ap.add_argument("--out", type=Path, default=Path("bench_out/sim"))
    ap.add_argument("--workers", type=ints, default=[2, 8], help="K of the grid's cells")
    ap.add_argument("--lrs", type=floats, default=[1e-3, 3e-3, 1e-2], help="peak LRs of the grid's cells")
    ap.add_argument("--scale-workers", type=ints, default=[2, 4, 8, 16])
    ap.add_argument("--scale-lr", type=float, default=3e-3)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=16)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu", type=int, default=None, help="the one CPU core to run on (default: the last allowed)")
    ap.add_argument("--deadline", default=None, help="HH:MM (UTC): start no new run after it")
    return ap.parse_args(argv)


def past(deadline: Optional[str]) -> bool:
    return deadline is not None and time.strftime("%H:%M", time.gmtime()) >= deadline


def main(argv: Optional[Iterable[str]] = None) -> None:
    args = parse(argv)
    # One core, one thread: the K worker threads take turns on it, as the machine is shared.
    os.sched_setaffinity(0, {args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))})
    torch.set_num_threads(1)
    store = Store(args.out)
    if args.phase in ("grid", "all"):
        for setting in grid_settings():
            for k in args.workers:
                for lr in args.lrs:
                    if past(args.deadline):
                        break
                    store.run(spec_of(setting, k, lr, args))
    table, pick = grid_table(store, args)
    if pick is None:
        sys.exit("no PALSGD setting has runs in every cell yet: run the grid first")
    if args.phase in ("scale", "all") and not past(args.deadline):
        scale_runs(store, pick, args, execute=True)
        noise_line(store, pick, args, execute=True)
    report = (f"Modeled times: compute measured here (costs.json), communication modeled per link. "
              f"{args.steps} steps, global batch {args.global_batch} x 64 tokens, preset {args.preset}.\n\n"
              f"## Sweep (final eval loss after {args.steps} steps; gap to the cell's best PALSGD)\n\n{table}"
              f"{noise_line(store, pick, args, execute=False)}\n"
              f"## Scale (peak LR {args.scale_lr:g}; MODELED seconds to DDP's final eval loss)\n\n"
              f"{scale_table(store, pick, args)}\n")
    (args.out / "report.md").write_text(report)
    plot(store, pick, args, args.out / "scale.png")
    print(report)


if __name__ == "__main__":
    main()
