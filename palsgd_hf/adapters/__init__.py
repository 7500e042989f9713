"""Backend adapters: which tensors a rank owns and how gradient sync is switched (one file per backend)."""

from .module import ModuleAdapter

__all__ = ["ModuleAdapter"]
