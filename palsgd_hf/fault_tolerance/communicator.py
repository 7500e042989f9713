"""The cross-replica Communicator of the fault-tolerant mode: every exchange is one torchft step.

PALSGD reaches the other replicas only through its ``peers`` communicator, for two kinds of means:
the warm-up gradient average (``all_reduce_mean``) and the pseudo-gradient average at a sync
(``mean_exchange_async``). Here each of them is one *managed step* of a torchft ``Manager``:

1. **quorum** (``start_quorum``, blocking): the lighthouse names the replicas alive now; torchft
   reconfigures its gloo group over them. A replica that is behind (restarted, or one whose last
   commit failed) receives a live peer's state inside this call (:mod:`.transfer`).
2. **weighted sum**: each replica sends ``[w * x, w]`` in one all-reduce (sum), so the mean is
   ``sum(w_k x_k) / sum(w_k)`` over the replicas in the quorum. ``w`` is 1 for a warm-up gradient and
   the gradient steps taken since the last sync for a pseudo-gradient (per-replica coins make that
   vary); a replica that has just received a peer's state sends ``w = 0``: it contributed nothing.
3. **commit vote** (``should_commit``): if any replica of the quorum failed (one died mid-all-reduce),
   nobody uses the result; the exchange starts again with a new quorum, up to ``max_attempts`` times.

Collectives PALSGD uses only with settings the fault-tolerant mode refuses up front (overlapped or
low-precision exchanges, the auto sync policy, per-replica metrics, a start that needs a broadcast)
raise ``NotImplementedError``.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import torch
from torch.distributed import ReduceOp

from ..core.comm import Communicator
from ..core.exchange import PendingReduce
from .settings import FaultToleranceConfig

logger = logging.getLogger(__name__)

# (collective, number of values, phase of the algorithm): where a replica is when it enters a quorum.
Position = tuple


class ReplicaFellBehind(RuntimeError):
    """A live replica received a peer's state at a point of its step where it cannot continue from it."""


class FinishedExchange:
    """A mean that is already complete (the fault-tolerant exchange blocks): the handle PALSGD waits on."""

    def __init__(self, mean: torch.Tensor, seconds: float):
        self.mean, self.seconds_blocked, self.phase = mean, seconds, "done"

    def advance(self) -> None:
        pass

    def drain(self) -> None:
        pass

    def wait(self) -> torch.Tensor:
        return self.mean


