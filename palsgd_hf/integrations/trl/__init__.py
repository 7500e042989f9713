"""PALSGD for trl's trainers (the ``[trl]`` extra; ``[peft]`` for LoRA).

``PALSGDSFTTrainer``/``PALSGDSFTConfig`` and ``PALSGDDPOTrainer``/``PALSGDDPOConfig`` are trl's
trainers and configs with PALSGD attached and trl's per-micro-batch metric gathers deferred to log
time. Importing this package imports trl; ``palsgd_hf`` itself exports these names lazily.
See docs/finetuning.md.
"""

try:  # trl is an optional extra: this package is imported only by users of it (one check for every module)
    import trl  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"palsgd_hf's trl integration needs trl ({err}); install it with `pip install 'palsgd_hf[trl]'`."
    ) from err

from .dpo import PALSGDDPOConfig, PALSGDDPOTrainer  # noqa: E402
from .metrics import LocalTrlMetricsMixin  # noqa: E402
from .sft import PALSGDSFTConfig, PALSGDSFTTrainer  # noqa: E402

__all__ = ["LocalTrlMetricsMixin", "PALSGDDPOConfig", "PALSGDDPOTrainer", "PALSGDSFTConfig", "PALSGDSFTTrainer"]
