"""What a live replica hands to one that rejoins, and how the receiver takes it over.

torchft calls :meth:`StateTransfer.capture` on a live replica inside its quorum (its main thread is
blocked there) and serves the result over its checkpoint transport (HTTP); the receiver's
:meth:`StateTransfer.restore` runs inside its own quorum call. The payload:

* ``algorithm``: the PALSGD state of the serving replica: anchor (the global model) and outer
  optimizer state, step, counters, coin generator, sync schedule;
* ``weights`` and ``inner``: its local weights and its inner optimizer's state (learning rates
  included). During warm-up all replicas hold the same ones, so the receiver continues exactly; in
  the local phase the receiver's weights are replaced by the anchor at the sync it joins, and its
  inner optimizer state is the serving peer's, not its own (which died with it);
* ``position``: where the serving replica is (collective, size, phase), so the receiver resumes
  at the same point of the same step;
* ``extra``: whatever the caller registered (an LR scheduler, a data position).

In a replica of S ranks (FSDP2 or DeepSpeed ZeRO) each rank serves and takes its own shard: torchft pairs
rank r of the rejoining replica with rank r of the serving one, and the weights, anchor and inner optimizer
state travel as that rank's local shards (ZeRO: its fp32 partitions and the inner optimizer's state of them).

Kept as the receiver's own: its replica index, its communication counters. With per-replica coins
its generator is reseeded from (seed, replica, step) rather than copied: a copy would make two
replicas flip the same coins from then on.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from ..core.step_kinds import StepKind, coin_seed

logger = logging.getLogger(__name__)

OWN_KEYS = ("replica_index", "peers_stats", "replica_stats", "guard")


def detached_copy(obj: Any) -> Any:
    """``obj`` with every tensor cloned: torchft serves the payload while the serving replica trains on."""
    if torch.is_tensor(obj):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: detached_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(detached_copy(v) for v in obj)
    return obj


class StateTransfer:
    """The state fns handed to torchft's ``Manager`` for one replica (see the module docstring)."""

    def __init__(self, algorithm, inner_optimizer: torch.optim.Optimizer, comm, replica_id: int):
        self.algorithm, self.inner, self.comm, self.replica_id = algorithm, inner_optimizer, comm, replica_id
        self.extra: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = {}
        self.received = 0
        self.served = 0
        # The weights the model computes with are still to be rebuilt from the restored ones (DeepSpeed: a gather
        # within the replica, which the session runs on all of its ranks at once, never from inside torchft's quorum).
        self.weights_stale = False

    def register(self, key: str, state_dict: Callable[[], Any], load_state_dict: Callable[[Any], None]) -> None:
        if key in self.extra:
            raise ValueError(f"extra state {key!r} is registered twice; give each object its own key.")
        self.extra[key] = (state_dict, load_state_dict)

    def phase(self) -> str:
        """'warmup' (inside a warm-up step), 'sync' (inside a global sync), or 'start' (the local phase starts)."""
        algo = self.algorithm
        if algo.current_kind is StepKind.WARMUP:
            return "warmup"
        return "sync" if algo.in_local_phase else "start"

    def owned(self) -> list[torch.Tensor]:
        return [t for g in self.algorithm.adapter.owned_groups() for t in g.tensors]

    def _inner_state(self) -> dict[str, Any]:
        # Sharded (FSDP2) optimizer state travels as this rank's local shards: plain tensors, no device mesh.
        local = getattr(self.algorithm.adapter, "local_optimizer_state", None)
        return local(self.inner) if local is not None else self.inner.state_dict()

    # ------------------------------------------------------------------ the serving side
    def capture(self) -> dict[str, Any]:
        self.served += 1
        logger.info("replica %d serves its state (step %d, at %s) to a rejoining replica",
                    self.replica_id, self.algorithm.step, self.comm.position)
        return detached_copy({
            "position": list(self.comm.position),
            "algorithm": self.algorithm.state_dict(),
            "weights": self.owned(),
            "inner": self._inner_state(),
            "extra": {key: fns[0]() for key, fns in self.extra.items()},
        })

    # ------------------------------------------------------------------ the receiving side
    def restore(self, state: dict[str, Any]) -> None:
        algo = self.algorithm
        own = algo.state_dict()
        incoming = dict(state["algorithm"])
        for key in OWN_KEYS:
            if key in own:
                incoming[key] = own[key]
        if algo.config.coins == "per_replica":
            seed = coin_seed(algo.config.seed, self.replica_id) + 104_729 * int(incoming["step"])
            incoming["generator"] = torch.Generator().manual_seed(seed % (2**63 - 1)).get_state()
        algo.load_state_dict(incoming)
        with torch.no_grad():
            for t, saved in zip(self.owned(), state["weights"]):
                t.copy_(saved)
        if getattr(algo.adapter, "after_write_is_collective", False):
            self.weights_stale = True
        else:
            algo.adapter.after_write()
        load_local = getattr(algo.adapter, "load_local_optimizer_state", None)  # FSDP2: this rank's shard of it
        if load_local is not None:
            load_local(self.inner, state["inner"])
        else:
            self.inner.load_state_dict(state["inner"])
        for key, (_, load) in self.extra.items():
            if key in state["extra"]:
                load(state["extra"][key])
        self.comm.healed_at = tuple(state["position"])
        self.received += 1
        logger.info("replica %d took over a live peer's state: step %d, at %s (inner optimizer state: the peer's)",
                    self.replica_id, algo.step, self.comm.healed_at)
