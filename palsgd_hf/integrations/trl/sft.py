"""PALSGDSFTTrainer / PALSGDSFTConfig: trl's ``SFTTrainer`` and ``SFTConfig`` with PALSGD.

    args = PALSGDSFTConfig(output_dir="out", palsgd_sync_interval=16, palsgd_pseudo_sync_prob=0.2, ...)
    trainer = PALSGDSFTTrainer(model="path/or/hub-name", args=args, train_dataset=chat_data,
                               peft_config=LoraConfig(r=16, target_modules="all-linear"))
    trainer.train(); trainer.save_model()          # the global model (or LoRA adapter), on every rank

The config takes every ``SFTConfig`` field with trl's defaults plus every ``palsgd_*`` field of
:class:`~palsgd_hf.integrations.trainer_args.PALSGDTrainingArguments`, validated the same way
(both are inherited, nothing is copied; ``HfArgumentParser(PALSGDSFTConfig)`` sees all of them).
The trainer is ``SFTTrainer`` with ``PALSGDTrainerMixin`` and trl's metrics kept local between logs
(metrics.py). With LoRA (``peft_config=`` or a ``PeftModel``) only the adapter tensors have
``requires_grad``, so the anchor, the outer optimizer state and every sync hold and send the adapter alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import SFTConfig, SFTTrainer  # the package's __init__ says which extra is missing

from ..trainer import PALSGDTrainerMixin
from ..trainer_args import PALSGDTrainingArguments
from .metrics import LocalTrlMetricsMixin


# SFTConfig first: its defaults (learning_rate, logging_steps, bf16, ...) win over TrainingArguments' ones that
# PALSGDTrainingArguments carries; the palsgd_* fields and the PALSGD checks come from PALSGDTrainingArguments,
# whose __post_init__ runs inside trl's (trl's -> PALSGD's -> TrainingArguments').
@dataclass
class PALSGDSFTConfig(SFTConfig, PALSGDTrainingArguments):
    """``SFTConfig`` plus the ``palsgd_*`` settings of :class:`PALSGDTrainingArguments`."""


class PALSGDSFTTrainer(LocalTrlMetricsMixin, PALSGDTrainerMixin, SFTTrainer):
    """trl's ``SFTTrainer`` trained with PALSGD; takes :class:`PALSGDSFTConfig` (or ``palsgd_config=``)."""
