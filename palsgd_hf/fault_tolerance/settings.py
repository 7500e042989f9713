"""The settings of the fault-tolerant mode: where the lighthouse is, who this replica is, how long to wait.

Framework-free and validated on construction (value, rule, fix), like :class:`~palsgd_hf.config.PALSGDConfig`;
importing it does not import torchft.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import timedelta

from ..config import PALSGDConfigError


@dataclass
class FaultToleranceConfig:
    """How one replica takes part in a torchft-managed PALSGD run (one instance per replica process)."""

    lighthouse: str = field(metadata={"help": "Address of the torchft lighthouse, e.g. 'http://host:29510'."})
    replica_id: int = field(metadata={"help": "This replica's index, 0..replicas-1 (seeds per-replica coins)."})
    replicas: int = field(metadata={"help": "Replicas launched (>= 2). A sync averages over those alive then."})
    min_replicas: int = field(
        default=2, metadata={"help": "Fewest replicas a sync may average over; give the lighthouse the same value."}
    )
    timeout_seconds: float = field(
        default=60.0, metadata={"help": "Bound on one collective, one commit vote and one state transfer."}
    )
    quorum_timeout_seconds: float = field(
        default=600.0,
        metadata={"help": "Bound on waiting for a quorum: longer than a sync period (a rejoining replica waits for "
                          "the others' next sync)."},
    )
    max_attempts: int = field(
        default=5, metadata={"help": "Quorums one exchange may try (a replica dying mid-exchange costs one)."}
    )
    hostname: str = field(
        default="localhost", metadata={"help": "Name the other replicas reach this one by (its store, its state)."}
    )

    def __post_init__(self) -> None:
        if not isinstance(self.lighthouse, str) or "://" not in self.lighthouse:
            raise PALSGDConfigError(
                f"lighthouse={self.lighthouse!r} must be the lighthouse's URL, e.g. 'http://localhost:29510' "
                "(start one with: torchft_lighthouse --min_replicas 2 --bind [::]:29510)."
            )
        _check_int("replicas", self.replicas, 2, "fault tolerance needs at least two replicas; launch more")
        _check_int("min_replicas", self.min_replicas, 1, "use e.g. replicas // 2 + 1")
        if self.min_replicas > self.replicas:
            raise PALSGDConfigError(
                f"min_replicas={self.min_replicas} exceeds replicas={self.replicas}: no sync could ever happen; "
                f"use at most {self.replicas} (replicas // 2 + 1 = {self.replicas // 2 + 1} avoids two disjoint "
                "quorums)."
            )
        _check_int("replica_id", self.replica_id, 0, "number the replicas 0..replicas-1")
        if self.replica_id >= self.replicas:
            raise PALSGDConfigError(
                f"replica_id={self.replica_id} must be below replicas={self.replicas}; number them "
                f"0..{self.replicas - 1}."
            )
        _check_int("max_attempts", self.max_attempts, 1, "use e.g. 5")
        for name in ("timeout_seconds", "quorum_timeout_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise PALSGDConfigError(f"{name}={value!r} must be a positive, finite number of seconds; use e.g. 60.")

    @property
    def timeout(self) -> timedelta:
        return timedelta(seconds=float(self.timeout_seconds))

    @property
    def quorum_timeout(self) -> timedelta:
        return timedelta(seconds=float(self.quorum_timeout_seconds))


def _check_int(name: str, value, minimum: int, fix: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise PALSGDConfigError(f"{name}={value!r} must be an integer >= {minimum}; {fix}.")
