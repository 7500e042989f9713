"""Worker script: a PALSGDTrainer run that carries a collective PALSGD did not issue.

Each ``--case`` is a path a user takes that puts a world collective, or DDP's own, inside the
steps where replicas may run different code (tiny GPT-Neo, offline Shakespeare, gloo):

* ``gather-in-loss``: a Trainer subclass that gathers a metric across ranks in ``compute_loss``
  (what trl's SFTTrainer does on every micro-batch);
* ``callback-all-reduce``: a callback that all-reduces in ``on_pre_optimizer_step``;
* ``warmup-1``: ``palsgd_warmup_steps=1`` (DDP rebuilds its buckets in the first forward after
  the first synced backward, which is then a local step);
* ``compile``: ``torch_compile=True`` (accelerate returns ``OptimizedModule(DDP(...))``);
* ``deepspeed-tokens``: DeepSpeed ZeRO-2 with ``include_num_input_tokens_seen`` (a gather after
  every micro-batch, after the engine stepped inside backward on gradient steps);
* ``deepspeed-best``: DeepSpeed ZeRO-2 with evaluations and checkpoints between syncs and
  ``load_best_model_at_end``: the kept model must be the best checkpoint's global model (its
  anchor), not each replica's own drifted weights.

Writes rank{R}.json into --out: the final weights, the step kinds, the palsgd metrics and how many
gloo collectives ran in the local phase.
"""

import argparse
import faulthandler
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from palsgd_hf.lm import build_lm_datasets, load_tokenizer, shakespeare_corpus
from palsgd_hf.integrations.trainer import PALSGDTrainer
from palsgd_hf.integrations.trainer_args import PALSGDTrainingArguments
from palsgd_hf.lm import build_causal_lm

RECIPES = Path(__file__).resolve().parents[3] / "recipes" / "deepspeed"
CASES = ("gather-in-loss", "callback-all-reduce", "warmup-1", "compile", "deepspeed-tokens", "deepspeed-best")


class GatherInLoss(PALSGDTrainer):
    """trl-style: a metric gathered over all ranks inside compute_loss, every micro-batch."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss = out[0] if return_outputs else out
        self.gathered.append(self.accelerator.gather_for_metrics(loss.detach().reshape(1)).mean().item())
        return out


class AllReduceBeforeStep(TrainerCallback):
    """A user's callback that all-reduces a number right before every optimizer step."""

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        dist.all_reduce(torch.ones(1))


class AnchorAtSave(TrainerCallback):
    """The global model (PALSGD's anchor over this rank's owned tensors) at every checkpoint."""

    def __init__(self):
        self.trainer = None
        self.anchors: dict[int, str] = {}

    def on_save(self, args, state, control, **kwargs):
        algo = self.trainer.palsgd
        self.anchors[state.global_step] = _sha(torch.cat([a.flatten() for a in algo._anchor.tensors]))


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().cpu().numpy().tobytes()).hexdigest()


class KindRecorder(TrainerCallback):
    """The kind of every optimizer step, read from PALSGD's counters (the same for every integration)."""

    def __init__(self):
        self.kinds: list[str] = []
        self.trainer = None
        self._last: dict = {}

    def on_step_end(self, args, state, control, **kwargs):
        counters = dict(self.trainer.palsgd.counters)
        grew = [k for k in ("warmup_steps", "gradient_steps", "pseudo_syncs") if counters[k] != self._last.get(k, 0)]
        names = {"warmup_steps": "warmup", "gradient_steps": "gradient", "pseudo_syncs": "pseudo_sync"}
        self.kinds.append(names[grew[0]])
        self._last = counters


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--case", choices=CASES, required=True)
    ap.add_argument("--coins", default="shared", choices=["shared", "per_replica"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--H", type=int, default=5)
    ap.add_argument("--p", type=float, default=0.3)
    return ap.parse_args()


def main() -> None:
    args = parse()
    faulthandler.dump_traceback_later(150, exit=False)  # a hang shows every thread's stack before the test's timeout
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer("bpe-shakespeare-2048")
    model = build_causal_lm(tokenizer=tokenizer, seed=0)  # before the arguments (see ds_trainer_run.py)
    extra = {}
    if args.case == "compile":
        extra = {"torch_compile": True, "torch_compile_backend": "aot_eager"}  # no C++ compiler needed on CPU
    if args.case == "deepspeed-tokens":
        extra = {"deepspeed": str(RECIPES / "zero2.json"), "include_num_input_tokens_seen": "all"}
    if args.case == "deepspeed-best":
        # Evaluations and checkpoints at steps 7 and 14: two and four local steps after the syncs at 5 and 10.
        extra = {"deepspeed": str(RECIPES / "zero2.json"), "eval_strategy": "steps", "eval_steps": 7,
                 "save_strategy": "steps", "save_steps": 7, "load_best_model_at_end": True,
                 "metric_for_best_model": "eval_loss", "per_device_eval_batch_size": 4,
                 # "Best" = the highest loss, i.e. the earliest checkpoint (step 7, mid-period): otherwise the final
                 # checkpoint, written after the last sync where every replica holds the global model, would win.
                 "greater_is_better": True}
    training_args = PALSGDTrainingArguments(
        output_dir=args.run_dir, max_steps=args.steps, per_device_train_batch_size=2, learning_rate=3e-3,
        lr_scheduler_type="linear", max_grad_norm=1.0, logging_steps=5, report_to="none", seed=0,
        **({} if "save_strategy" in extra else {"save_strategy": "no"}),
        use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
        palsgd_sync_interval=args.H, palsgd_pseudo_sync_prob=args.p, palsgd_mixing_rate=1.0,
        palsgd_warmup_steps=1 if args.case == "warmup-1" else 2, palsgd_coins=args.coins,
        palsgd_comm_timeout_seconds=60, **extra,
    )
    rank, world = training_args.process_index, training_args.world_size
    corpus = shakespeare_corpus()
    with training_args.main_process_first():
        train, val = build_lm_datasets(
            tokenizer, train_files=corpus.train_files[:2], validation_files=corpus.validation_files[:1],
            block_size=32, max_train_samples=2 * world * (args.steps + 2), max_eval_samples=8,
        )
    recorder, anchors = KindRecorder(), AnchorAtSave()
    callbacks = [recorder, anchors] + ([AllReduceBeforeStep()] if args.case == "callback-all-reduce" else [])
    cls = GatherInLoss if args.case == "gather-in-loss" else PALSGDTrainer
    trainer = cls(model=model, args=training_args, train_dataset=train, eval_dataset=val, callbacks=callbacks)
    trainer.gathered = []
    recorder.trainer = anchors.trainer = trainer
    trainer.train()
    final = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    ddp = getattr(trainer.palsgd.adapter, "ddp", None)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": world, "kinds": recorder.kinds, "metrics": trainer.palsgd.metrics(),
        "final_sha": hashlib.sha256(final.numpy().tobytes()).hexdigest(), "final_norm": final.norm().item(),
        "gathered": len(trainer.gathered), "model_type": type(trainer.model_wrapped).__name__,
        "ddp_found": ddp is not None, "ddp_grad_sync": None if ddp is None else ddp.require_backward_grad_sync,
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "owned_sha": _sha(torch.cat([t.flatten() for g in trainer.palsgd.adapter.owned_groups() for t in g.tensors])),
        "anchors_at_save": anchors.anchors, "best_checkpoint": trainer.state.best_model_checkpoint,
    }))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
