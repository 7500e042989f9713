"""Write a benchmark's results: ``results.json``, a markdown table and PNG plots.

The input is the benchmark dict the runner builds::

    {"settings": {...}, "machine": {...}, "command": "...", "overhead": {...} | None,
     "links": {"100mbit": {"probe": {...} | None, "runs": {"ddp": run, "palsgd": run, ...}}, ...}}

(``run`` as described in :mod:`.summary`). :func:`write_report` adds each link's summary and
target checks, and writes ``results.json``, ``results.md`` and ``loss_<link>.png`` (eval loss
against training wall time and against optimizer steps, DDP's final loss drawn as the target).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from .settings import split_run
from .summary import check_targets, summarize_link

logger = logging.getLogger(__name__)

ORDER = ("ddp", "localsgd", "diloco", "palsgd")
LABELS = {"ddp": "DDP", "localsgd": "Local SGD", "diloco": "DiLoCo", "palsgd": "PALSGD"}
COLORS = {"ddp": "black", "localsgd": "tab:green", "diloco": "tab:blue", "palsgd": "tab:red"}


def _methods(runs: dict) -> list[str]:
    """Runs in the order of ORDER, each method's variants by H ('auto' last)."""
    def key(name: str):
        method, variant = split_run(name)
        rank = ORDER.index(method) if method in ORDER else len(ORDER)
        h = -1 if variant is None else (10**9 if variant == "auto" else int(variant))
        return rank, h, name
    return sorted(runs, key=key)


def run_label(run: str, sync_interval: Optional[int] = None) -> str:
    """'Local SGD (H 8)', 'PALSGD (auto)'; a run at the settings' H is labelled with it when that is given."""
    method, variant = split_run(run)
    text = LABELS.get(method, method)
    if variant == "auto":
        return f"{text} (auto)"
    if variant is not None:
        return f"{text} (H {variant})"
    return f"{text} (H {sync_interval})" if sync_interval and method != "ddp" else text


def _fmt(value: Optional[float], spec: str = ".3g", suffix: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:{spec}}{suffix}"


def add_summaries(bench: dict[str, Any]) -> dict[str, Any]:
    """Fill ``summary`` and ``targets`` of every link in place; return ``bench``."""
    H = bench["settings"]["sync_interval"]
    base = bench["links"].get("unshaped", {}).get("runs")
    for label, link in bench["links"].items():
        link["summary"] = summarize_link(link["runs"], base if label != "unshaped" else None)
        link["targets"] = check_targets(link["summary"], H, (link.get("link") or {}).get("rate_mbit"))
    return bench


