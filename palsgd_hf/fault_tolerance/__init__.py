"""Fault-tolerant PALSGD on torchft: replicas that fail do not stop training (docs/fault_tolerance.md).

Importing this package does not import torchft (the optional ``[ft]`` extra): the session does, when built.
"""

from .lighthouse import start_lighthouse
from .session import FaultTolerantSession
from .settings import FaultToleranceConfig

__all__ = ["FaultToleranceConfig", "FaultTolerantSession", "start_lighthouse"]
