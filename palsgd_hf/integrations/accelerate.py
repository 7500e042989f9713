"""Accelerate hooks: PALSGD in a hand-written ``accelerate`` training loop, in a few marked lines.

    accelerator = Accelerator(gradient_accumulation_steps=4)
    palsgd = PALSGDAccelerate(accelerator, PALSGDConfig(sync_interval=32))      # PALSGD
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    optimizer = palsgd.wrap(model, optimizer)                                      # PALSGD
    for batch in loader:
        with accelerator.accumulate(model):
            if palsgd.should_compute():                                            # PALSGD
                loss = model(**batch).loss
                accelerator.backward(loss)
            optimizer.step(); scheduler.step(); optimizer.zero_grad()
        accelerator.log(palsgd.metrics(), step=...)                                # PALSGD
    palsgd.finalize()                                                              # PALSGD

The semantics are the Trainer's: warm-up steps are ordinary DDP steps; after warm-up
``should_compute()`` is False on a pseudo-sync step, so every micro-batch of that optimizer step
is read but not computed; the step itself applies the pull instead of the inner optimizer step;
gradient steps run with the learning rate scaled by 1/(1-p) and without DDP's all-reduce
(accelerate's ``no_sync`` keeps the adapter's setting); a global sync every H optimizer steps.

Where the wrapper sits: *outside* accelerate's ``AcceleratedOptimizer``. Under gradient
accumulation a loop calls ``optimizer.step()`` once per micro-batch and accelerate drops all but
the last (``sync_gradients``); the wrapper does the same, so one PALSGD step is one optimizer step,
and on that last call the inner ``AcceleratedOptimizer.step`` runs (its ``sync_gradients`` is true).

CPU-only machines: accelerate goes multi-process on CPU only when told so. Without
``Accelerator(cpu=True)`` every process of a ``torchrun`` (or ``accelerate launch --multi_gpu``)
launch on a GPU-less machine is its own one-process job that trains alone; pass
``Accelerator(cpu=cpu_only())``. ``PALSGDAccelerate`` refuses an accelerator that sees fewer
processes than the launcher started.

When the coin is drawn: right after each optimizer step, for the next one (and in ``wrap()`` for
the first). ``accelerator.accumulate`` enters DDP's ``no_sync`` *before* the loop body runs and
restores the flag it found on exit; had the coin been drawn inside the body, the switch to "no
gradient all-reduce" of the first local step would be undone, DDP would then broadcast buffers in
a later forward, and a rank on a pseudo-sync step (no forward) would never join: a deadlock.
Drawing early keeps the same coin sequence and sets DDP's flags before ``no_sync`` reads them.

Pseudo-sync steps and accelerate's step state: the pull replaces the inner step, so
``AcceleratedOptimizer.step`` does not run and cannot reset what it resets on every step: its
overflow flag (which would make accelerate's scheduler skip its step as after an fp16 overflow)
and the GradScaler's record of an ``unscale_`` on this step (``clip_grad_norm_`` on a step without
gradients; the next step's ``unscale_`` would raise). The wrapper's ``after_step`` settles both.

Checkpoints: ``accelerator.save_state`` writes the model and optimizer of the main process only,
and its registered objects (``custom_checkpoint_<i>.pkl``) from the main process only too. Between
syncs every replica's weights and inner-optimizer state differ, so each rank also writes its own
``palsgd/rank_<r>.pt`` (local weights, inner optimizer, PALSGD state; the one per-rank state file
of :mod:`palsgd_hf.state_files`, written atomically) from a save-state pre-hook. For an FSDP2 model
the weights and the optimizer's DTensor states are this rank's local shards (the adapter's ``local_*_state``).
On ``load_state`` a registered object, loaded after accelerate restored rank 0's model and
optimizer everywhere, reads the rank's own file back over them, so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import logging
import os
from datetime import timedelta
from typing import Any, Optional

import torch

from .. import state_files
from ..config import PALSGDConfig
from ..core.algorithm import PALSGD, StepKind
from ..core.optimizer import PALSGDOptimizer
from ..attach import build_algorithm
from ..devices import cpu_only  # noqa: F401  (it lived here; kept importable from this module)
from .faults import apply_collective_timeout

logger = logging.getLogger(__name__)

STATE_DIRNAME = "palsgd"


class PALSGDAccelerate:
    """PALSGD for an ``accelerate.Accelerator`` loop; ``config=None`` turns every hook into a no-op.

    Args:
        accelerator: the loop's ``Accelerator`` (its process group must be up, which
            ``Accelerator()`` does).
        config: the algorithm's settings; ``None`` leaves the loop as it is (plain DDP).
        comm_timeout: timeout of every collective of the loop: PALSGD's own groups and the default
            group, which carries PALSGD's syncs when every rank is a worker and DDP's all-reduce
            (default: ``config.comm_timeout_seconds``; when that is unset too, the process group's,
            ``InitProcessGroupKwargs(timeout=...)``). A rank that dies or hangs then makes the others
            fail within it instead of torch's 30 minutes.
    """

    def __init__(self, accelerator, config: Optional[PALSGDConfig], *, comm_timeout: Optional[timedelta] = None):
        if config is not None and not isinstance(config, PALSGDConfig):
            raise TypeError(f"config must be a PALSGDConfig or None, got {type(config).__name__}; build one with "
                            "PALSGDConfig(...).")
        _check_world(accelerator)
        self.accelerator = accelerator
        self.config = config
        if comm_timeout is None and config is not None:
            comm_timeout = config.comm_timeout()  # an explicit argument wins over the config's setting
        self.comm_timeout = comm_timeout
        self.algorithm: Optional[PALSGD] = None
        self.optimizer: Optional[PALSGDOptimizer] = None
        self._model = None
        self._load_dir: Optional[str] = None

    # ------------------------------------------------------------------ setup
    def wrap(self, model: torch.nn.Module, optimizer):
        """Attach PALSGD to the *prepared* model and optimizer; returns the optimizer to step.

        Also registers the per-rank checkpoint hooks with the accelerator, so call it before any
        ``accelerator.load_state``.
        """
        if self.config is None:
            return optimizer
        if self.algorithm is not None:
            raise RuntimeError("PALSGDAccelerate.wrap() was already called; create one PALSGDAccelerate per model.")
        if type(optimizer).__name__ not in ("AcceleratedOptimizer",):
            raise TypeError(
                f"wrap() needs the optimizer returned by accelerator.prepare(...), got {type(optimizer).__name__}; "
                "call accelerator.prepare(model, optimizer, ...) first and pass its results."
            )
        if type(model).__name__ == "DeepSpeedEngine":
            # Under DeepSpeed, accelerate steps the engine inside accelerator.backward(), so a step
            # cannot be routed through the optimizer; the Trainer integration handles ZeRO.
            raise NotImplementedError(
                "PALSGDAccelerate does not support DeepSpeed models yet (accelerate steps the engine inside "
                "accelerator.backward); use PALSGDTrainer with deepspeed=..., or DDP (no --use_deepspeed)."
            )
        self._model = model
        if self.comm_timeout is not None:
            apply_collective_timeout(self.comm_timeout)  # with one rank per worker, the syncs use the default group
        self.algorithm = self._build_algorithm(model, optimizer)
        # One optimizer step per accumulation window, as accelerate's own optimizer (see the module doc).
        self.optimizer = PALSGDOptimizer(
            optimizer, self.algorithm, is_boundary=lambda: self.accelerator.sync_gradients, after_step=self._after_step
        )
        self.accelerator.register_save_state_pre_hook(self._save_hook)
        self.accelerator.register_load_state_pre_hook(self._load_hook)
        self.accelerator.register_for_checkpointing(_RankStateLoader(self))
        # The first step's coin, before any accumulate() (see module doc). prepare_step(), not step_kind(): the
        # step's interior, watched by the collective guard, starts only at should_compute().
        self.algorithm.prepare_step()
        return self.optimizer

    def _build_algorithm(self, model: torch.nn.Module, optimizer) -> PALSGD:
        """The PALSGD of this rank (overridden by the fault-tolerant hooks, whose exchanges torchft manages)."""
        return build_algorithm(model, optimizer, self.config, comm_timeout=self.comm_timeout)

    # ------------------------------------------------------------------ the loop
    def should_compute(self) -> bool:
        """False on a pseudo-sync step: skip forward and backward of every micro-batch of this step.

        Call it at the start of each micro-batch: the first call of an optimizer step draws the
        coin (and switches DDP's gradient all-reduce on for warm-up, off after), later calls of the
        same step return the cached answer.
        """
        if self.algorithm is None:
            return True
        return self.algorithm.step_kind() is not StepKind.PSEUDO_SYNC

    @property
    def last_step_kind(self) -> Optional[StepKind]:
        """What the last optimizer step was (None before the first, or when disabled)."""
        return None if self.optimizer is None else self.optimizer.last_step_kind

    def metrics(self) -> dict[str, float]:
        """This rank's ``palsgd/<key>`` values for ``accelerator.log`` (empty when disabled)."""
        if self.algorithm is None:
            return {}
        return {f"palsgd/{k}": v for k, v in self.algorithm.metrics().items()}

    def global_weights(self) -> contextlib.AbstractContextManager:
        """Context manager that puts the global model (the anchor) into the weights, e.g. for eval."""
        if self.algorithm is None:
            return contextlib.nullcontext()
        return self.optimizer.global_weights()  # mode-aware for schedule-free optimizers

    def finalize(self) -> None:
        """Collective, at the end of training: a last sync so every rank holds the global model."""
        if self.algorithm is not None:
            self.algorithm.finalize()

    def _after_step(self, kind: StepKind) -> None:
        self.algorithm.prepare_step()  # draw the next step's coin now, before accumulate() enters no_sync
        if kind is StepKind.PSEUDO_SYNC:
            settle_skipped_inner_step(self.optimizer.optimizer)

    # ------------------------------------------------------------------ checkpoints
    def _rank_file(self, directory: str) -> str:
        return os.path.join(directory, STATE_DIRNAME, f"rank_{self.accelerator.process_index}.pt")

    def _save_hook(self, models, weights, output_dir: str) -> None:
        # Runs on every process (unlike accelerate's own model/optimizer files).
        adapter = self.algorithm.adapter
        if hasattr(adapter, "local_model_state"):  # FSDP2: this rank's local shards (replicas differ between syncs)
            model, optimizer = adapter.local_model_state(), adapter.local_optimizer_state(self.optimizer.optimizer)
        else:
            unwrapped = self.accelerator.unwrap_model(self._model)
            model = {k: v.detach().cpu().clone() for k, v in unwrapped.state_dict().items()}
            optimizer = self.optimizer.optimizer.state_dict()
        state_files.save(
            self._rank_file(output_dir), rank=self.accelerator.process_index, world_size=self.accelerator.num_processes,
            algorithm=self.algorithm.state_dict(), model=model, optimizer=optimizer,
        )

    def _load_hook(self, models, input_dir: str) -> None:
        # Only remembers where to read from: accelerate loads rank 0's model and optimizer after this
        # hook, so the rank's own state is restored later, by _RankStateLoader.
        self._load_dir = input_dir

    def _restore_rank_state(self, meta: dict[str, Any]) -> None:
        if self._load_dir is None:
            raise RuntimeError("PALSGD state loaded outside accelerator.load_state(); use accelerator.load_state(dir).")
        world = self.accelerator.num_processes
        if meta.get("world_size") != world:
            raise ValueError(
                f"the checkpoint in {self._load_dir} was written by {meta.get('world_size')} processes but this run "
                f"has {world}; PALSGD keeps one model copy per rank, so resume with the same number of processes."
            )
        path = self._rank_file(self._load_dir)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} is missing: every rank writes its own PALSGD state on save_state; on several machines "
                "each rank needs the checkpoint directory its own rank wrote (a shared filesystem, or copy them)."
            )
        state = state_files.load(path, rank=self.accelerator.process_index, world_size=world)
        adapter = self.algorithm.adapter
        if hasattr(adapter, "load_local_model_state"):
            adapter.load_local_model_state(state["model"])
            adapter.load_local_optimizer_state(self.optimizer.optimizer, state["optimizer"])
        else:
            self.accelerator.unwrap_model(self._model).load_state_dict(state["model"])
            self.optimizer.optimizer.load_state_dict(state["optimizer"])
        self.algorithm.load_state_dict(state["algorithm"])
        # The restored next-step kind was drawn before the save; put DDP's sync flags back to match
        # it now, since the algorithm re-applies them only when it draws a new coin.
        kind = self.algorithm.prepare_step()
        self.algorithm.adapter.set_gradient_sync(kind is StepKind.WARMUP)
        logger.info("Restored PALSGD rank state from %s (step %d)", path, self.algorithm.step)


