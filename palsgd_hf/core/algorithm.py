"""The PALSGD state machine: one call per optimizer step decides what that step does.

Phases of one optimizer step t (t counts every step, of all kinds, from 0):

1. Warm-up (t < warmup_steps, or every step for method 'ddp'): ordinary synchronous data
   parallel. The backend's gradient all-reduce is on; the inner optimizer steps.
2. After warm-up each replica draws a coin b ~ U[0, 1) from its own generator:
   - b < p, *pseudo-synchronization*: no forward, no backward, no communication; every owned
     tensor moves toward the stale anchor, x <- x - c (x - x_bar) with c = lr * eta / p.
   - b >= p, *gradient step*: local gradients only (the backend's all-reduce is off), the inner
     optimizer steps with its learning rate multiplied by 1 / (1 - p), then restored.
   In expectation: x <- x - lr [grad f(x) + eta (x - x_bar)], an elastic pull toward x_bar.
3. Global sync after step t when (t + 1) mod H == 0 (after warm-up):
   delta = mean over replicas of (x_bar - x)   (one all-reduce over the peer group)
   x_bar <- outer_optimizer_step(x_bar, grad=delta);  x <- x_bar.
   The inner optimizer's state is kept.
   With ``comm_dtype='bf16'`` delta is rounded to bf16 for the wire and summed in fp32
   (:class:`~palsgd_hf.core.comm.MeanExchange`): half the bytes.
4. Overlapped sync (``overlap_steps`` = d >= 1, see :mod:`palsgd_hf.core.overlap`): at the sync
   the average is only launched and x_launch = x kept; the workers take d more local steps
   (pulls aim at the old anchor), then the outer step lands and
   x <- x_bar_new + (x - x_launch): each worker keeps the progress made while waiting. A
   non-finite average skips the outer step and sends every worker back to the old anchor.
   finalize() applies an update in flight, then runs one last blocking sync; global_weights()
   during the wait gives the old anchor (the latest complete global model); state_dict() waits
   for the collective in flight and saves the exchange so that a resumed run applies it at the
   same step. Memory: x_launch is one more fp32 copy of the owned tensors (on the anchor's
   device), and the flat pseudo-gradient buffer lives for d steps instead of an instant.

The anchor x_bar is created when the first local step starts (workers are made identical then by
a broadcast from replica 0) and is refreshed only at global syncs: it is deliberately stale. At
every sync the floating-point buffers of the model (e.g. BatchNorm statistics), which no optimizer
owns, are averaged over all ranks too, so that the global model is one model.

Coins (``config.coins``): 'shared' draws one coin per step for all replicas (every rank runs the
same kind of step, so any collective inside a step pairs up); 'per_replica' gives each replica its
own generator, seeded from (seed, replica). The ranks of one replica always share a coin.
:mod:`~palsgd_hf.core.collective_guard` is armed from the coin draw of a local step to its end
(:meth:`PALSGD.end_step`) and counts or refuses collectives across replicas issued meanwhile.

Integration contract: ask :meth:`PALSGD.step_kind` before computing (skip forward/backward on a
pseudo-sync step), then call :meth:`PALSGD.optimizer_step` with the inner optimizer's step, once
per optimizer step. :class:`~palsgd_hf.core.optimizer.PALSGDOptimizer` does the second part for
loops that call ``optimizer.step()`` themselves.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
from typing import Any, Callable, Iterator, Optional

import torch

from ..config import PALSGDConfig
from .adapter import OwnedGroup, ParamAdapter
from .collective_guard import CollectiveGuard
from .comm import WIRE_DTYPES, Communicator, LocalCommunicator
from .outer import Anchor
from .overlap import PendingSync
from .topology import Topology

logger = logging.getLogger(__name__)

COUNTERS = ("warmup_steps", "gradient_steps", "pseudo_syncs", "outer_syncs", "skipped_syncs")


class StepKind(str, enum.Enum):
    WARMUP = "warmup"
    GRADIENT = "gradient"
    PSEUDO_SYNC = "pseudo_sync"


def coin_seed(seed: int, replica_index: int) -> int:
    """Seed of replica ``replica_index``'s coin generator: all ranks of a replica agree, replicas differ.

    With shared coins every replica uses ``coin_seed(seed, 0)``.
    """
    return (seed * 1_000_003 + replica_index * 7_919 + 17) % (2**63 - 1)


class PALSGD:
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
        self.config = config
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
        self.guard = guard if guard is not None else _job_guard(config)
        self.guard.describe_step = self.describe_step
        self.defer_step_end = False  # set by wrappers that end a step after optimizer_step returns
        self._clamp_warned = False
        self._kind: Optional[StepKind] = None
        self._anchor: Optional[Anchor] = None
        self._since_sync = 0  # local steps since the workers last left the anchor (a sync or its launch)
        self._pending: Optional[PendingSync] = None  # an overlapped sync in flight
        self.sync_seconds_blocked = 0.0  # time blocked in pseudo-gradient exchanges only
        self._grad_sync: Optional[bool] = None

    # ------------------------------------------------------------------ the step
    @property
    def in_local_phase(self) -> bool:
        return self._anchor is not None

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
            if self.config.is_ddp or self.step < self.config.warmup_steps:
                kind = StepKind.WARMUP
            else:
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
        self.counters[_COUNTER_OF[kind]] += 1
        self.step += 1
        self._kind = None
        if kind is not StepKind.WARMUP:
            self._since_sync += 1
            if self._pending is not None:
                self._pending.on_step(self.step)
                if self.step >= self._pending.apply_step:
                    self._apply_pending()
            if self.step % self.config.sync_interval == 0:
                if self.config.overlap_steps > 0:
                    self._launch_sync()
                else:
                    self.sync()
        return kind

    def finalize(self) -> None:
        """End of training: apply an overlapped sync in flight, then a last (blocking) global sync if
        workers moved since the previous one.

        Afterwards every worker holds the global model. Collective: every rank must call it.
        """
        if self._pending is not None:
            self._apply_pending()
        if self._anchor is not None and self._since_sync > 0:
            self.sync()
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
        # Warm-up leaves workers identical when the backend averaged gradients, but a loop that
        # started from different initializations would not be: one broadcast makes it so.
        tensors = self._owned_tensors()
        with torch.no_grad():
            for t in tensors:
                self.peers.broadcast(t.data, 0)
        self.adapter.after_write()
        self._sync_buffers()
        self._anchor = Anchor(tensors, self.config, self.anchor_device)
        # Strict here, before any local work: c > 1 at the current learning rate is a configuration error.
        coefficients = [self.config.check_mixing_coefficient(float(g.options["lr"])) for g in self.adapter.owned_groups()]
        logger.info(
            "PALSGD local phase starts at step %d: method=%s H=%d p=%g eta=%g, pull coefficient c=lr*eta/p=%s "
            "(aim for ~0.01-0.1 at peak LR); anchor holds %d values",
            self.step, self.config.method, self.config.sync_interval, self.config.pseudo_sync_prob,
            self.config.mixing_rate, ", ".join(f"{c:.4g}" for c in coefficients), self._anchor.numel(),
        )

    def _coefficient(self, group: OwnedGroup) -> float:
        lr = float(group.options["lr"])
        if lr * self.config.mixing_rate <= self.config.pseudo_sync_prob:
            return self.config.check_mixing_coefficient(lr)
        # c > 1 overshoots the anchor. Integrations check the schedule's peak before training starts;
        # a schedule they could not see (or an LR changed by hand) reaches here: land on the anchor
        # (c = 1) rather than crash mid-run, and say so once.
        if not self._clamp_warned:
            self._clamp_warned = True
            logger.warning(
                "PALSGD step %d: pull coefficient c = lr*eta/p = %g*%g/%g > 1 at this learning rate; using c = 1 "
                "(the worker lands on the anchor). Lower mixing_rate to at most %g for learning rates this high.",
                self.step, lr, self.config.mixing_rate, self.config.pseudo_sync_prob,
                self.config.pseudo_sync_prob / lr,
            )
        return 1.0

    def _pull(self) -> None:
        """x <- x - c (x - x_bar) = lerp(x, x_bar, c), per parameter group (each has its own lr)."""
        groups = self.adapter.owned_groups()
        self._check_aligned([t for g in groups for t in g.tensors])
        anchors = iter(self._anchor.tensors)
        with torch.no_grad():
            for group in groups:
                c = self._coefficient(group)
                self.last_mixing_coefficient = c
                group_anchors = [next(anchors) for _ in group.tensors]
                if c > 0 and group.tensors:  # a group may own nothing (e.g. LoRA's empty no-decay group)
                    _lerp_(group.tensors, group_anchors, c)
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

    def sync(self) -> None:
        """Global sync: average pseudo-gradients, one outer step, every worker takes the anchor.

        Blocking. An overlapped sync still in flight is applied first.
        """
        if self._pending is not None:
            self._apply_pending()
        tensors = self._owned_tensors()
        self._sync_buffers()
        exchange = self._exchange_pseudo_gradient(tensors)
        flat = exchange.wait()
        self.sync_seconds_blocked += exchange.seconds_blocked
        if self._all_finite(flat):
            self._anchor.outer_step(flat)
            self.counters["outer_syncs"] += 1
        else:
            self._skip_sync()
        self._anchor.write_to(tensors)
        self.adapter.after_write()
        self._since_sync = 0

    def _exchange_pseudo_gradient(self, tensors: list[torch.Tensor]):
        """Record the drift and start averaging delta = x_bar - x over the peers."""
        num, den = self._anchor.drift(tensors)
        self.last_drift = math.sqrt(num / den) if den > 0 else 0.0
        wire = WIRE_DTYPES[self.config.comm_dtype]
        return self.peers.mean_exchange_async(self._anchor.pseudo_gradient(tensors), wire)

    def _launch_sync(self) -> None:
        """The first half of an overlapped sync: start the average, remember x_launch, keep training."""
        tensors = self._owned_tensors()
        self._sync_buffers()
        exchange = self._exchange_pseudo_gradient(tensors)
        self._pending = PendingSync.launch(
            exchange, tensors, self._anchor.tensors, self.step, self.config.overlap_steps
        )
        self._since_sync = 0

    def _apply_pending(self) -> None:
        """The second half: wait for the average, outer step, x <- x_bar_new + (x - x_launch)."""
        pending, self._pending = self._pending, None
        flat = pending.exchange.wait()
        self.sync_seconds_blocked += pending.exchange.seconds_blocked
        tensors = self._owned_tensors()
        if self._all_finite(flat):
            self._anchor.outer_step(flat)
            self.counters["outer_syncs"] += 1
            pending.keep_local_progress(self._anchor.tensors, tensors)
        else:
            self._skip_sync()
            self._anchor.write_to(tensors)
            self._since_sync = 0  # every worker is back on the anchor
        self.adapter.after_write()

    def _skip_sync(self) -> None:
        # Every peer saw the same averaged NaN/inf, so all skip together: no extra round.
        if not self._all_finite(*self._anchor.tensors):
            # Returning to the anchor only helps if the anchor is good. It is not when the run diverged
            # before the local phase (or an outer step overflowed): every later sync would be skipped.
            raise FloatingPointError(
                f"PALSGD step {self.step}: the global model (anchor) itself is non-finite, so there is no good "
                "state to return to (the run diverged before the local phase, or an outer step overflowed); "
                "resume from the last checkpoint with a lower learning_rate or outer_lr."
            )
        self.counters["skipped_syncs"] += 1
        # The worker that diverged has non-finite inner-optimizer moments too; without this,
        # its next step would turn the restored weights non-finite again.
        reset = getattr(self.adapter, "reset_nonfinite_state", None)
        if reset is not None:
            reset()
        logger.warning(
            "PALSGD step %d: non-finite pseudo-gradient; outer update skipped, workers return to the last "
            "good anchor (skipped_syncs=%d)", self.step, self.counters["skipped_syncs"],
        )

    def _all_finite(self, *tensors: torch.Tensor) -> bool:
        finite = all(bool(torch.isfinite(t).all()) for t in tensors)
        # On the data's device: the replica group may be NCCL, which serves CUDA tensors only.
        bad = torch.tensor([0.0 if finite else 1.0], device=tensors[0].device if tensors else None)
        if self.replica.size > 1:
            # Shards of one replica must agree, or half a model would be updated.
            self.replica.all_reduce_max(bad)
        return bad.item() == 0.0

    def _owned_tensors(self) -> list[torch.Tensor]:
        tensors = [t for g in self.adapter.owned_groups() for t in g.tensors]
        self._check_aligned(tensors)
        return tensors

    def _check_aligned(self, tensors: list[torch.Tensor]) -> None:
        """Anchors pair with owned tensors by position: a changed list would pair them wrongly."""
        anchor = self._anchor
        if anchor is None:
            return
        if len(tensors) != len(anchor.tensors) or any(t.shape != a.shape for t, a in zip(tensors, anchor.tensors)):
            raise RuntimeError(
                f"PALSGD step {self.step}: the tensors this rank trains changed since the local phase started "
                f"({len(anchor.tensors)} with an anchor, now {len(tensors)}; e.g. a parameter was frozen or unfrozen, "
                "or an optimizer group added). PALSGD keeps one anchor per trained tensor from its first local step: "
                "set requires_grad and the optimizer's groups before training, or restart from a checkpoint."
            )

    def _sync_buffers(self) -> None:
        """Average the model's floating-point buffers over all ranks (blocking; every rank is here)."""
        buffers_of = getattr(self.adapter, "sync_buffers", None)
        buffers = buffers_of() if buffers_of is not None else []
        if not buffers or (self.peers.size == 1 and self.replica.size == 1):
            return
        flat = torch.cat([b.detach().flatten().to(torch.float32) for b in buffers])
        # The mean over the replica, then over the peers, is the mean over all ranks.
        if self.replica.size > 1:
            self.replica.all_reduce_mean(flat)
        if self.peers.size > 1:
            self.peers.all_reduce_mean(flat)
        offset = 0
        with torch.no_grad():
            for b in buffers:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()

    def _set_gradient_sync(self, enabled: bool) -> None:
        if self._grad_sync is not enabled:
            self.adapter.set_gradient_sync(enabled)
            self._grad_sync = enabled

    def adopt_global_model(self) -> None:
        """Every worker takes the anchor (the global model) now, without communicating.

        For a state loaded from a checkpoint that is to become the final model (the Trainer's
        ``load_best_model_at_end``): the anchor is the global model that was evaluated there. An
        overlapped sync that was in flight is dropped (its result did not exist at that step).
        """
        if self._anchor is None:
            return
        self._pending = None
        tensors = self._owned_tensors()
        self._anchor.write_to(tensors)
        self.adapter.after_write()
        self._since_sync = 0

    # ------------------------------------------------------------------ evaluation
    @contextlib.contextmanager
    def global_weights(self) -> Iterator[None]:
        """Temporarily put the global model (the anchor) into the weights, e.g. to evaluate it.

        Between syncs the anchor is the last global model; while an overlapped sync is in flight
        it is the old anchor (the latest complete global model: the new one exists only once the
        average arrives). During warm-up (no anchor yet) the weights already are the global model
        and nothing is swapped.
        """
        if self._anchor is None or (self._since_sync == 0 and self._pending is None):
            yield
            return
        tensors = self._owned_tensors()
        local = [t.detach().clone() for t in tensors]
        self._anchor.write_to(tensors)
        self.adapter.after_write()
        try:
            yield
        finally:
            with torch.no_grad():
                for t, saved in zip(tensors, local):
                    t.copy_(saved)
            self.adapter.after_write()

    # ------------------------------------------------------------------ metrics and state
    def metrics(self) -> dict[str, float]:
        """The palsgd/* log values (without the prefix)."""
        out: dict[str, float] = {name: float(v) for name, v in self.counters.items()}
        out["comm_bytes"] = float(self.peers.stats.bytes_sent + self.replica.stats.bytes_sent)
        out["comm_seconds"] = self.peers.stats.seconds_blocked + self.replica.stats.seconds_blocked
        # The pseudo-gradient exchanges alone: time blocked in them (the exposed cost of the outer
        # syncs) and time they ran hidden behind local steps (overlap_steps > 0).
        out["sync_seconds_blocked"] = self.sync_seconds_blocked
        out["comm_seconds_overlapped"] = self.peers.stats.seconds_overlapped
        out["drift"] = self.last_drift
        out["mixing_coefficient"] = self.last_mixing_coefficient
        out.update(self.guard.metrics())
        return out

    def state_dict(self) -> dict[str, Any]:
        """This rank's state. An overlapped sync in flight is waited for (nothing new is launched, so
        any subset of ranks may call this) and saved with x_launch, to be applied at the same step
        after a resume."""
        return {
            "step": self.step,
            "counters": dict(self.counters),
            "generator": self._generator.get_state(),
            "kind": None if self._kind is None else self._kind.value,
            "since_sync": self._since_sync,
            "last_drift": self.last_drift,
            "last_mixing_coefficient": self.last_mixing_coefficient,
            "anchor": None if self._anchor is None else self._anchor.state_dict(),
            "pending_sync": None if self._pending is None else self._pending.state_dict(),
            "sync_seconds_blocked": self.sync_seconds_blocked,
            "peers_stats": self.peers.stats.state_dict(),
            "replica_stats": self.replica.stats.state_dict(),
            "replica_index": self.replica_index,
            "guard": self.guard.state_dict(),
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved_cfg = state.get("config", {})
        for key in ("method", "sync_interval", "shard_size", "coins"):
            if key in saved_cfg and saved_cfg[key] != getattr(self.config, key):
                raise ValueError(
                    f"the checkpoint was written with {key}={saved_cfg[key]!r} but this run has "
                    f"{key}={getattr(self.config, key)!r}; resume with the same setting or start a new run."
                )
        if state.get("replica_index", self.replica_index) != self.replica_index:
            raise ValueError(
                f"the checkpoint belongs to replica {state['replica_index']} but this rank is replica "
                f"{self.replica_index}; resume with the same number of processes and shard layout."
            )
        self.step = int(state["step"])
        self.counters = {name: int(state["counters"].get(name, 0)) for name in COUNTERS}
        self._generator.set_state(state["generator"])
        self._kind = None if state["kind"] is None else StepKind(state["kind"])
        self._since_sync = int(state["since_sync"])
        self.last_drift = float(state["last_drift"])
        self.last_mixing_coefficient = float(state["last_mixing_coefficient"])
        self.peers.stats.load_state_dict(state["peers_stats"])
        self.replica.stats.load_state_dict(state["replica_stats"])
        if state["anchor"] is None:
            self._anchor = None
        else:
            self._anchor = Anchor(self._owned_tensors(), self.config, self.anchor_device)
            self._anchor.load_state_dict(state["anchor"])
        self.sync_seconds_blocked = float(state.get("sync_seconds_blocked", 0.0))
        self.guard.load_state_dict(state.get("guard", {}))
        self._pending = None
        if state.get("pending_sync") is not None:
            device = self._owned_tensors()[0].device
            self._pending = PendingSync.from_state(state["pending_sync"], self.peers, self._anchor.tensors, device)
        self._grad_sync = None  # re-applied to the backend at the next step


def _job_guard(config: PALSGDConfig) -> CollectiveGuard:
    """The guard of this rank in the running job (inactive with one replica or no process group)."""
    t = Topology.from_environment(config.shard_size)
    return CollectiveGuard(t.replica_ranks(t.replica_index), t.num_replicas, refuse=config.coins == "per_replica")


_COUNTER_OF = {
    StepKind.WARMUP: "warmup_steps",
    StepKind.GRADIENT: "gradient_steps",
    StepKind.PSEUDO_SYNC: "pseudo_syncs",
}


def _lerp_(tensors: list[torch.Tensor], anchors: list[torch.Tensor], c: float) -> None:
    """tensors <- tensors + c (anchors - tensors), in the tensors' own dtype and device."""
    same = all(t.dtype == a.dtype and t.device == a.device for t, a in zip(tensors, anchors))
    if same:
        torch._foreach_lerp_(tensors, anchors, c)
        return
    for t, a in zip(tensors, anchors):
        a = a.to(t.device, non_blocking=True)
        t.copy_(t.to(a.dtype).lerp_(a, c))
