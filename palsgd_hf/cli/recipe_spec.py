"""The recipe's own keys (model, data, trainer kind, LoRA, launch) and which arguments class each trainer takes.

A recipe is one flat mapping: the keys of :class:`RecipeSpec`, the fields of the trainer's arguments
class (:func:`arguments_class`: ``PALSGDTrainingArguments`` for ``trainer: causal_lm``,
``PALSGDSFTConfig`` / ``PALSGDDPOConfig`` for ``sft`` / ``dpo``), and three mappings: ``launch``
(:class:`LaunchSpec`), ``model_config`` (config overrides for a model built from a preset) and
``peft`` (the keyword arguments of ``peft.LoraConfig``). recipe.py parses the flat keys of both
dataclasses with one ``HfArgumentParser``.
"""

from __future__ import annotations

import importlib.util
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from ..integrations.trainer_args import PALSGDTrainingArguments
from .recipe_source import RecipeError

Launcher = Literal["torchrun", "accelerate"]
TrainerKind = Literal["causal_lm", "sft", "dpo"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
DATASETS = ("shakespeare",)
LAUNCHERS, TRAINERS, DTYPES = (typing.get_args(t) for t in (Launcher, TrainerKind, DType))
# The keys that are mappings (checked as sections, not parsed as command-line values).
SECTIONS = ("launch", "model_config", "peft")
# Argument fields a recipe may not set: the recipe's own keys say these things.
RESERVED = {
    "local_rank": "the launcher sets the rank",
    "model_init_kwargs": "set the recipe keys dtype, attn_implementation and trust_remote_code instead",
    "peft_config": "set the recipe's peft: mapping instead",
}


@dataclass
class LaunchSpec:
    """How ``palsgd-hf train`` starts the processes of one node."""

    num_processes: int = field(default=2, metadata={"help": "Processes (workers) on this node."})
    launcher: Launcher = field(default="torchrun", metadata={"help": f"One of {LAUNCHERS}."})
    accelerate_config: Optional[str] = field(
        default=None, metadata={"help": "An `accelerate config` YAML (launcher: accelerate only)."}
    )


@dataclass
class RecipeSpec:
    """The recipe keys that are not fields of the trainer's arguments class."""

    description: str = ""
    trainer: TrainerKind = field(default="causal_lm", metadata={
        "help": "causal_lm: PALSGDTrainer on text blocks; sft / dpo: trl's trainers on chat / preference data."})
    model: Optional[str] = field(default=None, metadata={"help": "Pretrained model: Hub name or local dir."})
    model_preset: Optional[str] = field(default=None, metadata={
        "help": "palsgd_hf.lm model preset built from scratch."})
    model_config: Optional[dict] = field(default=None, metadata={"help": "Model config overrides."})
    dtype: Optional[DType] = field(default=None, metadata={
        "help": "dtype a pretrained model loads in (from_pretrained's dtype); default: the model's float32."})
    attn_implementation: Optional[str] = field(default=None, metadata={
        "help": "from_pretrained's attn_implementation (eager, sdpa, flash_attention_2, ...)."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Run code shipped with a Hub model (off unless you trust its repo)."})
    peft: Optional[dict] = field(default=None, metadata={"help": "peft.LoraConfig keyword arguments: train LoRA."})
    tokenizer: Optional[str] = field(default=None, metadata={"help": "Hub name, local dir or bpe-shakespeare-<N>."})
    dataset: Optional[str] = field(default=None, metadata={"help": f"An embedded corpus: one of {DATASETS}."})
    dataset_name: Optional[str] = None
    dataset_config: Optional[str] = None
    train_files: Optional[list[str]] = None
    validation_files: Optional[list[str]] = None
    text_column: str = "text"
    block_size: int = 128
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    validation_split_percentage: int = 5
    fsdp2: bool = field(default=False, metadata={
        "help": "causal_lm: shard each worker's model over its palsgd_shard_size ranks with FSDP2 (fully_shard per "
        "block) before the Trainer, instead of DeepSpeed ZeRO (docs/fsdp.md)."})
    save_final_model: bool = field(default=True, metadata={
        "help": "trainer.save_model() (the global model) at the end."})

    def model_kwargs(self) -> dict:
        """``from_pretrained`` keyword arguments for a pretrained model (trl's ``model_init_kwargs``)."""
        kwargs: dict = {"trust_remote_code": self.trust_remote_code}
        if self.dtype is not None:
            kwargs["dtype"] = self.dtype
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        return kwargs


# Keys that only the block-tokenizing causal_lm trainer reads (trl's trainers tokenize themselves).
CAUSAL_LM_ONLY = {"dataset": "shakespeare is plain text", "model_preset": "trl fine-tunes a pretrained model",
                  "model_config": "trl fine-tunes a pretrained model", "text_column": "trl reads the data's columns",
                  "block_size": "set max_length (trl's field) instead"}


# datasets' packaged loader for each data-file suffix (trl recipes read rows as they are).
LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def data_loader(files: list[str]) -> str:
    """datasets' loader for these files (one kind of file per recipe)."""
    kinds = {LOADERS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise RecipeError(f"train_files/validation_files {files}: expected files of one kind, with a suffix among "
                          f"{sorted(LOADERS)}.")
    return kinds.pop()


def arguments_class(trainer: str):
    """The arguments class of a trainer kind; trl's are imported only for the recipes that use them."""
    if trainer == "causal_lm":
        return PALSGDTrainingArguments
    if importlib.util.find_spec("trl") is None:
        raise RecipeError(f"trainer: {trainer} needs trl, which is not installed: pip install 'palsgd_hf[trl]'.")
    from ..integrations import trl  # optional extra (trl), needed by sft/dpo recipes only

    return trl.PALSGDSFTConfig if trainer == "sft" else trl.PALSGDDPOConfig
