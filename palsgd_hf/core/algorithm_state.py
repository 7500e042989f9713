"""What one PALSGD rank reports, saves and restores: its palsgd/* metrics and its state dict.

The state machine (algorithm.py) owns the fields; this module is the one place that knows which of
them make up a checkpoint and how they are restored and checked (a checkpoint written with another
method, sync interval, shard layout, coin mode or replica is refused, naming the setting).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .outer import Anchor
from .overlap import PendingSync
from .step_kinds import COUNTERS, StepKind

if TYPE_CHECKING:
    from .algorithm import PALSGD

# Settings a resumed run must share with the run that wrote the checkpoint: they decide what the saved
# state means (the coin stream, the sync schedule, whose partition a file holds). Run-time settings such as
# comm_timeout_seconds are left out on purpose: resuming with a longer or shorter timeout is legitimate.
MUST_MATCH = ("method", "sync_interval", "sync_policy", "shard_size", "coins", "fragments")


def metrics(algo: "PALSGD") -> dict[str, float]:
    """The palsgd/* log values (without the prefix)."""
    out: dict[str, float] = {name: float(v) for name, v in algo.counters.items()}
    out["comm_bytes"] = float(algo.peers.stats.bytes_sent + algo.replica.stats.bytes_sent)
    out["comm_seconds"] = algo.peers.stats.seconds_blocked + algo.replica.stats.seconds_blocked
    # The pseudo-gradient exchanges alone: time blocked in them (the exposed cost of the outer
    # syncs) and time they ran hidden behind local steps (overlap_steps > 0).
    out["sync_seconds_blocked"] = algo.sync_seconds_blocked
    out["comm_seconds_overlapped"] = algo.peers.stats.seconds_overlapped
    out["drift"] = algo.last_drift
    out["mixing_coefficient"] = algo.last_mixing_coefficient
    out.update(algo.guard.metrics())
    out.update(algo.schedule.metrics())
    if algo.replica_stats is not None:
        out.update(algo.replica_stats.metrics())
    return out


def save(algo: "PALSGD") -> dict[str, Any]:
    """This rank's state (an overlapped sync in flight is waited for and saved with x_launch)."""
    return {
        "step": algo.step,
        "counters": dict(algo.counters),
        "generator": algo._generator.get_state(),
        "kind": None if algo._kind is None else algo._kind.value,
        "since_sync": algo._since_sync,
        "last_drift": algo.last_drift,
        "last_mixing_coefficient": algo.last_mixing_coefficient,
        "anchor": None if algo._anchor is None else algo._anchor.state_dict(),
        "pending_sync": None if algo._pending is None else algo._pending.state_dict(),
        "sync_seconds_blocked": algo.sync_seconds_blocked,
        "peers_stats": algo.peers.stats.state_dict(),
        "replica_stats": algo.replica.stats.state_dict(),
        "replica_index": algo.replica_index,
        "guard": algo.guard.state_dict(),
        "schedule": algo.schedule.state_dict(),
        "per_replica": None if algo.replica_stats is None else algo.replica_stats.state_dict(),
        # One fragment: the residuals' dict, as before fragments existed; F > 1: a list, one per fragment.
        "feedback": None if algo.feedbacks is None else (
            algo.feedbacks[0].state_dict() if len(algo.feedbacks) == 1 else [f.state_dict() for f in algo.feedbacks]),
        "config": algo.config.to_dict(),
    }


def load(algo: "PALSGD", state: dict[str, Any]) -> None:
    """Restore ``state`` (from :func:`save`) into ``algo``, refusing a checkpoint of another layout."""
    saved_cfg = state.get("config", {})
    for key in MUST_MATCH:
        if key in saved_cfg and saved_cfg[key] != getattr(algo.config, key):
            raise ValueError(
                f"the checkpoint was written with {key}={saved_cfg[key]!r} but this run has "
                f"{key}={getattr(algo.config, key)!r}; resume with the same setting or start a new run."
            )
    if state.get("replica_index", algo.replica_index) != algo.replica_index:
        raise ValueError(
            f"the checkpoint belongs to replica {state['replica_index']} but this rank is replica "
            f"{algo.replica_index}; resume with the same number of processes and shard layout."
        )
    algo.step = int(state["step"])
    algo.counters = {name: int(state["counters"].get(name, 0)) for name in COUNTERS}
    algo._generator.set_state(state["generator"])
    algo._kind = None if state["kind"] is None else StepKind(state["kind"])
    algo._since_sync = int(state["since_sync"])
    algo.last_drift = float(state["last_drift"])
    algo.last_mixing_coefficient = float(state["last_mixing_coefficient"])
    algo.peers.stats.load_state_dict(state["peers_stats"])
    algo.replica.stats.load_state_dict(state["replica_stats"])
    if state["anchor"] is None:
        algo._anchor = None
    else:
        algo._anchor = Anchor(algo._owned_tensors(), algo.config, algo.anchor_device)
        algo._anchor.load_state_dict(state["anchor"])
    algo.sync_seconds_blocked = float(state.get("sync_seconds_blocked", 0.0))
    algo.guard.load_state_dict(state.get("guard", {}))
    if state.get("schedule") is not None:
        algo.schedule.load_state_dict(state["schedule"])
    if algo.replica_stats is not None and state.get("per_replica") is not None:
        algo.replica_stats.load_state_dict(state["per_replica"])
    if algo.feedbacks is not None and state.get("feedback") is not None:
        _load_feedbacks(algo, state["feedback"])
    algo._pending = None
    if state.get("pending_sync") is not None:
        owned = algo._owned_tensors()
        fragment = state["pending_sync"].get("fragment")
        anchors = [a for a, _ in algo._anchor.pairs(owned, algo.fragments.members(fragment))]
        feedback = None if algo.feedbacks is None else algo.feedbacks[fragment or 0]
        algo._pending = PendingSync.from_state(state["pending_sync"], algo.peers, anchors, owned[0].device, feedback)
    algo._grad_sync = None  # re-applied to the backend at the next step


def _load_feedbacks(algo: "PALSGD", saved: Any) -> None:
    """The int8/int4 residuals: one dict (one fragment) or a list of one per fragment."""
    saved = [saved] if isinstance(saved, dict) else list(saved)
    if len(saved) != len(algo.feedbacks):
        raise ValueError(f"the checkpoint holds int8/int4 residuals of {len(saved)} fragments but this run has "
                         f"fragments={len(algo.feedbacks)}; resume with the checkpoint's fragments.")
    owned = algo._owned_tensors()
    for fragment, (feedback, state) in enumerate(zip(algo.feedbacks, saved)):
        idx = algo.fragments.members(None if len(saved) == 1 else fragment)
        numel = sum(owned[i].numel() for i in (range(len(owned)) if idx is None else idx))
        feedback.load_state_dict(state, owned[0].device, algo.peers.size, numel)
