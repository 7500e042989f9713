"""Per-replica numbers at every sync: how far each replica drifted, how much it computed, how long it waited.

Rank 0's palsgd/* metrics describe rank 0. What an operator needs differs per replica: which replica
lags (it took more gradient steps, with per-replica coins), how far each drifts from the global model,
how long each waited in the sync. With ``replica_metrics=True`` every rank contributes, right after
each sync, one row of five float64 values to one all-gather over its peer group (the ranks holding the
same shard in every replica), so every rank holds the rows of all replicas:

* ``drift``: ||x - x_bar|| / ||x_bar|| of the rank's owned tensors at the sync (before averaging);
* ``gradient_steps``, ``pseudo_syncs``: local steps of each kind since the previous sync;
* ``sync_seconds``: seconds blocked in this sync's exchange (the replica that arrived last waits least);
* ``step_seconds``: median seconds of a local gradient step in the period (0 if none was timed).

They are logged as ``palsgd/replica{i}/<name>``. Cost: one all-gather per sync (each rank sends 40 bytes),
counted in ``palsgd/comm_bytes``; off by default so that the bytes of a sync are the pseudo-gradient's.
Under sharding (``shard_size`` > 1) the drift is that of the rank's own partition.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from .comm import Communicator
from .sync_policy import StepTimer

FIELDS = ("drift", "gradient_steps", "pseudo_syncs", "sync_seconds", "step_seconds")


class ReplicaStats:
    """The rows of the last sync, one per replica, and what this rank counts toward its next row."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.rows: list[dict[str, float]] = []
        self._since: dict[str, int] = {"gradient_steps": 0, "pseudo_syncs": 0}
        self.timer = StepTimer(clock)

    def on_step_end(self, kind_counter: str) -> None:
        """After a local step (``kind_counter``: 'gradient_steps' or 'pseudo_syncs')."""
        self._since[kind_counter] = self._since.get(kind_counter, 0) + 1
        self.timer.on_step_end(kind_counter == "gradient_steps")

    def gather(self, peers: Communicator, drift: float, sync_seconds: float) -> None:
        """Collective over ``peers`` (every rank, right after the same sync)."""
        mine = torch.tensor([drift, self._since["gradient_steps"], self._since["pseudo_syncs"], sync_seconds,
                             self.timer.median()], dtype=torch.float64)
        rows = peers.all_gather_small(mine)
        self.rows = [dict(zip(FIELDS, row.tolist())) for row in rows]
        self._since = {"gradient_steps": 0, "pseudo_syncs": 0}
        self.timer.restart()

    def metrics(self) -> dict[str, float]:
        return {f"replica{i}/{name}": value for i, row in enumerate(self.rows) for name, value in row.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"rows": [dict(r) for r in self.rows], "since": dict(self._since)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = [dict(r) for r in state["rows"]]
        self._since = {k: int(v) for k, v in state["since"].items()}
