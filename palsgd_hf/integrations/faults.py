"""Surviving worker faults: one collective timeout, a clear error, and the last *complete* checkpoint.

Three pieces the integrations share:

* **One timeout for every collective of a run.** :func:`collective_timeout` reads it from the
  arguments (``palsgd_comm_timeout_seconds``), else the config (``PALSGDConfig.comm_timeout_seconds``),
  else ``ddp_timeout``, and
  :func:`apply_collective_timeout` sets it on the default process group too. That group carries
  PALSGD's syncs when every rank is its own worker, DDP's warm-up all-reduce and the Trainer's own
  collectives; without this, transformers leaves it at torch's 30-minute default on CPU (it passes
  ``ddp_timeout`` to accelerate on GPUs only). A rank that dies closes its connections, so its
  peers fail at their next collective at once; a rank that *hangs* is only noticed when a peer's
  collective times out, after at most this long.
* **A clear error.** :func:`is_worker_fault` recognizes the backend's timeout / closed-connection
  errors and :class:`WorkerFaultError` re-raises them with what happened, the timeout in force and
  the checkpoint to resume from.
* **Complete checkpoints only.** The Trainer writes ``checkpoint-N/`` in place, file by file. A
  PALSGD checkpoint is complete once rank 0 has written ``trainer_state.json``: it does so after
  every rank has finished its own files (PALSGDTrainer adds the barrier that makes this true) and
  before older checkpoints are rotated away. :func:`last_complete_checkpoint` is
  ``transformers.trainer_utils.get_last_checkpoint`` skipping directories a crash left behind, and
  :func:`resolve_resume` is what ``train(resume_from_checkpoint=...)`` goes through.
"""

from __future__ import annotations

import json
import logging
import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Union

import torch.distributed as dist

from ..config import PALSGDConfig

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "trainer_state.json"  # written last, by rank 0, after every rank's files
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# What gloo / NCCL say when a peer is gone or silent (the c10d Dist*Error types are checked first).
_FAULT_RE = re.compile(
    r"gloo/|ProcessGroup(Gloo|NCCL)|NCCL|Connection closed by peer|Connection reset by peer|Timed out waiting|"
    r"Broken pipe"
)


# ---------------------------------------------------------------------------------------------- timeout
def collective_timeout(args: Any, config: Optional[PALSGDConfig] = None) -> timedelta:
    """The run's collective timeout, the first one set of: the arguments' ``palsgd_comm_timeout_seconds``,
    the config's ``comm_timeout_seconds`` (plain ``TrainingArguments`` / trl configs with ``palsgd_config=``
    have no such argument), ``ddp_timeout``."""
    seconds = getattr(args, "palsgd_comm_timeout_seconds", None)
    if seconds is None and config is not None:
        seconds = config.comm_timeout_seconds
    if seconds is None:
        seconds = getattr(args, "ddp_timeout", 1800)
    return timedelta(seconds=float(seconds))


def apply_collective_timeout(timeout: timedelta) -> None:
    """Set ``timeout`` on the default process group (gloo and NCCL), if one is up."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    from torch.distributed.distributed_c10d import _set_pg_timeout  # private API (torch >= 2.3; torchtitan uses it too)

    _set_pg_timeout(timeout)
    logger.info("Collective timeout: %.0f s (a rank that dies or hangs stops the others within it).",
                timeout.total_seconds())


# ---------------------------------------------------------------------------------------------- the error
class WorkerFaultError(RuntimeError):
    """A collective failed because another rank died or stopped answering."""


def is_worker_fault(err: BaseException) -> bool:
    """True for the errors a dead or hung peer causes in a collective."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(err, dist_error):
        return True
    return isinstance(err, RuntimeError) and bool(_FAULT_RE.search(str(err)))


