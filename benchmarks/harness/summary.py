"""From per-run histories to the numbers the benchmark claims: time to target, equal-token loss, bytes.

A run (one method on one link) is a dict with ``method``, ``steps`` (optimizer steps taken),
``train_seconds`` and ``history``: one entry per evaluation with ``step``, ``train_seconds`` (wall
time of training up to that step, evaluation excluded), ``eval_loss``, ``comm_bytes`` and
``comm_seconds`` (cumulative, from the collectives), and optionally ``comm_at_local_start``: the
cumulative bytes when the warm-up ended, so that bytes per step of the local phase alone can be
compared with DDP's (the warm-up steps are DDP steps by design). The target of every run on a link is DDP's
final eval loss on that link. Eval losses are those of the global model (for the local methods:
the anchor, i.e. the model as of the last outer sync).
"""

from __future__ import annotations

import math
from typing import Any, Optional

from .settings import split_run


def first_reach(history: list[dict], target: float, key: str = "train_seconds") -> Optional[float]:
    """``key`` at the first evaluation whose loss is <= ``target`` (None if never reached)."""
    for entry in history:
        if entry["eval_loss"] <= target:
            return float(entry[key])
    return None


def loss_at_step(history: list[dict], step: int) -> Optional[float]:
    """Eval loss at exactly ``step`` (evaluations are every k steps and DDP's last step is one)."""
    for entry in history:
        if entry["step"] == step:
            return float(entry["eval_loss"])
    return None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def _local_bytes_per_step(run: dict) -> Optional[float]:
    start = run.get("comm_at_local_start")
    if start is None or run["steps"] <= start["step"]:
        return None
    return (run["comm_bytes"] - start["comm_bytes"]) / (run["steps"] - start["step"])


def summarize_link(runs: dict[str, dict], unshaped: Optional[dict[str, dict]] = None) -> dict[str, dict[str, Any]]:
    """Per method: the comparison against DDP (and DiLoCo) on one link.

    With ``unshaped`` (the same methods' runs without shaping), ``extra_seconds_per_step`` is the
    time per step the link added: communication that was not hidden behind compute. It is the one
    measure of blocked time that also covers DDP, whose all-reduce runs inside backward where the
    communicator's ``comm_seconds`` cannot see it.
    """
    if "ddp" not in runs:
        raise ValueError(f"no DDP run among {sorted(runs)}: DDP's final eval loss is the target.")
    ddp = runs["ddp"]
    target = float(ddp["history"][-1]["eval_loss"])
    ddp_steps = int(ddp["steps"])
    ddp_bytes_per_step = ddp["comm_bytes"] / max(ddp["steps"], 1)
    ddp_loss = loss_at_step(ddp["history"], ddp_steps)
    out: dict[str, dict[str, Any]] = {}
    for method, run in runs.items():
        history = run["history"]
        equal_tokens = loss_at_step(history, ddp_steps)
        bytes_per_step = run["comm_bytes"] / max(run["steps"], 1)
        out[method] = {
            "target_loss": target,
            "steps": run["steps"],
            "train_seconds": run["train_seconds"],
            "seconds_per_step": run["train_seconds"] / max(run["steps"], 1),
            "time_to_target": first_reach(history, target),
            "steps_to_target": first_reach(history, target, key="step"),
            "final_eval_loss": float(history[-1]["eval_loss"]),
            "eval_loss_at_ddp_tokens": equal_tokens,
            "loss_gap_vs_ddp": _ratio(equal_tokens, ddp_loss) - 1 if _ratio(equal_tokens, ddp_loss) else None,
            "comm_bytes": run["comm_bytes"],
            "comm_seconds": run["comm_seconds"],
            "bytes_per_step": bytes_per_step,
            "bytes_per_step_vs_ddp": _ratio(bytes_per_step, ddp_bytes_per_step),
            "local_bytes_per_step_vs_ddp": _ratio(_local_bytes_per_step(run), ddp_bytes_per_step),
            "comm_fraction": _ratio(run["comm_seconds"], run["train_seconds"]),
            "extra_seconds_per_step": None,
        }
        base = (unshaped or {}).get(method)
        if base is not None and base is not run:
            out[method]["extra_seconds_per_step"] = (
                out[method]["seconds_per_step"] - base["train_seconds"] / max(base["steps"], 1))
    ddp_time = out["ddp"]["time_to_target"]
    diloco_time = out.get("diloco", {}).get("time_to_target")
    for row in out.values():
        row["time_to_target_vs_ddp"] = _ratio(row["time_to_target"], ddp_time)
        row["time_to_target_vs_diloco"] = _ratio(row["time_to_target"], diloco_time)
    return out


def _best_time(summary: dict[str, dict[str, Any]], method: str) -> Optional[float]:
    """The shortest time to target of ``method``'s runs (any H); None if none reached it."""
    reached = [row["time_to_target"] for run, row in summary.items()
               if split_run(run)[0] == method and row["time_to_target"] is not None]
    return min(reached, default=None)


def check_targets(summary: dict[str, dict[str, Any]], sync_interval: int,
                  rate_mbit: Optional[float] = None) -> dict[str, Any]:
    """Issue 17's targets for PALSGD with its defaults (the run 'palsgd') on one link: each True / False / None
    (not measurable). On a slow link (<= 100 Mbit/s) it must reach DDP's final loss in <= 0.45x DDP's time, on a
    faster or unshaped one in no more than DDP's; everywhere ahead of DiLoCo and of Local SGD at its best H."""
    row = summary.get("palsgd")
    if row is None:
        return {}

    def le(value: Optional[float], bound: float) -> Optional[bool]:
        return None if value is None else bool(value <= bound)

    def ahead_of(method: str) -> Optional[bool]:
        seconds = _best_time(summary, method)
        if seconds is None:  # the peer never reached the target (or did not run): ahead if PALSGD did
            return None if not any(split_run(r)[0] == method for r in summary) else row["time_to_target"] is not None
        return None if row["time_to_target"] is None else bool(row["time_to_target"] < seconds)

    bound = 0.45 if rate_mbit is not None and rate_mbit <= 100 else 1.0
    gap = row["loss_gap_vs_ddp"]
    return {
        f"time_to_target_le_{bound:g}x_ddp": le(row["time_to_target_vs_ddp"], bound),
        "ahead_of_localsgd_at_its_best_H": ahead_of("localsgd"),
        "ahead_of_diloco": ahead_of("diloco"),
        "equal_token_loss_within_2pct_of_ddp": None if gap is None else bool(gap <= 0.02),
        f"local_bytes_per_step_le_1/H (H={sync_interval})": le(row["local_bytes_per_step_vs_ddp"], 1.0 / sync_interval),
    }
