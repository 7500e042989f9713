"""Write the projection: a markdown table, a JSON file and a plot, optionally tied to a measured run.

With a benchmark's ``results.json`` the projection takes PALSGD's measured own work per step
(``overhead.own_work_ratio``) and the measured steps each method needed to reach DDP's loss on the
shaped link (relative to DDP's), and it first checks the model on the benchmark itself: the
measured compute time per step (the overhead micro-benchmark's plain step, one process, one
thread; else the unshaped link's Local SGD step) plus the measured link (probe fit) predict each
method's time per step on the shaped link, side by side with what was measured.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from .projection import Hardware, default_grid, markdown, plot, project, validate

FORMULAS = """\
Per optimizer step (n GPUs, N parameters, b tokens per GPU per step, link B bit/s per GPU, hop latency alpha):

    T_c        = 6 N b / (F * MFU)                         compute (F: peak bf16 FLOP/s)
    A(M)       = 2 (n-1)/n * 8 M / B + 2 (n-1) alpha        ring all-reduce of M bytes
    DDP        = T_c + A(g N)            (no overlap)       DDP overlap = max(T_c, A(g N))
    DiLoCo     = T_c + A(s N) / H
    PALSGD     = (1 - p + eps) T_c + A(s N) / H              eps: PALSGD's own work per step / T_c

g = 2 (bf16 gradients), s = bytes per parameter of the pseudo-gradient (4 = fp32). Time to quality =
step time x steps needed relative to DDP (columns below assume equal steps unless stated).
PALSGD beats DDP (overlap) iff steps_ratio < max(T_c, A(gN)) / ((1-p+eps) T_c + A(sN)/H): the
"vs DDP overlap" column is exactly the steps ratio PALSGD can afford. Since A(gN)/T_c =
8 g F MFU (n-1)/n / (3 b B), the model size cancels (except through alpha)."""


def _steps_ratios(link: dict[str, Any]) -> dict[str, Optional[float]]:
    summary = link["summary"]
    ddp = summary["ddp"]["steps_to_target"]
    return {m: (row["steps_to_target"] / ddp if row["steps_to_target"] and ddp else None)
            for m, row in summary.items()}


def _shaped_link(bench: dict[str, Any]) -> Optional[tuple[str, dict]]:
    shaped = [(label, link) for label, link in bench["links"].items() if link["link"].get("rate_mbit")]
    return shaped[0] if shaped else None


def model_check(bench: dict[str, Any]) -> Optional[dict[str, Any]]:
    """Predicted vs measured seconds per step on the shaped link of a benchmark."""
    shaped = _shaped_link(bench)
    overhead = bench.get("overhead") or {}
    params = overhead.get("settings", {}).get("parameters")
    if shaped is None or params is None or not (shaped[1].get("probe") or {}).get("fit"):
        return None
    label, link = shaped
    s = bench["settings"]
    unshaped = bench["links"].get("unshaped", {}).get("summary", {})
    if overhead.get("plain_step_s"):
        compute, source = overhead["plain_step_s"], "plain step of the overhead micro-benchmark"
    elif "localsgd" in unshaped:
        compute, source = unshaped["localsgd"]["seconds_per_step"], "unshaped Local SGD step"
    else:
        return None
    own = (bench.get("overhead") or {}).get("own_work_ratio", 0.0)
    predicted = validate(compute, link["probe"]["fit"], s["workers"], params, s["sync_interval"],
                         s["pseudo_sync_prob"], own)
    measured = {m: row["seconds_per_step"] for m, row in link["summary"].items()}
    return {"link": label, "compute_s": compute, "compute_source": source, "predicted": predicted,
            "measured": measured}


def _check_table(check: dict[str, Any]) -> str:
    rows = ["| method | predicted s/step | measured s/step | measured / predicted |", "|---|---:|---:|---:|"]
    for m, meas in check["measured"].items():
        pred = check["predicted"].get(m)
        if pred is None:
            continue
        extra = f" (overlap bound {check['predicted']['ddp_overlap']:.3f})" if m == "ddp" else ""
        rows.append(f"| {m} | {pred:.3f}{extra} | {meas:.3f} | {meas / pred:.2f} |")
    return "\n".join(rows)


def write_projection(out: Path, results: Optional[Path] = None, *, mfu: float = 0.40, alpha_s: float = 10e-6,
                     sync_bytes_per_param: float = 4.0, sync_interval: int = 32,
                     pseudo_sync_prob: float = 0.2) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    hw = Hardware(mfu=mfu, alpha_s=alpha_s, sync_bytes_per_param=sync_bytes_per_param)
    bench = json.loads(results.read_text()) if results else None
    own = (bench or {}).get("overhead", {}) or {}
    own_ratio = own.get("own_work_ratio", 0.005)
    steps_ratio = None
    md = ["# Projection to cluster scale", "", "```", FORMULAS, "```", "",
          f"Assumptions: H100 SXM, F = {hw.peak_flops / 1e12:.0f} TFLOP/s dense bf16 at MFU {mfu:.0%}; "
          f"alpha = {alpha_s * 1e6:g} us per hop; one link of the stated speed per GPU; GPT-3 global batches "
          f"(125M: 0.5M tokens, 1.3B: 1M, 7B: 2M) split over the GPUs; g = {hw.grad_bytes_per_param:g}, "
          f"s = {sync_bytes_per_param:g} bytes/param; H = {sync_interval}, p = {pseudo_sync_prob:g}, "
          f"eps = {own_ratio:.4f}" + (" (measured)" if own else " (assumed)") + "."]
    check = None
    if bench is not None:
        from .report import add_summaries

        add_summaries(bench)
        shaped = _shaped_link(bench)
        if shaped:
            ratios = _steps_ratios(shaped[1])
            if all(ratios.get(m) for m in ("palsgd", "diloco")):
                steps_ratio = {m: ratios[m] for m in ("palsgd", "diloco")}
            md += ["", f"Measured steps to DDP's loss on {shaped[0]}, relative to DDP's: "
                   + ", ".join(f"{m} {'not reached' if r is None else f'{r:.2f}'}" for m, r in ratios.items()) + "."]
        check = model_check(bench)
        if check:
            md += ["", f"## The model on the measured benchmark ({check['link']})", "",
                   f"Compute per step {check['compute_s']:.3f} s ({check['compute_source']}) + the measured link "
                   "(probe fit); fp32 gradients and pseudo-gradients on the wire:", "",
                   _check_table(check)]
    rows = project(default_grid(own_ratio, sync_interval, pseudo_sync_prob), hw, steps_ratio)
    md += ["", "## Step time and PALSGD's advantage at equal steps", "", markdown(rows)]
    if steps_ratio:
        md += ["", f"## Time to quality with the measured steps ratios {steps_ratio}", "",
               markdown(rows, steps_ratio)]
    plot(out / "projection.png", hw, own_ratio, sync_interval, pseudo_sync_prob)
    md += ["", "![projection](projection.png)"]
    paths = {"markdown": out / "projection.md", "json": out / "projection.json", "plot": out / "projection.png"}
    paths["markdown"].write_text("\n".join(md) + "\n")
    paths["json"].write_text(json.dumps({"hardware": asdict(hw), "rows": rows, "steps_ratio": steps_ratio,
                                         "model_check": check}, indent=1))
    return paths
