"""What a recipe trains: its tokenizer, datasets, model and trainer, for each trainer kind.

* ``causal_lm``: text cut into ``block_size`` token blocks (:func:`palsgd_hf.lm.build_lm_datasets`),
  a preset built from scratch or a pretrained model, ``PALSGDTrainer``; LoRA through ``peft``'s
  ``get_peft_model`` when the recipe has a ``peft:`` mapping; with ``fsdp2: true`` the model is sharded with
  FSDP2 over each worker's ranks before the Trainer sees it.
* ``sft`` / ``dpo``: rows loaded as they are (JSON lines, JSON, Parquet, CSV or a Hub dataset) and
  handed to trl's ``SFTTrainer`` / ``DPOTrainer`` with PALSGD, which tokenize them (chat templates,
  ``assistant_only_loss``, packing: SFTConfig's fields); trl loads the model by name with the recipe's
  ``dtype`` / ``attn_implementation`` / ``trust_remote_code`` and applies the LoRA config itself.

Without validation files, ``validation_split_percentage`` of the training rows (seeded split) are held
out for evaluation in every kind, so every recipe reports an eval loss of the final global model.
"""

from __future__ import annotations

from typing import Any

from transformers import default_data_collator

from ..devices import cpu_only
from ..integrations.fsdp_trainer import shard_model
from ..integrations.trainer import PALSGDTrainer
from ..lm import build_causal_lm, build_lm_datasets, load_tokenizer, shakespeare_corpus
from .recipe_spec import data_loader


def build_trainer(recipe, callbacks: list) -> Any:
    """The trainer of ``recipe`` in this process (one rank of the job), with its arguments built here."""
    if recipe.spec.trainer == "causal_lm":
        return _causal_lm_trainer(recipe, callbacks)
    return _trl_trainer(recipe, callbacks)


# ---------------------------------------------------------------------------------------------- causal_lm
def _causal_lm_trainer(recipe, callbacks: list) -> PALSGDTrainer:
    spec = recipe.spec
    tokenizer = load_tokenizer(spec.tokenizer, **_tokenizer_kwargs(spec))
    model = None
    if cpu_only():
        # Before the TrainingArguments exist: with a ZeRO-3 config they make transformers build the
        # model inside deepspeed.zero.Init, whose world (DeepSpeed's comm, not initialized under
        # use_cpu) has one rank, and the batch-size check fails. ZeRO-3 partitions it later instead.
        model = _causal_lm(recipe, tokenizer, recipe.training.get("seed", 42))
    args = recipe.training_arguments()
    if spec.dataset == "shakespeare":
        corpus = shakespeare_corpus()
        data = {"train_files": corpus.train_files, "validation_files": corpus.validation_files}
    elif spec.dataset_name is not None:
        data = {"dataset_name": spec.dataset_name, "dataset_config": spec.dataset_config}
    else:
        data = {"train_files": spec.train_files, "validation_files": spec.validation_files}
    with args.main_process_first(desc="tokenizing the datasets"):
        train_ds, eval_ds = build_lm_datasets(
            tokenizer, **data, text_column=spec.text_column, block_size=spec.block_size,
            max_train_samples=spec.max_train_samples, max_eval_samples=spec.max_eval_samples,
            validation_split_percentage=spec.validation_split_percentage,
        )
    if model is None:
        model = _causal_lm(recipe, tokenizer, args.seed)  # on GPUs, inside zero.Init under ZeRO-3
    if spec.fsdp2:  # after the arguments: they start torch.distributed, which the replica meshes need
        shard_model(model, args.palsgd_shard_size)
    return PALSGDTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=default_data_collator, processing_class=tokenizer, callbacks=callbacks,
    )


def _causal_lm(recipe, tokenizer, seed: int):
    spec = recipe.spec
    model = build_causal_lm(spec.model, spec.model_config, tokenizer=tokenizer, seed=seed,
                            preset=spec.model_preset or "tiny",
                            model_kwargs=spec.model_kwargs() if spec.model is not None else None)
    lora = recipe.lora_config()
    if lora is not None:
        from peft import get_peft_model  # optional extra (peft): recipes with a peft: mapping only

        model = get_peft_model(model, lora)
    return model


# ---------------------------------------------------------------------------------------------- trl
def _trl_trainer(recipe, callbacks: list):
    from ..integrations import trl  # optional extra (trl): sft/dpo recipes only

    spec = recipe.spec
    args = recipe.training_arguments()
    with args.main_process_first(desc="loading the datasets"):
        train_ds, eval_ds = load_rows(spec, seed=args.seed)
    trainer_class = trl.PALSGDSFTTrainer if spec.trainer == "sft" else trl.PALSGDDPOTrainer
    return trainer_class(
        model=spec.model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        processing_class=load_tokenizer(spec.tokenizer, **_tokenizer_kwargs(spec)),
        peft_config=recipe.lora_config(), callbacks=callbacks,
    )


def load_rows(spec, *, seed: int):
    """(train, eval) rows of a trl recipe, untokenized: local files by suffix, or a Hub dataset."""
    from datasets import load_dataset  # the [demo] extra: imported by the runs that read data only

    if spec.dataset_name is not None:
        loaded = load_dataset(spec.dataset_name, spec.dataset_config)
        if "train" not in loaded:
            raise ValueError(f"dataset_name={spec.dataset_name!r} has no 'train' split (it has {sorted(loaded)}); "
                             "pick a dataset with one, or download it and pass train_files.")
        train, evals = loaded["train"], loaded.get("validation", loaded.get("test"))
    else:
        files = {"train": spec.train_files}
        if spec.validation_files is not None:
            files["validation"] = spec.validation_files
        loaded = load_dataset(data_loader(spec.train_files), data_files=files)
        train, evals = loaded["train"], loaded.get("validation")
    if evals is None:
        split = train.train_test_split(test_size=spec.validation_split_percentage / 100, seed=seed)
        train, evals = split["train"], split["test"]
    if spec.max_train_samples is not None:
        train = train.select(range(min(spec.max_train_samples, len(train))))
    if spec.max_eval_samples is not None:
        evals = evals.select(range(min(spec.max_eval_samples, len(evals))))
    return train, evals


def _tokenizer_kwargs(spec) -> dict[str, Any]:
    return {"trust_remote_code": True} if spec.trust_remote_code else {}
