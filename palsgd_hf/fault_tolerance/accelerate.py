"""The Accelerate hooks in the fault-tolerant mode: one single-process ``Accelerator`` per replica.

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

One process per replica (a replica of several FSDP2 ranks: ``FaultTolerantTrainer``, or the session in a
hand-written loop). Everything else is :class:`~palsgd_hf.integrations.accelerate.PALSGDAccelerate`'s (coins
drawn after each step, gradient accumulation, per-rank checkpoints); only the algorithm is built by the session.
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
        if accelerator.num_processes != 1:
            # Not yet: accelerate would wrap a model of several ranks in DDP, which a fault-tolerant replica does not
            # carry; the FSDP2 path through these hooks is untested under fault tolerance.
            raise PALSGDConfigError(
                f"the fault-tolerant Accelerate hooks run one process per replica, but this Accelerator has "
                f"{accelerator.num_processes}; launch each replica as its own single process, or, for a replica of "
                "several FSDP2 ranks, use FaultTolerantTrainer or FaultTolerantSession in a hand-written loop."
            )
        super().__init__(accelerator, config)
        self.session, self.extra_state = session, extra_state

    def _build_algorithm(self, model: torch.nn.Module, optimizer) -> PALSGD:
        return self.session.build_algorithm(model, optimizer, self.config, self.extra_state)

    def wrap(self, model: torch.nn.Module, optimizer):
        wrapped = super().wrap(model, optimizer)
        self.session.join()
        return wrapped
