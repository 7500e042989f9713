"""Adapter for an FSDP2 (``torch.distributed.fsdp.fully_shard``) model: PALSGD acts on the local shards.

Layout: the world is R replicas x S ranks. FSDP2 shards one model copy over the S ranks of a
replica (``fully_shard(module, mesh=shard_mesh(S))``: the 1-D "shard" dimension of the PALSGD
device mesh, the very groups :mod:`palsgd_hf.core.topology` builds); PALSGD averages across the R
replicas, each rank exchanging only the shard it owns with the ranks owning the same shard in the
other replicas (its peer group). The anchor and the outer optimizer's state hold that shard only,
so bytes per sync and anchor memory are 1/S of the unsharded model's.

What the core sees (``owned_groups``): the local tensors of the DTensor parameters
(``DTensor._local_tensor``), which share storage with FSDP2's sharded parameter data; the inner
optimizer updates the DTensors, i.e. exactly these tensors. The core writes them in place (pull,
sync); FSDP2 all-gathers from them at the next forward. ``after_write`` reshards every FSDP
module (a local operation) so no stale unsharded copy survives a write (the root stays unsharded
after a forward without backward, e.g. an evaluation).

Gradient sync: FSDP2's reduce-scatter runs over the shard dimension only (the mesh is 1-D), so it
always stays on and never crosses replicas. Warm-up steps must average over *all* ranks: during
warm-up a hook FSDP2 calls right after each reduce-scatter (``set_all_reduce_hook``) averages the
reduced shard over the peer group, so the mean over S then over R is the mean over every rank,
before anything (clipping, the optimizer) reads the gradient, as DDP would. After warm-up the hook
does nothing: a local step sends nothing across replicas, and a pseudo-sync step (no forward, no
backward on every rank of the replica: the ranks of a replica share one coin) makes FSDP issue no
collective at all.

``mean_in_backward=False`` (the fault-tolerant mode, :mod:`palsgd_hf.fault_tolerance.session`) moves that mean
to the step boundary instead: no hook; ``warmup_gradient_sync`` sends this rank's gradient shards of every
FSDP module in one exchange, after backward and before the inner step. Inside backward a replica restarted by
torchft could not join the others (they would be waiting in the middle of their backward, one exchange per
module); at the step boundary it takes a peer's state, runs its own backward and meets them in that exchange,
and a warm-up step costs one exchange (one quorum) rather than one per module. The mean is then taken after
anything the loop did between backward and ``optimizer.step()`` (clipping clips each replica's gradient), as
for a one-process replica.

Not supported (refused on construction): FSDP1 (``FullyShardedDataParallel``), HSDP (a 2-D mesh:
FSDP2's replica all-reduce cannot be switched off without dropping the gradient, it only defers
it), CPU offload, a mesh that is not this rank's replica group, trained parameters left out of
FSDP (not DTensors).
"""

from __future__ import annotations

import logging
import torch
import torch.distributed as dist

from ..core.adapter import OwnedGroup
from ..core.comm import Communicator
from ..core.topology import Topology, build_process_groups

logger = logging.getLogger(__name__)


def shard_mesh(shard_size: int, timeout=None):
    """The 1-D device mesh of this rank's replica, to pass as ``fully_shard(..., mesh=shard_mesh(S))``.

    Collective (every rank calls it, in the same order). Refuses a shard size that does not divide the
    world before any work.
    """
    if not dist.is_initialized():
        raise RuntimeError("shard_mesh() needs torch.distributed initialized (torchrun + init_process_group).")
    topology = Topology.from_environment(shard_size)  # raises when shard_size does not divide the world
    groups = build_process_groups(topology, timeout)
    if groups.mesh is None:
        raise RuntimeError("a one-process job has no mesh to shard over; run without fully_shard.")
    return groups.mesh["shard"]


