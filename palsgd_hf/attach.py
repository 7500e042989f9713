"""One call that attaches PALSGD to a model and its optimizer, for any PyTorch training loop.

    optimizer = palsgd_hf.wrap_optimizer(model, optimizer, PALSGDConfig(sync_interval=32))
    for batch in loader:
        if optimizer.algorithm.step_kind() is not StepKind.PSEUDO_SYNC:   # skip compute
            loss = model(**batch).loss; loss.backward()
        optimizer.step(); scheduler.step(); optimizer.zero_grad()
    optimizer.algorithm.finalize()        # every worker now holds the global model

It lays out replicas and shards from the running ``torch.distributed`` job, creates the peer and
replica process groups, picks the adapter for the model's backend (plain module or DDP; a
DeepSpeed engine is handed to ``palsgd_hf.adapters.deepspeed.attach``, imported lazily, which
reuses the engine's replica groups) and returns a :class:`PALSGDOptimizer`. In a hand-written
DeepSpeed loop, use ``palsgd_hf.adapters.deepspeed.initialize`` and call ``engine.step()`` on
every step instead.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Optional

import torch

from .adapters.fsdp import FSDPAdapter, is_fsdp2
from .adapters.module import ModuleAdapter
from .config import PALSGDConfig
from .core.algorithm import PALSGD
from .core.comm import Communicator, LocalCommunicator
from .core.optimizer import PALSGDOptimizer
from .core.topology import Topology, build_process_groups


def build_algorithm(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: PALSGDConfig,
    *,
    adapter=None,
    comm_timeout: Optional[timedelta] = None,
) -> PALSGD:
    """The PALSGD state machine for this rank, wired to its process groups and backend adapter.

    ``comm_timeout`` (default: ``config.comm_timeout_seconds``, else the default group's) bounds every
    collective of PALSGD's own process groups.
    """
    if comm_timeout is None:
        comm_timeout = config.comm_timeout()
    if adapter is None and _is_deepspeed_engine(model):
        # ZeRO's groups come from the engine's mpu, and the adapter must be bound to the engine's step.
        from .adapters.deepspeed import attach  # lazy: deepspeed is an optional extra

        return attach(model, config, comm_timeout=comm_timeout)
    topology = Topology.from_environment(config.shard_size)
    groups = build_process_groups(topology, comm_timeout)
    distributed = topology.world_size > 1
    peers = Communicator(groups.peers, comm_timeout) if distributed else LocalCommunicator()
    replica = Communicator(groups.replica, comm_timeout) if config.shard_size > 1 else LocalCommunicator()
    if adapter is None:
        adapter = build_adapter(model, optimizer, peers, config.shard_size)
    anchor_device = torch.device("cpu") if config.anchor_device == "cpu" else None
    return PALSGD(
        config, adapter, peers=peers, replica=replica, replica_index=topology.replica_index, anchor_device=anchor_device
    )


def build_adapter(model: torch.nn.Module, optimizer: torch.optim.Optimizer, comm: Communicator, shard_size: int = 1):
    """The adapter for an FSDP2 model, a plain module or DDP (DeepSpeed engines go through
    ``adapters.deepspeed.attach``)."""
    if is_fsdp2(model):
        return FSDPAdapter(model, optimizer, comm, shard_size)
    return ModuleAdapter(model, optimizer, comm)


def _is_deepspeed_engine(model: torch.nn.Module) -> bool:
    return type(model).__name__ == "DeepSpeedEngine"


def wrap_optimizer(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: PALSGDConfig,
    *,
    comm_timeout: Optional[timedelta] = None,
) -> PALSGDOptimizer:
    """Wrap ``optimizer`` so that each ``step()`` is a PALSGD step (see the module docstring)."""
    return PALSGDOptimizer(optimizer, build_algorithm(model, optimizer, config, comm_timeout=comm_timeout))