class ManagedCommunicator(Communicator):
    """PALSGD's ``peers`` over a torchft ``Manager`` (see the module docstring).

    The session (:class:`~palsgd_hf.fault_tolerance.session.FaultTolerantSession`) sets
    ``position_of`` (where the algorithm is) and ``exchange_weight`` (this replica's share of a sync).
    """

    def __init__(self, manager, settings: FaultToleranceConfig):
        super().__init__(group=None, timeout=settings.timeout)
        self._device_known = True  # gloo takes tensors anywhere
        self.manager = manager
        self.settings = settings
        self.position_of: Callable[[str, int], Position] = lambda call, numel: (call, numel, "")
        self.exchange_weight: Callable[[], float] = lambda: 1.0
        self.on_commit: Callable[[str], None] = lambda call: None
        self.position: Position = ("join", 0, "join")  # what a peer that heals from us is told
        self.healed_at: Optional[Position] = None  # set by the state loader: a peer's position we took over
        self.quorum_ready = False  # join() started the quorum the next exchange belongs to
        self.participants = 0
        self.failed_attempts = 0

    @property
    def size(self) -> int:
        # The replicas launched, not those alive now: PALSGD must issue every exchange even when only
        # some replicas are left (a size of 1 would make it skip them and fall out of step).
        return self.settings.replicas

    @property
    def rank(self) -> int:
        return self.settings.replica_id

    # ------------------------------------------------------------------ the managed exchange
    def start_quorum(self) -> None:
        """Block until the lighthouse forms a quorum (a peer's state is loaded here if we are behind)."""
        try:
            self.manager.start_quorum(timeout=self.settings.quorum_timeout)
        except Exception as e:
            raise RuntimeError(
                f"replica {self.settings.replica_id}: no quorum of >= {self.settings.min_replicas} replicas within "
                f"quorum_timeout_seconds={self.settings.quorum_timeout_seconds} at {self.position} ({e}). Check that "
                "the lighthouse runs and enough replicas are alive, or raise quorum_timeout_seconds above a sync "
                "period."
            ) from e

    def weighted_mean(self, flat: torch.Tensor, weight: float, call: str) -> torch.Tensor:
        """sum(w_k flat_k) / sum(w_k) over the replicas of a committed quorum, into ``flat``; blocking."""
        position = self.position_of(call, flat.numel())
        self.position = position
        start, took_over = time.perf_counter(), False
        n = flat.numel()
        for attempt in range(1, self.settings.max_attempts + 1):
            if self.quorum_ready:
                self.quorum_ready = False  # join() started this quorum and checked the position
            else:
                self.start_quorum()
                if self.healed_at is not None and tuple(self.healed_at) != tuple(position):
                    raise ReplicaFellBehind(
                        f"replica {self.settings.replica_id} fell behind (its last commit failed while its peers "
                        f"committed) and took a peer's state at {tuple(self.healed_at)} while itself at {position}; it "
                        "cannot continue this step. Restart the replica (torchrun --max-restarts) and it rejoins."
                    )
            took_over = took_over or self.healed_at is not None
            self.healed_at = None
            w = 0.0 if took_over else float(weight)
            buf = torch.empty(n + 1, dtype=flat.dtype, device=flat.device)
            if w == 0.0:
                buf.zero_()
            else:
                torch.mul(flat.reshape(-1), w, out=buf[:n])
                buf[n] = w
            self.record(buf.numel() * buf.element_size())
            self.manager.allreduce(buf, reduce_op=ReduceOp.SUM).wait()
            if self.manager.should_commit():
                total = float(buf[n])
                with torch.no_grad():
                    if total > 0:
                        flat.view(-1).copy_(buf[:n] / total)
                    else:  # nobody took a gradient step: every pseudo-gradient is zero
                        flat.zero_()
                self.participants = self.manager.num_participants()
                self.stats.seconds_blocked += time.perf_counter() - start
                self.on_commit(call)
                return flat
            self.failed_attempts += 1
            logger.warning("replica %d: %s at %s not committed (attempt %d of %d; a replica failed or left): "
                           "retrying with a new quorum", self.settings.replica_id, call, position, attempt,
                           self.settings.max_attempts)
        raise RuntimeError(
            f"replica {self.settings.replica_id}: {call} at {position} was not committed in "
            f"{self.settings.max_attempts} quorums (replicas keep failing or the lighthouse's min_replicas is not "
            "met); see the torchft errors above, or raise max_attempts."
        )

    # ------------------------------------------------------------------ what PALSGD calls
    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.weighted_mean(tensor, 1.0, "all_reduce_mean")

    def all_reduce_mean_async(self, tensor: torch.Tensor) -> PendingReduce:
        return PendingReduce(self, self.all_reduce_mean(tensor), None, 1)

    def mean_exchange_async(self, flat: torch.Tensor, wire=None, feedback=None):
        if wire is not None:
            raise NotImplementedError(f"the fault-tolerant exchange carries fp32 only, got wire={wire!r}")
        start = time.perf_counter()
        mean = self.weighted_mean(flat, self.exchange_weight(), "exchange")
        return FinishedExchange(mean, time.perf_counter() - start)

    def _refused(self, *args, **kwargs):
        raise NotImplementedError(
            "PALSGD issued a collective the fault-tolerant mode does not carry (only means are managed); the settings "
            "that need it are refused when the session is built. Please report how you got here."
        )

    all_to_all_async = all_gather_async = all_gather_small = all_reduce_max = broadcast = _refused

    def barrier(self) -> None:
        pass  # replicas never need to wait for each other outside an exchange
