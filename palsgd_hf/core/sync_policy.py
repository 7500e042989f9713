"""When the next global sync happens: every H steps (``fixed``), or at an interval set from measurements (``auto``).

``sync_policy='fixed'``: a sync after step t when (t + 1) mod H == 0 (t counts every step from 0,
warm-up included), the paper's schedule.

``sync_policy='auto'``: H is re-decided at every sync so that the *exposed* communication (the time
every rank is blocked in the pseudo-gradient exchange) stays near a target fraction rho of the
period's wall time (``comm_target``, default 0.1). With t_step the median seconds of a local
gradient step in the period just ended (forward, backward and optimizer step, as the loop sees it:
the time between the ends of consecutive optimizer steps) and t_sync the seconds blocked in this
sync, a period of H steps computes about (1 - p) H t_step (pseudo-sync steps cost almost nothing),
so the fraction t_sync / ((1 - p) H t_step + t_sync) equals rho at

    H* = t_sync (1 - rho) / (rho (1 - p) t_step).

The next interval is H* rounded up, moved at most a factor 2 from the current one (one noisy
measurement cannot swing it), and kept within [max(overlap_steps + 1, sync_interval / 8),
max_sync_interval (default 8 x sync_interval)]. The link alone never takes H below the user's
``sync_interval``: that interval is a quality choice, and on a link where syncs cost nothing a
shorter one bought no quality in the benchmarks (BENCHMARKS.md, "``sync_policy="auto"``") while it
adds outer steps; so ``auto`` raises H above the user's only to keep exposed communication near
the target. Quality guard: the drift at a sync (relative distance of the local weights from the
anchor) is compared with the baseline drift, the largest drift measured while H was at most the
user's ``sync_interval``. H may grow only while the drift is at most twice the baseline; beyond
that, whatever the link asks, H shrinks (at most by half per decision) toward the interval that
would bring the drift back to the baseline if drift grew in proportion to H, if need be below the
user's interval. The first period starts at the local phase and lasts ``sync_interval`` steps (it is
not shortened to a multiple of H as in the fixed schedule). With one replica there is nothing to
wait for and H stays.

t_sync is the *least* time any rank was blocked in the exchange: that of the last replica to arrive,
which waited only for the transfer. The others also waited for it, but that wait is the replicas'
compute imbalance (their coins skip compute on different steps; load on a shared host), which a longer
H does not amortize; counted as link time it grew H on a 1 Gbit/s link with a loaded host
(BENCHMARKS.md, "The defaults sitting").

Agreement: every decision uses t_step and the drift maxed, and t_sync minimized, over all ranks by two
tiny all-reduces (3 float64 values each) at the sync, which every rank reaches at the same step, so
every replica decides the same H at the same step, deterministically given the measurements. The
schedule's state (H, the next sync step, the baseline drift, the last measurements) is
checkpointed, so a resumed run continues the same schedule. Every decision is logged at INFO and
as palsgd/* metrics.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from typing import Any, Callable, Optional

import torch

from ..config import PALSGDConfig
from .comm import Communicator
from .fragments import due_fragment

logger = logging.getLogger(__name__)

# At most this factor between consecutive intervals, up or down.
MAX_CHANGE = 2.0
# The interval stays within [sync_interval / MAX_RANGE, MAX_RANGE x sync_interval] (unless max_sync_interval says).
MAX_RANGE = 8
# H may grow while the drift at a sync is at most this multiple of the drift at the first sync.
DRIFT_ALLOWANCE = 2.0


class StepTimer:
    """Median seconds of the local gradient steps of one period, timed between the ends of consecutive steps."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self._seconds: list[float] = []
        self._last_end: Optional[float] = None

    def restart(self) -> None:
        """A new period starts now (after a sync, or at the local phase)."""
        self._seconds.clear()
        self._last_end = self.clock()

    def on_step_end(self, gradient_step: bool) -> None:
        now = self.clock()
        if gradient_step and self._last_end is not None:
            self._seconds.append(now - self._last_end)
        self._last_end = now

    def median(self) -> float:
        return statistics.median(self._seconds) if self._seconds else 0.0


