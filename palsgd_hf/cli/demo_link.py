"""The demo's emulated slow link: modeled time over a link of a given bandwidth, and time to a target loss.

The demo's runs share loopback, where communication is nearly free, so their measured seconds
hide what PALSGD saves. This module charges each run its traffic at a chosen link speed, from
what every evaluation recorded (``eval_history`` in result.json, written by
palsgd_hf/cli/run.py): for each evaluation point,

    modeled_s = train_s + 2(n-1)/n * 8 * comm_bytes / bandwidth + 2(n-1) * comm_calls * latency

``train_s`` the measured training seconds up to that point (evaluations excluded), ``comm_bytes``
and ``comm_calls`` this rank's bytes and collectives so far (DDP's gradient buckets and PALSGD's
warm-up, syncs and flags alike), n the processes. 2(n-1)/n of an all-reduced payload crosses
each rank's link in a ring all-reduce, in 2(n-1) latency-bound hops (the same model as
benchmarks/harness/projection.py; at 2 processes the bytes are charged once, and each collective
two latencies). Every byte is charged in full: no overlap with compute is credited, neither
DDP's bucket overlap with backward nor PALSGD's ``overlap_steps`` (off by default). The
loopback's own (small) communication time stays in ``train_s``, so the model slightly
over-charges both methods. It is a model, not a measurement: the demo labels it so.

Time to a target loss is the modeled time of the first evaluation at or below it: a point on
the curve, never an interpolation; ``None`` when no evaluation reaches it.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Any, Optional

# Losses are compared to a target with this slack (nats), so that a run's final evaluation, which
# repeats its last in-training one, reaches its own final loss whatever the last bit of the sum.
LOSS_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Link:
    """An emulated link: ``mbit`` None = off (modeled time = measured time)."""

    mbit: Optional[float] = 100.0
    latency_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.mbit is not None and not self.mbit > 0:
            raise ValueError(f"link mbit={self.mbit!r}: give a bandwidth > 0 in Mbit/s, or None for no link model.")
        if not self.latency_ms >= 0:
            raise ValueError(f"link latency_ms={self.latency_ms!r}: give a latency >= 0 in milliseconds.")

    @property
    def on(self) -> bool:
        return self.mbit is not None

    @property
    def label(self) -> str:
        if not self.on:
            return "no link model (loopback)"
        latency = f", {self.latency_ms:g} ms per hop" if self.latency_ms else ""
        return f"emulated {self.mbit:g} Mbit/s{latency}"

    def seconds(self, comm_bytes: float, comm_calls: float, world: int) -> float:
        """Seconds this link charges a rank that sent ``comm_bytes`` in ``comm_calls`` collectives."""
        if not self.on or world < 2:
            return 0.0
        ring = 2 * (world - 1) / world
        return ring * 8 * comm_bytes / (self.mbit * 1e6) + 2 * (world - 1) * comm_calls * self.latency_ms / 1e3

    def formula(self, world: int) -> str:
        """The charge in words, for ``world`` processes (the ring factors written out only where they are not 1)."""
        ring = "" if world == 2 else "2(n-1)/n x "
        hops = "2" if world == 2 else "2(n-1)"
        latency = f" + collectives x {hops} hops x {self.latency_ms:g} ms" if self.latency_ms else ""
        return f"measured training s + {ring}bytes sent x 8 / {self.mbit:g} Mbit/s{latency}"

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "emulated": True, "label": self.label,
                "model": "modeled_s = train_s + 2(n-1)/n * 8 * comm_bytes / bandwidth + 2(n-1) * comm_calls * latency"}


def parse_mbit(text: str) -> Optional[float]:
    """``--link_mbit``: a bandwidth in Mbit/s; ``0``, ``none`` or ``off`` turn the link model off."""
    if text.strip().lower() in ("none", "off", "0", "0.0"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give Mbit/s as a number (e.g. 100), or 0 / none for no link")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the bandwidth must be > 0 Mbit/s (0 or none: no link model)")
    return value


def dedup(history: list[dict[str, float]]) -> list[dict[str, float]]:
    """One point per step, in step order. The final evaluate() repeats the last in-training step: keep it (the
    later entry), whose loss is the run's final_eval_loss and whose counters include anything sent after."""
    seen: dict[int, dict[str, float]] = {}
    for h in history:
        seen[h["step"]] = h
    return sorted(seen.values(), key=lambda h: h["step"])


def modeled_curve(history: list[dict[str, float]], link: Link, world: int) -> list[dict[str, float]]:
    """Each evaluation as ``{step, eval_loss, measured_s, modeled_s}``; measured_s = modeled_s without a link."""
    curve = []
    for h in dedup(history):
        measured = h.get("train_s", h["elapsed_s"])
        if link.on and "comm_bytes" not in h:
            raise ValueError(f"eval_history at step {h['step']} has no comm_bytes: this run cannot be charged "
                             "for a link (it predates the counters, or ran without PALSGD's trainer).")
        charged = link.seconds(h.get("comm_bytes", 0.0), h.get("comm_calls", 0.0), world)
        curve.append({"step": h["step"], "eval_loss": h["eval_loss"], "measured_s": measured,
                      "modeled_s": measured + charged})
    return curve


def time_to_loss(curve: list[dict[str, float]], target: float) -> Optional[dict[str, float]]:
    """The first point of ``curve`` at or below ``target`` (within LOSS_TOLERANCE), or None: never reached."""
    return next((p for p in curve if p["eval_loss"] <= target + LOSS_TOLERANCE), None)


def compare(results: dict[str, dict[str, Any]], link: Link) -> dict[str, dict[str, Any]]:
    """Per method: its modeled curve, final measured and modeled seconds, and time to DDP's final loss.

    The target is DDP's final eval loss (none without a DDP run); ``x_ddp`` divides a method's time
    to it by DDP's. ``common_loss`` is the highest final loss of all methods, which every one of
    them reaches: time to it compares the methods at a quality all of them attain.
    """
    curves = {m: modeled_curve(r["eval_history"], link, r["world_size"]) for m, r in results.items()}
    target = results["ddp"]["final_eval_loss"] if "ddp" in results else None
    common = max(r["final_eval_loss"] for r in results.values())
    ddp_hit = time_to_loss(curves["ddp"], target) if target is not None else None
    out = {}
    for method, curve in curves.items():
        hit = time_to_loss(curve, target) if target is not None else None
        common_hit = time_to_loss(curve, common)
        out[method] = {
            "link": link.describe(),
            "measured_s": curve[-1]["measured_s"],
            "modeled_s": curve[-1]["modeled_s"],
            "target_loss": target,
            "reached": hit is not None,
            "time_to_target_s": hit["modeled_s"] if hit else None,
            "time_to_target_step": hit["step"] if hit else None,
            "x_ddp": hit["modeled_s"] / ddp_hit["modeled_s"] if hit and ddp_hit and ddp_hit["modeled_s"] > 0 else None,
            "common_loss": common,
            "time_to_common_s": common_hit["modeled_s"] if common_hit else None,
            "time_to_common_step": common_hit["step"] if common_hit else None,
            "curve": curve,
        }
    return out
