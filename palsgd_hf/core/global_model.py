"""The global model as seen from one rank between syncs: evaluate it, or make it the local model.

Between syncs each worker's weights drift from the anchor (the last global model); these two
operations put the anchor into the weights, for a while (:meth:`GlobalModelViews.global_weights`,
e.g. to evaluate or save the global model) or for good (:meth:`GlobalModelViews.adopt_global_model`,
e.g. when a checkpoint's global model becomes the final one). Mixed into
:class:`~palsgd_hf.core.algorithm.PALSGD`, whose state (``_anchor``, ``_pending``, ``_since_sync``,
the adapter) they read and write; neither communicates.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class GlobalModelViews:
    """Evaluation and adoption of the anchor; see the module docstring."""

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
