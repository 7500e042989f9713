"""One asynchronous collective in flight, and the time a rank spent blocked on it vs. hidden behind work."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .comm import Communicator


class InFlight:
    """One asynchronous collective: wait for it and book the time blocked vs. hidden behind work.

    The backend's future marks when the collective really finished (gloo runs it on a background
    thread, NCCL on its own stream), so the hidden part is launch -> min(finish, start of wait)
    and the blocked part is the time spent inside ``wait()``.
    """

    def __init__(self, comm: "Communicator", work):
        self.comm, self.work = comm, work
        self.launched_at = time.perf_counter()
        self.done_at: Optional[float] = None
        if work is not None:
            try:
                work.get_future().add_done_callback(self._mark_done)
            except (AttributeError, RuntimeError):
                pass  # a backend without futures: the hidden time is taken up to the start of wait()

    def _mark_done(self, _future) -> None:
        self.done_at = time.perf_counter()

    def wait(self) -> float:
        """Block until done; returns the seconds blocked (0 when nothing was in flight)."""
        if self.work is None:
            return 0.0
        start = time.perf_counter()
        self.work.wait()
        blocked = time.perf_counter() - start
        done = start if self.done_at is None else min(self.done_at, start)
        self.comm.stats.seconds_blocked += blocked
        self.comm.stats.seconds_overlapped += max(0.0, done - self.launched_at)
        self.work = None
        return blocked
