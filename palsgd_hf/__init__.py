"""palsgd_hf: Pseudo-Asynchronous Local SGD (PALSGD) for the Hugging Face training stack."""

from .config import PALSGDConfig, PALSGDConfigError
from .core import PALSGD, Communicator, LocalCommunicator, PALSGDOptimizer, StepKind, Topology
from .wrap import build_algorithm, wrap_optimizer

__version__ = "0.1.0"

__all__ = [
    "PALSGDConfig", "PALSGDConfigError", "PALSGD", "PALSGDOptimizer", "StepKind", "Communicator",
    "LocalCommunicator", "Topology", "build_algorithm", "wrap_optimizer", "__version__",
]