def fsdp_modules(model: torch.nn.Module) -> list:
    """The FSDP2 modules inside ``model`` (looking through ``torch.compile``)."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in _unwrap_compiled(model).modules() if isinstance(m, FSDPModule)]


def is_fsdp2(model: torch.nn.Module) -> bool:
    return bool(fsdp_modules(model))


class FSDPAdapter:
    """The PALSGD adapter of one rank of an FSDP2 model sharded over its replica.

    Args:
        model: the model after ``fully_shard`` (each sharded module over ``shard_mesh(S)``).
        optimizer: the inner optimizer over the model's DTensor parameters (or a wrapper exposing its
            ``param_groups``).
        comm: communicator over this rank's peer group. Collective: on construction the owned shards
            are broadcast from replica 0, so every replica starts from the same model (as DDP does);
            a checkpoint loaded afterwards overwrites them.
        shard_size: S, the ranks per replica the FSDP mesh must span.
        broadcast: ``False`` skips that broadcast (a state restored before attaching).
        mean_in_backward: ``False`` averages warm-up gradients at the step boundary (see the module docstring).
    """

    # Replicas start equal (the broadcast below) and warm-up averages every rank's gradient.
    starts_identical = True

    def __init__(self, model: torch.nn.Module, optimizer, comm: Communicator, shard_size: int,
                 broadcast: bool = True, mean_in_backward: bool = True):
        self.model = model
        self.optimizer = optimizer
        self.modules = fsdp_modules(model)
        self._check_supported(shard_size)
        self._trained = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        self._check_params(shard_size)
        self._warmup = False
        self._comm = comm
        self._mean_in_backward = mean_in_backward
        for module in self.modules if mean_in_backward else ():
            if module._get_fsdp_state()._fsdp_param_groups:
                module.set_all_reduce_hook(self._after_reduce_scatter)
        if broadcast and comm.size > 1:
            with torch.no_grad():
                for group in self.owned_groups():
                    for t in group.tensors:
                        comm.broadcast(t, 0)
            self.after_write()

    # ------------------------------------------------------------------ the adapter contract
    def owned_groups(self) -> list[OwnedGroup]:
        trained = {id(p) for p in self._trained}
        groups = [OwnedGroup(g, [_local(p) for p in g["params"] if id(p) in trained])
                  for g in self.optimizer.param_groups]
        late = [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad and id(p) not in trained]
        if late:
            raise RuntimeError(
                f"{len(late)} parameter(s) became trainable after PALSGD was attached: they have no anchor, so each "
                "replica would train them alone. Set requires_grad before attaching PALSGD."
            )
        return groups

    def after_write(self) -> None:
        """Drop any unsharded copy, so the next forward all-gathers the shards just written (no collective)."""
        for module in self.modules:
            module.reshard()

    def set_gradient_sync(self, enabled: bool) -> None:
        """Warm-up on: the reduce-scatter hook averages across replicas too. Off: nothing crosses replicas."""
        self._warmup = enabled

    def warmup_gradient_sync(self, comm: Communicator) -> None:
        """Nothing left to do when the hook averaged each reduced shard during backward (before clipping); else
        one exchange of this rank's gradient shards with the same shard of every replica."""
        if not self._mean_in_backward and comm.size > 1:
            _mean_gradient_shards(self._trained, comm)

    def sync_buffers(self) -> list[torch.Tensor]:
        """Floating-point buffers (not sharded by FSDP2), averaged at every sync."""
        module = _unwrap_compiled(self.model)
        persistent = set(module.state_dict().keys())
        return [b for name, b in module.named_buffers()
                if b.is_floating_point() and name in persistent and not _is_dtensor(b)]

    @torch.no_grad()
    def reset_nonfinite_state(self) -> None:
        """Zero non-finite entries of the inner optimizer's state (local shards of DTensor moments)."""
        for state in self.optimizer.state.values():
            for value in state.values():
                if torch.is_tensor(value) and value.is_floating_point():
                    torch.nan_to_num_(_local(value), nan=0.0, posinf=0.0, neginf=0.0)

    # ------------------------------------------------------------------ per-rank checkpoint state
    def local_model_state(self) -> dict[str, torch.Tensor]:
        """This rank's model state with every DTensor as its local shard (replicas differ between syncs)."""
        module = _unwrap_compiled(self.model)
        return {k: _local(v).detach().cpu().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def load_local_model_state(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in _unwrap_compiled(self.model).state_dict().items():
            _local(value).copy_(state[key])
        self.after_write()

    def local_optimizer_state(self, optimizer) -> dict:
        """``optimizer.state_dict()`` with DTensor values as their local shards (plain tensors pickle simply)."""
        state = optimizer.state_dict()
        state["state"] = {k: {n: _local(v).detach().cpu().clone() if torch.is_tensor(v) else v for n, v in s.items()}
                          for k, s in state["state"].items()}
        return state

    def load_local_optimizer_state(self, optimizer, state: dict) -> None:
        """Load a :meth:`local_optimizer_state`, making shard-shaped values DTensors like their parameter."""
        from torch.distributed.tensor import DTensor

        params = [p for g in optimizer.param_groups for p in g["params"]]
        converted = {}
        for index, values in state["state"].items():
            param = params[int(index)]
            converted[index] = {
                name: DTensor.from_local(v.to(_local(param).device), param.device_mesh, param.placements,
                                         shape=param.shape, stride=param.stride())
                if _is_dtensor(param) and torch.is_tensor(v) and v.shape == _local(param).shape and v.dim() > 0 else v
                for name, v in values.items()
            }
        optimizer.load_state_dict({**state, "state": converted})

    # ------------------------------------------------------------------ internals
    def _after_reduce_scatter(self, reduced: torch.Tensor) -> None:
        # FSDP2 calls this with the shard's gradient, already averaged over the S ranks of the replica.
        if self._warmup and self._comm.size > 1:
            result = self._comm.all_reduce_mean(reduced)
            if result is not reduced:
                reduced.copy_(result)

    def _check_supported(self, shard_size: int) -> None:
        try:
            from torch.distributed.fsdp import CPUOffloadPolicy, FullyShardedDataParallel
        except ImportError as error:  # pragma: no cover - a torch without FSDP2
            raise RuntimeError("PALSGD + FSDP needs torch >= 2.6 (torch.distributed.fsdp.fully_shard).") from error
        if any(isinstance(m, FullyShardedDataParallel) for m in _unwrap_compiled(self.model).modules()):
            raise NotImplementedError(
                "PALSGD supports FSDP2 (torch.distributed.fsdp.fully_shard), not FSDP1 (FullyShardedDataParallel); "
                "shard with fully_shard(module, mesh=palsgd_hf.adapters.fsdp.shard_mesh(shard_size)) instead."
            )
        if not self.modules:
            raise ValueError("FSDPAdapter needs a model sharded with fully_shard; this one has no FSDP2 module.")
        for module in self.modules:
            for group in module._get_fsdp_state()._fsdp_param_groups:
                if isinstance(group.offload_policy, CPUOffloadPolicy):
                    raise NotImplementedError(
                        "PALSGD does not support FSDP2 CPU offload (offload_policy=CPUOffloadPolicy): the shards it "
                        "acts on then move between host and device inside FSDP's step. Shard without offload, and keep "
                        "the PALSGD anchor in host memory instead with anchor_device='cpu'."
                    )

    def _check_params(self, shard_size: int) -> None:
        topology = Topology.from_environment(shard_size)
        expected = topology.replica_ranks(topology.replica_index)
        for p in self._trained:
            if not _is_dtensor(p):
                raise ValueError(
                    f"a trained parameter of shape {tuple(p.shape)} is not sharded by FSDP2 (ignored_params, or a "
                    "module outside fully_shard); PALSGD + FSDP needs every trained parameter inside fully_shard."
                )
            mesh = p.device_mesh
            if mesh.ndim != 1:
                raise NotImplementedError(
                    f"the model is sharded over a {mesh.ndim}-D mesh {tuple(mesh.shape)} (HSDP): its replica "
                    "all-reduce would run at every step. Shard each replica on its own 1-D mesh: "
                    "fully_shard(module, mesh=palsgd_hf.adapters.fsdp.shard_mesh(shard_size))."
                )
            ranks = sorted(dist.get_process_group_ranks(mesh.get_group())) if dist.is_initialized() else [0]
            if ranks != expected:
                raise ValueError(
                    f"FSDP2 shards over ranks {ranks}, but with shard_size={shard_size} this rank's replica is ranks "
                    f"{expected}: FSDP must be confined to one replica, or its per-step collectives cross replicas. "
                    "Pass mesh=palsgd_hf.adapters.fsdp.shard_mesh(shard_size) to fully_shard (and make "
                    "palsgd_shard_size the FSDP shard size)."
                )


@torch.no_grad()
def _mean_gradient_shards(params: list, comm: Communicator) -> None:
    """Average the local gradient shards of ``params`` over ``comm`` in one fp32 exchange, in place.

    The buffer covers every trained parameter, with or without a gradient here, so every replica sends the same
    number of values (a size that differed would pair mismatched buffers), plus one flag per parameter: 1 where
    it has a gradient. A parameter with a gradient on some replica gets the mean on all of them (the replicas
    without one count as zeros, as DDP counts unused parameters); one with none anywhere keeps none everywhere,
    so the replicas stay identical through warm-up (a rejoin during warm-up relies on that).
    """
    if not params:
        return
    shards = [_local(p) for p in params]
    sizes = [s.numel() for s in shards]
    total = sum(sizes)
    flat = torch.zeros(total + len(params), dtype=torch.float32, device=shards[0].device)
    values, flags = flat[:total].split(sizes), flat[total:]
    for i, (p, value) in enumerate(zip(params, values)):
        if p.grad is not None:
            value.copy_(_local(p.grad).reshape(-1))
            flags[i] = 1.0
    mean = comm.all_reduce_mean(flat)
    if mean is not flat:
        flat.copy_(mean)
    for p, value, flag in zip(params, values, flags.tolist()):
        if flag == 0.0:
            p.grad = None
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)  # a DTensor sharded like its parameter
        grad = _local(p.grad)
        grad.copy_(value.view(grad.shape))


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    # The local shard itself, not a copy: ``to_local()`` may return an autograd view; ``_local_tensor`` is the
    # storage FSDP2's sharded parameter data and the optimizer's in-place updates use.
    return t._local_tensor if _is_dtensor(t) else t


def _unwrap_compiled(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
        model = model._orig_mod
    return model

