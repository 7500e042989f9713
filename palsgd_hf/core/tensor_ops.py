"""The tensor operations of a PALSGD step and sync, as functions of tensors and communicators.

Kept apart from the state machine (algorithm.py) so that it reads as the schedule of a step, and
these read as the arithmetic: the pull (``lerp_``), the agreement of a sharded replica on a finite
pseudo-gradient, the averaging of buffers at a sync, and the check that the anchors still pair with
the tensors they were made for.
"""

from __future__ import annotations

import torch

from .comm import Communicator


def lerp_(tensors: list[torch.Tensor], anchors: list[torch.Tensor], c: float) -> None:
    """tensors <- tensors + c (anchors - tensors), in the tensors' own dtype and device."""
    if not tensors:  # a group may own nothing (e.g. LoRA's empty no-decay group)
        return
    same = all(t.dtype == a.dtype and t.device == a.device for t, a in zip(tensors, anchors))
    if same:
        torch._foreach_lerp_(tensors, anchors, c)
        return
    for t, a in zip(tensors, anchors):
        a = a.to(t.device, non_blocking=True)
        t.copy_(t.to(a.dtype).lerp_(a, c))


def agree_all_finite(tensors: tuple[torch.Tensor, ...], replica: Communicator) -> bool:
    """True when every tensor is finite on every rank of the replica (collective over the replica).

    Shards of one replica must agree, or half a model would be updated. The flag lives on the data's
    device: the replica group may be NCCL, which serves CUDA tensors only.
    """
    finite = all(bool(torch.isfinite(t).all()) for t in tensors)
    bad = torch.tensor([0.0 if finite else 1.0], device=tensors[0].device if tensors else None)
    if replica.size > 1:
        replica.all_reduce_max(bad)
    return bad.item() == 0.0


def average_buffers(buffers: list[torch.Tensor], replica: Communicator, peers: Communicator) -> None:
    """Average floating-point buffers over all ranks in place (blocking: every rank is at a sync).

    The mean over the replica, then over the peers, is the mean over all ranks.
    """
    if not buffers or (peers.size == 1 and replica.size == 1):
        return
    flat = torch.cat([b.detach().flatten().to(torch.float32) for b in buffers])
    if replica.size > 1:
        replica.all_reduce_mean(flat)
    if peers.size > 1:
        peers.all_reduce_mean(flat)
    offset = 0
    with torch.no_grad():
        for b in buffers:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()


def check_aligned(step: int, tensors: list[torch.Tensor], anchors: list[torch.Tensor]) -> None:
    """Anchors pair with owned tensors by position: a changed list would pair them wrongly."""
    if len(tensors) != len(anchors) or any(t.shape != a.shape for t, a in zip(tensors, anchors)):
        raise RuntimeError(
            f"PALSGD step {step}: the tensors this rank trains changed since the local phase started "
            f"({len(anchors)} with an anchor, now {len(tensors)}; e.g. a parameter was frozen or unfrozen, "
            "or an optimizer group added). PALSGD keeps one anchor per trained tensor from its first local step: "
            "set requires_grad and the optimizer's groups before training, or restart from a checkpoint."
        )
