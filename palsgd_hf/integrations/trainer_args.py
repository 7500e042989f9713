"""PALSGDTrainingArguments: ``TrainingArguments`` plus the PALSGD settings, prefixed ``palsgd_``.

Every :class:`~palsgd_hf.config.PALSGDConfig` field ``x`` has a twin ``palsgd_x`` here, with the
same default and help text (both read from ``PALSGDConfig``, so the two cannot drift apart), so
``HfArgumentParser`` and the command line see ``--palsgd_sync_interval 32`` and so on. One
Trainer-only setting follows: ``palsgd_eval_on`` (evaluate the global model or each worker's
local one). ``palsgd_comm_timeout_seconds`` is the twin of ``PALSGDConfig.comm_timeout_seconds``;
unset, the collective timeout is ``ddp_timeout``.

Validation happens in ``__post_init__``, before any training work: the PALSGD values themselves
(errors re-worded to name the ``palsgd_`` field), then their contradictions with the rest of the
arguments (:func:`check_training_args`, also used when a ``PALSGDConfig`` is handed to the
trainer directly).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch.distributed as dist
from transformers import TrainingArguments
from transformers.training_args import OptimizerNames

from ..config import (
    ANCHOR_DEVICES, COINS, COMM_DTYPES, METHODS, OUTER_OPTIMIZERS, SYNC_POLICIES, PALSGDConfig, PALSGDConfigError,
)

logger = logging.getLogger(__name__)

PREFIX = "palsgd_"
EVAL_ON = ("global", "local")
_CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(PALSGDConfig)}

# Optimizers that update parameters inside backward (LOMO) or from per-parameter hooks (layer-wise
# GaLore/APOLLO): there is no optimizer.step() for PALSGD to scale or replace.
_STEP_IN_BACKWARD = {
    OptimizerNames.LOMO, OptimizerNames.ADALOMO, OptimizerNames.GALORE_ADAMW_LAYERWISE,
    OptimizerNames.GALORE_ADAMW_8BIT_LAYERWISE, OptimizerNames.GALORE_ADAFACTOR_LAYERWISE,
    OptimizerNames.APOLLO_ADAMW_LAYERWISE,
}
# Below this pull per pseudo-sync step the elastic term does (almost) nothing: typical of
# fine-tuning learning rates with the paper's eta (see docs/trainer.md).
_WEAK_PULL = 1e-3


def _twin(name: str, choices: Optional[tuple[str, ...]] = None) -> Any:
    """A dataclass field mirroring ``PALSGDConfig.<name>``: same default, same help."""
    source = _CONFIG_FIELDS[name]
    metadata = {"help": f"{source.metadata['help']} (PALSGDConfig.{name})"}
    if choices is not None:
        metadata["choices"] = list(choices)
    return field(default=source.default, metadata=metadata)


@dataclass
class PALSGDTrainingArguments(TrainingArguments):
    """``TrainingArguments`` for :class:`~palsgd_hf.integrations.trainer.PALSGDTrainer`.

    The ``palsgd_*`` fields are :class:`~palsgd_hf.config.PALSGDConfig`'s fields; see its help
    texts (``--help`` on the command line). ``palsgd_config()`` returns the resolved config.
    """

    palsgd_method: str = _twin("method", METHODS)
    palsgd_sync_interval: int = _twin("sync_interval")
    palsgd_sync_policy: str = _twin("sync_policy", SYNC_POLICIES)
    palsgd_comm_target: float = _twin("comm_target")
    palsgd_max_sync_interval: Optional[int] = _twin("max_sync_interval")
    palsgd_pseudo_sync_prob: Optional[float] = _twin("pseudo_sync_prob")
    palsgd_mixing_rate: Optional[float] = _twin("mixing_rate")
    palsgd_pull: Optional[float] = _twin("pull")
    palsgd_warmup_steps: int = _twin("warmup_steps")
    palsgd_outer_optimizer: Optional[str] = _twin("outer_optimizer", OUTER_OPTIMIZERS)
    palsgd_outer_lr: Optional[float] = _twin("outer_lr")
    palsgd_outer_momentum: Optional[float] = _twin("outer_momentum")
    palsgd_seed: int = _twin("seed")
    palsgd_coins: str = _twin("coins", COINS)
    palsgd_shard_size: int = _twin("shard_size")
    palsgd_overlap_steps: int = _twin("overlap_steps")
    palsgd_fragments: int = _twin("fragments")
    palsgd_comm_dtype: str = _twin("comm_dtype", COMM_DTYPES)
    palsgd_anchor_device: str = _twin("anchor_device", ANCHOR_DEVICES)
    palsgd_replica_metrics: bool = _twin("replica_metrics")
    palsgd_eval_on: str = field(
        default="global",
        metadata={
            "help": "Which model evaluate()/predict() score: 'global' (the anchor, the model every worker "
            "returns to at the next sync) or 'local' (each worker its own drifted copy; the reported metric "
            "is then gathered over the workers' shards of the evaluation set).",
            "choices": list(EVAL_ON),
        },
    )
    palsgd_comm_timeout_seconds: Optional[float] = _twin("comm_timeout_seconds")

    def __post_init__(self) -> None:
        config = self.palsgd_config()  # the PALSGD values alone first: cheapest, clearest errors
        check_trainer_options(self, config)
        check_training_args(config, self)
        super().__post_init__()  # initializes the distributed state, so the world size is known below
        check_world(config, self.world_size)

    def palsgd_config(self) -> PALSGDConfig:
        """The :class:`PALSGDConfig` these arguments describe (validated; errors name ``palsgd_`` fields)."""
        values = {name: getattr(self, PREFIX + name) for name in _CONFIG_FIELDS}
        try:
            return PALSGDConfig(**values)
        except PALSGDConfigError as err:
            raise PALSGDConfigError(prefixed(str(err))) from None


def prefixed(message: str) -> str:
    """Rename PALSGDConfig field names in an error message to their ``palsgd_`` argument names."""
    for name in _CONFIG_FIELDS:
        # Multi-word names are unambiguous anywhere; 'method' and 'seed' only as 'name=' assignments.
        pattern = rf"(?<![\w.]){name}\b" if "_" in name else rf"(?<![\w.]){name}(?==)"
        message = re.sub(pattern, PREFIX + name, message)
    return message


def check_trainer_options(args: Any, config: Optional[PALSGDConfig] = None) -> None:
    """The Trainer-only option ``palsgd_eval_on``, and the ``ddp_timeout`` that stands in for an unset timeout.

    The collective timeout itself (``palsgd_comm_timeout_seconds`` = ``PALSGDConfig.comm_timeout_seconds``) is
    checked by ``PALSGDConfig``.
    """
    eval_on = getattr(args, "palsgd_eval_on", "global")
    if eval_on not in EVAL_ON:
        raise PALSGDConfigError(f"palsgd_eval_on={eval_on!r} is not one of {EVAL_ON}; pick one of them.")
    # ---- reliability: ddp_timeout is the collective timeout when neither the arguments nor the config set one
    timeout_set = getattr(args, "palsgd_comm_timeout_seconds", None) is not None or (
        config is not None and config.comm_timeout_seconds is not None
    )
    ddp_timeout = getattr(args, "ddp_timeout", 1800)
    bad_ddp_timeout = isinstance(ddp_timeout, bool) or not isinstance(ddp_timeout, (int, float)) or ddp_timeout <= 0
    if not timeout_set and bad_ddp_timeout:
        raise PALSGDConfigError(
            f"ddp_timeout={ddp_timeout!r} must be a positive number of seconds: it is the timeout of every collective "
            "(PALSGD's syncs too) when palsgd_comm_timeout_seconds (PALSGDConfig.comm_timeout_seconds) is unset; use "
            "e.g. 600, or leave the default 1800."
        )


def check_training_args(config: PALSGDConfig, args: TrainingArguments) -> None:
    """Refuse PALSGD settings that contradict the other training arguments; warn about weak ones.

    Runs on the raw argument values (before or after ``TrainingArguments.__post_init__``).
    """
    # `accelerate launch --use_fsdp` (or an FSDP accelerate config) switches FSDP on through the environment.
    fsdp_from_launcher = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1")
    if getattr(args, "fsdp", None) or fsdp_from_launcher:
        where = f"fsdp={args.fsdp!r}" if getattr(args, "fsdp", None) else "ACCELERATE_USE_FSDP (accelerate --use_fsdp)"
        raise PALSGDConfigError(
            f"{where} cannot be combined with PALSGD: the Trainer's FSDP would shard over the whole world. Shard "
            "the model yourself with fully_shard(module, mesh=palsgd_hf.adapters.fsdp.shard_mesh(palsgd_shard_size)) "
            "before PALSGDTrainer (docs/fsdp.md), or shard each worker with DeepSpeed ZeRO (deepspeed=...)."
        )
    if _optimizer_name(args.optim) in _STEP_IN_BACKWARD:
        raise PALSGDConfigError(
            f"optim={_optimizer_name(args.optim).value!r} updates parameters inside backward, so PALSGD cannot "
            "scale or skip its step; use an optimizer with a step(), e.g. optim='adamw_torch'."
        )
    # palsgd_shard_size > 1 needs DeepSpeed or an FSDP2 model: checked once the model is known (check_model_sharding).
    if config.is_ddp:
        return
    _check_pull(config, args.learning_rate)
    if args.max_steps is not None and args.max_steps > 0:
        local_steps = args.max_steps - config.warmup_steps
        if local_steps <= 0:
            logger.warning(
                "palsgd_warmup_steps=%d >= max_steps=%d: every step is a synchronous warm-up step, so this run is "
                "plain DDP; lower palsgd_warmup_steps to train with PALSGD.", config.warmup_steps, args.max_steps,
            )
        elif local_steps < config.sync_interval:
            logger.warning(
                "palsgd_sync_interval=%d is longer than the %d steps after warm-up: the only global sync is the "
                "final one at the end of training.", config.sync_interval, local_steps,
            )
    if getattr(args, "include_num_input_tokens_seen", "no") not in ("no", False) and config.coins == "per_replica":
        raise PALSGDConfigError(
            f"include_num_input_tokens_seen={args.include_num_input_tokens_seen!r} all-gathers a token count over all "
            "ranks inside every step, which hangs with palsgd_coins='per_replica' (replicas run different steps); "
            "use palsgd_coins='shared' (the default) or include_num_input_tokens_seen='no'."
        )
    if getattr(args, "include_num_input_tokens_seen", "no") not in ("no", False):
        logger.warning(
            "include_num_input_tokens_seen=%r all-gathers a token count after every micro-batch, also between "
            "PALSGD syncs; set it to 'no' for local steps without any communication.",
            args.include_num_input_tokens_seen,
        )


def check_model_sharding(config: PALSGDConfig, args: TrainingArguments, fsdp2_model: bool) -> None:
    """palsgd_shard_size > 1 needs each worker's model copy sharded: by DeepSpeed ZeRO or by FSDP2 (the model)."""
    # `accelerate launch --use_deepspeed` passes its DeepSpeed config through the environment, not `deepspeed=`.
    deepspeed = bool(args.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if fsdp2_model and deepspeed:
        raise PALSGDConfigError(
            "the model is sharded with FSDP2 (fully_shard) and deepspeed is set: shard with one of them; drop "
            "deepspeed=... to train the FSDP2 model."
        )
    if config.shard_size > 1 and not deepspeed and not fsdp2_model:
        raise PALSGDConfigError(
            f"palsgd_shard_size={config.shard_size} needs each worker's model copy sharded, but deepspeed is not set "
            "and the model is not an FSDP2 model; pass deepspeed=<ZeRO config>, or shard the model with "
            "fully_shard(module, mesh=palsgd_hf.adapters.fsdp.shard_mesh(palsgd_shard_size)) first, or use "
            "palsgd_shard_size=1."
        )
    if fsdp2_model and config.shard_size == 1 and args.world_size > 1:
        raise PALSGDConfigError(
            "the model is sharded with FSDP2 but palsgd_shard_size=1: set palsgd_shard_size to the ranks each "
            "replica's mesh spans (fully_shard(module, mesh=shard_mesh(palsgd_shard_size)))."
        )


def _optimizer_name(optim: Any) -> Optional[OptimizerNames]:
    try:
        return OptimizerNames(optim)
    except ValueError:
        return None  # an unknown name: TrainingArguments itself reports it


def _check_pull(config: PALSGDConfig, learning_rate: float) -> None:
    """c = lr*eta/p at the peak learning rate must lie in (0, 1]; warn when it is negligible."""
    if config.pull is not None:
        return  # c at the peak is palsgd_pull by construction (eta is derived from the schedule's peak)
    try:
        c = config.check_mixing_coefficient(learning_rate)
    except PALSGDConfigError as err:
        raise PALSGDConfigError(
            f"at the peak learning_rate={learning_rate:g}: {prefixed(str(err))} (or lower learning_rate)."
        ) from None
    if 0 < c < _WEAK_PULL:
        logger.warning(
            "PALSGD pull per pseudo-sync step c = learning_rate*palsgd_mixing_rate/palsgd_pseudo_sync_prob = "
            "%g*%g/%g = %.2g at the peak learning rate: almost no pull toward the global model. Aim for c of "
            "about 0.01-0.1, e.g. palsgd_mixing_rate=%.3g.",
            learning_rate, config.mixing_rate, config.pseudo_sync_prob, c,
            0.03 * config.pseudo_sync_prob / learning_rate,
        )


def check_world(config: PALSGDConfig, world_size: int) -> None:
    """Checks that need the launched world size (the Trainer's view of it)."""
    launched = dist.get_world_size() if dist.is_available() and dist.is_initialized() else world_size
    if launched != world_size:
        # Seen with torchrun on a machine without GPUs: every process trains alone as rank 0 of 1, so
        # they would all write the same checkpoint files while PALSGD averages across them.
        raise PALSGDConfigError(
            f"torch.distributed runs {launched} processes but the Trainer sees world_size={world_size}: on a "
            "machine without GPUs pass use_cpu=True (--use_cpu) so that the Trainer trains data-parallel."
        )
    if world_size % config.shard_size != 0:
        raise PALSGDConfigError(
            f"the job has {world_size} processes, not a multiple of palsgd_shard_size={config.shard_size}: every "
            f"worker needs exactly palsgd_shard_size ranks; launch a multiple of {config.shard_size} processes."
        )


def warn_alone(config: PALSGDConfig, world_size: int, peers_outside_world: bool = False) -> None:
    """Warn when the world holds one PALSGD worker and it has no peers elsewhere. Called by the Trainer, not the
    arguments: only the Trainer knows whether the world is all (a fault-tolerant Trainer's peers are the other
    replicas, reached through torchft: ``peers_outside_world``)."""
    if world_size // config.shard_size == 1 and not config.is_ddp and not peers_outside_world:
        logger.warning(
            "PALSGD with a single worker (world size %d, palsgd_shard_size %d): there is nobody to average with; "
            "the run is local SGD on one worker with an outer optimizer. Launch with torchrun or "
            "`accelerate launch --multi_gpu` for several workers.", world_size, config.shard_size,
        )
