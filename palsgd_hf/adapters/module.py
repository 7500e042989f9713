"""Adapter for a plain ``nn.Module`` or a ``DistributedDataParallel``-wrapped one (full tensors).

Owned tensors are the inner optimizer's parameters themselves. Gradient sync:

* DDP: during warm-up DDP's reducer all-reduces gradient buckets in backward as usual (a comm
  hook counts their bytes). After warm-up both of DDP's per-step collectives are switched off:
  ``require_backward_grad_sync`` (the gradient all-reduce) and ``require_forward_param_sync``
  (the buffer broadcast before forward), so a local step sends nothing.
* A bare module: nothing averages gradients, so warm-up steps all-reduce them here.

A ``torch.compile``-d model (``OptimizedModule``, as accelerate and the Trainer's
``torch_compile=True`` return it) is looked through to the DDP or module inside: its flags are
the ones DDP reads. FSDP2 models have their own adapter (:mod:`.fsdp`); FSDP1-wrapped ones are refused:
treated as a plain module they would keep reduce-scattering every step and pair collectives across replicas.

The trained tensors are fixed when the adapter is built (those with ``requires_grad`` then): the
core pairs each with an anchor by position, so freezing a parameter later must not drop it from
the list (it keeps its anchor and is simply not updated), and unfreezing one that has no anchor is
an error rather than a replica that silently trains it alone.
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
        _refuse_fsdp(model)
        self.ddp = _find_ddp(model)
        self._trained = {id(p) for g in optimizer.param_groups for p in g["params"] if p.requires_grad}
        self._counting_hook = False
        if self.ddp is not None and comm is not None:
            self._install_counting_hook(comm)

    @property
    def starts_identical(self) -> bool:
        """DDP broadcasts the weights at construction and averages every warm-up step: the replicas are
        identical when the local phase starts, so it needs no broadcast."""
        return self.ddp is not None

    def owned_groups(self) -> list[OwnedGroup]:
        param_groups = self.optimizer.param_groups
        groups = [OwnedGroup(g, [p for p in g["params"] if id(p) in self._trained]) for g in param_groups]
        late = [p for g in param_groups for p in g["params"] if p.requires_grad and id(p) not in self._trained]
        if late:
            raise RuntimeError(
                f"{len(late)} parameter(s) of shape {[tuple(p.shape) for p in late][:3]} became trainable after PALSGD "
                "was attached: they have no anchor, so each replica would train them alone and never sync them. "
                "Set requires_grad before building the trainer / wrapping the optimizer."
            )
        return groups

    def on_local_phase_start(self) -> None:
        """Consume DDP's pending bucket rebuild now, when every rank is here together.

        DDP rebuilds its buckets (a broadcast) in the first forward after the first synced
        backward. With a single warm-up step that forward belongs to the local phase, where a
        replica on a pseudo-sync step has no forward and the broadcast would pair with another
        collective. ``Reducer._rebuild_buckets`` is what DDP's forward calls; it is a no-op once done.
        """
        if self.ddp is not None and dist.is_initialized() and torch.is_grad_enabled():
            if self.ddp.reducer._rebuild_buckets():
                self.ddp._has_rebuilt_buckets = True

    def sync_buffers(self) -> list[torch.Tensor]:
        """Floating-point buffers of the model (BatchNorm statistics...), averaged at every sync."""
        module = self.ddp.module if self.ddp is not None else _unwrap_compiled(self.model)
        persistent = set(module.state_dict().keys())
        return [b for name, b in module.named_buffers() if b.is_floating_point() and name in persistent]

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


def _unwrap_compiled(model: torch.nn.Module) -> torch.nn.Module:
    # torch.compile returns an OptimizedModule whose _orig_mod is the module it compiled.
    while hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
        model = model._orig_mod
    return model


def _find_ddp(model: torch.nn.Module) -> Optional[DistributedDataParallel]:
    model = _unwrap_compiled(model)
    if isinstance(model, DistributedDataParallel):
        return model
    return None


def _refuse_fsdp(model: torch.nn.Module) -> None:
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # a torch without FSDP (e.g. built without distributed): nothing to refuse
        return
    if any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in _unwrap_compiled(model).modules()):
        raise NotImplementedError(
            "PALSGD got an FSDP-sharded model it cannot handle here (FSDP1, or FSDP2 given to ModuleAdapter): it would "
            "keep FSDP's per-step collectives across replicas. Shard each worker with FSDP2 over its replica, "
            "fully_shard(module, mesh=palsgd_hf.adapters.fsdp.shard_mesh(shard_size)) (docs/fsdp.md), or with "
            "DeepSpeed ZeRO (palsgd_shard_size, deepspeed=...)."
        )

