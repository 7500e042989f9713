"""PALSGDTrainer: the Transformers ``Trainer`` with PALSGD in place of per-step gradient all-reduce.

    args = PALSGDTrainingArguments(output_dir="out", palsgd_sync_interval=32, palsgd_mixing_rate=1.0, ...)
    trainer = PALSGDTrainer(model=model, args=args, train_dataset=train, eval_dataset=val)
    trainer.train(); trainer.save_model()      # launched with torchrun / accelerate launch

:class:`PALSGDTrainerMixin` holds all of it, so PALSGD attaches to any ``Trainer`` subclass
(``class MySFT(PALSGDTrainerMixin, SFTTrainer)``), with ``palsgd_config=PALSGDConfig(...)`` when
the arguments are not :class:`PALSGDTrainingArguments`. The hooks, in the order of a step:

* ``_prepare_for_training``: after accelerate has wrapped the model (DDP) and the optimizer, the
  optimizer is wrapped in :class:`PALSGDOptimizer`, so the Trainer's ``optimizer.step()`` is a
  PALSGD step; on resume each rank's own PALSGD file is read back.
* ``get_batch_samples``: the step's kind is drawn before its micro-batches run, so DDP's gradient
  all-reduce is already off when accelerate's ``no_sync`` saves and restores it. The kind is kept
  for the whole optimizer step (later hooks never draw), and the step's interior, up to the
  optimizer step, is watched by the collective guard (palsgd_hf/core/collective_guard.py).
* ``_get_num_items_in_batch`` / ``training_step``: a pseudo-sync step reads its micro-batches but
  computes nothing; a local gradient step normalizes its loss by its own token count, with no
  all-gather of counts (that would be per-step traffic).
* ``_clip_grad_norm`` / ``_get_grad_norm``: untouched except on pseudo-sync steps, which have no
  gradients (and must not touch an fp16 GradScaler).
* ``_maybe_log_save_evaluate`` / ``_finalize_training``: the reported loss is the mean over the
  steps that computed one (pseudo-sync steps add zeros to the Trainer's running sum).
* ``log``: palsgd/* metrics join every training log (``log_history``, every ``report_to``).
* ``evaluation_loop``: runs on the global model (the anchor) unless ``palsgd_eval_on='local'``.
* ``save_model``: always writes the global model; ``_finalize_training`` first syncs a last time.
* ``_save_optimizer_and_scheduler``: every rank writes ``palsgd_rank{R}.pt`` (checkpoint.py).
* A model sharded with FSDP2 before the Trainer (``fully_shard(mesh=shard_mesh(S))``): fsdp_trainer.py.
* Reliability (palsgd_hf/integrations/faults.py): ``train`` resumes only from a complete checkpoint
  (``resume_from_checkpoint=True`` skips ones a crash left half-written) and turns a collective that
  failed because another rank died or hung into a :class:`WorkerFaultError` naming the checkpoint to
  resume from; ``_prepare_for_training`` puts one collective timeout on every group;
  ``_save_rng_state`` ends with a barrier, so that ``trainer_state.json`` (written next, by rank 0)
  marks a checkpoint whose every file is complete.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Optional

import torch
import torch.distributed as dist
from transformers import Trainer
from transformers.utils import logging as hf_logging

from ..adapters.deepspeed import attach as deepspeed_attach
from ..attach import build_algorithm
from ..config import PALSGDConfig
from ..core.algorithm import PALSGD, StepKind
from ..core.optimizer import PALSGDOptimizer
from . import checkpoint, faults, fsdp_trainer
from .accelerate import settle_skipped_inner_step
from .fsdp_trainer import FSDP2TrainerMixin
from .schedules import schedule_peak_lr
from .trainer_args import PALSGDTrainingArguments, check_trainer_options, check_training_args, check_world, warn_alone

logger = logging.getLogger(__name__)


class PALSGDTrainerMixin(FSDP2TrainerMixin):
    """PALSGD for a ``transformers.Trainer`` subclass; put it first in the bases (see module doc)."""

    palsgd_peers_outside_world = False  # peers that torch.distributed does not hold (FaultTolerantTrainer)

    def __init__(self, *args: Any, palsgd_config: Optional[PALSGDConfig] = None, **kwargs: Any):
        _check_hooks(type(self))
        super().__init__(*args, **kwargs)
        _follow_transformers_logging(self.args.get_process_log_level())
        self.palsgd_config = resolve_palsgd_config(self.args, palsgd_config)
        warn_alone(self.palsgd_config, self.args.world_size, self.palsgd_peers_outside_world)
        self._palsgd_fsdp_setup(self.palsgd_config)  # the model is known: shard size vs DeepSpeed / FSDP2
        self.palsgd: Optional[PALSGD] = None
        self._palsgd_computed_at_log = 0
        self._palsgd_peak_c: Optional[float] = None  # logged once, with the first training log
        self._palsgd_step_kind: Optional[StepKind] = None  # the kind of the optimizer step in progress

    # ------------------------------------------------------------------ set-up and resume
    def train(self, resume_from_checkpoint=None, *args: Any, **kwargs: Any):
        # ---- reliability: resume from complete checkpoints only; a dead or hung peer gets a clear error
        resume = faults.resolve_resume(resume_from_checkpoint, self.args.output_dir)
        try:
            return super().train(resume, *args, **kwargs)
        except RuntimeError as err:
            if not faults.is_worker_fault(err) or not (dist.is_available() and dist.is_initialized()):
                raise
            message = faults.worker_fault_message(
                err, rank=self.args.process_index, step=self.state.global_step,
                timeout=faults.collective_timeout(self.args, self.palsgd_config), output_dir=self.args.output_dir,
                where=self.palsgd.describe_step() if self.palsgd is not None else None,
            )
            logger.error(message)
            raise faults.WorkerFaultError(message) from err

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        if isinstance(self.optimizer, PALSGDOptimizer):
            # A second train() call: hand the Trainer back the optimizer it created, as stock.
            self.optimizer = self.optimizer.optimizer
        # ---- reliability: one timeout for every collective (PALSGD's groups and the default group)
        timeout = faults.collective_timeout(self.args, self.palsgd_config)
        faults.apply_collective_timeout(timeout)
        if self.is_deepspeed_enabled:
            # ---- DeepSpeed ZeRO (palsgd_hf/adapters/deepspeed*.py): accelerate's deepspeed.initialize shards
            # within each replica of palsgd_shard_size ranks; the engine steps PALSGD inside backward (attach), and
            # the optimizer's step() takes the pseudo-sync steps, which have no backward.
            from ..adapters.deepspeed_groups import replica_sharding

            with replica_sharding(self.palsgd_config.shard_size, timeout):
                model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader,
                                                                        resume_from_checkpoint)
            self._palsgd_resolve_pull()
            self.palsgd = self._palsgd_build_algorithm(timeout)
            self.optimizer = PALSGDOptimizer(self.optimizer, self.palsgd, engine_steps=True)
            # The engine takes gradient steps inside backward; the step's interior (token counting,
            # on_pre_optimizer_step, grad-norm logging) goes on until the Trainer's optimizer.step().
            self.palsgd.defer_step_end = True
            # ---- end DeepSpeed
        else:
            model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
            self._palsgd_resolve_pull()
            # model_wrapped is what accelerate prepared (DDP): build_algorithm picks the adapter from it.
            # Collective: every rank builds its process groups here.
            self.palsgd = self._palsgd_build_algorithm(timeout)
            self.optimizer = PALSGDOptimizer(self.optimizer, self.palsgd)
        self.callback_handler.optimizer = self.optimizer
        if resume_from_checkpoint is not None:
            self._palsgd_load(resume_from_checkpoint)
        self._palsgd_computed_at_log = self._palsgd_computed()
        self._palsgd_announce()
        return model, train_dataloader

    def _palsgd_build_algorithm(self, timeout) -> PALSGD:
        """This rank's PALSGD (overridden by the fault-tolerant trainer, whose exchanges torchft manages)."""
        if self.is_deepspeed_enabled:
            return deepspeed_attach(self.model_wrapped, self.palsgd_config, comm_timeout=timeout)
        return build_algorithm(self.model_wrapped, self.optimizer, self.palsgd_config, comm_timeout=timeout)

    def _palsgd_resolve_pull(self) -> None:
        """palsgd_pull = c at the peak: eta = pull*p/peak from the schedule's peak (before the algorithm exists)."""
        cfg = self.palsgd_config
        if cfg.mixing_rate is None:
            self.palsgd_config = cfg.resolved(schedule_peak_lr(self.optimizer, self.lr_scheduler, self.state.max_steps))

    def _palsgd_announce(self) -> None:
        cfg = self.palsgd_config
        if cfg.is_ddp:
            logger.info("PALSGD method 'ddp': every step is a synchronous data-parallel step.")
            return
        # The peak over the whole schedule (OneCycle/cyclic schedules peak mid-run), checked before any step.
        peak = schedule_peak_lr(self.optimizer, self.lr_scheduler, self.state.max_steps)
        try:
            self._palsgd_peak_c = cfg.check_mixing_coefficient(peak)
        except ValueError as err:
            raise type(err)(f"at the schedule's peak learning rate {peak:g}: {err}") from None
        logger.info(
            "PALSGD: method=%s H=%d p=%g eta=%g warm-up=%d steps; pull per pseudo-sync step c = lr*eta/p = %.4g at "
            "the peak learning rate %g (aim for ~0.01-0.1).",
            cfg.method, cfg.sync_interval, cfg.pseudo_sync_prob, cfg.mixing_rate, cfg.warmup_steps,
            self._palsgd_peak_c, peak,
        )

    def _palsgd_load(self, checkpoint_dir: str) -> None:
        """Read this rank's local weights, inner optimizer state and PALSGD state over the stock ones."""
        state = checkpoint.load_rank_state(checkpoint_dir, self.args.process_index, self.args.world_size)
        self._palsgd_load_local_state(state)
        self.palsgd.load_state_dict(state["algorithm"])
        if self.palsgd.step != self.state.global_step:
            raise ValueError(
                f"{checkpoint_dir}: the PALSGD state is at step {self.palsgd.step} but the Trainer state at step "
                f"{self.state.global_step}; the checkpoint is inconsistent, resume from another one."
            )
        logger.info("Resumed PALSGD state of rank %d from %s (step %d)", self.args.process_index, checkpoint_dir,
                    self.palsgd.step)

    # Local weights and inner-optimizer state. DeepSpeed writes and reads its per-rank partitions in its own
    # checkpoint files, so there only the PALSGD state travels in palsgd_rank{R}.pt.
    def _palsgd_local_state(self) -> dict[str, Any]:
        if self.is_deepspeed_enabled:
            return {}
        if self._palsgd_fsdp:  # this rank's shards, as plain tensors
            return fsdp_trainer.local_state(self.palsgd.adapter, self.optimizer)
        return {"model_state": self.model.state_dict(), "optimizer_state": self.optimizer.state_dict()}

    def _palsgd_load_local_state(self, state: dict[str, Any]) -> None:
        if self.is_deepspeed_enabled:
            return
        if self._palsgd_fsdp:
            return fsdp_trainer.load_local_state(self.palsgd.adapter, self.optimizer, state)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.palsgd is None:
            return
        checkpoint.save_rank_state(
            output_dir, self.args.process_index, self.args.world_size, self.palsgd.state_dict(),
            **self._palsgd_local_state(),
        )
        # Rank 0 writes trainer_state.json next, which marks the checkpoint complete: every rank's file first.
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        # ---- reliability: every rank's rng_state_{R}.pth is written after the barrier above; wait for them too,
        # so that rank 0's trainer_state.json, written right after this, is the last file of a checkpoint.
        if self.palsgd is not None and dist.is_available() and dist.is_initialized():
            dist.barrier()

    # ------------------------------------------------------------------ the step
    def _palsgd_kind(self) -> Optional[StepKind]:
        # The kind drawn for the optimizer step in progress. Never drawn here: under DeepSpeed the
        # engine finishes the PALSGD step inside backward, and a later hook would draw the next coin.
        # Only inside train(): evaluation and prediction never draw a coin.
        return self._palsgd_step_kind if self.palsgd is not None and self.is_in_train else None

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self.palsgd is not None and self.is_in_train:
            # Draw the coin and switch backend gradient sync before any micro-batch runs.
            self._palsgd_step_kind = self.palsgd.step_kind()
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def _get_num_items_in_batch(self, batch_samples, device):
        kind = self._palsgd_kind()
        if kind is StepKind.PSEUDO_SYNC:
            return None  # nothing is computed
        if kind is not StepKind.GRADIENT or not self.args.average_tokens_across_devices or self.args.world_size == 1:
            return super()._get_num_items_in_batch(batch_samples, device)
        # A local step: count this rank's tokens only (no all-gather). compute_loss still multiplies the loss by
        # the process count (it assumes DDP's averaging), so scale the count alike: loss = sum / local count.
        self.args.average_tokens_across_devices = False
        try:
            count = super()._get_num_items_in_batch(batch_samples, device)
        finally:
            self.args.average_tokens_across_devices = True
        return None if count is None else count * (self.accelerator.num_processes // self.get_tp_size())

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._palsgd_kind() is StepKind.PSEUDO_SYNC:
            # The micro-batch was read (the data position advances as in the paper) but is not computed.
            return torch.zeros((), device=self.args.device)
        return super().training_step(model, inputs, num_items_in_batch)

    def floating_point_ops(self, inputs):
        return 0 if self._palsgd_kind() is StepKind.PSEUDO_SYNC else super().floating_point_ops(inputs)

    def _clip_grad_norm(self, model):
        return None if self._palsgd_kind() is StepKind.PSEUDO_SYNC else super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        if self._palsgd_kind() is StepKind.PSEUDO_SYNC:
            # No gradients, and unscaling an fp16 GradScaler without a step would break the next real step.
            # A pseudo-sync step is never an overflow-skipped one: the LR scheduler must step.
            for opt in getattr(self.accelerator, "_optimizers", []):
                settle_skipped_inner_step(opt)
            return None
        return super()._get_grad_norm(model, grad_norm)

    # ------------------------------------------------------------------ logging
    def _palsgd_computed(self) -> int:
        """Optimizer steps so far that ran forward/backward (warm-up + gradient steps)."""
        if self.palsgd is None:
            return 0
        return self.palsgd.counters["warmup_steps"] + self.palsgd.counters["gradient_steps"]

    def _maybe_log_save_evaluate(self, tr_loss, *args, **kwargs):
        if self.palsgd is not None:
            self.palsgd.end_step()  # a step boundary: every rank is at the same global step
            self._palsgd_step_kind = None
        if self.palsgd is not None and self.state.global_step >= self.state.max_steps:
            # The last step: sync now, so that its evaluation and checkpoint see the final global model.
            # (max_steps is the same on every rank, so every rank joins this collective.)
            self.palsgd.finalize()
        steps = self.state.global_step - self._globalstep_last_logged
        if self.palsgd is not None and self.control.should_log and steps > 0:
            # The Trainer logs mean_over_ranks(sum of step losses) / steps; pseudo-sync steps added zeros.
            # Rescale so that it logs sum over ranks / computed steps over ranks. Collective, on a logging
            # step only (the Trainer all-gathers the loss right after).
            computed = torch.tensor(
                [float(self._palsgd_computed() - self._palsgd_computed_at_log)], device=tr_loss.device
            )
            if self.args.world_size > 1:
                dist.all_reduce(computed)
            mean_computed = computed.item() / self.args.world_size
            if mean_computed > 0:
                tr_loss.mul_(steps / mean_computed)
                self._palsgd_computed_at_log = self._palsgd_computed()
            else:
                self.control.should_log = False  # no loss measured since the last log: fold into the next one
        return super()._maybe_log_save_evaluate(tr_loss, *args, **kwargs)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.palsgd is not None and ("loss" in logs or "train_loss" in logs):
            if self._palsgd_peak_c is not None:
                # Once, in the first training log, where every report_to backend shows it: the pull strength.
                logs["palsgd/peak_mixing_coefficient"] = self._palsgd_peak_c
                self._palsgd_peak_c = None
            logs.update({f"palsgd/{k}": v for k, v in self.palsgd.metrics().items()})
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ end of training, evaluation, saving
    def _finalize_training(self, trial, num_train_samples, start_time):
        if self.palsgd is not None:
            self.palsgd.finalize()  # collective: every rank now holds the global model
            # The unlogged remainder is added to train_loss from this rank alone (as stock): same correction.
            steps = self.state.global_step - self._globalstep_last_logged
            computed = self._palsgd_computed() - self._palsgd_computed_at_log
            if steps > 0 and computed > 0:
                self._tr_loss.mul_(steps / computed)
        return super()._finalize_training(trial, num_train_samples, start_time)

    def _palsgd_global_weights(self):
        if self.palsgd is None:
            return contextlib.nullcontext()
        if isinstance(self.optimizer, PALSGDOptimizer):
            return self.optimizer.global_weights()  # mode-aware (schedule-free optimizers)
        return self.palsgd.global_weights()

    def evaluation_loop(self, *args: Any, **kwargs: Any):
        local = getattr(self.args, "palsgd_eval_on", "global") == "local"
        with contextlib.nullcontext() if local else self._palsgd_global_weights():
            return super().evaluation_loop(*args, **kwargs)

    def _load_best_model(self) -> None:
        super()._load_best_model()
        if self.palsgd is not None and self.is_deepspeed_enabled:
            # DeepSpeed restored each replica's own (drifted) partitions and, with them, the PALSGD state
            # of that checkpoint; the model that was evaluated there, and is to be kept, is its anchor.
            self.palsgd.adopt_global_model()

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        # Between syncs this writes the anchor (the last global model), never one worker's drifted copy.
        with self._palsgd_global_weights():
            super().save_model(output_dir, _internal_call)


def _follow_transformers_logging(level: int) -> None:
    """palsgd_hf's log lines go where the Trainer's go, at the level ``--log_level`` sets (as the Trainer
    does for transformers' own loggers): without it, the INFO lines (the pull coefficient c, resumes)
    never show in a user's script. Done once a trainer exists, never at import."""
    ours = logging.getLogger("palsgd_hf")
    ours.setLevel(level)
    if not ours.handlers:
        for handler in hf_logging.get_logger().handlers:  # transformers' library root logger
            ours.addHandler(handler)
        ours.propagate = not ours.handlers


def resolve_palsgd_config(args: Any, palsgd_config: Optional[PALSGDConfig]) -> PALSGDConfig:
    """The PALSGD settings of a trainer: from PALSGDTrainingArguments or from palsgd_config, never both."""
    if isinstance(args, PALSGDTrainingArguments):
        if palsgd_config is not None:
            raise ValueError(
                "got both PALSGDTrainingArguments and palsgd_config: pass the settings once, either as the "
                "arguments' palsgd_* fields or as palsgd_config with plain TrainingArguments."
            )
        return args.palsgd_config()  # validated against the other arguments in its __post_init__
    if palsgd_config is None:
        raise ValueError(
            "PALSGD settings are missing: pass args=PALSGDTrainingArguments(...) or palsgd_config=PALSGDConfig(...)."
        )
    if not isinstance(palsgd_config, PALSGDConfig):
        raise TypeError(f"palsgd_config must be a PALSGDConfig, got {type(palsgd_config).__name__}.")
    check_trainer_options(args, palsgd_config)
    check_training_args(palsgd_config, args)
    check_world(palsgd_config, args.world_size)
    return palsgd_config


# Private Trainer methods this mixin overrides. Were one renamed in a future transformers release, the
# override would silently never run (and the run would be plain DDP, or worse): refuse that instead.
_HOOKS = (
    "_prepare_for_training", "get_batch_samples", "_get_num_items_in_batch", "training_step", "_clip_grad_norm",
    "_get_grad_norm", "_maybe_log_save_evaluate", "_finalize_training", "_save_optimizer_and_scheduler",
    "evaluation_loop", "save_model", "log", "floating_point_ops", "_save_rng_state", "train", "_load_best_model",
    "_load_from_checkpoint", "_load_optimizer_and_scheduler", "_defer_fsdp_gradient_reduction",  # fsdp_trainer.py
)


def _check_hooks(cls: type) -> None:
    base = next((b for b in cls.__mro__ if b is not PALSGDTrainerMixin and issubclass(b, Trainer)
                 and not issubclass(b, PALSGDTrainerMixin)), None)
    if base is None:
        raise TypeError(f"{cls.__name__}: PALSGDTrainerMixin must be combined with a transformers.Trainer subclass.")
    missing = [name for name in _HOOKS if not hasattr(base, name)]
    if missing:
        import transformers

        raise RuntimeError(
            f"PALSGDTrainer relies on Trainer methods {missing}, which transformers {transformers.__version__} does "
            "not have; install a transformers version this package supports (see pyproject.toml)."
        )


class PALSGDTrainer(PALSGDTrainerMixin, Trainer):
    """``transformers.Trainer`` trained with PALSGD; takes :class:`PALSGDTrainingArguments`."""
