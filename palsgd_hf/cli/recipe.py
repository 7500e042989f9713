"""Recipes: one flat YAML per training run, loaded from a file, the Hub, or the package; strictly checked.

A recipe names everything a run needs, at the top level::

    description: tiny GPT-Neo on Shakespeare, PALSGD         # free text
    trainer: causal_lm          # or sft / dpo: trl's trainers on chat / preference data (the [trl] extra)
    model_preset: tiny          # or  model: EleutherAI/gpt-neo-125M  (Hub name or local dir) + dtype, ...
    model_config: {num_layers: 2}                            # config overrides (optional)
    peft: {r: 16, target_modules: all-linear}                # LoRA (optional; peft.LoraConfig's arguments)
    tokenizer: bpe-shakespeare-2048                          # Hub name, local dir, or the built-in BPE
    dataset: shakespeare        # or dataset_name/dataset_config (Hub), or train_files/validation_files
    block_size: 128
    learning_rate: 3.0e-3       # ...any field of the trainer's arguments class (TrainingArguments, SFTConfig...)
    palsgd_method: palsgd       # ...including the palsgd_* settings
    launch: {num_processes: 2, launcher: torchrun}          # or launcher: accelerate + accelerate_config

The keys are those of :class:`~palsgd_hf.cli.recipe_spec.RecipeSpec` and of the trainer's arguments
class (:func:`~palsgd_hf.cli.recipe_spec.arguments_class`), parsed with one ``HfArgumentParser``
over both, as ``--key value`` arguments: each value is typed and checked exactly as on that
trainer's command line (``1e-3`` is a float, ``true`` a boolean, a choice must be one of its
choices). ``--key value`` overrides are read as YAML scalars and merged into the recipe first
(``--launch.num_processes 4``, ``--model_config.num_layers 3``, ``--peft.r 8`` set one key of a mapping).

Sources: a local path; ``hub:ORG/REPO/path/in/repo.yaml[@revision]`` (fetched with
``huggingface_hub.hf_hub_download``, so HF_HUB_OFFLINE and the local cache work as for models);
``builtin:NAME`` for the recipes shipped in ``palsgd_hf/cli/builtin/`` (the demo's).

Relative paths inside a recipe (train_files, validation_files, launch.accelerate_config,
deepspeed) are tried against the working directory first, then the recipe's own directory; for a
Hub recipe, the file is fetched from the same repo and revision.

Every key is checked before anything runs: unknown keys are errors (with the closest known name),
values are typed as above, the data/model/launch choices must be consistent, the LoRA settings
build a ``peft.LoraConfig``, and the arguments are validated by constructing the arguments class.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..config import PALSGDConfigError
from ..devices import cpu_only
from ..lm import MODEL_PRESETS
from .launch import check_accelerate_config
from .recipe_source import BUILTIN_DIR, RecipeError  # noqa: F401 (both part of this module's API)
from .recipe_source import Locator as _Locator
from .recipe_parse import init_fields, parse_section, parse_values, suggest
from .recipe_spec import (
    CAUSAL_LM_ONLY, DATASETS, SECTIONS, TRAINERS, LaunchSpec, RecipeSpec, arguments_class, data_loader,
)

logger = logging.getLogger(__name__)


@dataclass
class Recipe:
    """A validated recipe: its source, its own keys, the launch section and the trainer's arguments."""

    source: str
    path: Path
    spec: RecipeSpec
    launch: LaunchSpec
    training: dict[str, Any]

    @property
    def arguments_class(self):
        return arguments_class(self.spec.trainer)

    def training_arguments(self, **changes: Any):
        """The trainer's arguments (``PALSGDTrainingArguments``, ``PALSGDSFTConfig``...) for this recipe."""
        values = {**self.training, **changes}
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and cpu_only() and "use_cpu" not in values:
            # Without use_cpu the Trainer's accelerate state on a GPU-less machine is single-process in
            # every rank: N independent runs instead of one data-parallel job.
            values["use_cpu"] = True
        if self.spec.trainer != "causal_lm" and self.spec.model is not None:
            values["model_init_kwargs"] = self.spec.model_kwargs()  # trl loads the model by name with these
        return self.arguments_class(**values)

    def lora_config(self):
        """``peft.LoraConfig`` of the recipe's ``peft:`` mapping, or None."""
        return None if self.spec.peft is None else _lora_config(self.source, self.spec.peft)

    def to_dict(self) -> dict[str, Any]:
        spec = {k: v for k, v in dataclasses.asdict(self.spec).items() if v is not None}
        return {**spec, **self.training, "launch": dataclasses.asdict(self.launch)}


