"""Recipes: one flat YAML per training run, loaded from a file, the Hub, or the package; strictly checked.

A recipe names everything a run needs, at the top level::

    description: tiny GPT-Neo on Shakespeare, PALSGD         # free text
    model_preset: tiny          # or  model: EleutherAI/gpt-neo-125M  (Hub name or local dir)
    model_config: {num_layers: 2}                            # config overrides (optional)
    tokenizer: bpe-shakespeare-2048                          # Hub name, local dir, or the built-in BPE
    dataset: shakespeare        # or dataset_name/dataset_config (Hub), or train_files/validation_files
    block_size: 128
    learning_rate: 3.0e-3       # ...any TrainingArguments field...
    palsgd_method: palsgd       # ...and any palsgd_* field of PALSGDTrainingArguments
    launch: {num_processes: 2, launcher: torchrun}          # or launcher: accelerate + accelerate_config

Sources: a local path; ``hub:ORG/REPO/path/in/repo.yaml[@revision]`` (fetched with
``huggingface_hub.hf_hub_download``, so HF_HUB_OFFLINE and the local cache work as for models);
``builtin:NAME`` for the recipes shipped in ``palsgd_hf/cli/builtin/`` (the demo's).

Relative paths inside a recipe (train_files, validation_files, launch.accelerate_config,
deepspeed) are tried against the working directory first, then the recipe's own directory; for a
Hub recipe, the file is fetched from the same repo and revision.

Every key is checked before anything runs: unknown keys are errors (with the closest known name),
values are checked against their field's type (``--key value`` overrides are parsed as YAML first,
so ``--learning_rate 1e-3`` is a float), the data/model/launch choices must be consistent, and the
TrainingArguments + PALSGD settings are validated by constructing ``PALSGDTrainingArguments``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import enum
import logging
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from ..config import PALSGDConfigError
from ..devices import cpu_only
from ..integrations.trainer_args import PALSGDTrainingArguments
from ..lm import MODEL_PRESETS
from .launch import check_accelerate_config
from .recipe_source import BUILTIN_DIR, RecipeError  # noqa: F401 (both part of this module's API)
from .recipe_source import Locator as _Locator

logger = logging.getLogger(__name__)

DATASETS = ("shakespeare",)
LAUNCHERS = ("torchrun", "accelerate")
# TrainingArguments fields a recipe may not set: the recipe's own keys say these things.
_RESERVED = {"local_rank": "the launcher sets the rank"}


@dataclass
class LaunchSpec:
    """How ``palsgd-hf train`` starts the processes of one node."""

    num_processes: int = field(default=2, metadata={"help": "Processes (workers) on this node."})
    launcher: str = field(default="torchrun", metadata={"help": f"One of {LAUNCHERS}."})
    accelerate_config: Optional[str] = field(
        default=None, metadata={"help": "An `accelerate config` YAML (launcher: accelerate only)."}
    )


@dataclass
class RecipeSpec:
    """The recipe keys that are not TrainingArguments fields."""

    description: str = ""
    model: Optional[str] = field(default=None, metadata={"help": "Pretrained model: Hub name or local dir."})
    model_preset: Optional[str] = field(default=None, metadata={"help": "palsgd_hf.lm model preset built from scratch."})
    model_config: Optional[dict] = field(default=None, metadata={"help": "Model config overrides."})
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
    save_final_model: bool = field(default=True, metadata={"help": "trainer.save_model() (the global model) at the end."})


@dataclass
class Recipe:
    """A validated recipe: its source, its own keys, the launch section and the Trainer arguments."""

    source: str
    path: Path
    spec: RecipeSpec
    launch: LaunchSpec
    training: dict[str, Any]

    def training_arguments(self, **changes: Any):
        """``PALSGDTrainingArguments`` for this recipe (call inside the launched processes)."""
        values = {**self.training, **changes}
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and cpu_only() and "use_cpu" not in values:
            # Without use_cpu the Trainer's accelerate state on a GPU-less machine is single-process in
            # every rank: N independent runs instead of one data-parallel job.
            values["use_cpu"] = True
        return PALSGDTrainingArguments(**values)

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
        if dot:  # launch.num_processes, model_config.num_layers
            if head not in ("launch", "model_config"):
                raise RecipeError(f"override --{key}: only launch.* and model_config.* take dotted keys.")
            section = dict(merged.get(head) or {})
            section[rest] = value
            merged[head] = section
        else:
            merged[key] = value
    return merged


# ---------------------------------------------------------------------------------------------- checking
def _build(source: str, locator: _Locator, raw: dict[str, Any]) -> Recipe:
    spec_fields, launch_fields = _fields(RecipeSpec), _fields(LaunchSpec)
    training_fields = _training_fields()
    known = set(spec_fields) | set(training_fields) | {"launch"}
    spec_kw, training = {}, {}
    for key, value in raw.items():
        if not isinstance(key, str) or key not in known or key in _RESERVED:
            why = f" ({_RESERVED[key]})" if key in _RESERVED else ""
            raise RecipeError(f"recipe {source}: unknown key {key!r}{why}.{_suggest(key, known)}")
        if key == "launch":
            continue
        if key in spec_fields:
            if key in ("train_files", "validation_files") and isinstance(value, str):
                value = [value]  # one file needs no list brackets
            spec_kw[key] = coerce(key, value, spec_fields[key])
        elif key == "resume_from_checkpoint" and isinstance(value, bool):
            # `--resume_from_checkpoint true`: the last complete checkpoint in output_dir (reliability.py)
            training[key] = "true" if value else None
        else:
            training[key] = coerce(key, value, training_fields[key])
    launch_raw = raw.get("launch") or {}
    if not isinstance(launch_raw, dict):
        raise RecipeError(f"recipe {source}: launch must be a mapping (num_processes, launcher, accelerate_config).")
    launch_kw = {}
    for key, value in launch_raw.items():
        if key not in launch_fields:
            raise RecipeError(f"recipe {source}: unknown key 'launch.{key}'.{_suggest(key, launch_fields)}")
        launch_kw[key] = coerce(f"launch.{key}", value, launch_fields[key])
    spec, launch = RecipeSpec(**spec_kw), LaunchSpec(**launch_kw)
    _check_spec(source, spec, locator)
    _check_launch(source, launch, locator, training)
    if training.get("deepspeed") is not None and isinstance(training["deepspeed"], str):
        training["deepspeed"] = locator.resolve("deepspeed", training["deepspeed"])
    training.setdefault("output_dir", os.path.join("outputs", locator.path.stem))
    return Recipe(source=source, path=locator.path, spec=spec, launch=launch, training=training)


def _check_spec(source: str, spec: RecipeSpec, locator: _Locator) -> None:
    if spec.model is not None and spec.model_preset is not None:
        raise RecipeError(f"recipe {source}: model={spec.model!r} and model_preset={spec.model_preset!r}: set one.")
    if spec.model is None and spec.model_preset is None:
        spec.model_preset = "tiny"
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
    for key, minimum in (("block_size", 2), ("max_train_samples", 1), ("max_eval_samples", 1)):
        value = getattr(spec, key)
        if value is not None and value < minimum:
            raise RecipeError(f"recipe {source}: {key}={value} must be >= {minimum}.")


def _check_launch(source: str, launch: LaunchSpec, locator: _Locator, training: dict[str, Any]) -> None:
    if launch.num_processes < 1:
        raise RecipeError(f"recipe {source}: launch.num_processes={launch.num_processes} must be >= 1.")
    if launch.launcher not in LAUNCHERS:
        raise RecipeError(f"recipe {source}: launch.launcher={launch.launcher!r} is not one of {LAUNCHERS}.")
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
    # The arguments' own warnings (a sync interval longer than the run, a weak pull) are about the run and
    # shown; the single-worker one is about this one-process check, not the launched job, and dropped.
    quiet = logging.getLogger("palsgd_hf.integrations.trainer_args")
    only_run_warnings = _DropSingleWorkerWarning()
    quiet.addFilter(only_run_warnings)
    try:
        recipe.training_arguments(**values)
    except PALSGDConfigError as err:
        raise RecipeError(f"recipe {recipe.source}: {err}") from None
    except (ValueError, TypeError) as err:
        raise RecipeError(f"recipe {recipe.source}: TrainingArguments rejected it: {err}") from None
    finally:
        quiet.removeFilter(only_run_warnings)


class _DropSingleWorkerWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("PALSGD with a single worker")


# ---------------------------------------------------------------------------------------------- types
def _fields(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


_TRAINING_FIELDS: Optional[dict[str, Any]] = None


def _training_fields() -> dict[str, Any]:
    global _TRAINING_FIELDS
    if _TRAINING_FIELDS is None:
        hints = typing.get_type_hints(PALSGDTrainingArguments)
        _TRAINING_FIELDS = {f.name: hints[f.name] for f in dataclasses.fields(PALSGDTrainingArguments) if f.init}
    return _TRAINING_FIELDS


def coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field's type (int -> float and scalar -> str are allowed)."""
    allowed = _flatten(annotation)
    if value is None:
        if type(None) in allowed or Any in allowed:
            return None
        raise RecipeError(f"{key}: null is not allowed; give a value of type {_describe(allowed)}.")
    if Any in allowed or object in allowed:
        return value
    if isinstance(value, str) and str not in allowed:
        value = _number(value, allowed)  # YAML 1.1 reads 1e-3 (no dot) as a string
    if isinstance(value, bool):
        if bool in allowed:
            return value
    elif isinstance(value, int) and int in allowed:
        return value
    elif isinstance(value, (int, float)) and float in allowed:
        return float(value)
    elif isinstance(value, str) and (str in allowed or any(_is_enum(t) for t in allowed)):
        for t in allowed:
            if _is_enum(t) and str not in allowed and value not in {m.value for m in t}:
                raise RecipeError(f"{key}={value!r} is not one of {[m.value for m in t]}.")
        return value
    elif isinstance(value, list) and list in allowed:
        return value
    elif isinstance(value, dict) and dict in allowed:
        return value
    if str in allowed and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # YAML read `run_name: 123` as a number
    if any(not _is_plain(t) for t in allowed):
        return value  # a type we cannot check here (e.g. a config object): TrainingArguments will
    raise RecipeError(f"{key}={value!r} ({type(value).__name__}) should be {_describe(allowed)}.")


def _number(text: str, allowed: set) -> Any:
    for kind in (int, float):
        if kind in allowed:
            try:
                return kind(text)
            except ValueError:
                pass
    return text


def _flatten(annotation: Any) -> set:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        out = set()
        for arg in typing.get_args(annotation):
            out |= _flatten(arg)
        return out
    if origin is typing.Literal:
        return {type(a) for a in typing.get_args(annotation)}
    if origin in (list, tuple, Sequence):
        return {list}
    if origin is dict:
        return {dict}
    return {annotation}


def _is_enum(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, enum.Enum)


def _is_plain(t: Any) -> bool:
    return t in (bool, int, float, str, list, dict, type(None)) or _is_enum(t)


def _describe(allowed: set) -> str:
    return " or ".join(sorted("null" if t is type(None) else getattr(t, "__name__", str(t)) for t in allowed))


def _suggest(key: Any, known) -> str:
    close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else " See docs/cli.md for the recipe keys."
