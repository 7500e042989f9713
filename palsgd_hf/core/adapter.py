"""The contract between the PALSGD core and a training backend (plain module, DDP, DeepSpeed ZeRO).

An adapter answers two questions for the core: *which tensors does this rank own* (the fp32
tensors the inner optimizer updates: whole parameters for a plain module or DDP, the flat fp32
master partitions under ZeRO) and *how is cross-worker gradient sync switched on and off*. The
core reads and writes only those tensors and never imports a backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .comm import Communicator


@dataclass
class OwnedGroup:
    """One inner-optimizer parameter group as the core sees it.

    ``options`` is the optimizer's live ``param_group`` dict: the core reads its ``lr`` (the
    alpha_t of the pull) and scales it on gradient steps, so it must be the very dict that the
    optimizer and its LR scheduler use, not a copy.
    """

    options: dict[str, Any]
    tensors: list[torch.Tensor]


class ParamAdapter(Protocol):
    def owned_groups(self) -> list[OwnedGroup]:
        """The tensors this rank owns, grouped by inner-optimizer parameter group."""

    def after_write(self) -> None:
        """Called after the core changed owned tensors in place (ZeRO refreshes 16-bit copies)."""

    def set_gradient_sync(self, enabled: bool) -> None:
        """Switch the backend's own cross-worker gradient all-reduce on (warm-up) or off."""

    def warmup_gradient_sync(self, comm: Communicator) -> None:
        """Average gradients over all workers before a warm-up step, if the backend did not."""

    # Optional: ``starts_identical`` (True when the backend keeps the replicas identical through warm-up, so
    # the local phase needs no broadcast), ``on_local_phase_start()``, ``sync_buffers()`` (buffers averaged
    # at a sync), ``reset_nonfinite_state()`` -- replace non-finite values in the inner optimizer's
    # state by zeros; called after a sync was skipped for a non-finite pseudo-gradient.
