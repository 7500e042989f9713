"""A modeled clock for ``sync_policy='auto'`` in the simulator: the policy decides from modeled, not real, seconds.

The auto policy (:mod:`palsgd_hf.core.sync_policy`) times local steps with a clock and reads the seconds each
sync blocked. In the simulator every collective is a thread barrier, so real seconds would say the link is free.
Here each worker thread gets its own :class:`ModeledClock`, advanced by the loop with every step's modeled cost
(:mod:`benchmarks.sim.wall_time`), and a :class:`ModeledCommunicator` whose pseudo-gradient exchanges report the
modeled transfer time of the bytes they booked as their blocked seconds (and advance the clock by it, plus the outer
step's local work). The policy's decisions are then those it would take on the modeled link, deterministically.
"""

from __future__ import annotations

from tests.helpers.threads import ThreadCommunicator

from .wall_time import Costs, Link, allreduce_seconds


class ModeledClock:
    """Seconds on one worker's modeled timeline (callable, as the policy's ``clock``)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class _ModeledExchange:
    """A finished-on-wait exchange whose blocked seconds are the modeled transfer of its bytes."""

    def __init__(self, exchange, comm: "ModeledCommunicator", booked_before: int):
        self._exchange, self._comm, self._before = exchange, comm, booked_before
        self.seconds_blocked = 0.0

    def wait(self):
        out = self._exchange.wait()
        c = self._comm
        transfer = allreduce_seconds(c.stats.bytes_sent - self._before, c.size, c.link)
        self.seconds_blocked = transfer
        c.clock.advance(transfer + c.costs.sync_local_s)
        return out

    def __getattr__(self, name):  # advance(), state_dict(): the real exchange's
        return getattr(self._exchange, name)


class ModeledCommunicator(ThreadCommunicator):
    """The threaded communicator, with pseudo-gradient exchanges priced on ``link`` (blocking syncs only)."""

    def __init__(self, comm: ThreadCommunicator, clock: ModeledClock, link: Link, costs: Costs):
        super().__init__(comm._group, comm.rank)
        self.clock, self.link, self.costs = clock, link, costs

    def mean_exchange_async(self, flat, wire=None, feedback=None):
        before = self.stats.bytes_sent
        return _ModeledExchange(super().mean_exchange_async(flat, wire, feedback), self, before)
