"""``PALSGDTrainer`` in the fault-tolerant mode: one Trainer per replica, exchanges on torchft.

A replica is one process, or S ranks of its own ``torch.distributed`` world (its own
``torchrun --standalone --nproc_per_node S``) that shard the model with FSDP2 before the Trainer, exactly as
the non-fault-tolerant FSDP2 path (palsgd_hf/integrations/fsdp_trainer.py):

    args = PALSGDTrainingArguments(..., max_steps=N, palsgd_shard_size=S,   # S = 1 for a one-process replica
                                   palsgd_warmup_steps=0)                   # starts the replica's world
    model = shard_model(model, S)                    # with S > 1 only; after the arguments, before the session
    session = FaultTolerantSession(FaultToleranceConfig(lighthouse=..., replica_id=r, replicas=3))
    trainer = FaultTolerantTrainer(model=model, args=args, train_dataset=shard_r, session=session)
    trainer.train()                                  # joins the others first; shuts the session down at the end

The session builds PALSGD when the Trainer prepares for training, and ``join()`` runs right there: a replica
restarted while the others train takes a live peer's state (the LR scheduler's included; with S ranks each
rank its own shard of it, from the same rank of a live replica) and the Trainer continues at the others' step
(``state.global_step`` is set to it, so the run still ends at ``max_steps`` with the others; the data loader
restarts from the beginning of its shard). Everything else is ``PALSGDTrainer``'s.

A replica of S ranks may instead train with DeepSpeed ZeRO-1/2/3 (``deepspeed=`` a ZeRO config,
``palsgd_shard_size=S``, the model not sharded beforehand): ZeRO shards over the replica's world, the engine steps
PALSGD as in ``PALSGDTrainer``, a warm-up step's mean is one managed exchange inside that step, and a rejoining
replica's ranks take their own fp32 partitions, inner optimizer state and the engine's step count from the same
rank of a live replica (palsgd_hf/fault_tolerance/session.py).

Refused when the Trainer is built, before any work (each error names the value, the rule and the fix):
a replica of several ranks whose model is neither FSDP2 nor DeepSpeed (accelerate would wrap it in DDP);
``palsgd_shard_size`` other than the replica's ranks; a session built in another world than the Trainer's (it
must come after the arguments, which start ``torch.distributed``); and the
settings the managed exchange does not carry (overlap, low-precision exchanges, ...; see session.py).
``train(resume_from_checkpoint=...)`` is refused before any work: a restarted replica takes the live replicas'
state when it joins, which is newer than any checkpoint of its own.
"""

from __future__ import annotations

import logging
from typing import Any

from ..config import PALSGDConfigError
from ..core.algorithm import PALSGD
from ..integrations.trainer import PALSGDTrainer
from .session import FaultTolerantSession, _check_supported

logger = logging.getLogger(__name__)


class FaultTolerantTrainer(PALSGDTrainer):
    """``PALSGDTrainer`` whose exchanges go through ``session``: one Trainer per replica, which is one process or
    S ranks sharding an FSDP2 model or a ZeRO engine (see the module docstring: the launch, the rejoin, what is
    refused)."""

    # Its peers are the other replicas, reached through torchft: a world of one worker (one process, or S ranks
    # with palsgd_shard_size=S) is not alone, so the single-worker warning would mislead.
    palsgd_peers_outside_world = True

    def __init__(self, *args: Any, session: FaultTolerantSession, **kwargs: Any):
        super().__init__(*args, **kwargs)
        _check_replica(self, session)
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

    def train(self, resume_from_checkpoint=None, *args: Any, **kwargs: Any):
        if resume_from_checkpoint is not None and resume_from_checkpoint is not False:
            # Refused before any work (the session stays usable): after join() this replica holds the live
            # replicas' state, newer than its own checkpoint, which would then roll it back to an older step
            # than theirs; and replicas resumed from checkpoints of different steps would hold different anchors.
            raise PALSGDConfigError(
                f"FaultTolerantTrainer.train(resume_from_checkpoint={resume_from_checkpoint!r}): a fault-tolerant "
                "replica does not resume from its own checkpoint. Call train() without it: a restarted replica takes "
                "the live replicas' state when it joins. To restart a whole run (every replica stopped), load every "
                "replica's model from the global model that a checkpoint (or save_model) wrote, then train() anew."
            )
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self.session.shutdown()


def _check_replica(trainer: PALSGDTrainer, session: FaultTolerantSession) -> None:
    """What the fault-tolerant Trainer does not run, refused before any work."""
    ranks = trainer.args.world_size
    if ranks > 1 and not trainer._palsgd_fsdp and not trainer.is_deepspeed_enabled:
        raise PALSGDConfigError(
            f"this replica's torch.distributed world has {ranks} ranks but the model is not sharded with FSDP2 nor "
            "trained with DeepSpeed, so accelerate would wrap it in DDP, which a fault-tolerant replica does not "
            f"support. Shard it first (shard_model(model, {ranks}) with palsgd_shard_size={ranks}), or pass a ZeRO "
            "config (deepspeed=...), or launch each replica as one process."
        )
    if session.group_size != ranks:
        raise PALSGDConfigError(
            f"the FaultTolerantSession was built in a world of {session.group_size} rank(s) but the Trainer runs "
            f"{ranks}: build the session after the TrainingArguments (they start torch.distributed) and after "
            "sharding the model, in every rank of the replica."
        )
    # shard_size == ranks, blocking fp32 exchanges at a fixed interval (warm-up: any number of ranks).
    _check_supported(trainer.model, trainer.palsgd_config, ranks, deepspeed=trainer.is_deepspeed_enabled)
