"""Project time per step (and time to quality) of DDP, DiLoCo and PALSGD to cluster scale.

The model (all times per optimizer step; formulas also in docs/projection.md):

* compute  ``T_c = 6 N b / (F * MFU)`` + PALSGD's own work ``eps * T_c`` (measured: :mod:`.overhead`)
  with N parameters, b tokens per GPU per step (the model's global batch G over n GPUs), F the
  GPU's peak dense bf16 FLOP/s;
* ring all-reduce of M bytes over n GPUs, each behind a link of B bit/s with per-hop latency alpha:
  ``A(M) = 2 (n-1)/n * 8 M / B + 2 (n-1) alpha``;
* DDP:     ``T_c + A(g N)``             (no overlap)   and ``max(T_c, A(g N))`` (perfect overlap);
* DiLoCo:  ``T_c + A(s N) / H``         (one blocking outer sync every H steps);
* PALSGD:  ``(1-p) T_c + eps T_c + A(s N) / H`` (a fraction p of steps skips forward/backward).

g and s are the bytes per parameter of a gradient (bf16: 2) and of a pseudo-gradient (fp32: 4 by
default; ``comm_dtype='bf16'`` gives 2). Time to quality multiplies a step time by the steps a
method needs relative to DDP's (``steps_ratio``: 1 = same steps; the CPU benchmark measures it).

Because T_c and A both grow with N, their ratio ``A(gN)/T_c ~ 8 g F MFU (n-1)/n / (3 b B)`` does not
depend on the model size (only alpha does): what decides PALSGD's edge over DDP is GPU speed over
(tokens per GPU x link speed). Its edge over DiLoCo is the skipped compute, at most 1/(1-p), and it
shrinks where the outer sync A(sN)/H dominates the step.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

# GPT-3 (Brown et al. 2020, Table 2.1) global batch sizes in tokens, by model size.
GLOBAL_BATCH_TOKENS = {125e6: 0.5e6, 350e6: 0.5e6, 1.3e9: 1e6, 2.7e9: 1e6, 7e9: 2e6}


@dataclass(frozen=True)
class Hardware:
    """An accelerator and its interconnect. Defaults: an H100 SXM (989 TFLOP/s dense bf16) at 40% MFU."""

    peak_flops: float = 989e12
    mfu: float = 0.40
    alpha_s: float = 10e-6  # per ring hop; RDMA fabrics ~2-10 us, TCP ~20-50 us
    grad_bytes_per_param: float = 2.0  # DDP's bf16 gradients
    sync_bytes_per_param: float = 4.0  # fp32 pseudo-gradient (comm_dtype='fp32', the default)


@dataclass(frozen=True)
class Scenario:
    params: float
    gpus: int
    link_gbit: float
    tokens_per_gpu: float
    sync_interval: int = 32
    pseudo_sync_prob: float = 0.2
    own_work_ratio: float = 0.005  # PALSGD's bookkeeping + pull + sync local work, per step (measured)

    def __post_init__(self) -> None:
        if self.gpus < 2 or self.params <= 0 or self.link_gbit <= 0 or self.tokens_per_gpu <= 0:
            raise ValueError(f"{self}: need gpus >= 2 and positive params, link_gbit, tokens_per_gpu.")
        if not 0 <= self.pseudo_sync_prob < 1 or self.sync_interval < 1:
            raise ValueError(f"{self}: need 0 <= pseudo_sync_prob < 1 and sync_interval >= 1.")


def allreduce_seconds(nbytes: float, n: int, bandwidth_bit_s: float, alpha_s: float) -> float:
    """Ring all-reduce: 2(n-1)/n of the message crosses each link, in 2(n-1) latency-bound hops."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * 8 * nbytes / bandwidth_bit_s + 2 * (n - 1) * alpha_s


def step_times(sc: Scenario, hw: Hardware = Hardware()) -> dict[str, float]:
    """Seconds per optimizer step of each method (and its parts) in scenario ``sc``."""
    compute = 6 * sc.params * sc.tokens_per_gpu / (hw.peak_flops * hw.mfu)
    bw = sc.link_gbit * 1e9
    grad_ar = allreduce_seconds(hw.grad_bytes_per_param * sc.params, sc.gpus, bw, hw.alpha_s)
    sync_ar = allreduce_seconds(hw.sync_bytes_per_param * sc.params, sc.gpus, bw, hw.alpha_s)
    p, H = sc.pseudo_sync_prob, sc.sync_interval
    return {
        "compute": compute,
        "grad_allreduce": grad_ar,
        "sync_allreduce": sync_ar,
        "ddp": compute + grad_ar,
        "ddp_overlap": max(compute, grad_ar),
        "diloco": compute + sync_ar / H,
        "palsgd": (1 - p + sc.own_work_ratio) * compute + sync_ar / H,
    }


def speedups(times: dict[str, float], steps_ratio: Optional[dict[str, float]] = None) -> dict[str, float]:
    """Time-to-quality ratios of PALSGD's (>1 = PALSGD faster), given steps needed relative to DDP."""
    r = {"ddp": 1.0, "diloco": 1.0, "palsgd": 1.0, **(steps_ratio or {})}
    palsgd = r["palsgd"] * times["palsgd"]
    return {
        "vs_ddp": times["ddp"] / palsgd,
        "vs_ddp_overlap": times["ddp_overlap"] / palsgd,
        "vs_diloco": r["diloco"] * times["diloco"] / palsgd,
    }