def worker_fault_message(
    err: BaseException, *, rank: int, step: int, timeout: timedelta, output_dir: str, where: Optional[str] = None
) -> str:
    """One paragraph: what failed, why that usually happens, the timeout in force and how to resume.

    ``where`` describes what this rank was doing (e.g. PALSGD's step and step kind): when every rank is
    alive, a timeout means the ranks were waiting in *different* collectives, and the step kinds of
    the ranks' messages show which ones diverged.
    """
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    last = last_complete_checkpoint(output_dir) if output_dir and os.path.isdir(output_dir) else None
    resume = (
        f"the last complete checkpoint is {last}: resume with resume_from_checkpoint=True "
        "(--resume_from_checkpoint true), which skips incomplete ones"
        if last is not None
        else f"there is no complete checkpoint in {output_dir!r} to resume from (set save_steps to write some)"
    )
    doing = f" in PALSGD {where}" if where else ""
    return (
        f"rank {rank} at step {step}: a collective with the other ranks failed ({first}){doing}. Either another rank "
        f"died or stopped answering, or every rank is alive but they waited in different collectives (one issued by "
        f"some ranks only; compare the step kinds in each rank's message) (collective timeout "
        f"{timeout.total_seconds():.0f} s, set by palsgd_comm_timeout_seconds / PALSGDConfig.comm_timeout_seconds or "
        f"ddp_timeout); see the first failing rank's log for the cause. {resume}."
    )


# ---------------------------------------------------------------------------------------------- checkpoints
def is_complete_checkpoint(path: Union[str, os.PathLike]) -> bool:
    """True when ``path`` holds a readable ``trainer_state.json`` (written last; see the module doc)."""
    marker = Path(path) / COMPLETE_MARKER
    try:
        state = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False  # missing, or cut short by a crash while it was written
    return isinstance(state, dict) and "global_step" in state


def last_complete_checkpoint(output_dir: Union[str, os.PathLike]) -> Optional[str]:
    """The highest-numbered complete ``checkpoint-N`` in ``output_dir`` (None if there is none)."""
    found = []
    for entry in Path(output_dir).iterdir() if Path(output_dir).is_dir() else ():
        match = _CHECKPOINT_RE.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    skipped = []
    for _, entry in sorted(found, reverse=True):
        if is_complete_checkpoint(entry):
            if skipped:
                logger.warning("Skipping incomplete checkpoint(s) %s (a crash while saving); resuming from %s.",
                               ", ".join(skipped), entry)
            return str(entry)
        skipped.append(entry.name)
    return None


def resolve_resume(resume_from_checkpoint: Union[str, bool, None], output_dir: str) -> Optional[str]:
    """The checkpoint ``train(resume_from_checkpoint=...)`` should read; refuses incomplete ones.

    ``True`` (or the string ``"true"``/``"last"``, as a command line gives it, when no such directory
    exists) means the last complete checkpoint in ``output_dir``; a path must be complete.
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.lower() in ("true", "last"):
        if not os.path.isdir(resume_from_checkpoint):
            resume_from_checkpoint = True
    if resume_from_checkpoint is True:
        last = last_complete_checkpoint(output_dir)
        if last is None:
            raise ValueError(
                f"resume_from_checkpoint=True but {output_dir!r} holds no complete checkpoint-N directory (one with "
                f"{COMPLETE_MARKER}); pass a checkpoint path, or start without resume_from_checkpoint."
            )
        return last
    path = str(resume_from_checkpoint)
    if os.path.isdir(path) and not is_complete_checkpoint(path):
        parent = os.path.dirname(os.path.normpath(path))
        last = last_complete_checkpoint(parent) if parent else None
        hint = f"resume from {last}" if last else "resume from an earlier checkpoint"
        raise ValueError(
            f"checkpoint {path!r} is incomplete: it has no readable {COMPLETE_MARKER}, which is written last, so the "
            f"run stopped while saving it; {hint} (or pass resume_from_checkpoint=True to pick the last complete one)."
        )
    return path
