"""THE per-rank PALSGD state file: one format for every integration, written atomically, checked on load.

Why per rank: a stock checkpoint (the Trainer's ``checkpoint-N/``, ``accelerator.save_state``,
``engine.save_checkpoint``) holds one model and one optimizer state, written by the main process.
Between two PALSGD syncs every replica has its own weights and inner-optimizer state, and PALSGD's
own state (anchor, outer optimizer, counters, coin generator) lives on every rank. So each rank
writes one file of its own beside the stock files, always in this layout:

    {"format": FORMAT, "rank": R, "world_size": W,
     "algorithm": PALSGD.state_dict(),
     "model": this rank's weights, or None,
     "optimizer": this rank's inner-optimizer state, or None}

``model``/``optimizer`` are None where the backend keeps per-rank state of its own (DeepSpeed's
``save_checkpoint`` writes each rank's ZeRO partitions). Where the integrations put the file (names
kept from earlier releases, so that existing checkpoints are found where they were):

    Trainer      checkpoint-N/palsgd_rank{R}.pt          integrations/checkpoint.py
    Accelerate   <save_state dir>/palsgd/rank_{R}.pt     integrations/accelerate.py
    DeepSpeed    <dir>/<tag>/palsgd/rank_{R}.pt          adapters/deepspeed_checkpoint.py

Atomic: :func:`atomic_write` writes a temporary file in the same directory, flushes and fsyncs it,
renames it over the target with ``os.replace`` (atomic on POSIX within one filesystem) and fsyncs
the directory, so that the rename itself survives a power loss. A crash at any point leaves the
previous file or the complete new one, never a torn one (at worst a hidden ``.<name>.tmp-<pid>``
beside it, which nothing reads).

Versioned and checked: :func:`load` refuses a file of another format number, of another rank or
world size, or one that is not a PALSGD state file, with a :class:`StateFileError` naming the file,
what it found, what it expected and what to do. Loading uses ``torch.load(weights_only=True)``:
tensors and plain data only, no code runs while reading a checkpoint.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import IO, Any, Callable, Optional

import torch

logger = logging.getLogger(__name__)

# Bump when the layout above changes; load() then refuses files of the other number with a clear error.
FORMAT = 1
_KEYS = ("format", "rank", "world_size", "algorithm", "model", "optimizer")


class StateFileError(ValueError):
    """A per-rank state file this run cannot use (other format, other rank or world size, unreadable)."""


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Create or replace ``path`` with what ``write(f)`` writes into a binary file, atomically and durably."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory as the target: os.replace is atomic only within one filesystem.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        # A failed write (an exception, Ctrl-C) leaves no temporary file; a killed process leaves one, unread.
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def save(
    path: str | os.PathLike,
    *,
    rank: int,
    world_size: int,
    algorithm: dict[str, Any],
    model: Optional[dict[str, Any]] = None,
    optimizer: Optional[dict[str, Any]] = None,
) -> Path:
    """Write one rank's state file at ``path`` (atomically; see the module docstring); return the path."""
    state = {
        "format": FORMAT, "rank": int(rank), "world_size": int(world_size), "algorithm": algorithm,
        "model": model, "optimizer": optimizer,
    }
    return atomic_write(path, lambda f: torch.save(state, f))


def load(path: str | os.PathLike, *, rank: int, world_size: int) -> dict[str, Any]:
    """Read the state file at ``path`` for rank ``rank`` of ``world_size``; refuse anything else.

    Returns the dict of the module docstring. Raises FileNotFoundError for a missing file (callers
    that know where it should have come from check first and say so) and :class:`StateFileError`
    for a file of another format, rank or world size, or one that is not a PALSGD state file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PALSGD state file {path} is missing; resume from a checkpoint every rank wrote.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # data only: no code runs on load
    except Exception as err:  # torn zip, pickle refused by weights_only, ...: one clear message
        raise StateFileError(
            f"cannot read PALSGD state file {path} ({type(err).__name__}: {str(err).splitlines()[0][:200]}); it is "
            "not a complete state file written by palsgd_hf. Resume from another checkpoint."
        ) from err
    found = state.get("format") if isinstance(state, dict) else None
    if found != FORMAT:
        if found is None:
            what = "has no format number: it is not a PALSGD state file (or predates versioned files)"
        elif isinstance(found, int) and found > FORMAT:
            what = f"has format {found}, written by a newer palsgd_hf; upgrade palsgd_hf to read it"
        else:
            what = f"has format {found!r}; resume it with the palsgd_hf release that wrote it"
        raise StateFileError(
            f"PALSGD state file {path} {what}. This palsgd_hf reads format {FORMAT} only (or start from a "
            "checkpoint written by this version)."
        )
    missing = [k for k in _KEYS if k not in state]
    if missing:
        raise StateFileError(
            f"PALSGD state file {path} says format {FORMAT} but lacks {missing}: it was not written by "
            "palsgd_hf.state_files.save (an earlier layout?); resume from a checkpoint written by this version."
        )
    if state["world_size"] != world_size or state["rank"] != rank:
        raise StateFileError(
            f"{path} was written by rank {state['rank']} of {state['world_size']} processes, but this is rank {rank} "
            f"of {world_size}; PALSGD keeps one model copy per rank, so resume with the process count (and shard "
            "size) that wrote the checkpoint."
        )
    return state


def _fsync_dir(directory: Path) -> None:
    # A rename is durable only once its directory entry is; some platforms cannot open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        logger.debug("cannot open %s to fsync it; the rename is atomic but may not survive a power loss", directory)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
