"""palsgd_hf: Pseudo-Asynchronous Local SGD (PALSGD) for the Hugging Face training stack.

The core (config, algorithm, optimizer wrapper) imports only torch. The integrations, which pull
in transformers / accelerate, load on first use of their names, so ``import palsgd_hf`` stays cheap
for plain PyTorch loops and for the per-rank processes of a launch.
"""

from importlib import import_module
from typing import Any

from .config import PALSGDConfig, PALSGDConfigError
from .core import PALSGD, Communicator, LocalCommunicator, PALSGDOptimizer, StepKind, Topology
from .attach import build_algorithm, wrap_optimizer
from .devices import cpu_only

__version__ = "0.1.0"

# name -> module that defines it, imported lazily (see the module docstring).
_LAZY = {
    "PALSGDTrainer": ".integrations.trainer",
    "PALSGDTrainerMixin": ".integrations.trainer",
    "PALSGDTrainingArguments": ".integrations.trainer_args",
    "PALSGDAccelerate": ".integrations.accelerate",
    # The [trl] extra: importing these imports trl (and only then).
    "PALSGDSFTTrainer": ".integrations.trl",
    "PALSGDSFTConfig": ".integrations.trl",
    "PALSGDDPOTrainer": ".integrations.trl",
    "PALSGDDPOConfig": ".integrations.trl",
    # The [ft] extra: torchft is imported only when a session is built.
    "FaultTolerantSession": ".fault_tolerance",
    "FaultToleranceConfig": ".fault_tolerance",
}

__all__ = [
    "PALSGDConfig", "PALSGDConfigError", "PALSGD", "PALSGDOptimizer", "StepKind", "Communicator",
    "LocalCommunicator", "Topology", "build_algorithm", "wrap_optimizer", "cpu_only", "__version__", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'palsgd_hf' has no attribute {name!r}")
