"""The per-process training entry: one recipe, run by its PALSGD trainer on every launched process.

    torchrun --standalone --nproc_per_node 2 -m palsgd_hf.cli.run recipes/shakespeare-tiny/palsgd.yaml
    python -m palsgd_hf.cli.run RECIPE --launch.num_processes 1        # one process, on purpose

``palsgd-hf train RECIPE`` starts exactly this under the recipe's launcher; the benchmark and
multi-node users start it under their own ``torchrun --nnodes ...``. It builds the trainer the
recipe names (build.py: ``PALSGDTrainer`` on text blocks, or trl's SFT/DPO trainers with PALSGD),
trains, evaluates the final global model, saves it, and rank 0 writes ``<output_dir>/result.json``
(keys documented in docs/cli.md): final eval loss and perplexity (exp of the eval loss), wall time,
tokens read and computed (trl recipes: computed is trl's ``num_tokens``, read is null), every rank's
palsgd/* metrics, and the eval-loss history over steps and seconds.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch.distributed as dist
from transformers import TrainerCallback

from .. import __version__
from .build import build_trainer
from .errors import report_user_errors
from .launch import check_world
from .preflight import check_sources
from .recipe import Recipe, load_recipe
from .result import RESULT_FILE, RESULT_VERSION, perplexity, write_json

logger = logging.getLogger(__name__)


class RunRecorder(TrainerCallback):
    """Eval and train losses over optimizer steps and wall-clock seconds since training began.

    Each evaluation also records what the demo's link model needs (palsgd_hf/cli/demo_link.py):
    ``train_s``, the seconds since training began less the time spent in evaluations so far
    (including this one), and this rank's ``comm_bytes`` / ``comm_calls`` so far (the same counters
    as ``palsgd/comm_bytes`` in result.json, which count DDP's gradient buckets too).
    """

    def __init__(self) -> None:
        self.start: Optional[float] = None
        self.eval_seconds = 0.0
        self.trainer = None  # set by run() once built: its PALSGD algorithm holds the traffic counters
        self.evals: list[dict[str, float]] = []
        self.train_losses: list[dict[str, float]] = []

    def _elapsed(self) -> float:
        return 0.0 if self.start is None else time.perf_counter() - self.start

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            elapsed = self._elapsed()
            self.eval_seconds += float(metrics.get("eval_runtime", 0.0))
            self.evals.append({
                "step": state.global_step, "elapsed_s": elapsed, "eval_loss": metrics["eval_loss"],
                "train_s": max(0.0, elapsed - self.eval_seconds), **self._traffic(),
            })

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.train_losses.append({"step": state.global_step, "elapsed_s": self._elapsed(), "loss": logs["loss"]})

    def _traffic(self) -> dict[str, float]:
        """This rank's bytes and collectives sent so far (empty without PALSGD: no counters to read)."""
        algo = getattr(self.trainer, "palsgd", None)
        if algo is None:
            return {}
        # Local counters only (no collective): safe at any evaluation, on any subset of ranks.
        comms = (getattr(algo, "peers", None), getattr(algo, "replica", None))
        calls = sum(getattr(getattr(c, "stats", None), "calls", 0) for c in comms)
        return {"comm_bytes": algo.metrics()["comm_bytes"], "comm_calls": float(calls)}


def run(recipe: Recipe) -> dict[str, Any]:
    """Train one recipe in this process (one rank of the job); return the result (rank 0 writes it)."""
    began = time.perf_counter()
    check_world(recipe.launch.num_processes)
    recorder = RunRecorder()
    trainer = build_trainer(recipe, callbacks=[recorder])
    recorder.trainer = trainer
    args = trainer.args
    output = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    final = trainer.evaluate()
    if recipe.spec.save_final_model:
        trainer.save_model()  # the global model (or LoRA adapter): PALSGD syncs before the last step's save
    result = _result(recipe, args, trainer, output, final, recorder, began)
    if trainer.is_world_process_zero():
        write_json(Path(args.output_dir) / RESULT_FILE, result)
        write_json(Path(args.output_dir) / "recipe.json", {"source": recipe.source, **recipe.to_dict()})
        logger.info("Result written to %s", Path(args.output_dir) / RESULT_FILE)
    return result


def _result(recipe, args, trainer, output, final, recorder, began) -> dict[str, Any]:
    palsgd = trainer.palsgd.metrics() if trainer.palsgd is not None else {}
    per_rank = _gather(palsgd)
    world = args.world_size
    steps = output.global_step
    computed = (sum(r.get("warmup_steps", 0) + r.get("gradient_steps", 0) for r in per_rank) if per_rank
                else steps * world)
    tokens_read, tokens_computed = None, None
    if recipe.spec.trainer == "causal_lm":
        micro = args.per_device_train_batch_size * recipe.spec.block_size  # tokens in one micro-batch of one rank
        tokens_read = steps * args.gradient_accumulation_steps * world * micro
        tokens_computed = computed * args.gradient_accumulation_steps * micro
    else:  # rows of varying length: trl's own count of the tokens trained on (all ranks), from its last log
        tokens_computed = next((log["num_tokens"] for log in reversed(trainer.state.log_history)
                                if "num_tokens" in log), None)
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
        "tokens_read": tokens_read,
        "tokens_computed": tokens_computed,
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
