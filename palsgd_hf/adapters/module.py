"""Adapter for a plain ``nn.Module`` or a ``DistributedDataParallel``-wrapped one (full tensors).

Owned tensors are the inner optimizer's parameters themselves. Gradient sync:

* DDP: during warm-up DDP's reducer all-reduces gradient buckets in backward as usual (a comm
  hook counts their bytes). After warm-up both of DDP's per-step collectives are switched off:
  ``require_backward_grad_sync`` (the gradient all-reduce) and ``require_forward_param_sync``
  (the buffer broadcast before forward), so a local step sends nothing.
* A bare module: nothing averages gradients, so warm-up steps all-reduce them here.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..core.adapter import OwnedGroup
from ..core.comm import Communicator


class ModuleAdapter:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, comm: Optional[Communicator] = None):
        self.model = model
        # Wrappers (PALSGDOptimizer, accelerate's AcceleratedOptimizer) expose the inner optimizer's
        # very param_group dicts, so the lr read and scaled here is the one the scheduler sets.
        self.optimizer = optimizer
        self.ddp = _find_ddp(model)
        self._counting_hook = False
        if self.ddp is not None and comm is not None:
            self._install_counting_hook(comm)

    def owned_groups(self) -> list[OwnedGroup]:
        return [OwnedGroup(g, [p for p in g["params"] if p.requires_grad]) for g in self.optimizer.param_groups]

    def after_write(self) -> None:
        """Plain tensors: nothing to refresh."""

    def set_gradient_sync(self, enabled: bool) -> None:
        if self.ddp is not None:
            self.ddp.require_backward_grad_sync = enabled
            self.ddp.require_forward_param_sync = enabled

    def warmup_gradient_sync(self, comm: Communicator) -> None:
        if self.ddp is not None or comm.size == 1:
            return
        grads = [p.grad for g in self.owned_groups() for p in g.tensors if p.grad is not None]
        if grads:
            flat = torch.cat([g.flatten() for g in grads])
            comm.all_reduce_mean(flat)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    def reset_nonfinite_state(self) -> None:
        """Zero non-finite entries of the inner optimizer's state (e.g. Adam moments after a NaN)."""
        for state in self.optimizer.state.values():
            for value in state.values():
                if torch.is_tensor(value) and value.is_floating_point():
                    torch.nan_to_num_(value, nan=0.0, posinf=0.0, neginf=0.0)

    def _install_counting_hook(self, comm: Communicator) -> None:
        """Count DDP's gradient bytes in the PALSGD accounting (DDP's default all-reduce, averaged)."""
        group = self.ddp.process_group

        # No annotations: DDP inspects them, and this module's postponed (string) annotations fail its check.
        def hook(_state, bucket):
            tensor = bucket.buffer()
            comm.record(tensor.numel() * tensor.element_size())
            world = dist.get_world_size(group)
            tensor.div_(world)
            fut = dist.all_reduce(tensor, group=group, async_op=True).get_future()
            return fut.then(lambda f: f.value()[0])

        try:
            self.ddp.register_comm_hook(None, hook)
            self._counting_hook = True
        except RuntimeError:
            # A hook is already registered (by the user or a previous adapter): keep theirs.
            self._counting_hook = False


def _find_ddp(model: torch.nn.Module) -> Optional[DistributedDataParallel]:
    if isinstance(model, DistributedDataParallel):
        return model
    return None

