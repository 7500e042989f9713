"""The narrow communication protocol the PALSGD core talks through, with byte/time accounting.

The core never calls ``torch.distributed`` directly: it holds a :class:`Communicator` bound to
one process group (the ranks PALSGD averages over) and asks it for a handful of collectives.
Every call is counted: ``bytes_sent`` is the payload (tensor bytes) this rank contributed to a
collective, ``seconds_blocked`` the wall time this rank spent waiting for one. Traffic the core
does not issue itself (DDP's gradient buckets during warm-up) is added with :meth:`record`.

:class:`LocalCommunicator` is the single-process stand-in (one worker, every collective a no-op),
used for runs without ``torch.distributed`` and in unit tests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class CommStats:
    """Counters of one communicator; they only grow and are part of the checkpoint."""

    calls: int = 0
    bytes_sent: int = 0
    seconds_blocked: float = 0.0

    def state_dict(self) -> dict:
        return {"calls": self.calls, "bytes_sent": self.bytes_sent, "seconds_blocked": self.seconds_blocked}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])
        self.bytes_sent = int(state["bytes_sent"])
        self.seconds_blocked = float(state["seconds_blocked"])


class PendingReduce:
    """An all-reduce in flight: :meth:`wait` blocks until the averaged tensor is ready."""

    def __init__(self, comm: "Communicator", tensor: torch.Tensor, work, size: int):
        self._comm, self._work, self._size = comm, work, size
        self.tensor = tensor
        self.launched_at = time.perf_counter()

    def is_completed(self) -> bool:
        return self._work is None or self._work.is_completed()

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            start = time.perf_counter()
            self._work.wait()
            self._comm.stats.seconds_blocked += time.perf_counter() - start
            self._work = None
            if self._size > 1:
                self.tensor.div_(self._size)
        return self.tensor


class Communicator:
    """Collectives over one ``torch.distributed`` process group (``None`` = the default group)."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None, timeout: Optional[timedelta] = None):
        self.group = group
        self.timeout = timeout
        self.stats = CommStats()

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def record(self, nbytes: int, seconds: float = 0.0) -> None:
        """Count traffic issued outside this object (e.g. DDP's gradient buckets)."""
        self.stats.calls += 1
        self.stats.bytes_sent += int(nbytes)
        self.stats.seconds_blocked += seconds

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average ``tensor`` in place over the group, blocking."""
        return self.all_reduce_mean_async(tensor).wait()

    def all_reduce_mean_async(self, tensor: torch.Tensor) -> PendingReduce:
        """Start averaging ``tensor`` in place; the returned handle's ``wait()`` finishes it."""
        size = self.size
        if size == 1:
            return PendingReduce(self, tensor, None, 1)
        self.record(tensor.numel() * tensor.element_size())
        # Gloo has no AVG op, so every backend sums and the handle divides: one code path.
        work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        return PendingReduce(self, tensor, work, size)

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise max over the group, blocking (used for small flags)."""
        if self.size > 1:
            self.record(tensor.numel() * tensor.element_size())
            start = time.perf_counter()
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
            self.stats.seconds_blocked += time.perf_counter() - start
        return tensor

    def broadcast(self, tensor: torch.Tensor, src_group_rank: int = 0) -> torch.Tensor:
        """Copy ``tensor`` from the group's rank ``src_group_rank`` to every member."""
        if self.size > 1:
            if self.rank == src_group_rank:
                self.record(tensor.numel() * tensor.element_size())
            start = time.perf_counter()
            src = dist.get_global_rank(self.group, src_group_rank) if self.group is not None else src_group_rank
            dist.broadcast(tensor, src=src, group=self.group)
            self.stats.seconds_blocked += time.perf_counter() - start
        return tensor

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.group)


class LocalCommunicator(Communicator):
    """One worker alone: every collective returns its input; the accounting still runs."""

    def __init__(self):
        super().__init__(group=None)

    @property
    def size(self) -> int:
        return 1

    @property
    def rank(self) -> int:
        return 0