# ---------------------------------------------------------------------------------------------- loading
def load_recipe(source: str, overrides: Sequence[str] | dict[str, Any] = (), *, check_training: bool = True) -> Recipe:
    """Fetch, merge ``overrides`` (``["--key", "value", ...]`` or a dict) and validate a recipe."""
    locator = _Locator(source)
    raw = yaml.safe_load(locator.path.read_text())
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {source}: the top level must be a mapping of keys to values, got {type(raw).__name__}.")
    raw = _merge(raw, parse_overrides(overrides) if not isinstance(overrides, dict) else overrides)
    recipe = _build(source, locator, raw)
    if check_training:
        check_training_arguments(recipe)
    return recipe


def parse_overrides(argv: Sequence[str]) -> dict[str, Any]:
    """``["--key", "value", "--launch.num_processes", "4"]`` -> dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    argv = list(argv)
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or len(token) == 2:
            raise RecipeError(f"override {token!r}: expected --key value (e.g. --learning_rate 1e-3).")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise RecipeError(f"override --{key} has no value; write --{key} VALUE (booleans: true/false).")
            value, i = argv[i + 1], i + 1
        try:
            out[key.replace("-", "_")] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            out[key.replace("-", "_")] = value
        i += 1
    return out


def _merge(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(raw)
    for key, value in overrides.items():
        head, dot, rest = key.partition(".")
        if dot:  # launch.num_processes, model_config.num_layers, peft.r
            if head not in SECTIONS:
                raise RecipeError(f"override --{key}: only {', '.join(s + '.*' for s in SECTIONS)} take dotted keys.")
            section = dict(merged.get(head) or {})
            section[rest] = value
            merged[head] = section
        else:
            merged[key] = value
    return merged


# ---------------------------------------------------------------------------------------------- checking
def _build(source: str, locator: _Locator, raw: dict[str, Any]) -> Recipe:
    trainer = raw.get("trainer", "causal_lm")
    if trainer not in TRAINERS:
        raise RecipeError(f"recipe {source}: trainer={trainer!r} is not one of {TRAINERS}.")
    args_class = arguments_class(trainer)
    flat = {k: v for k, v in raw.items() if k != "launch"}
    for key in ("train_files", "validation_files"):
        if isinstance(flat.get(key), str):
            flat[key] = [flat[key]]  # one file needs no list brackets
    if isinstance(flat.get("resume_from_checkpoint"), bool):
        # `--resume_from_checkpoint true`: the last complete checkpoint in output_dir (integrations/faults.py)
        flat["resume_from_checkpoint"] = "true" if flat["resume_from_checkpoint"] else None
    values = parse_values(source, flat, RecipeSpec, args_class)
    spec_fields = init_fields(RecipeSpec)
    spec = RecipeSpec(**{k: v for k, v in values.items() if k in spec_fields})
    training = {k: v for k, v in values.items() if k not in spec_fields or k in init_fields(args_class)}
    launch = parse_section(source, "launch", LaunchSpec, raw.get("launch"))
    _check_spec(source, spec, locator, given=set(flat))
    _check_launch(source, launch, locator, training)
    _check_fsdp2(source, spec, training)
    if training.get("deepspeed") is not None and isinstance(training["deepspeed"], str):
        training["deepspeed"] = locator.resolve("deepspeed", training["deepspeed"])
    training.setdefault("output_dir", os.path.join("outputs", locator.path.stem))
    return Recipe(source=source, path=locator.path, spec=spec, launch=launch, training=training)


def _check_spec(source: str, spec: RecipeSpec, locator: _Locator, given: set[str]) -> None:
    if spec.model is not None and spec.model_preset is not None:
        raise RecipeError(f"recipe {source}: model={spec.model!r} and model_preset={spec.model_preset!r}: set one.")
    if spec.trainer != "causal_lm":
        _check_trl_spec(source, spec, given)
    for key in ("dtype", "attn_implementation"):
        if getattr(spec, key) is not None and spec.model is None:
            raise RecipeError(f"recipe {source}: {key} applies to a pretrained model (model: <Hub name or dir>); "
                              "a model_preset is built in float32 with the default attention.")
    if spec.model is None and spec.model_preset is None:
        spec.model_preset = "tiny"
    if spec.peft is not None:
        _lora_config(source, spec.peft)
    if spec.model_preset is not None and spec.model_preset not in MODEL_PRESETS:
        raise RecipeError(
            f"recipe {source}: model_preset={spec.model_preset!r} is not one of {sorted(MODEL_PRESETS)}; "
            "pick one or set model: <Hub name>."
        )
    if spec.tokenizer is None:
        if spec.model is None:
            raise RecipeError(f"recipe {source}: tokenizer is missing; set e.g. tokenizer: bpe-shakespeare-2048 or gpt2.")
        spec.tokenizer = spec.model
    sources = [k for k in ("dataset", "dataset_name", "train_files") if getattr(spec, k) is not None]
    if len(sources) != 1:
        raise RecipeError(
            f"recipe {source}: exactly one data source is needed, got {sources or 'none'}; set dataset: shakespeare, "
            "or dataset_name: <Hub dataset>, or train_files: [...]."
        )
    if spec.dataset is not None and spec.dataset not in DATASETS:
        raise RecipeError(f"recipe {source}: dataset={spec.dataset!r} is not one of {DATASETS}; use dataset_name for Hub data.")
    if spec.validation_files is not None and spec.train_files is None:
        raise RecipeError(f"recipe {source}: validation_files needs train_files.")
    if spec.dataset_config is not None and spec.dataset_name is None:
        raise RecipeError(f"recipe {source}: dataset_config needs dataset_name.")
    for key in ("train_files", "validation_files"):
        files = getattr(spec, key)
        if files is not None:
            if not files:
                raise RecipeError(f"recipe {source}: {key} is empty; list at least one file.")
            setattr(spec, key, [locator.resolve(key, f) for f in files])
    if spec.trainer != "causal_lm" and spec.train_files is not None:
        try:
            data_loader(spec.train_files + (spec.validation_files or []))  # trl's rows are read by suffix
        except RecipeError as err:
            raise RecipeError(f"recipe {source}: {err}") from None
    if not 1 <= spec.validation_split_percentage <= 99:
        raise RecipeError(f"recipe {source}: validation_split_percentage={spec.validation_split_percentage} must "
                          "lie in [1, 99] (the share of training rows held out when there are no validation files).")
    for key, minimum in (("block_size", 2), ("max_train_samples", 1), ("max_eval_samples", 1)):
        value = getattr(spec, key)
        if value is not None and value < minimum:
            raise RecipeError(f"recipe {source}: {key}={value} must be >= {minimum}.")


def _check_trl_spec(source: str, spec: RecipeSpec, given: set[str]) -> None:
    """trl's trainers fine-tune a pretrained model on rows they tokenize themselves (chat, preferences)."""
    for key, why in CAUSAL_LM_ONLY.items():
        if key in given:
            raise RecipeError(f"recipe {source}: {key} applies to trainer: causal_lm only ({why}); drop it for "
                              f"trainer: {spec.trainer}.")
    if spec.model is None:
        raise RecipeError(f"recipe {source}: trainer: {spec.trainer} fine-tunes a pretrained model; set model: <Hub "
                          "name or local dir> (palsgd-hf chat-example DIR builds a small local one).")
    if spec.train_files is None and spec.dataset_name is None:
        rows = "messages (chat) or text" if spec.trainer == "sft" else "prompt, chosen and rejected"
        raise RecipeError(f"recipe {source}: trainer: {spec.trainer} needs data with {rows}: set train_files: "
                          "[data.jsonl] (JSON lines, also .json/.parquet/.csv) or dataset_name: <Hub dataset>.")


