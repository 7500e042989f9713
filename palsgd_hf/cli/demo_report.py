"""What ``palsgd-hf demo`` shows at the end: the table, the loss-curve plot and summary.json.

Inputs are each method's result.json (palsgd_hf/cli/run.py) and the link model's comparison
(palsgd_hf/cli/demo_link.py). Every modeled figure is labelled as such where it appears: the
table's header line and column names, the plot's third panel, the summary's ``modeled`` entries.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from .demo_link import Link


def format_table(results: dict[str, dict[str, Any]], modeled: dict[str, dict[str, Any]], link: Link) -> str:
    """Plain-text table, one row per method, with the link model stated above it and the common loss below."""
    at = f"@{link.mbit:g}Mbit" if link.on else "(no link)"
    header = ("method", "steps", "eval loss", "MB sent/rank", "syncs", "measured s", f"modeled s {at}",
              "to DDP's loss, modeled s", "x DDP")
    rows = [header]
    for method, r in results.items():
        p, m = r.get("palsgd", {}), modeled[method]
        rows.append((
            method, str(r.get("global_steps", "-")), f"{r['final_eval_loss']:.4f}",
            f"{p.get('comm_bytes', 0) / 1e6:.1f}",
            f"{p.get('outer_syncs', 0):.0f}", f"{m['measured_s']:.1f}", f"{m['modeled_s']:.1f}",
            _time_cell(m, r), "-" if m["x_ddp"] is None else f"{m['x_ddp']:.2f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    first = next(iter(modeled.values()))
    if link.on:
        world = next(iter(results.values()))["world_size"]
        lines.insert(0, f"Link: {link.label.upper()} (modeled, not measured): modeled s = {link.formula(world)}; "
                        "measured s = training time on loopback, evaluations excluded.")
    else:
        lines.insert(0, "Link: none (--link_mbit 0): modeled s = measured training s on loopback.")
    if len(results) > 1:
        lines.append(f"All methods reach {first['common_loss']:.4f} (the highest final loss): " + ", ".join(
            "{} at {}".format(method, "not reached" if m["time_to_common_s"] is None else
                              f"{m['time_to_common_s']:.1f} s (step {m['time_to_common_step']})")
            for method, m in modeled.items()) + (" modeled." if link.on else "."))
    return "\n" + "\n".join(lines)


def _time_cell(m: dict[str, Any], r: dict[str, Any]) -> str:
    if m["target_loss"] is None:
        return "- (no ddp run)"
    if not m["reached"]:
        return f"not reached (final {r['final_eval_loss']:.4f})"
    return f"{m['time_to_target_s']:.1f} (step {m['time_to_target_step']})"


def write_summary(results: dict[str, dict[str, Any]], modeled: dict[str, dict[str, Any]], path: Path) -> None:
    """summary.json: each method's result (less the per-rank metrics) with its ``modeled`` link figures."""
    summary = {m: {**{k: v for k, v in r.items() if k != "palsgd_per_rank"}, "modeled": modeled[m]}
               for m, r in results.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1))


def plot_curves(results: dict[str, dict[str, Any]], modeled: dict[str, dict[str, Any]], link: Link,
                path: Path) -> None:
    """Eval loss over optimizer steps, over measured training seconds and over modeled seconds at the link."""
    # matplotlib is the [demo] extra's, imported only to plot. A Figure of its own (no pyplot) draws to a
    # file without touching the caller's backend or pyplot state.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.6))
    by_step, by_time, by_link = fig.subplots(1, 3, sharey=True)
    first = next(iter(modeled.values()))
    target: Optional[float] = first["target_loss"]
    for method, m in modeled.items():
        curve = m["curve"]
        losses = [p["eval_loss"] for p in curve]
        line, = by_step.plot([p["step"] for p in curve], losses, marker="o", label=method)
        by_time.plot([p["measured_s"] for p in curve], losses, marker="o", label=method)
        missed = "" if m["reached"] or target is None else " (never reaches DDP's final loss)"
        by_link.plot([p["modeled_s"] for p in curve], losses, marker="o", label=method + missed)
        if m["reached"] and target is not None:
            by_link.plot([m["time_to_target_s"]], [_loss_at(curve, m["time_to_target_step"])], marker="*",
                         markersize=15, color=line.get_color(),
                         linestyle="none", label=f"{method} at DDP's final loss: {m['time_to_target_s']:.0f} s")
        if len(modeled) > 1 and m["time_to_common_s"] is not None and first["common_loss"] != target:
            by_link.plot([m["time_to_common_s"]], [_loss_at(curve, m["time_to_common_step"])], marker="s",
                         markersize=10, fillstyle="none", color=line.get_color(), linestyle="none",
                         label=f"{method} at {first['common_loss']:.3f}: {m['time_to_common_s']:.0f} s")
    if target is not None:
        by_link.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"DDP's final loss {target:.3f}")
    if len(modeled) > 1 and first["common_loss"] != target:
        by_link.axhline(first["common_loss"], color="grey", linestyle=":", linewidth=1,
                        label=f"highest final loss {first['common_loss']:.3f} (all reach it)")
    # The first evaluation (an untrained model) would squash the differences that matter into the bottom of
    # the panels: start the axis just above the second evaluation's losses and let that segment leave the frame.
    later = [p["eval_loss"] for m in modeled.values() for p in m["curve"][1:]]
    if later:
        span = max(later) - min(later)
        by_step.set_ylim(min(later) - 0.05 * span - 0.01, max(later) + 0.15 * span + 0.01)
    by_step.set_xlabel("optimizer step")
    by_time.set_xlabel("measured training time on loopback (s)")
    by_link.set_xlabel(f"MODELED time (s) over an {link.label} link" if link.on else "training time (s), no link model")
    world = next(iter(results.values()))["world_size"]
    by_link.set_title(f"modeled s = {link.formula(world)}" if link.on else "link model off", fontsize=9)
    by_step.set_ylabel("eval loss (global model)")
    for ax in (by_step, by_time, by_link):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Tiny GPT-Neo on Shakespeare, {world} processes: DDP vs PALSGD")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _loss_at(curve: list[dict[str, float]], step: int) -> float:
    # Markers sit on the evaluation that reached a loss (a point of the curve), not on the loss's line.
    return next(p["eval_loss"] for p in curve if p["step"] == step)
