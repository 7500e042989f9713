"""Start a torchft lighthouse in this process (tests, notebooks, a one-machine run).

In production run the lighthouse as its own long-lived process, on a host every replica reaches:

    torchft_lighthouse --min_replicas 2 --join_timeout_ms 10000 --heartbeat_timeout_ms 5000 --bind [::]:29510

``min_replicas``: fewest replicas a sync may average over (more than half of those launched avoids two
disjoint quorums). ``heartbeat_timeout_ms``: how long a silent replica counts as alive, which bounds the time
from a crash to the next sync without it. ``join_timeout_ms``: how long a quorum waits for a live replica
that has not reached the exchange yet; keep it above the skew between replicas reaching a sync.
"""

from __future__ import annotations


def start_lighthouse(min_replicas: int, *, bind: str = "[::]:0", join_timeout_ms: int = 10_000,
                     heartbeat_timeout_ms: int = 5_000, quorum_tick_ms: int = 100):
    """A running ``LighthouseServer`` (its ``address()`` is the URL replicas take; ``shutdown()`` stops it)."""
    from torchft._torchft import LighthouseServer  # lazy: torchft is the optional [ft] extra

    return LighthouseServer(bind=bind, min_replicas=min_replicas, join_timeout_ms=join_timeout_ms,
                            quorum_tick_ms=quorum_tick_ms, heartbeat_timeout_ms=heartbeat_timeout_ms)
