"""The PALSGD algorithm, torch only: state machine, anchor + outer optimizer, communication, layout."""

from .adapter import OwnedGroup, ParamAdapter
from .algorithm import PALSGD, StepKind, coin_seed
from .comm import Communicator, LocalCommunicator
from .optimizer import PALSGDOptimizer
from .topology import Topology, build_process_groups

__all__ = [
    "PALSGD", "StepKind", "coin_seed", "Communicator", "LocalCommunicator", "OwnedGroup", "ParamAdapter",
    "PALSGDOptimizer", "Topology", "build_process_groups",
]
