"""Where the Trainer keeps each rank's PALSGD state: ``checkpoint-N/palsgd_rank{R}.pt``.

The file itself (layout, atomic write, version and rank checks) is :mod:`palsgd_hf.state_files`,
shared by every integration; this module only names it inside a Trainer checkpoint and says, when
it is missing, what the directory holds instead. ``model``/``optimizer`` are None under DeepSpeed
(its ``save_checkpoint`` stores each rank's ZeRO partitions).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from .. import state_files

FORMAT = state_files.FORMAT


def rank_file(checkpoint_dir: str | os.PathLike, rank: int) -> Path:
    return Path(checkpoint_dir) / f"palsgd_rank{rank}.pt"


def save_rank_state(
    checkpoint_dir: str | os.PathLike,
    rank: int,
    world_size: int,
    algorithm_state: dict[str, Any],
    model_state: Optional[dict[str, Any]] = None,
    optimizer_state: Optional[dict[str, Any]] = None,
) -> Path:
    """Write this rank's PALSGD file into ``checkpoint_dir`` atomically; return its path."""
    return state_files.save(
        rank_file(checkpoint_dir, rank), rank=rank, world_size=world_size, algorithm=algorithm_state,
        model=model_state, optimizer=optimizer_state,
    )


def load_rank_state(checkpoint_dir: str | os.PathLike, rank: int, world_size: int) -> dict[str, Any]:
    """Read this rank's PALSGD file, refusing a missing file or one written by another layout or world."""
    path = rank_file(checkpoint_dir, rank)
    if not path.is_file():
        others = sorted(p.name for p in Path(checkpoint_dir).glob("palsgd_rank*.pt"))
        found = f"it holds {others}" if others else "it holds no PALSGD files"
        raise FileNotFoundError(
            f"cannot resume PALSGD from {checkpoint_dir}: {path.name} is missing ({found}). Each rank needs the file "
            "its rank wrote: resume with the same number of processes, from a checkpoint written by a PALSGD "
            "trainer (not with save_only_model=True)."
        )
    return state_files.load(path, rank=rank, world_size=world_size)