def _lora_config(source: str, values: dict[str, Any]):
    """``peft.LoraConfig(**values)`` (a causal-LM task unless said otherwise); mistakes as RecipeErrors."""
    try:
        from peft import LoraConfig  # optional extra (peft), needed by recipes with a peft: mapping only
    except ImportError:
        raise RecipeError(f"recipe {source}: peft: needs PEFT, which is not installed: pip install "
                          "'palsgd_hf[peft]'.") from None
    known = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    for key in values:
        if key not in known:
            raise RecipeError(f"recipe {source}: unknown key 'peft.{key}' (peft.LoraConfig has no such argument)."
                              f"{suggest(key, known)}")
    try:
        return LoraConfig(**{"task_type": "CAUSAL_LM", **values})
    except (ValueError, TypeError) as err:
        raise RecipeError(f"recipe {source}: peft: LoraConfig rejected it: {err}") from None


def _check_launch(source: str, launch: LaunchSpec, locator: _Locator, training: dict[str, Any]) -> None:
    if launch.num_processes < 1:
        raise RecipeError(f"recipe {source}: launch.num_processes={launch.num_processes} must be >= 1.")
    if launch.accelerate_config is not None:
        if launch.launcher != "accelerate":
            raise RecipeError(
                f"recipe {source}: launch.accelerate_config is set but launch.launcher={launch.launcher!r}; "
                "set launcher: accelerate or drop accelerate_config."
            )
        launch.accelerate_config = locator.resolve("launch.accelerate_config", launch.accelerate_config)
        check_accelerate_config(launch.accelerate_config, launch.num_processes)
    shard = training.get("palsgd_shard_size", 1)
    if launch.num_processes % shard != 0:
        raise RecipeError(
            f"recipe {source}: launch.num_processes={launch.num_processes} is not a multiple of palsgd_shard_size="
            f"{shard}; every PALSGD worker needs palsgd_shard_size ranks."
        )


