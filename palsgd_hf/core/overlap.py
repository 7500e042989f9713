"""An overlapped outer sync: the pseudo-gradient average in flight while the workers keep training.

With ``overlap_steps`` = d >= 1 the global sync that falls due when the step count reaches L
(L mod H == 0) is split in two (counts are optimizer steps, of both kinds, after the increment):

* launch, at count L (where the blocking sync would run):
  delta_k = x_bar - x_k exactly as in the blocking sync; start averaging it over the peers
  (:class:`~palsgd_hf.core.exchange.MeanExchange`, fp32, bf16, int8 or int4 on the wire); keep x_launch_k = x_k,
  a copy of the owned tensors in the anchor's dtype (fp32) and on the anchor's device.
* wait, the next d steps (counts L+1 .. L+d): ordinary local steps. Pseudo-sync pulls aim at
  the OLD anchor x_bar: it is the latest complete global model. With bf16 on the wire the
  exchange's second half (the all-gather) starts after the step that brings the count to
  L + ceil(d/2), so each half has compute to hide behind (with d = 1 the second half is exposed).
* apply, at count L + d (after that step's inner step or pull):
  delta_bar = the finished average; x_bar_new = outer_step(x_bar, delta_bar);
  x_k <- x_bar_new + (x_k - x_launch_k): the global update lands and every worker keeps the local
  progress it made while waiting. Workers therefore still differ right after an overlapped sync;
  they agree again only at finalize().
* non-finite delta_bar: no outer step and x_k <- x_bar (the last good anchor) on every worker,
  local progress dropped, as in the blocking sync: a worker that diverged would otherwise keep
  its NaNs (its own progress x_k - x_launch_k is NaN) and make every later sync fail too.

Memory: the blocking sync's flat pseudo-gradient buffer (N values, fp32; with bf16 on the wire
2N bytes for the send buffer, 2N for the receive buffer, 4N/n for the fp32 partial sum) now lives
for d steps instead of an instant, plus x_launch: one more fp32 copy of the owned tensors (the
whole model for a plain module/DDP, this rank's partition under ZeRO), on the anchor's device
(pinned host memory with anchor_device='cpu').
"""

from __future__ import annotations

from typing import Optional

import torch

from .comm import Communicator, MeanExchange, exchange_from_state


class PendingSync:
    """One launched, not yet applied outer sync."""

    def __init__(
        self, exchange: MeanExchange, at_launch: list[torch.Tensor], launch_step: int, apply_step: int,
        advance_step: int, fragment: Optional[int] = None,
    ):
        self.exchange = exchange
        self.at_launch = at_launch  # of the synced fragment's pieces (every owned tensor when fragment is None)
        self.launch_step, self.apply_step, self.advance_step = launch_step, apply_step, advance_step
        self.fragment = fragment

    @classmethod
    def launch(
        cls, exchange: MeanExchange, tensors: list[torch.Tensor], anchors: list[torch.Tensor], step: int, overlap: int,
        fragment: Optional[int] = None,
    ) -> "PendingSync":
        at_launch = []
        with torch.no_grad():
            for t, a in zip(tensors, anchors):
                copy = torch.empty(a.shape, dtype=a.dtype, device=a.device)
                if a.device.type == "cpu" and t.device.type == "cuda":
                    copy = copy.pin_memory()
                at_launch.append(copy.copy_(t.detach(), non_blocking=True))
        return cls(exchange, at_launch, step, step + overlap, step + (overlap + 1) // 2, fragment)

    def on_step(self, step: int) -> None:
        """Called after every local step while in flight: start the bf16 gather when its time comes."""
        if step >= self.advance_step:
            self.exchange.advance()

    def keep_local_progress(self, anchors: list[torch.Tensor], tensors: list[torch.Tensor]) -> None:
        """x <- x_bar_new + (x - x_launch), computed in the anchor's dtype on the weights' device."""
        with torch.no_grad():
            for a, launched, t in zip(anchors, self.at_launch, tensors):
                progress = t.detach().to(a.dtype) - launched.to(t.device, non_blocking=True)
                t.copy_(a.to(t.device, non_blocking=True) + progress)

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        """Waits for the collective in flight (no new one is started), so any rank may call it."""
        return {
            "exchange": self.exchange.state_dict(),
            "at_launch": [t.detach().cpu().clone() for t in self.at_launch],
            "launch_step": self.launch_step,
            "apply_step": self.apply_step,
            "advance_step": self.advance_step,
            "fragment": self.fragment,
        }

    @classmethod
    def from_state(
        cls, state: dict, comm: Communicator, anchors: list[torch.Tensor], device: Optional[torch.device],
        feedback=None,
    ) -> "PendingSync":
        saved = state["at_launch"]
        if len(saved) != len(anchors) or any(s.shape != a.shape for s, a in zip(saved, anchors)):
            raise ValueError(
                "the checkpoint's in-flight PALSGD sync does not match this model's owned tensors; resume with "
                "the same model, optimizer groups and shard layout that wrote it."
            )
        at_launch = [(torch.empty_like(a).pin_memory() if a.is_pinned() else torch.empty_like(a)).copy_(s)
                     for s, a in zip(saved, anchors)]
        exchange = exchange_from_state(comm, state["exchange"], device or anchors[0].device, feedback)
        return cls(exchange, at_launch, int(state["launch_step"]), int(state["apply_step"]), int(state["advance_step"]),
                   state.get("fragment"))