def _check_world(accelerator) -> None:
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > accelerator.num_processes:
        raise RuntimeError(
            f"the launcher started {launched} processes (WORLD_SIZE) but the Accelerator sees "
            f"{accelerator.num_processes}: each process would train alone. On a machine without GPUs create it "
            "with Accelerator(cpu=True) (palsgd_hf.devices.cpu_only() says when)."
        )


class _RankStateLoader:
    """Registered with ``accelerator.register_for_checkpointing``: its ``load_state_dict`` runs after
    accelerate restored the model and optimizer, which is the moment to put the rank's own back."""

    def __init__(self, hooks: PALSGDAccelerate):
        self._hooks = hooks

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": state_files.FORMAT,
            "world_size": self._hooks.accelerator.num_processes,
            "config": self._hooks.config.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._hooks._restore_rank_state(state)


def settle_skipped_inner_step(accelerated) -> None:
    """Reset what ``AcceleratedOptimizer.step`` resets on every step, after a pseudo-sync step skipped it.

    Its overflow flag still says how the previous inner step went; left True, accelerate's scheduler
    skips this step too (it reads ``step_was_skipped``) and the LR schedule falls behind the steps.
    The GradScaler's per-optimizer record is only cleared by ``scaler.update()`` inside that step; an
    ``unscale_`` on this step (``clip_grad_norm_`` on a step without gradients) would make the next
    step's ``unscale_`` raise. Forgetting it is what ``update()`` does (private, hence the guard).
    """
    if hasattr(accelerated, "_is_overflow"):
        accelerated._is_overflow = False
    records = getattr(getattr(accelerated, "scaler", None), "_per_optimizer_states", None)
    if isinstance(records, dict):
        records.pop(id(getattr(accelerated, "optimizer", None)), None)
