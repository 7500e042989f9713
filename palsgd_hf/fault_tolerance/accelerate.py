"""The Accelerate hooks in the fault-tolerant mode: one ``Accelerator`` per replica (one process, or S FSDP2 ranks).

    session = FaultTolerantSession(FaultToleranceConfig(lighthouse=..., replica_id=r, replicas=3))
    accelerator = Accelerator(cpu=cpu_only())
    palsgd = FaultTolerantAccelerate(accelerator, PALSGDConfig(sync_interval=32), session)
    model, optimizer = accelerator.prepare(model, optimizer)
    optimizer = palsgd.wrap(model, optimizer)        # builds PALSGD over torchft, then joins the others
    while palsgd.algorithm.step < total_steps:       # the step jumps forward when this replica rejoins
        with accelerator.accumulate(model):
            if palsgd.should_compute():
                accelerator.backward(model(**batch_for(palsgd.algorithm.step)).loss)
            optimizer.step(); optimizer.zero_grad()
    palsgd.finalize(); session.shutdown()

A replica of S ranks (its own ``torchrun --nproc_per_node S``, as for the session in a hand-written loop) shards
the model with FSDP2 over all of its ranks (``fully_shard(..., mesh=shard_mesh(S))``) and prepares the optimizer
only, never the model (accelerate has no FSDP mode on CPU and would wrap it in DDP), exactly as the
non-fault-tolerant hooks on an FSDP2 model; ``PALSGDConfig(shard_size=S)``; the session is built after the
``Accelerator`` (which starts the replica's world). Warm-up works as with one process: its gradient mean is one
managed exchange in ``optimizer.step()`` (after backward and any clipping; see the session). Refused before any
step: a session of another world, another shard size, a DDP-prepared model (naming the fix).

Everything else is :class:`~palsgd_hf.integrations.accelerate.PALSGDAccelerate`'s (coins drawn after each
step, gradient accumulation, per-rank checkpoints); only the algorithm is built by the session.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config import PALSGDConfig, PALSGDConfigError
from ..core.algorithm import PALSGD
from ..integrations.accelerate import PALSGDAccelerate
from .session import FaultTolerantSession


class FaultTolerantAccelerate(PALSGDAccelerate):
    """``PALSGDAccelerate`` whose exchanges go through ``session`` (see the module docstring).

    ``extra_state``: objects a rejoining replica takes from its peer (e.g. ``{"scheduler": scheduler}``).
    """

    def __init__(self, accelerator, config: PALSGDConfig, session: FaultTolerantSession,
                 extra_state: Optional[dict] = None):
        ranks = accelerator.num_processes
        if ranks != session.group_size:
            raise PALSGDConfigError(
                f"this Accelerator has {ranks} process(es) but the FaultTolerantSession was built in a world of "
                f"{session.group_size}: build the session after the Accelerator (it starts torch.distributed), on "
                "every rank of the replica, each replica its own launch."
            )
        if ranks > 1 and config is not None and config.shard_size != ranks:
            raise PALSGDConfigError(
                f"shard_size={config.shard_size} but this replica has {ranks} ranks: the fault-tolerant hooks run a "
                f"replica of several ranks as one FSDP2 model copy over all of them; use shard_size={ranks} and "
                f"fully_shard(..., mesh=shard_mesh({ranks})), or one process per replica."
            )
        super().__init__(accelerator, config)
        self.session, self.extra_state = session, extra_state

    def _build_algorithm(self, model: torch.nn.Module, optimizer) -> PALSGD:
        # The session refuses a DDP-prepared model and a multi-rank model that is not FSDP2 (session._check_supported).
        return self.session.build_algorithm(model, optimizer, self.config, self.extra_state)

    def wrap(self, model: torch.nn.Module, optimizer):
        wrapped = super().wrap(model, optimizer)
        self.session.join()
        return wrapped