def markdown_table(bench: dict[str, Any]) -> str:
    """One row per (link, method)."""
    s = bench["settings"]
    lines = [
        "| link | method | steps | train s | s/step | time to target s | ×DDP | ×DiLoCo | final eval loss "
        "| loss at DDP's tokens | vs DDP | MB sent/step | ×DDP bytes (local phase) | comm s blocked "
        "| s/step added by the link | load avg |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, link in bench["links"].items():
        probe = (link.get("probe") or {}).get("fit")
        link_name = label if not probe else f"{label} (measured {probe['link_mbit_s']:.0f} Mbit/s)"
        for m in _methods(link["runs"]):
            r = link["summary"][m]
            lines.append(
                f"| {link_name} | {run_label(m, s['sync_interval'])} | {r['steps']} | {r['train_seconds']:.1f} | "
                f"{r['seconds_per_step']:.3f} | {_fmt(r['time_to_target'], '.1f')} | "
                f"{_fmt(r['time_to_target_vs_ddp'], '.2f')} | {_fmt(r['time_to_target_vs_diloco'], '.2f')} | "
                f"{r['final_eval_loss']:.4f} | {_fmt(r['eval_loss_at_ddp_tokens'], '.4f')} | "
                f"{_fmt(None if r['loss_gap_vs_ddp'] is None else 100 * r['loss_gap_vs_ddp'], '+.2f', '%')} | "
                f"{r['bytes_per_step'] / 1e6:.3f} | {_fmt(r['bytes_per_step_vs_ddp'], '.4f')} "
                f"({_fmt(r['local_bytes_per_step_vs_ddp'], '.4f')}) | "
                f"{'in backward' if m == 'ddp' else format(r['comm_seconds'], '.1f')} | "
                f"{_fmt(r['extra_seconds_per_step'], '+.3f')} | {_load(link['runs'][m])} |"
            )
    lines.append("")
    lines.append(
        f"Target = DDP's final eval loss on the same link after {s['steps']} steps; local methods may run up to "
        f"{s['local_step_factor']:g}× as many steps and stop once at target (and past DDP's step count). "
        "Times are training wall time, evaluation excluded. Bytes: payload this rank (rank 0) sent in "
        "collectives, counted by the communicator; '(local phase)' excludes the synchronous warm-up steps. "
        "'comm s blocked': time blocked in PALSGD's own collectives (DDP's all-reduce runs inside backward and "
        "is not timed there); 's/step added by the link': seconds per step minus the same method's unshaped run; "
        "'load avg': the machine's 1-minute load average before and after the run (wall times compare only at "
        "similar load)."
    )
    for label, link in bench["links"].items():
        for m in _methods(link["runs"]):
            path = _interval_path([e.get("sync_interval") for e in link["runs"][m]["history"]])
            if path:
                lines.append("")
                lines.append(f"{run_label(m)} on {label}, H at each evaluation's step (changes only): {path}")
        targets = link.get("targets") or {}
        if targets:
            lines.append("")
            lines.append(f"Targets on {label}: " + "; ".join(
                f"{name}: {'n/a' if ok is None else ('met' if ok else 'MISSED')}" for name, ok in targets.items()))
    return "\n".join(lines)


def _interval_path(values: list) -> str:
    """'16 → 32 → 47' from H at each evaluation; '' for a run without a moving H."""
    path: list[int] = []
    for v in values:
        if v is not None and (not path or int(v) != path[-1]):
            path.append(int(v))
    return " → ".join(map(str, path)) if path else ""


def _load(run: dict[str, Any]) -> str:
    load = run.get("load_average") or []
    return "–".join(f"{x:.1f}" for x in load if x is not None) or "n/a"


def overhead_table(overhead: dict[str, Any]) -> str:
    med = overhead["median_s"]
    mem = overhead["memory"]
    rows = [
        "| measure | median ms | vs plain step |",
        "|---|---:|---:|",
        f"| plain step (fwd+bwd + AdamW) | {overhead['plain_step_s'] * 1e3:.2f} | 1 |",
        f"| AdamW step alone (plain) | {med['opt_plain'] * 1e3:.3f} | "
        f"{med['opt_plain'] / overhead['plain_step_s']:.4f} |",
        f"| PALSGD optimizer step (gradient step: coin, LR scaling, AdamW) | {med['opt_palsgd'] * 1e3:.3f} | "
        f"{med['opt_palsgd'] / overhead['plain_step_s']:.4f} |",
        f"| pseudo-sync pull (replaces a whole step) | {med['pull'] * 1e3:.3f} | {overhead['pull_ratio']:.4f} |",
        f"| sync, local work only (every H steps) | {med['sync'] * 1e3:.3f} | "
        f"{med['sync'] / overhead['plain_step_s']:.4f} |",
        f"| **PALSGD's own work per step** (1-p)·bookkeeping + p·pull + sync/H | "
        f"{overhead['own_work_per_step_s'] * 1e3:.3f} | **{overhead['own_work_ratio']:.4f}** |",
        "",
        f"Memory: model {mem['model_bytes'] / 1e6:.2f} MB; anchor {mem['anchor_bytes'] / 1e6:.2f} MB + outer "
        f"optimizer state {mem['outer_state_bytes'] / 1e6:.2f} MB = {mem['extra_ratio']:.2f}× the model's bytes "
        f"(weights + gradients + AdamW state = 4×, so PALSGD adds {mem['extra_ratio'] / 4:.0%} to the training "
        "state).",
    ]
    return "\n".join(rows)


def plot_link(label: str, link: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    target = link["summary"]["ddp"]["target_loss"]
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in _methods(link["runs"]):
        h = link["runs"][m]["history"]
        method, variant = split_run(m)
        kw = dict(label=run_label(m), color=COLORS.get(method), marker=".", linewidth=1.4,
                  linestyle="-" if variant is None else (":" if variant == "auto" else "--"))
        ax_t.plot([e["train_seconds"] for e in h], [e["eval_loss"] for e in h], **kw)
        ax_s.plot([e["step"] for e in h], [e["eval_loss"] for e in h], **kw)
    for ax, xlabel in ((ax_t, "training wall time (s, evaluation excluded)"), (ax_s, "optimizer step")):
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label="target (DDP final)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("eval loss (global model)")
        ax.grid(alpha=0.3)
        low = min(e["eval_loss"] for r in link["runs"].values() for e in r["history"])
        ax.set_ylim(low - 0.1, target + 1.5)  # the interesting part: the approach to the target
    ax_t.legend()
    fig.suptitle(f"Eval loss, link {label}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(bench: dict[str, Any], out_dir: Path, plots: bool = True) -> dict[str, Path]:
    """Summaries + ``results.json`` + ``results.md`` (+ PNGs); returns the written paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    add_summaries(bench)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    paths["json"].write_text(json.dumps(bench, indent=1, default=str))
    md = [f"# Benchmark results\n\nCommand: `{bench.get('command', '')}`\n", _machine_line(bench), "",
          markdown_table(bench)]
    if bench.get("overhead"):
        md += ["", "## PALSGD's own overhead (no communication)", "", overhead_table(bench["overhead"])]
    if plots:
        for label, link in bench["links"].items():
            path = out_dir / f"loss_{label}.png"
            plot_link(label, link, path)
            paths[f"plot_{label}"] = path
            md += ["", f"![eval loss, {label}]({path.name})"]
    paths["markdown"].write_text("\n".join(md) + "\n")
    logger.info("Benchmark report written to %s", out_dir)
    return paths


def _machine_line(bench: dict[str, Any]) -> str:
    m = bench.get("machine") or {}
    return "Machine: " + ", ".join(f"{k} {v}" for k, v in m.items()) if m else ""
