"""Replica x shard layout: which ranks form one worker, and which ranks PALSGD averages over.

The world of W ranks is R = W / S replicas of S ranks each. Rank ``r`` is shard ``r % S`` of
replica ``r // S``. Inside a replica the S ranks shard one model copy (ZeRO); across replicas the
ranks that own the same shard form a *peer group*: that is the group a pseudo-gradient is
averaged over, each rank exchanging only the partition it owns. With S = 1 every rank is its own
replica and the peer group is the whole world.

    W = 4, S = 2:   replica groups {0,1} {2,3}     peer groups {0,2} {1,3}
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

from ..config import PALSGDConfigError


@dataclass(frozen=True)
class Topology:
    world_size: int
    rank: int
    shard_size: int = 1

    def __post_init__(self) -> None:
        if self.shard_size < 1 or self.world_size % self.shard_size != 0:
            raise PALSGDConfigError(
                f"world size {self.world_size} is not divisible by shard_size={self.shard_size}: every replica "
                f"needs exactly shard_size ranks; launch a multiple of {self.shard_size} processes or change "
                "shard_size."
            )

    @classmethod
    def from_environment(cls, shard_size: int = 1) -> "Topology":
        """The layout of the running job (a single process when torch.distributed is not initialized)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_world_size(), dist.get_rank(), shard_size)
        return cls(1, 0, shard_size)

    @property
    def num_replicas(self) -> int:
        return self.world_size // self.shard_size

    @property
    def replica_index(self) -> int:
        return self.rank // self.shard_size

    @property
    def shard_index(self) -> int:
        return self.rank % self.shard_size

    def replica_ranks(self, replica: int) -> list[int]:
        """The S ranks that shard replica ``replica``'s model copy."""
        return list(range(replica * self.shard_size, (replica + 1) * self.shard_size))

    def peer_ranks(self, shard: int) -> list[int]:
        """The R ranks, one per replica, that own shard ``shard``."""
        return list(range(shard, self.world_size, self.shard_size))


@dataclass
class ProcessGroups:
    """This rank's groups: ``replica`` (ZeRO inside a worker) and ``peers`` (PALSGD across workers).

    A group is ``None`` when it would be the whole world, so callers use the default group.
    """

    replica: Optional[dist.ProcessGroup]
    peers: Optional[dist.ProcessGroup]


def build_process_groups(topology: Topology, timeout: Optional[timedelta] = None) -> ProcessGroups:
    """Create the replica and peer groups. Every rank must call this, in the same order.

    ``dist.new_group`` is collective over the whole world even for ranks outside the new group,
    so each rank creates every group and keeps the two it belongs to.
    """
    if topology.world_size == 1 or not dist.is_initialized():
        return ProcessGroups(None, None)
    kwargs = {"timeout": timeout} if timeout is not None else {}
    s, r = topology.shard_size, topology.num_replicas
    replica_group = peer_group = None
    if s > 1:
        for replica in range(r):
            group = dist.new_group(topology.replica_ranks(replica), **kwargs)
            if replica == topology.replica_index:
                replica_group = group
    if s > 1 and r > 1:
        for shard in range(s):
            group = dist.new_group(topology.peer_ranks(shard), **kwargs)
            if shard == topology.shard_index:
                peer_group = group
    if s == 1:
        peer_group = None  # every rank a replica: the peers are the whole world
    if r == 1:
        # A single replica has no peers to average with; a one-rank group keeps the code path uniform.
        for rank in range(topology.world_size):
            group = dist.new_group([rank], **kwargs)
            if rank == topology.rank:
                peer_group = group
    if s == topology.world_size:
        replica_group = None
    return ProcessGroups(replica_group, peer_group)
