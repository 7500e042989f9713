"""The kinds of an optimizer step, their counters, and the seed of the coin that picks them."""

from __future__ import annotations

import enum

COUNTERS = ("warmup_steps", "gradient_steps", "pseudo_syncs", "outer_syncs", "skipped_syncs")


class StepKind(str, enum.Enum):
    WARMUP = "warmup"
    GRADIENT = "gradient"
    PSEUDO_SYNC = "pseudo_sync"


# The counter each kind of step adds to.
COUNTER_OF = {
    StepKind.WARMUP: "warmup_steps",
    StepKind.GRADIENT: "gradient_steps",
    StepKind.PSEUDO_SYNC: "pseudo_syncs",
}


def coin_seed(seed: int, replica_index: int) -> int:
    """Seed of replica ``replica_index``'s coin generator: all ranks of a replica agree, replicas differ.

    With shared coins every replica uses ``coin_seed(seed, 0)``.
    """
    return (seed * 1_000_003 + replica_index * 7_919 + 17) % (2**63 - 1)
