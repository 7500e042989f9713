"""The Trainer's FSDP2 path: a model the user sharded with ``fully_shard(mesh=shard_mesh(S))`` before the Trainer.

    mesh = shard_mesh(args.palsgd_shard_size)            # after the arguments (they start torch.distributed)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)                         # or: shard_model(model, args.palsgd_shard_size)
    trainer = PALSGDTrainer(model=model, args=args, ...)  # palsgd_shard_size=S, no deepspeed, no fsdp=

accelerate 1.15 has no FSDP mode on CPU and shards over the whole world on GPUs, so the Trainer
cannot shard per replica itself. What this module changes in the stock Trainer for such a model:

* Preparation: it marks the model as sharded before the Trainer saw it (transformers' own flag for
  ``from_pretrained(distributed_config=...)`` models, ``is_distributed_loading_by_transformers``),
  so accelerate neither wraps it in DDP (which fails on DTensors) nor shards it again. The PALSGD
  adapter is then :class:`~palsgd_hf.adapters.fsdp.FSDPAdapter` (chosen from the model).
* ``save_model``: every rank gathers ``get_model_state_dict(full_state_dict=True)`` (a collective
  within each replica; the caller has put the global model, the anchor, into the shards), the main
  process writes it with ``save_pretrained``. The stock save reads DTensor storage and fails.
* Checkpoints: the weights and the inner optimizer's state live only in each rank's PALSGD file
  (``palsgd_rank{R}.pt``, the adapter's local shards as plain tensors); the main process writes the
  LR scheduler as stock, and no ``optimizer.pt`` (the stock one would pickle DTensors). On resume
  the stock loading of full weights into the sharded parameters is skipped (the rank file
  overwrites the shards), and only the scheduler is read from the stock files.
* Gradient accumulation: FSDP2's reduce-scatter waits for the last micro-batch (the stock path for
  such models reads a ``distributed_config`` our models do not have).

Refused (before any work): ``load_best_model_at_end`` (the stock loader writes full weights into
DTensors), a transformers without the flag.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Any, Optional

import torch

from ..adapters.fsdp import fsdp_modules, is_fsdp2
from ..config import PALSGDConfig, PALSGDConfigError
from .trainer_args import check_model_sharding

logger = logging.getLogger(__name__)

SCHEDULER_NAME = "scheduler.pt"  # transformers.trainer's name for the scheduler state


class FSDP2TrainerMixin:
    """Trainer hooks for a pre-sharded FSDP2 model; each does the stock thing for any other model."""

    _palsgd_fsdp = False

    def _palsgd_fsdp_setup(self, config: PALSGDConfig) -> None:
        """After ``Trainer.__init__``: detect an FSDP2 model, check the shard layout, skip accelerate's wrapping."""
        self._palsgd_fsdp = is_fsdp2(self.model)
        check_model_sharding(config, self.args, self._palsgd_fsdp)
        if not self._palsgd_fsdp:
            return
        if not hasattr(self, "is_distributed_loading_by_transformers"):
            import transformers

            raise RuntimeError(
                f"PALSGDTrainer with an FSDP2 model needs a transformers Trainer that prepares pre-sharded models "
                f"without DDP (is_distributed_loading_by_transformers); transformers {transformers.__version__} has "
                "none. Install a transformers version this package supports (see pyproject.toml)."
            )
        if self.args.load_best_model_at_end:
            raise PALSGDConfigError(
                "load_best_model_at_end=True with an FSDP2 model: the Trainer would load full weights into the "
                "sharded parameters. Set load_best_model_at_end=False and pick the best checkpoint afterwards."
            )
        # Prepared without DDP and without sharding it again (Trainer._prepare_for_training).
        self.is_distributed_loading_by_transformers = True
        logger.info("PALSGDTrainer: FSDP2 model over %d ranks per replica; accelerate will not wrap it.",
                    config.shard_size)

    # ------------------------------------------------------------------ training
    @contextlib.contextmanager
    def _defer_fsdp_gradient_reduction(self):
        if not self._palsgd_fsdp:
            with super()._defer_fsdp_gradient_reduction():
                yield
            return
        modules = fsdp_modules(self.model)
        for module in modules:
            module.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for module in modules:
                module.set_requires_gradient_sync(True, recurse=False)

    # ------------------------------------------------------------------ saving
    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        if not self._palsgd_fsdp:
            return super().save_model(output_dir, _internal_call)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        # Collective within each replica (all-gathers every shard): every rank calls it, the main process writes.
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        if self.args.should_save:
            # Tied weights (lm_head = embeddings) come back as separate copies: keep the first name, as stock.
            first: dict[int, str] = {}
            tied = {n for n, v in self.model.state_dict(keep_vars=True).items() if first.setdefault(id(v), n) != n}
            self._save(output_dir, state_dict={k: v.detach().cpu().contiguous() for k, v in state.items()
                                               if k not in tied})
        if self.args.push_to_hub and not _internal_call:  # as the stock save_model
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._palsgd_fsdp:
            return super()._save_optimizer_and_scheduler(output_dir)
        # The optimizer state is sharded: it travels in each rank's PALSGD file (trainer.py), not here.
        if self.args.should_save and self.lr_scheduler is not None:
            with warnings.catch_warnings(record=True):
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    # ------------------------------------------------------------------ resuming
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[torch.nn.Module] = None) -> None:
        if not self._palsgd_fsdp:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # model.safetensors holds the full global model; this rank's own shards come from its PALSGD file.
        logger.info("FSDP2: weights of %s are read from the per-rank PALSGD files", resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        if not self._palsgd_fsdp or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, SCHEDULER_NAME)
        if self.lr_scheduler is not None and os.path.isfile(path):
            with warnings.catch_warnings(record=True):
                self.lr_scheduler.load_state_dict(torch.load(path, weights_only=True))


def shard_model(model: torch.nn.Module, shard_size: int) -> torch.nn.Module:
    """``fully_shard`` each block (the classes in ``model._no_split_modules``, as accelerate's FSDP wraps them) and
    the root over ``shard_mesh(shard_size)``. Collective: every rank, after ``torch.distributed`` is up."""
    from torch.distributed.fsdp import fully_shard

    from ..adapters.fsdp import shard_mesh

    mesh = shard_mesh(shard_size)
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    if not blocks:
        logger.warning("%s names no blocks (_no_split_modules): FSDP2 shards it as one unit, so every forward "
                       "all-gathers the whole model at once.", type(model).__name__)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def local_state(adapter, optimizer) -> dict[str, Any]:
    """This rank's shards of the weights and the inner optimizer's state, as plain tensors (PALSGD rank file)."""
    return {"model_state": adapter.local_model_state(), "optimizer_state": adapter.local_optimizer_state(optimizer)}


def load_local_state(adapter, optimizer, state: dict[str, Any]) -> None:
    adapter.load_local_model_state(state["model"])
    adapter.load_local_optimizer_state(optimizer, state["optimizer"])
