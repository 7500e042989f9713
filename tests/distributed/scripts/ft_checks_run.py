"""What the fault-tolerant integrations refuse when they are built (tests/distributed/test_fault_tolerance_checks.py).

Launched with torchrun, next to a live lighthouse (``--lighthouse``) that never sees a quorum: every case below
must be refused while the Trainer or the Accelerate hooks are built, before PALSGD exists and before any
exchange. Per case this records the message, whether the session built a PALSGD, torchft's step (one per
committed exchange) and whether the model's weights changed.

* ``--case worlds`` (2 ranks, one replica sharding an FSDP2 model over both): a session built *before* the
  arguments start the replica's world (so in a world of 1), handed to ``FaultTolerantTrainer`` and to
  ``FaultTolerantAccelerate`` (2 ranks); a session built in the world, handed to the hooks with ``shard_size=1``.
  Then a valid ``FaultTolerantTrainer`` and a ``PALSGDTrainer`` in the same world: which of them logs the
  single-worker warning (the fault-tolerant replica must not: its peers are the other replicas).

Writes ``rank<R>.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from ft_trainer_data import Regressor, Samples, sha
from palsgd_hf.config import PALSGDConfig, PALSGDConfigError
from palsgd_hf.fault_tolerance import FaultToleranceConfig, FaultTolerantSession
from palsgd_hf.fault_tolerance.trainer import FaultTolerantTrainer
from palsgd_hf.integrations.fsdp_trainer import shard_model
from palsgd_hf.integrations.trainer import PALSGDTrainer
from palsgd_hf.integrations.trainer_args import PALSGDTrainingArguments


class Warnings(logging.Handler):
    """The warnings of the arguments' checks (where the single-worker warning comes from)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        logging.getLogger("palsgd_hf.integrations.trainer_args").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def take(self) -> list[str]:
        taken, self.messages = self.messages, []
        return taken


def weights(model: torch.nn.Module) -> str:
    return sha(p.to_local() if hasattr(p, "to_local") else p for p in model.parameters())


def refused(build, session: FaultTolerantSession, model: torch.nn.Module) -> dict:
    """Build what must be refused; its message, and what it left behind (nothing, if refused before any work)."""
    before = weights(model)
    try:
        build()
        message = None
    except PALSGDConfigError as err:
        message = str(err)
    return {"message": message, "algorithm_built": session.algorithm is not None,
            "exchanges": session.manager.current_step(), "weights_changed": weights(model) != before}


def arguments(args, **extra) -> PALSGDTrainingArguments:
    return PALSGDTrainingArguments(
        output_dir=str(Path(args.out) / "trainer"), max_steps=4, per_device_train_batch_size=4, use_cpu=True,
        report_to="none", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, ddp_timeout=60,
        palsgd_sync_interval=2, palsgd_warmup_steps=0, palsgd_mixing_rate=1.0, **extra,
    )


def worlds(args, session_settings: FaultToleranceConfig) -> dict:
    from accelerate import Accelerator

    from palsgd_hf.fault_tolerance.accelerate import FaultTolerantAccelerate

    early = FaultTolerantSession(session_settings)  # the mistake: before the arguments start the world
    training_args = arguments(args, palsgd_shard_size=2)  # starts the replica's world of 2 ranks
    torch.manual_seed(0)
    model, data = shard_model(Regressor(), 2), Samples(64)
    cases = {"trainer_session_before_world": refused(
        lambda: FaultTolerantTrainer(model=model, args=training_args, train_dataset=data, session=early), early, model)}
    accelerator = Accelerator(cpu=True)  # the world is already up: it joins it
    config = PALSGDConfig(sync_interval=2, warmup_steps=0, mixing_rate=1.0, shard_size=2)
    cases["accelerate_session_before_world"] = refused(
        lambda: FaultTolerantAccelerate(accelerator, config, early), early, model)
    session = FaultTolerantSession(session_settings)  # in the world, as it should be (collective)
    one_shard = PALSGDConfig(sync_interval=2, warmup_steps=0, mixing_rate=1.0, shard_size=1)
    cases["accelerate_shard_size"] = refused(
        lambda: FaultTolerantAccelerate(accelerator, one_shard, session), session, model)

    warnings = Warnings()
    FaultTolerantTrainer(model=model, args=training_args, train_dataset=data, session=session)  # accepted
    ft_warnings = warnings.take()
    PALSGDTrainer(model=model, args=training_args, train_dataset=data)
    result = {"cases": cases, "warnings": {"fault_tolerant": ft_warnings, "plain": warnings.take()}}
    early.shutdown()
    session.shutdown()
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--lighthouse", required=True)
    p.add_argument("--case", required=True, choices=["worlds"])
    args = p.parse_args()
    session_settings = FaultToleranceConfig(lighthouse=args.lighthouse, replica_id=0, replicas=2,
                                            timeout_seconds=20, quorum_timeout_seconds=20)
    result = worlds(args, session_settings)
    rank = dist.get_rank()
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