def _check_fsdp2(source: str, spec: RecipeSpec, training: dict[str, Any]) -> None:
    if not spec.fsdp2:
        return
    clash = {f"trainer: {spec.trainer}": spec.trainer != "causal_lm", "deepspeed": bool(training.get("deepspeed")),
             "peft": spec.peft is not None, "palsgd_shard_size: 1": training.get("palsgd_shard_size", 1) == 1}
    found = [key for key, bad in clash.items() if bad]
    if found:
        raise RecipeError(
            f"recipe {source}: fsdp2: true cannot go with {', '.join(found)}: FSDP2 shards a causal_lm model (no "
            "LoRA) over palsgd_shard_size > 1 ranks per worker, in place of DeepSpeed; set palsgd_shard_size to "
            "the ranks per worker and drop the others, or drop fsdp2."
        )


def check_training_arguments(recipe: Recipe) -> None:
    """Validate the TrainingArguments + PALSGD settings by constructing them, in a launcher process.

    Run before any process is started. Settings whose checks need the launched job are left to the
    processes: the world size (PALSGD's shard layout is checked against launch.num_processes instead)
    and DeepSpeed (its config is checked to be a readable JSON file here; its init needs the job).
    Mixed precision is checked here only where a GPU is present, so a GPU recipe validates on a CPU
    machine (``palsgd-hf train`` refuses to launch it there: :func:`palsgd_hf.cli.launch.check_hardware`).
    """
    values = dict(recipe.training)
    values["palsgd_shard_size"] = 1
    if cpu_only():
        values["bf16"] = values["fp16"] = False
    deepspeed, values["deepspeed"] = values.get("deepspeed"), None
    if isinstance(deepspeed, str):
        try:
            json.loads(Path(deepspeed).read_text())
        except (OSError, ValueError) as err:
            raise RecipeError(f"recipe {recipe.source}: deepspeed={deepspeed!r} is not a readable JSON file: {err}.") from None
    # The arguments' own warnings (a sync interval longer than the run, a weak pull) are about the run and shown.
    # (The single-worker warning, which would be about this one-process check, is the Trainer's: not issued here.)
    try:
        recipe.training_arguments(**values)
    except PALSGDConfigError as err:
        raise RecipeError(f"recipe {recipe.source}: {err}") from None
    except (ValueError, TypeError) as err:
        raise RecipeError(f"recipe {recipe.source}: {recipe.arguments_class.__name__} rejected it: {err}") from None
