"""The global (outer) sync of one rank: average the pseudo-gradient, step the anchor, return the workers to it.

Blocking (``overlap_steps`` = 0): :meth:`OuterSyncs.sync_fragment` does it all at once. Overlapped (d >= 1):
:meth:`OuterSyncs.launch_sync` starts the average and :meth:`OuterSyncs.apply_pending` lands it d steps later
(:mod:`~palsgd_hf.core.overlap`). With ``fragments`` = F > 1 each sync covers one fragment's pieces
(:mod:`~palsgd_hf.core.fragments`); :meth:`OuterSyncs.sync` (end of training, or an explicit call) syncs
every fragment, one exchange each, so each keeps its own int8/int4 residuals.

Mixed into :class:`~palsgd_hf.core.algorithm.PALSGD`, whose state (``_anchor``, ``_pending``,
``_since_sync``, ``feedbacks``, the adapter, the communicators) these methods read and write. Every
method here is collective over the peers, and over the replica when it is sharded.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch

from .comm import WIRE_DTYPES, ErrorFeedback, LocalCommunicator
from .overlap import PendingSync
from .tensor_ops import agree_all_finite

logger = logging.getLogger(__name__)


class OuterSyncs:
    """The sync half of PALSGD; see the module docstring."""

    def sync(self) -> None:
        """Global sync of the whole model: average pseudo-gradients, one outer step, every worker takes the anchor.

        Blocking. An overlapped sync still in flight is applied first.
        """
        if self._pending is not None:
            self.apply_pending()
        self._sync_buffers()
        for fragment in ([None] if self.fragments.count == 1 else range(self.fragments.count)):
            self.sync_fragment(fragment, buffers=False)
        self._since_sync = 0

    def sync_fragment(self, fragment: Optional[int], buffers: bool = True) -> None:
        """Blocking sync of one fragment (None: the whole model; the only kind when F = 1)."""
        if self._pending is not None:
            self.apply_pending()
        tensors = self._owned_tensors()
        idx = self.fragments.members(fragment)
        if buffers:
            self._sync_buffers()
        exchange = self._exchange_pseudo_gradient(tensors, fragment)
        flat = exchange.wait()
        self.sync_seconds_blocked += exchange.seconds_blocked
        if agree_all_finite((flat,), self.replica):
            self._anchor.outer_step(flat, idx)
            self.counters["outer_syncs"] += 1
            self._anchor.write_to(tensors, idx)
        else:
            self._skip_sync()
            self._anchor.write_to(tensors)
            self._since_sync = 0  # every worker is back on the anchor, every fragment of it
        self.adapter.after_write()
        if idx is None:
            self._since_sync = 0

    def _exchange_pseudo_gradient(self, tensors: list[torch.Tensor], fragment: Optional[int]):
        """Record the drift and start averaging delta = x_bar - x (of one fragment, or all) over the peers."""
        idx = self.fragments.members(fragment)
        num, den = self._anchor.drift(tensors, idx)
        self.last_drift = math.sqrt(num / den) if den > 0 else 0.0
        wire = WIRE_DTYPES[self.config.comm_dtype]
        feedback = None if self.feedbacks is None else self.feedbacks[fragment or 0]
        flat = self._anchor.pseudo_gradient(tensors, idx)
        # A fragment with no values on this rank has none on its peers either (same shard, same sizes): no exchange.
        peers = self.peers if flat.numel() else LocalCommunicator()
        return peers.mean_exchange_async(flat, wire, feedback)

    def launch_sync(self, fragment: Optional[int]) -> None:
        """The first half of an overlapped sync: start the average, remember x_launch, keep training."""
        if self._pending is not None:  # never two in flight (the config keeps d below every gap; a backstop)
            self.apply_pending()
        tensors = self._owned_tensors()
        idx = self.fragments.members(fragment)
        self._sync_buffers()
        exchange = self._exchange_pseudo_gradient(tensors, fragment)
        pairs = self._anchor.pairs(tensors, idx)
        self._pending = PendingSync.launch(
            exchange, [t for _, t in pairs], [a for a, _ in pairs], self.step, self.config.overlap_steps, fragment
        )
        if idx is None:
            self._since_sync = 0

    def apply_pending(self) -> None:
        """The second half: wait for the average, outer step, x <- x_bar_new + (x - x_launch)."""
        pending, self._pending = self._pending, None
        flat = pending.exchange.wait()
        self.sync_seconds_blocked += pending.exchange.seconds_blocked
        tensors = self._owned_tensors()
        idx = self.fragments.members(pending.fragment)
        if agree_all_finite((flat,), self.replica):
            self._anchor.outer_step(flat, idx)
            self.counters["outer_syncs"] += 1
            pairs = self._anchor.pairs(tensors, idx)
            pending.keep_local_progress([a for a, _ in pairs], [t for _, t in pairs])
        else:
            self._skip_sync()
            self._anchor.write_to(tensors)
            self._since_sync = 0  # every worker is back on the anchor
        self.adapter.after_write()

    def _skip_sync(self) -> None:
        # Every peer saw the same averaged NaN/inf, so all skip together: no extra round.
        if not agree_all_finite(tuple(self._anchor.tensors), self.replica):
            # Returning to the anchor only helps if the anchor is good. It is not when the run diverged
            # before the local phase (or an outer step overflowed): every later sync would be skipped.
            raise FloatingPointError(
                f"PALSGD step {self.step}: the global model (anchor) itself is non-finite, so there is no good "
                "state to return to (the run diverged before the local phase, or an outer step overflowed); "
                "resume from the last checkpoint with a lower learning_rate or outer_lr."
            )
        self.counters["skipped_syncs"] += 1
        if self.feedbacks is not None:  # NaN residuals would make every later mean non-finite; all peers saw it
            self.feedbacks = [ErrorFeedback() for _ in self.feedbacks]
        # The worker that diverged has non-finite inner-optimizer moments too; without this,
        # its next step would turn the restored weights non-finite again.
        reset = getattr(self.adapter, "reset_nonfinite_state", None)
        if reset is not None:
            reset()
        logger.warning("PALSGD step %d: non-finite pseudo-gradient; outer update skipped, workers return to the "
                       "last good anchor (skipped_syncs=%d)", self.step, self.counters["skipped_syncs"])
