"""Device and process helpers shared by the integrations and the command line.

Kept apart from the integrations so that asking "is there a GPU?" (recipe checks, the launcher)
does not import the Accelerate hooks or the Trainer.
"""

from __future__ import annotations

import torch


def cpu_only() -> bool:
    """True on a machine without a GPU: pass ``Accelerator(cpu=cpu_only())`` so a multi-process
    launch becomes one gloo job instead of N independent single-process runs."""
    xpu = getattr(torch, "xpu", None)
    return not (torch.cuda.is_available() or (xpu is not None and xpu.is_available()))
