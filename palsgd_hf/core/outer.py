"""The anchor (this rank's stale copy of the global model) and the outer optimizer acting on it.

The anchor holds one fp32 tensor per owned tensor, beside the weights or in (pinned) host memory.
At a global sync the pseudo-gradient x_bar - x is averaged over the peer group, written as the
anchor's gradient, and one step of the outer optimizer (Nesterov SGD by default) moves the anchor;
the workers then copy it. Memory cost: the anchor plus the outer optimizer's state (one momentum
buffer for SGD/Nesterov, two for Adam), in fp32, for the owned tensors only.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config import PALSGDConfig


def build_outer_optimizer(params: list[torch.Tensor], config: PALSGDConfig) -> torch.optim.Optimizer:
    if config.outer_optimizer == "adam":
        return torch.optim.Adam(params, lr=config.outer_lr, betas=(config.outer_momentum, 0.999))
    return torch.optim.SGD(
        params,
        lr=config.outer_lr,
        momentum=config.outer_momentum,
        nesterov=config.outer_optimizer == "nesterov",
    )


class Anchor:
    """Anchor tensors for a list of owned tensors, plus the outer optimizer over them."""

    def __init__(self, tensors: list[torch.Tensor], config: PALSGDConfig, device: Optional[torch.device] = None):
        def make(t: torch.Tensor) -> torch.Tensor:
            target = device if device is not None else t.device
            # fp32 at least (16-bit anchors would lose small pseudo-gradients); fp64 stays fp64.
            dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
            a = torch.empty(t.shape, dtype=dtype, device=target)
            if target.type == "cpu" and t.device.type == "cuda":
                a = a.pin_memory()
            return a.copy_(t.detach())

        self.tensors = [make(t) for t in tensors]
        self.optimizer = build_outer_optimizer(self.tensors, config)

    def copy_from(self, tensors: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for a, t in zip(self.tensors, tensors):
                a.copy_(t.detach())

    def pairs(self, tensors: list[torch.Tensor], idx: Optional[list[int]] = None):
        """(anchor, tensor) pairs: all of them, or those at the indices ``idx`` (one fragment's pieces)."""
        if idx is None:
            return list(zip(self.tensors, tensors))
        return [(self.tensors[i], tensors[i]) for i in idx]

    def write_to(self, tensors: list[torch.Tensor], idx: Optional[list[int]] = None) -> None:
        """x <- anchor for every owned tensor (or those at ``idx``)."""
        with torch.no_grad():
            for a, t in self.pairs(tensors, idx):
                t.copy_(a, non_blocking=True)

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors[0].dtype if self.tensors else torch.float32

    def pseudo_gradient(self, tensors: list[torch.Tensor], idx: Optional[list[int]] = None) -> torch.Tensor:
        """One flat buffer of x_bar - x (in the anchor's dtype, on the weights' device), over ``idx`` or all."""
        device = tensors[0].device
        with torch.no_grad():
            parts = [(a.to(device, non_blocking=True) - t.detach().to(a.dtype)).flatten()
                     for a, t in self.pairs(tensors, idx)]
            return torch.cat(parts) if parts else torch.zeros(0, dtype=self.dtype, device=device)

    def outer_step(self, flat_mean: torch.Tensor, idx: Optional[list[int]] = None) -> None:
        """Set the averaged pseudo-gradient as the anchor's gradient and take one outer step.

        With ``idx`` (one fragment) only those anchor tensors get a gradient: the outer optimizer skips
        tensors without one, so the other fragments' anchors and momenta stay as they are.
        """
        offset = 0
        anchors = self.tensors if idx is None else [self.tensors[i] for i in idx]
        for a in anchors:
            n = a.numel()
            a.grad = flat_mean[offset : offset + n].view_as(a).to(a.device, a.dtype)
            offset += n
        self.optimizer.step()
        for a in anchors:
            a.grad = None

    def drift(self, tensors: list[torch.Tensor], idx: Optional[list[int]] = None) -> tuple[float, float]:
        """(||x - x_bar||^2, ||x_bar||^2) over the owned tensors (or ``idx``); callers combine and take roots."""
        num = den = 0.0
        with torch.no_grad():
            for a, t in self.pairs(tensors, idx):
                a_dev = a.to(t.device, non_blocking=True)
                num += float((t.detach().to(a.dtype) - a_dev).pow(2).sum())
                den += float(a_dev.pow(2).sum())
        return num, den

    def numel(self) -> int:
        return sum(a.numel() for a in self.tensors)

    def state_dict(self) -> dict:
        return {"tensors": [a.detach().cpu().clone() for a in self.tensors], "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        saved = state["tensors"]
        if len(saved) != len(self.tensors) or any(s.shape != a.shape for s, a in zip(saved, self.tensors)):
            raise ValueError(
                "the checkpoint's PALSGD anchor does not match this model's owned tensors "
                f"({[tuple(s.shape) for s in saved][:4]}... vs {[tuple(a.shape) for a in self.tensors][:4]}...); "
                "resume with the same model, optimizer groups and shard layout that wrote it."
            )
        with torch.no_grad():
            for a, s in zip(self.tensors, saved):
                a.copy_(s)
        self.optimizer.load_state_dict(state["optimizer"])