class FixedSchedule:
    """A sync after step t when (t + 1) mod H == 0 (``step`` below is t + 1, the steps taken).

    With F fragments, fragment i after step t when (t + 1) mod H == floor(i H / F) (:mod:`.fragments`).
    """

    def __init__(self, config: PALSGDConfig):
        self.interval = config.sync_interval
        self.fragments = config.fragments

    def start(self, step: int) -> None:
        pass

    def on_step_end(self, gradient_step: bool) -> None:
        pass

    def is_due(self, step: int) -> bool:
        return step % self.interval == 0

    def due_fragment(self, step: int) -> Optional[int]:
        """The fragment whose sync falls after the step that brings the count to ``step`` (0 when F = 1), or None."""
        return due_fragment(step, self.interval, self.fragments)

    def launched(self, step: int) -> None:
        pass

    def after_sync(self, step: int, sync_seconds: float, drift: float, groups: tuple[Communicator, ...]) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}  # H is the configured one: nothing to report

    def state_dict(self) -> dict[str, Any]:
        return {"policy": "fixed", "interval": self.interval}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class AdaptiveSchedule:
    """The ``auto`` policy (see the module docstring). ``clock`` is injectable for tests."""

    def __init__(self, config: PALSGDConfig, clock: Callable[[], float] = time.perf_counter):
        self.config = config
        self.interval = config.sync_interval
        self.low = max(config.overlap_steps + 1, math.ceil(config.sync_interval / MAX_RANGE))
        self.high = config.max_sync_interval or MAX_RANGE * config.sync_interval
        self.next_sync: Optional[int] = None
        self.baseline_drift: Optional[float] = None
        self.decisions = 0
        self.last: dict[str, float] = {}  # the agreed measurements behind the last decision
        self.timer = StepTimer(clock)

    def start(self, step: int) -> None:
        """The local phase starts before step ``step``: the first period is ``sync_interval`` steps."""
        if self.next_sync is None:  # a resumed run keeps the saved schedule
            self.next_sync = step + self.interval
        self.timer.restart()

    def on_step_end(self, gradient_step: bool) -> None:
        self.timer.on_step_end(gradient_step)

    def is_due(self, step: int) -> bool:
        return self.next_sync is not None and step >= self.next_sync

    def due_fragment(self, step: int) -> Optional[int]:
        return 0 if self.is_due(step) else None  # one fragment: the config refuses fragments > 1 with 'auto'

    def launched(self, step: int) -> None:
        """An overlapped sync left at ``step``: not due again before its decision lands (H > overlap_steps)."""
        self.next_sync = step + self.interval

    def after_sync(self, step: int, sync_seconds: float, drift: float, groups: tuple[Communicator, ...]) -> None:
        """Decide the next interval from the agreed measurements; the next sync is that many steps away."""
        # Maxed: the slowest step and the largest drift; the sync time minimized (max of its negative): the last
        # rank to arrive waited for the transfer alone (see the module docstring).
        agreed = torch.tensor([self.timer.median(), -float(sync_seconds), float(drift)], dtype=torch.float64)
        for group in groups:  # peers (same shard, every replica), then the replica's own ranks
            agreed = group.all_reduce_max(agreed)
        t_step, t_sync, drift = (float(v) for v in agreed.tolist())
        t_sync = -t_sync
        previous = self.interval
        if groups[0].size > 1:  # with one replica there is nothing to wait for: H stays
            self.interval = self.decide(previous, t_step, t_sync, drift)
        self.next_sync = step + self.interval
        self.decisions += 1
        exposed = t_sync / ((1.0 - self.config.pseudo_sync_prob) * previous * t_step + t_sync) if t_sync > 0 else 0.0
        self.last = {"step_seconds": t_step, "sync_seconds": t_sync, "drift": drift, "comm_fraction": exposed}
        logger.info(
            "PALSGD auto sync interval at step %d: H %d -> %d (local step %.4g s, sync %.4g s blocked: exposed "
            "communication %.1f%% of the period, target %.0f%%; drift %.4g, baseline %.4g; next sync after step %d)",
            step, previous, self.interval, t_step, t_sync, 100 * exposed, 100 * self.config.comm_target, drift,
            self.baseline_drift or 0.0, self.next_sync,
        )
        self.timer.restart()  # the next step's time starts after the sync

    def decide(self, current: int, t_step: float, t_sync: float, drift: float) -> int:
        """The next interval (the same inputs give the same H on every replica; updates the baseline drift)."""
        if current <= self.config.sync_interval:  # the baseline: the replicas' drift at the user's interval
            self.baseline_drift = max(self.baseline_drift or 0.0, drift)
        if t_step <= 0:
            return current  # no gradient step measured in the period (all pseudo-syncs): keep H
        rho, p = self.config.comm_target, self.config.pseudo_sync_prob
        wanted = t_sync * (1.0 - rho) / (rho * (1.0 - p) * t_step)
        target = self._bounded(current, math.ceil(wanted - 1e-9))
        # A cheap link alone never takes H below the user's interval: a shorter H bought no quality in the auto
        # benchmark (H 8 behind H 16 in the median over 5 seeds on every link, in 12 of the 15 runs) and it costs
        # outer steps. The previous rule, which halved H toward 2 on fast links, was 14-19 % behind fixed H.
        target = max(target, min(current, self.config.sync_interval))
        baseline = self.baseline_drift or 0.0
        if baseline > 0 and drift > DRIFT_ALLOWANCE * baseline:
            # Quality first: the replicas drift over twice as far as at the user's interval. Shrink toward the
            # interval that would bring the drift back to the baseline if drift grew in proportion to H.
            target = min(target, current, self._bounded(current, math.floor(current * baseline / drift)))
        return int(min(max(target, self.low), self.high))

    @staticmethod
    def _bounded(current: int, wanted: int) -> int:
        """``wanted``, at least 1, moved at most a factor MAX_CHANGE away from ``current``."""
        return min(max(wanted, 1, math.ceil(current / MAX_CHANGE)), math.floor(current * MAX_CHANGE))

    def metrics(self) -> dict[str, float]:
        out = {"sync_interval": float(self.interval)}
        for key, value in self.last.items():
            out[f"auto_{key}"] = value
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"policy": "auto", "interval": self.interval, "next_sync": self.next_sync,
                "baseline_drift": self.baseline_drift, "decisions": self.decisions, "last": dict(self.last)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("policy") != "auto":
            raise ValueError(f"the checkpoint's sync schedule is sync_policy={state.get('policy')!r} but this run has "
                             "sync_policy='auto'; resume with the checkpoint's policy.")
        # Clamped to this run's bounds: a resume with a larger overlap_steps must not schedule a sync before
        # the one in flight lands.
        self.interval = min(max(int(state["interval"]), self.low), self.high)
        self.next_sync = None if state["next_sync"] is None else int(state["next_sync"])
        self.baseline_drift = state["baseline_drift"]
        self.decisions = int(state["decisions"])
        self.last = dict(state["last"])


def build_schedule(config: PALSGDConfig, clock: Callable[[], float] = time.perf_counter):
    """The schedule of ``config.sync_policy``."""
    return AdaptiveSchedule(config, clock) if config.sync_policy == "auto" else FixedSchedule(config)