def default_grid(own_work_ratio: float = 0.005, sync_interval: int = 32,
                 pseudo_sync_prob: float = 0.2) -> list[Scenario]:
    """125M / 1.3B / 7B parameters x 8 / 64 GPUs x 10 / 100 / 400 Gbit/s, GPT-3 global batches."""
    out = []
    for params, gpus, link in itertools.product((125e6, 1.3e9, 7e9), (8, 64), (10, 100, 400)):
        batch = GLOBAL_BATCH_TOKENS[params]
        out.append(Scenario(params, gpus, link, batch / gpus, sync_interval, pseudo_sync_prob, own_work_ratio))
    return out


def project(scenarios: list[Scenario], hw: Hardware = Hardware(),
            steps_ratio: Optional[dict[str, float]] = None) -> list[dict[str, Any]]:
    rows = []
    for sc in scenarios:
        times = step_times(sc, hw)
        rows.append({"scenario": asdict(sc), "times": times, "speedup_equal_steps": speedups(times),
                     "speedup_measured_steps": speedups(times, steps_ratio) if steps_ratio else None})
    return rows


def _human(n: float) -> str:
    return f"{n / 1e9:g}B" if n >= 1e9 else f"{n / 1e6:g}M"


def markdown(rows: list[dict[str, Any]], steps_ratio: Optional[dict[str, float]] = None) -> str:
    head = ("| params | GPUs | link Gbit/s | tokens/GPU/step | T_c ms | DDP all-reduce ms | DDP ms | DDP overlap ms "
            "| DiLoCo ms | PALSGD ms | PALSGD vs DDP | vs DDP overlap | vs DiLoCo |")
    lines = [head, "|" + "|".join(["---:"] * 13) + "|"]
    for row in rows:
        sc, t = row["scenario"], row["times"]
        sp = row["speedup_measured_steps"] if steps_ratio else row["speedup_equal_steps"]
        lines.append(
            f"| {_human(sc['params'])} | {sc['gpus']} | {sc['link_gbit']:g} | {sc['tokens_per_gpu']:,.0f} | "
            f"{t['compute'] * 1e3:.1f} | {t['grad_allreduce'] * 1e3:.1f} | {t['ddp'] * 1e3:.1f} | "
            f"{t['ddp_overlap'] * 1e3:.1f} | {t['diloco'] * 1e3:.1f} | {t['palsgd'] * 1e3:.1f} | "
            f"{sp['vs_ddp']:.2f}× | {sp['vs_ddp_overlap']:.2f}× | {sp['vs_diloco']:.2f}× |"
        )
    return "\n".join(lines)


def breakeven_steps_ratio(times: dict[str, float]) -> dict[str, float]:
    """How many times DDP's steps PALSGD may take and still tie: DDP (overlap) and DiLoCo (same steps)."""
    return {k: times[k] / times["palsgd"] for k in ("ddp", "ddp_overlap", "diloco")}


def plot(path: Path, hw: Hardware = Hardware(), own_work_ratio: float = 0.005, sync_interval: int = 32,
         pseudo_sync_prob: float = 0.2) -> None:
    """PALSGD's step-time advantage vs link speed, per model size and GPU count (equal steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    links = [10 * 2 ** (i / 4) for i in range(int(4 * math.log2(400 / 10)) + 1)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, gpus in zip(axes, (8, 64)):
        for params, color in zip((125e6, 1.3e9, 7e9), ("tab:green", "tab:blue", "tab:red")):
            b = GLOBAL_BATCH_TOKENS[params] / gpus
            sc = [Scenario(params, gpus, link, b, sync_interval, pseudo_sync_prob, own_work_ratio) for link in links]
            sp = [speedups(step_times(s, hw)) for s in sc]
            ax.plot(links, [x["vs_ddp_overlap"] for x in sp], color=color, label=f"{_human(params)} vs DDP (overlap)")
            ax.plot(links, [x["vs_diloco"] for x in sp], color=color, linestyle=":",
                    label=f"{_human(params)} vs DiLoCo")
        ax.axhline(1.0, color="grey", linewidth=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("link bandwidth per GPU (Gbit/s)")
        ax.set_title(f"{gpus} GPUs, H={sync_interval}, p={pseudo_sync_prob:g}")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("step-time speedup of PALSGD (equal steps)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def validate(compute_s: float, link_fit: dict, workers: int, params: int, sync_interval: int,
             pseudo_sync_prob: float, own_work_ratio: float) -> dict[str, float]:
    """The model's step times for the CPU benchmark itself (measured compute and link; fp32 on the wire)."""
    bw = link_fit["link_mbit_s"] * 1e6
    alpha = link_fit.get("alpha_s", 0.0) / max(2 * (workers - 1), 1)
    grad_ar = allreduce_seconds(4 * params, workers, bw, alpha)
    p, H = pseudo_sync_prob, sync_interval
    return {
        "compute": compute_s,
        "ddp": compute_s + grad_ar,
        "ddp_overlap": max(compute_s, grad_ar),
        "diloco": compute_s + grad_ar / H,
        "localsgd": compute_s + grad_ar / H,
        "palsgd": (1 - p + own_work_ratio) * compute_s + grad_ar / H,
    }
