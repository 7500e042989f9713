"""PALSGDDPOTrainer / PALSGDDPOConfig: trl's ``DPOTrainer`` and ``DPOConfig`` with PALSGD.

Built as sft.py builds the SFT pair. The reference model is never trained: it is not in the
optimizer, so PALSGD neither anchors nor syncs it (with ``peft_config=`` trl uses the base model
with the adapter disabled as the reference). ``precompute_ref_log_probs`` gathers once before
training, when every rank is together.
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import DPOConfig, DPOTrainer  # the package's __init__ says which extra is missing

from ..trainer import PALSGDTrainerMixin
from ..trainer_args import PALSGDTrainingArguments
from .metrics import LocalTrlMetricsMixin


# DPOConfig first, for the same reason as in sft.py.
@dataclass
class PALSGDDPOConfig(DPOConfig, PALSGDTrainingArguments):
    """``DPOConfig`` plus the ``palsgd_*`` settings of :class:`PALSGDTrainingArguments`."""


class PALSGDDPOTrainer(LocalTrlMetricsMixin, PALSGDTrainerMixin, DPOTrainer):
    """trl's ``DPOTrainer`` trained with PALSGD; takes :class:`PALSGDDPOConfig` (or ``palsgd_config=``)."""
