"""The per-process training entry: one recipe, run by ``PALSGDTrainer`` on every launched process.

    torchrun --standalone --nproc_per_node 2 -m palsgd_hf.cli.run recipes/shakespeare-tiny/palsgd.yaml
    python -m palsgd_hf.cli.run RECIPE --launch.num_processes 1        # one process, on purpose

``palsgd-hf train RECIPE`` starts exactly this under the recipe's launcher; the benchmark and
multi-node users start it under their own ``torchrun --nnodes ...``. It builds the tokenizer, the
block datasets and the model the recipe names, trains, evaluates the final global model, saves
it, and rank 0 writes ``<output_dir>/result.json`` (keys documented in docs/cli.md): final eval
loss and perplexity (exp of the eval loss), wall time, tokens read and
computed, every rank's palsgd/* metrics, and the eval-loss history over steps and seconds.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch.distributed as dist
from transformers import TrainerCallback, default_data_collator

from .. import __version__
from ..lm import build_lm_datasets, load_tokenizer, shakespeare_corpus
from ..devices import cpu_only
from ..integrations.trainer import PALSGDTrainer
from ..lm import build_causal_lm
from .errors import report_user_errors
from .launch import check_world
from .preflight import check_sources
from .recipe import Recipe, load_recipe
from .result import RESULT_FILE, RESULT_VERSION, perplexity, write_json

logger = logging.getLogger(__name__)


class RunRecorder(TrainerCallback):
    """Eval and train losses over optimizer steps and wall-clock seconds since training began."""

    def __init__(self) -> None:
        self.start: Optional[float] = None
        self.evals: list[dict[str, float]] = []
        self.train_losses: list[dict[str, float]] = []

    def _elapsed(self) -> float:
        return 0.0 if self.start is None else time.perf_counter() - self.start

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            self.evals.append({"step": state.global_step, "elapsed_s": self._elapsed(), "eval_loss": metrics["eval_loss"]})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.train_losses.append({"step": state.global_step, "elapsed_s": self._elapsed(), "loss": logs["loss"]})


def run(recipe: Recipe) -> dict[str, Any]:
    """Train one recipe in this process (one rank of the job); return the result (rank 0 writes it)."""
    began = time.perf_counter()
    check_world(recipe.launch.num_processes)
    spec = recipe.spec
    tokenizer = load_tokenizer(spec.tokenizer)
    model = None
    if cpu_only():
        # Before the TrainingArguments exist: with a ZeRO-3 config they make transformers build the
        # model inside deepspeed.zero.Init, whose world (DeepSpeed's comm, not initialized under
        # use_cpu) has one rank, and the batch-size check fails. ZeRO-3 partitions it later instead.
        model = _build_model(spec, tokenizer, recipe.training.get("seed", 42))
    args = recipe.training_arguments()
    data: dict[str, Any] = {}
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
        model = _build_model(spec, tokenizer, args.seed)  # on GPUs, inside zero.Init under ZeRO-3
    recorder = RunRecorder()
    trainer = PALSGDTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=default_data_collator, processing_class=tokenizer, callbacks=[recorder],
    )
    output = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    final = trainer.evaluate()
    if spec.save_final_model:
        trainer.save_model()  # the global model (PALSGDTrainer syncs before the last step's save)
    result = _result(recipe, args, trainer, output, final, recorder, spec.block_size, began)
    if trainer.is_world_process_zero():
        write_json(Path(args.output_dir) / RESULT_FILE, result)
        write_json(Path(args.output_dir) / "recipe.json", {"source": recipe.source, **recipe.to_dict()})
        logger.info("Result written to %s", Path(args.output_dir) / RESULT_FILE)
    return result


def _build_model(spec, tokenizer, seed: int):
    return build_causal_lm(spec.model, spec.model_config, tokenizer=tokenizer, seed=seed,
                           preset=spec.model_preset or "tiny")


def _result(recipe, args, trainer, output, final, recorder, block_size, began) -> dict[str, Any]:
    palsgd = trainer.palsgd.metrics() if trainer.palsgd is not None else {}
    per_rank = _gather(palsgd)
    world = args.world_size
    micro = args.per_device_train_batch_size * block_size  # tokens in one micro-batch of one rank
    steps = output.global_step
    computed = sum(r.get("warmup_steps", 0) + r.get("gradient_steps", 0) for r in per_rank) if per_rank else steps * world
    eval_loss = final.get("eval_loss")
    return {
        "version": RESULT_VERSION,
        "palsgd_hf_version": __version__,
        "recipe": recipe.source,
        "method": recipe.training.get("palsgd_method", "palsgd"),
        "world_size": world,
        "global_steps": steps,
        "final_eval_loss": eval_loss,
        "final_perplexity": perplexity(eval_loss),
        "train_loss": output.training_loss,
        "train_runtime_s": output.metrics.get("train_runtime"),
        "wall_time_s": time.perf_counter() - began,
        "tokens_read": steps * args.gradient_accumulation_steps * world * micro,
        "tokens_computed": computed * args.gradient_accumulation_steps * micro,
        "comm_bytes_total": sum(r.get("comm_bytes", 0.0) for r in per_rank),
        "palsgd": palsgd,
        "palsgd_per_rank": per_rank,
        "eval_history": recorder.evals,
        "train_loss_history": recorder.train_losses,
    }


def _gather(metrics: dict[str, float]) -> list[dict[str, float]]:
    if not (dist.is_available() and dist.is_initialized()):
        return [metrics]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, metrics)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m palsgd_hf.cli.run RECIPE [--key value ...]``; user errors exit 2 with one line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank{rank}] %(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
    with report_user_errors("palsgd_hf.cli.run") as status:
        # The TrainingArguments are checked when run() builds them, once, in the real world size.
        recipe = load_recipe(argv[0], argv[1:], check_training=False)
        check_sources(recipe)
        run(recipe)
        # Only after success: a rank that failed exits at once, and torchrun stops the others.
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    return status.code


if __name__ == "__main__":
    sys.exit(main())
