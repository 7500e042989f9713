"""``PALSGDTrainer`` in the fault-tolerant mode: one single-process Trainer per replica, exchanges on torchft.

    session = FaultTolerantSession(FaultToleranceConfig(lighthouse=..., replica_id=r, replicas=3))
    trainer = FaultTolerantTrainer(model=model, args=PALSGDTrainingArguments(..., max_steps=N),
                                   train_dataset=shard_r, session=session)
    trainer.train()                                  # joins the others first; shuts the session down at the end

The session builds PALSGD when the Trainer prepares for training, and ``join()`` runs right there: a replica
restarted while the others train takes a live peer's state (the LR scheduler's included) and the Trainer
continues at the others' step (``state.global_step`` is set to it, so the run still ends at ``max_steps``
with the others; the data loader restarts from the beginning of its shard). Everything else is
``PALSGDTrainer``'s. Not with DeepSpeed (one process per replica, plain module).
"""

from __future__ import annotations

import logging
from typing import Any

from ..core.algorithm import PALSGD
from ..integrations.trainer import PALSGDTrainer
from .session import FaultTolerantSession

logger = logging.getLogger(__name__)


class FaultTolerantTrainer(PALSGDTrainer):
    """``PALSGDTrainer`` whose exchanges go through ``session`` (see the module docstring)."""

    def __init__(self, *args: Any, session: FaultTolerantSession, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled or self.args.world_size != 1:
            raise ValueError(
                f"FaultTolerantTrainer runs one single-process Trainer per replica (got world_size="
                f"{self.args.world_size}, deepspeed={bool(self.is_deepspeed_enabled)}); launch each replica as its "
                "own process without DeepSpeed."
            )
        self.session = session

    def _palsgd_build_algorithm(self, timeout) -> PALSGD:
        algorithm = self.session.build_algorithm(self.model_wrapped, self.optimizer, self.palsgd_config,
                                                 extra_state={"lr_scheduler": self.lr_scheduler})
        self.session.join()
        if algorithm.step > self.state.global_step:  # rejoined: continue at the others' step
            logger.info("replica %d continues at step %d (the others' step)", self.session.settings.replica_id,
                        algorithm.step)
            self.state.global_step = algorithm.step
        return algorithm

    def train(self, *args: Any, **kwargs: Any):
        try:
            return super().train(*args, **kwargs)
        finally:
            self.session.shutdown()
