"""One benchmark run on one rank: PALSGDTrainer on Shakespeare, with the time-to-quality callback.

Launched by :mod:`.runner` under torchrun (``-m benchmarks.harness.worker --spec run.json``), one
process per worker. It trains through the user-facing path: the project's data helpers, a GPT-Neo
from ``palsgd_hf.lm``, :class:`PALSGDTrainer` with :class:`PALSGDTrainingArguments` (DDP is
``palsgd_method='ddp'``: accelerate's DistributedDataParallel all-reduces gradients every step),
plus :class:`~.callback.TimeToQualityCallback`, which writes the run's record.

The spec (JSON) holds the :class:`~.settings.BenchSettings` fields, ``method``, ``target_loss``
(None for DDP), ``min_steps`` and ``out`` (the record's path).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch.distributed as dist

from palsgd_hf.lm import build_lm_datasets, load_tokenizer, shakespeare_corpus
from palsgd_hf.integrations.trainer import PALSGDTrainer
from palsgd_hf.integrations.trainer_args import PALSGDTrainingArguments
from palsgd_hf.lm import build_causal_lm
from .callback import TimeToQualityCallback
from .settings import MODEL_SIZES, BenchSettings

logger = logging.getLogger(__name__)

_SPEC_KEYS = ("method", "target_loss", "min_steps", "out")


def load_spec(path: str) -> tuple[BenchSettings, dict]:
    spec = json.loads(Path(path).read_text())
    run = {k: spec.pop(k) for k in _SPEC_KEYS}
    for derived in ("eta", "model_overrides"):
        spec.pop(derived, None)
    spec["methods"] = tuple(spec["methods"])
    return BenchSettings(**spec), run


def prepare_data(settings: BenchSettings):
    """Tokenizer, train and eval datasets (cached: the runner calls this once before launching)."""
    tokenizer = load_tokenizer(f"bpe-shakespeare-{settings.vocab_size}")
    corpus = shakespeare_corpus()
    train, evals = build_lm_datasets(
        tokenizer, train_files=corpus.train_files, validation_files=corpus.validation_files,
        block_size=settings.block_size, max_eval_samples=settings.eval_samples,
    )
    return tokenizer, train, evals


def training_arguments(settings: BenchSettings, method: str, out_dir: str) -> PALSGDTrainingArguments:
    palsgd = {f"palsgd_{k}": v for k, v in settings.palsgd_config(method).items()}
    return PALSGDTrainingArguments(
        output_dir=out_dir,
        max_steps=settings.max_steps(method),
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=16,
        learning_rate=settings.learning_rate,
        # Constant after a short warm-up: methods run different step counts, and a decaying schedule
        # would give each a different learning-rate curve.
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=settings.lr_warmup_steps,
        weight_decay=0.0,
        max_grad_norm=1.0,
        eval_strategy="steps",
        eval_steps=settings.eval_every,
        logging_steps=settings.eval_every,
        save_strategy="no",
        report_to=[],
        seed=settings.seed,
        data_seed=settings.seed,
        use_cpu=True,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        disable_tqdm=True,
        **palsgd,
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", required=True, help="JSON file written by benchmarks.harness.runner")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    settings, run = load_spec(args.spec)
    targs = training_arguments(settings, run["method"], str(Path(run["out"]).parent / "trainer"))
    with targs.main_process_first():
        tokenizer, train, evals = prepare_data(settings)
    model = build_causal_lm(config_overrides=MODEL_SIZES[settings.model_size], tokenizer=tokenizer,
                            seed=settings.seed, preset="tiny")
    callback = TimeToQualityCallback(run["target_loss"], run["min_steps"], run["out"])
    trainer = PALSGDTrainer(model=model, args=targs, train_dataset=train, eval_dataset=evals, callbacks=[callback])
    try:
        trainer.train()
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
