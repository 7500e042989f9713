"""Replica x shard layout: which ranks form one worker, and which ranks PALSGD averages over.

The world of W ranks is R = W / S replicas of S ranks each. Rank ``r`` is shard ``r % S`` of
replica ``r // S``. Inside a replica the S ranks shard one model copy (ZeRO); across replicas the
ranks that own the same shard form a *peer group*: that is the group a pseudo-gradient is
averaged over, each rank exchanging only the partition it owns. With S = 1 every rank is its own
replica and the peer group is the whole world. The groups are the two dimensions of a
``DeviceMesh`` (``init_device_mesh(..., (R, S), mesh_dim_names=("replica", "shard"))``).

    W = 4, S = 2:   replica groups {0,1} {2,3}     peer groups {0,2} {1,3}
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.distributed_c10d import _set_pg_timeout

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

    ``None`` only without a distributed job (one process). ``mesh`` is the 2-D device mesh
    (``("replica", "shard")``) they come from, for code that wants the mesh itself.
    """

    replica: Optional[dist.ProcessGroup]
    peers: Optional[dist.ProcessGroup]
    mesh: Optional[DeviceMesh] = None


def build_process_groups(topology: Topology, timeout: Optional[timedelta] = None) -> ProcessGroups:
    """Create the replica and peer groups from a ``replica x shard`` device mesh. Every rank must call
    this, in the same order (group creation is collective over the whole world).

    Rank r sits at (r // S, r % S) of the mesh: the mesh's "shard" dimension through r is its replica
    group (the S ranks that shard one model copy), its "replica" dimension is its peer group (the R
    ranks, one per replica, that own the same shard). ``timeout`` bounds every collective on both.
    """
    if topology.world_size == 1 or not dist.is_initialized():
        return ProcessGroups(None, None)
    mesh = init_device_mesh(
        _mesh_device_type(), (topology.num_replicas, topology.shard_size), mesh_dim_names=("replica", "shard")
    )
    groups = ProcessGroups(replica=mesh.get_group("shard"), peers=mesh.get_group("replica"), mesh=mesh)
    if timeout is not None:
        for group in (groups.replica, groups.peers):
            _set_pg_timeout(timeout, group)  # private API (torch >= 2.3; torchtitan uses it too)
    return groups


def _mesh_device_type() -> str:
    # The mesh's groups use the default group's backend for this device type: NCCL for CUDA, gloo for CPU.
    backend = str(dist.get_backend()).lower()
    return "cuda" if "nccl" in backend and torch.cuda.is_available() else "cpu"
