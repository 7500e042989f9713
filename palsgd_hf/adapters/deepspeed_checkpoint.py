"""Per-replica DeepSpeed checkpoints: replica groups must not overwrite each other's ZeRO files.

Every replica is a ZeRO group of its own, so every replica's rank 0 writes
``mp_rank_00_model_states.pt`` and its shard k writes ``zero_pp_rank_k_..._optim_states.pt``:
in one directory the replicas would overwrite each other, and between PALSGD syncs their states
differ. :func:`install` replaces the engine's ``save_checkpoint`` / ``load_checkpoint`` with
versions that keep this layout (the same call, the same arguments):

    <dir>/latest                          the tag, written by global rank 0
    <dir>/replica_<r>/<tag>/...           DeepSpeed's own files of replica r (unchanged format)
    <dir>/<tag>/palsgd/rank_<k>.pt        rank k's PALSGD state (anchor, outer optimizer, coin, counters):
                                          the per-rank state file of palsgd_hf.state_files (atomic,
                                          versioned), with model/optimizer None (DeepSpeed's files hold them)

``<dir>/<tag>`` also lets the HF Trainer's resume check (``checkpoint-N/global_step*``) find
the checkpoint. The PALSGD state is written once an algorithm is attached; a checkpoint loaded
before that (the HF Trainer loads inside ``accelerator.prepare``) is applied on attaching.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch.distributed as dist

from .. import state_files

logger = logging.getLogger(__name__)

STATE_DIR = "palsgd"


class ReplicaCheckpoints:
    """The engine's checkpoint methods under PALSGD (see the module docstring)."""

    def __init__(self, engine, replica_index: int):
        self.engine = engine
        self.replica_index = replica_index
        self.algorithm = None
        self.pending_state: Optional[dict[str, Any]] = None
        self._save, self._load = engine.save_checkpoint, engine.load_checkpoint

    def attach(self, algorithm) -> None:
        """From now on save (and restore) ``algorithm``'s state too; apply a state loaded earlier."""
        self.algorithm = algorithm
        if self.pending_state is not None:
            algorithm.load_state_dict(self.pending_state)
            self.pending_state = None

    def replica_dir(self, save_dir: str) -> str:
        return os.path.join(save_dir, f"replica_{self.replica_index}")

    @staticmethod
    def state_file(save_dir: str, tag: str) -> str:
        return os.path.join(save_dir, str(tag), STATE_DIR, f"rank_{_rank()}.pt")

    def save_checkpoint(self, save_dir, tag=None, client_state={}, save_latest=True, exclude_frozen_parameters=False):
        tag = str(tag) if tag is not None else f"global_step{self.engine.global_steps}"
        ok = self._save(
            self.replica_dir(save_dir), tag=tag, client_state=client_state, save_latest=save_latest,
            exclude_frozen_parameters=exclude_frozen_parameters,
        )
        # <dir>/<tag> exists even before an algorithm is attached: the HF Trainer's resume check looks for it.
        os.makedirs(os.path.dirname(self.state_file(save_dir, tag)), exist_ok=True)
        if self.algorithm is not None:
            state_files.save(
                self.state_file(save_dir, tag), rank=_rank(), world_size=_world_size(),
                algorithm=self.algorithm.state_dict(),
            )
        if save_latest and _rank() == 0:
            state_files.atomic_write(os.path.join(save_dir, "latest"), lambda f: f.write(tag.encode()))
        if dist.is_initialized():
            dist.barrier()
        return ok

    def load_checkpoint(self, load_dir, tag=None, **kwargs):
        if tag is None:
            latest = os.path.join(load_dir, "latest")
            if not os.path.isfile(latest):
                logger.warning("No 'latest' file in %s: nothing to resume (pass tag= to choose one).", load_dir)
                return None, None
            with open(latest) as fd:
                tag = fd.read().strip()
        tag = str(tag)
        replica_dir = self.replica_dir(load_dir)
        if not os.path.isdir(os.path.join(replica_dir, tag)):
            raise FileNotFoundError(
                f"{os.path.join(replica_dir, tag)} is missing: a PALSGD DeepSpeed checkpoint keeps one directory per "
                "replica (replica_<r>/<tag>); resume with the same number of processes and shard size, from the "
                "directory engine.save_checkpoint wrote."
            )
        load_path, client_state = self._load(replica_dir, tag=tag, **kwargs)
        if load_path is None:
            return load_path, client_state
        path = self.state_file(load_dir, tag)
        if os.path.isfile(path):
            saved = state_files.load(path, rank=_rank(), world_size=_world_size())
            if self.algorithm is not None:
                self.algorithm.load_state_dict(saved["algorithm"])
            else:
                self.pending_state = saved["algorithm"]
        else:
            logger.warning("%s is missing: DeepSpeed state restored, PALSGD state not (saved before attaching?)", path)
        logger.info("Loaded PALSGD + DeepSpeed checkpoint %s (tag %s, replica %d)", load_dir, tag, self.replica_index)
        return load_path, client_state


def install(engine, replica_index: int) -> ReplicaCheckpoints:
    """Give ``engine`` the per-replica checkpoint layout (idempotent); return the installed object."""
    existing = getattr(engine, "palsgd_checkpoints", None)
    if existing is not None:
        return existing
    checkpoints = ReplicaCheckpoints(engine, replica_index)
    # Instance attributes shadow the class methods for this engine only; callers (the HF Trainer,
    # user code) keep calling engine.save_checkpoint / engine.load_checkpoint as usual.
    engine.save_checkpoint = checkpoints.save_checkpoint
    engine.load_checkpoint = checkpoints.load_checkpoint
    engine.palsgd_checkpoints = checkpoints
    return checkpoints


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1
