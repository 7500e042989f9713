"""PALSGD for trl's trainers (the ``[trl]`` extra; ``[peft]`` for LoRA).

``PALSGDSFTTrainer``/``PALSGDSFTConfig`` and ``PALSGDDPOTrainer``/``PALSGDDPOConfig`` are trl's
trainers and configs with PALSGD attached and trl's per-micro-batch metric gathers deferred to log
time. Importing this package imports trl; ``palsgd_hf`` itself exports these names lazily.
See docs/finetuning.md.
"""

from .dpo import PALSGDDPOConfig, PALSGDDPOTrainer
from .metrics import LocalTrlMetricsMixin
from .sft import PALSGDSFTConfig, PALSGDSFTTrainer

__all__ = ["LocalTrlMetricsMixin", "PALSGDDPOConfig", "PALSGDDPOTrainer", "PALSGDSFTConfig", "PALSGDSFTTrainer"]
