"""The PALSGD state machine: one call per optimizer step decides what that step does.

Phases of one optimizer step t (t counts every step, of all kinds, from 0):

1. Warm-up (t < warmup_steps, or every step for method 'ddp'): ordinary synchronous data
   parallel. The backend's gradient all-reduce is on; the inner optimizer steps.
2. After warm-up a coin b ~ U[0, 1) is drawn (``config.coins``: 'shared', one coin per step for
   all replicas; 'per_replica', each replica its own generator; the ranks of a replica agree):
   - b < p, *pseudo-synchronization*: no forward, no backward, no communication; every owned
     tensor moves toward the stale anchor, x <- x - c (x - x_bar) with c = lr * eta / p.
   - b >= p, *gradient step*: local gradients only (the backend's all-reduce is off), the inner
     optimizer steps with its learning rate multiplied by 1 / (1 - p), then restored.
   In expectation: x <- x - lr [grad f(x) + eta (x - x_bar)], an elastic pull toward x_bar.
3. Global sync after step t when (t + 1) mod H == 0 (after warm-up; ``sync_policy='auto'``: at an
   interval re-decided at every sync from measured step and sync times, :mod:`~palsgd_hf.core.sync_policy`):
   delta = mean over replicas of (x_bar - x)   (one all-reduce over the peer group; bf16 on the
   wire with ``comm_dtype='bf16'``, :class:`~palsgd_hf.core.comm.MeanExchange`; int8/int4 with error
   feedback, :mod:`~palsgd_hf.core.quantized`);
   x_bar <- outer_optimizer_step(x_bar, grad=delta);  x <- x_bar. The inner optimizer's state is
   kept; the model's floating-point buffers (BatchNorm statistics) are averaged over all ranks.
4. Overlapped sync (``overlap_steps`` = d >= 1): the average is launched at the sync and applied
   d steps later, keeping the local progress made meanwhile (:mod:`palsgd_hf.core.overlap`).
5. Fragments (``fragments`` = F > 1): the owned values are cut into F fragments, each synced on its own at
   staggered steps, fragment i when (t + 1) mod H == floor(i H / F) (:mod:`palsgd_hf.core.fragments`). The
   syncs themselves live in :mod:`palsgd_hf.core.outer_sync`.

The anchor x_bar is created when the first local step starts (workers are identical then: DDP and
DeepSpeed keep them so, a bare module gets a broadcast from replica 0) and is refreshed only at
global syncs: it is deliberately stale.

Integration contract: ask :meth:`PALSGD.step_kind` before computing (skip forward/backward on a
pseudo-sync step), then call :meth:`PALSGD.optimizer_step` with the inner optimizer's step, once
per optimizer step. :class:`~palsgd_hf.core.optimizer.PALSGDOptimizer` does the second part for
loops that call ``optimizer.step()`` themselves. From the draw to the end of a local step the
collective guard (:mod:`~palsgd_hf.core.collective_guard`) watches collectives across replicas.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator, Optional

import torch

from ..config import PALSGDConfig
from .adapter import OwnedGroup, ParamAdapter
from .collective_guard import CollectiveGuard
from .comm import WIRE_DTYPES, Communicator, ErrorFeedback, LocalCommunicator
from .fragments import Fragments
from .global_model import GlobalModelViews
from . import algorithm_state
from .outer import Anchor
from .outer_sync import OuterSyncs
from .overlap import PendingSync
from .step_kinds import COUNTER_OF, COUNTERS, StepKind, coin_seed
from .replica_stats import ReplicaStats
from .sync_policy import build_schedule
from .tensor_ops import average_buffers, check_aligned, lerp_

logger = logging.getLogger(__name__)

class PALSGD(GlobalModelViews, OuterSyncs):
    """Pseudo-Asynchronous Local SGD for one rank.

    Args:
        config: the algorithm's settings.
        adapter: gives the tensors this rank owns and switches backend gradient sync.
        peers: communicator over the ranks that own the same shard in every replica.
        replica: communicator over this rank's replica group (only used to agree on a skipped
            sync when a replica is sharded).
        replica_index: this rank's replica, which seeds its coin generator (per-replica coins).
        anchor_device: where the anchor lives (``None``: beside the weights).
        guard: the collective-safety guard of this rank (``None``: one replica, nothing to guard).
    """

    def __init__(
        self,
        config: PALSGDConfig,
        adapter: ParamAdapter,
        *,
        peers: Optional[Communicator] = None,
        replica: Optional[Communicator] = None,
        replica_index: int = 0,
        anchor_device: Optional[torch.device] = None,
        guard: Optional[CollectiveGuard] = None,
    ):
        if config.mixing_rate is None:  # pull= set and no integration resolved it from its LR schedule
            config = config.resolved(max(float(g.options.get("initial_lr", g.options["lr"]))
                                         for g in adapter.owned_groups()))
        self.config = config
        self.schedule = build_schedule(config)
        self.replica_stats = ReplicaStats() if config.replica_metrics else None
        self.adapter = adapter
        self.peers = peers if peers is not None else LocalCommunicator()
        self.replica = replica if replica is not None else LocalCommunicator()
        self.replica_index = replica_index
        self.anchor_device = anchor_device
        self.step = 0
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.last_drift = 0.0
        self.last_mixing_coefficient = 0.0
        coin_stream = replica_index if config.coins == "per_replica" else 0
        self._generator = torch.Generator().manual_seed(coin_seed(config.seed, coin_stream))
        self.guard = guard if guard is not None else CollectiveGuard.for_job(config)
        self.guard.describe_step = self.describe_step
        self.defer_step_end = False  # set by wrappers that end a step after optimizer_step returns
        self._clamp_warned = False
        self._kind: Optional[StepKind] = None
        self._anchor: Optional[Anchor] = None
        self._since_sync = 0  # local steps since the workers last left the anchor (a sync or its launch)
        self._pending: Optional[PendingSync] = None  # an overlapped sync in flight
        self.sync_seconds_blocked = 0.0  # time blocked in pseudo-gradient exchanges only
        self.fragments = Fragments(config.fragments)
        # int8/int4 on the wire: this rank's quantization residuals, carried from one sync to the next (per fragment).
        quantized = isinstance(WIRE_DTYPES[config.comm_dtype], str)
        self.feedbacks = [ErrorFeedback() for _ in range(config.fragments)] if quantized else None
        self._grad_sync: Optional[bool] = None

    # ------------------------------------------------------------------ the step
    @property
    def in_local_phase(self) -> bool:
        return self._anchor is not None

    @property
    def current_kind(self) -> Optional[StepKind]:
        """The kind drawn for the step in progress (None between steps)."""
        return self._kind

    def step_kind(self) -> StepKind:
        """What step t does. Drawn once per step (the coin is cached until the step finishes).

        Marks the start of the step's interior: from here to :meth:`end_step` the collective guard
        watches collectives across replicas (local steps only).
        """
        kind = self.prepare_step()
        if kind is not StepKind.WARMUP:
            self.guard.arm()
        return kind

    def prepare_step(self) -> StepKind:
        """Draw step t's coin (and set the backend's gradient sync) without starting the step, for
        loops that must switch DDP off before their step's code runs (the Accelerate hooks)."""
        if self._kind is None:
            kind = StepKind.WARMUP
            if not (self.config.is_ddp or self.step < self.config.warmup_steps):
                if self._anchor is None:
                    self._start_local_phase()
                coin = torch.rand((), generator=self._generator).item()
                kind = StepKind.PSEUDO_SYNC if coin < self.config.pseudo_sync_prob else StepKind.GRADIENT
            self._kind = kind
        # Outside the draw: after load_state_dict the kind may come cached from the checkpoint, and the
        # backend's sync switch (not part of any state) must still be applied. A no-op when unchanged.
        self._set_gradient_sync(self._kind is StepKind.WARMUP)
        return self._kind

    def end_step(self) -> None:
        """The step's interior is over (step boundaries are the same step on every rank)."""
        self.guard.disarm()

    def optimizer_step(self, inner_step: Callable[[], Any]) -> StepKind:
        """Finish optimizer step t: run ``inner_step`` (or the pull instead), then a sync if due.

        Ends the step's interior unless a wrapper set ``defer_step_end`` (it calls :meth:`end_step`).
        """
        try:
            return self._optimizer_step(inner_step)
        finally:
            if not self.defer_step_end:
                self.end_step()

    def _optimizer_step(self, inner_step: Callable[[], Any]) -> StepKind:
        kind = self.step_kind()
        if kind is StepKind.PSEUDO_SYNC:
            self._pull()
        elif kind is StepKind.GRADIENT:
            with self._scaled_lr(1.0 / (1.0 - self.config.pseudo_sync_prob)):
                inner_step()
        else:
            self.adapter.warmup_gradient_sync(self.peers)
            inner_step()
        self.counters[COUNTER_OF[kind]] += 1
        self.step += 1
        self._kind = None
        if kind is not StepKind.WARMUP:
            self._since_sync += 1
            self.schedule.on_step_end(kind is StepKind.GRADIENT)
            if self.replica_stats is not None:
                self.replica_stats.on_step_end(COUNTER_OF[kind])
            if self._pending is not None:
                self._pending.on_step(self.step)
                if self.step >= self._pending.apply_step:
                    launched, blocked = self._pending.launch_step, self.sync_seconds_blocked
                    self.apply_pending()
                    self._after_sync(launched, self.sync_seconds_blocked - blocked)
            due = self.schedule.due_fragment(self.step)
            if due is not None:
                fragment = None if self.fragments.count == 1 else due  # None: the whole model
                if self.config.overlap_steps > 0:
                    self.launch_sync(fragment)
                    self.schedule.launched(self.step)
                else:
                    blocked = self.sync_seconds_blocked
                    self.sync_fragment(fragment)
                    self._after_sync(self.step, self.sync_seconds_blocked - blocked)
        return kind

    def _after_sync(self, sync_step: int, blocked: float) -> None:
        """After the sync of ``sync_step`` (blocking, or landed): per-replica metrics, the schedule's decision.

        Collective when ``replica_metrics`` or ``sync_policy='auto'`` is on; every rank gets here at the same step.
        """
        if self.replica_stats is not None:
            self.replica_stats.gather(self.peers, self.last_drift, blocked)
        self.schedule.after_sync(sync_step, blocked, self.last_drift, (self.peers, self.replica))

    def finalize(self) -> None:
        """End of training: apply an overlapped sync in flight, then a last blocking sync if workers
        moved since the previous one. Then every worker holds the global model. Collective."""
        if self._pending is not None:
            self.apply_pending()
        if self._anchor is not None and self._since_sync > 0:
            blocked = self.sync_seconds_blocked
            self.sync()
            if self.replica_stats is not None:  # the rows of the final sync (no schedule decision: training ends)
                self.replica_stats.gather(self.peers, self.last_drift, self.sync_seconds_blocked - blocked)
        self.end_step()

    def describe_step(self) -> str:
        kind = "no" if self._kind is None else f"a {self._kind.value}"
        return f"step {self.step} ({kind} step; coins={self.config.coins})"

    # ------------------------------------------------------------------ pieces
    def _start_local_phase(self) -> None:
        # Every rank reaches this at the same step: the place for the backend's last collectives
        # (DDP rebuilds its buckets in the first forward after a synced backward; with warmup_steps=1
        # that forward is a local step, which a pseudo-sync replica would skip).
        start = getattr(self.adapter, "on_local_phase_start", None)
        if start is not None:
            start()
        # Backends that make the replicas identical at construction (DDP, DeepSpeed) keep them so through
        # synchronous warm-up: nothing to send. A bare module's loop may have started from different
        # initializations: one broadcast makes the workers identical.
        self.schedule.start(self.step)
        tensors = self._owned_tensors()
        if not getattr(self.adapter, "starts_identical", False):
            with torch.no_grad():
                for t in tensors:
                    self.peers.broadcast(t.data, 0)
        self.adapter.after_write()
        self._sync_buffers()
        self._anchor = Anchor(tensors, self.config, self.anchor_device)
        # Strict here, before any local work: c > 1 at the current learning rate is a configuration error.
        groups = self.adapter.owned_groups()
        coefficients = [self.config.check_mixing_coefficient(float(g.options["lr"])) for g in groups]
        logger.info(
            "PALSGD local phase starts at step %d: method=%s H=%d p=%g eta=%g, pull coefficient c=lr*eta/p=%s "
            "(aim for ~0.01-0.1 at peak LR); anchor holds %d values in %d fragment(s)",
            self.step, self.config.method, self.config.sync_interval, self.config.pseudo_sync_prob,
            self.config.mixing_rate, ", ".join(f"{c:.4g}" for c in coefficients), self._anchor.numel(),
            self.fragments.count,
        )

    def _coefficient(self, group: OwnedGroup) -> float:
        lr = float(group.options["lr"])
        if lr * self.config.mixing_rate <= self.config.pseudo_sync_prob:
            return self.config.check_mixing_coefficient(lr)
        # c > 1 overshoots the anchor. Integrations check the schedule's peak before training; one they
        # could not see (or an LR set by hand) lands here: land on the anchor rather than crash mid-run.
        if not self._clamp_warned:
            self._clamp_warned = True
            logger.warning("PALSGD step %d: pull coefficient c = lr*eta/p = %g*%g/%g > 1; using c = 1 (the worker "
                           "lands on the anchor). Lower mixing_rate to at most %g for learning rates this high.",
                           self.step, lr, self.config.mixing_rate, self.config.pseudo_sync_prob,
                           self.config.pseudo_sync_prob / lr)
        return 1.0

    def _pull(self) -> None:
        """x <- x - c (x - x_bar) = lerp(x, x_bar, c), per parameter group (each has its own lr)."""
        groups = self.adapter.owned_groups()
        pieces = self.fragments.split_groups([g.tensors for g in groups])  # each group's tensors (F = 1) or pieces
        self._check_aligned([t for g in pieces for t in g])
        anchors = iter(self._anchor.tensors)
        with torch.no_grad():
            for group, group_pieces in zip(groups, pieces):
                c = self._coefficient(group)
                self.last_mixing_coefficient = c
                group_anchors = [next(anchors) for _ in group_pieces]
                if c > 0:
                    lerp_(group_pieces, group_anchors, c)
        self.adapter.after_write()

    @contextlib.contextmanager
    def _scaled_lr(self, factor: float) -> Iterator[None]:
        groups = [g.options for g in self.adapter.owned_groups()]
        saved = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = g["lr"] * factor
        try:
            yield
        finally:
            for g, lr in zip(groups, saved):
                g["lr"] = lr

    def _owned_tensors(self) -> list[torch.Tensor]:
        """The owned tensors in order, as the anchor holds them: whole (F = 1) or cut into fragment pieces."""
        tensors = self.fragments.split([t for g in self.adapter.owned_groups() for t in g.tensors])
        self._check_aligned(tensors)
        return tensors

    def _check_aligned(self, tensors: list[torch.Tensor]) -> None:
        if self._anchor is not None:
            check_aligned(self.step, tensors, self._anchor.tensors)

    def _sync_buffers(self) -> None:
        """Average the model's floating-point buffers (BatchNorm statistics...) over all ranks."""
        buffers_of = getattr(self.adapter, "sync_buffers", None)
        average_buffers(buffers_of() if buffers_of is not None else [], self.replica, self.peers)

    def _set_gradient_sync(self, enabled: bool) -> None:
        if self._grad_sync is not enabled:
            self.adapter.set_gradient_sync(enabled)
            self._grad_sync = enabled

    # ------------------------------------------------------------------ metrics and state
    def metrics(self) -> dict[str, float]:
        """The palsgd/* log values (without the prefix)."""
        return algorithm_state.metrics(self)

    def state_dict(self) -> dict[str, Any]:
        """This rank's state. An overlapped sync in flight is waited for (nothing new is launched, so
        any subset of ranks may call this) and saved with x_launch, to be applied at the same step
        after a resume."""
        return algorithm_state.save(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        algorithm_state.load(self, state)
