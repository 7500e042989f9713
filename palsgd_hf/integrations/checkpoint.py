"""Per-rank PALSGD checkpoint files: the state a stock checkpoint loses when replicas differ.

A Trainer (or ``accelerator.save_state``) checkpoint holds one model and one optimizer state,
written by the main process. Between two PALSGD syncs every replica has its own weights and
inner-optimizer state, plus PALSGD's own state (anchor, outer optimizer, counters, coin
generator), so each rank writes ``palsgd_rank{R}.pt`` beside the stock files:

    {"format": 1, "rank": R, "world_size": W, "algorithm": PALSGD.state_dict(),
     "model": local weights or None, "optimizer": inner optimizer state or None}

``model``/``optimizer`` are left out (None) where the backend writes per-rank state of its own
(DeepSpeed's ``save_checkpoint`` stores each rank's ZeRO partitions).

Files are written atomically (a temporary file in the same directory, fsync, ``os.replace``), so
a crash while saving leaves either the previous file or the complete new one, never half of one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

FORMAT = 1


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
    path = rank_file(checkpoint_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT, "rank": rank, "world_size": world_size, "algorithm": algorithm_state,
        "model": model_state, "optimizer": optimizer_state,
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_rank_state(checkpoint_dir: str | os.PathLike, rank: int, world_size: int) -> dict[str, Any]:
    """Read this rank's PALSGD file, refusing a missing file or one written by another layout."""
    path = rank_file(checkpoint_dir, rank)
    if not path.is_file():
        others = sorted(p.name for p in Path(checkpoint_dir).glob("palsgd_rank*.pt"))
        found = f"it holds {others}" if others else "it holds no PALSGD files"
        raise FileNotFoundError(
            f"cannot resume PALSGD from {checkpoint_dir}: {path.name} is missing ({found}). Each rank needs the file "
            "its rank wrote: resume with the same number of processes, from a checkpoint written by a PALSGD "
            "trainer (not with save_only_model=True)."
        )
    state = torch.load(path, map_location="cpu", weights_only=True)  # data only: no code runs on load
    if state.get("format") != FORMAT:
        raise ValueError(f"{path} has PALSGD checkpoint format {state.get('format')!r}; this version reads {FORMAT}.")
    if state["world_size"] != world_size or state["rank"] != rank:
        raise ValueError(
            f"{path} was written by rank {state['rank']} of {state['world_size']} processes, but this is rank {rank} "
            f"of {world_size}; resume with the process count that wrote the checkpoint."
        )
    return state
