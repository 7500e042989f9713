"""Backend adapters: which tensors a rank owns and how gradient sync is switched (one file per backend)."""

from .fsdp import FSDPAdapter, shard_mesh
from .module import ModuleAdapter

__all__ = ["FSDPAdapter", "ModuleAdapter", "shard_mesh"]
