"""Worker script: PALSGDTrainer with ``deepspeed=recipes/deepspeed/zero<N>.json`` (or plain DDP, ``--stage 0``).

Tiny GPT-Neo on the offline Shakespeare corpus, sequential sampling. With R replicas of S ranks
and ``--bs`` blocks per rank, replica r reads at step t the same contiguous blocks that rank r of
a 2-process DDP run with ``--bs`` x S blocks reads (accelerate deals batch j to rank j % world),
and the Trainer normalizes each rank's loss by its own tokens, so the two runs are one algorithm
on one data stream, sharded differently.

Records per optimizer step the kind (from PALSGD's counters), the learning rate and the peer
bytes; the full weights after every sync (gathered within the replica under ZeRO-3); the saved
global model; the log history. Writes rank{R}.json into --out.
"""

import argparse
import contextlib
import faulthandler
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import TrainerCallback

from palsgd_hf.lm import build_lm_datasets, load_tokenizer, shakespeare_corpus
from palsgd_hf.integrations.trainer import PALSGDTrainer
from palsgd_hf.integrations.trainer_args import PALSGDTrainingArguments
from palsgd_hf.lm import build_causal_lm

BLOCK = 64
RECIPES = Path(__file__).resolve().parents[3] / "recipes" / "deepspeed"


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--run-dir", required=True, help="the Trainer's output_dir")
    ap.add_argument("--stage", type=int, default=2, help="ZeRO stage; 0 = no DeepSpeed (DDP)")
    ap.add_argument("--shard-size", type=int, default=1)
    ap.add_argument("--bs", type=int, default=2, help="blocks per rank and micro-batch")
    ap.add_argument("--ga", type=int, default=1, help="gradient accumulation steps")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--p", type=float, default=0.25)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--optim", default="adamw_torch", help="the inner optimizer (TrainingArguments.optim)")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--save-steps", type=int, default=0)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--from-launcher", action="store_true",
                    help="DeepSpeed set by `accelerate launch --use_deepspeed --deepspeed_config_file ...`, not deepspeed=")
    return ap.parse_args()


def gathered(trainer, stage: int) -> dict[str, torch.Tensor]:
    """The full model weights by name (ZeRO-3 gathers them within the replica: every rank of it calls this)."""
    named = list(trainer.model.named_parameters())
    context = contextlib.nullcontext()
    if stage == 3:
        import deepspeed

        context = deepspeed.zero.GatheredParameters([p for _, p in named])
    with context:
        return {name: p.detach().float().clone() for name, p in named}


def flat(weights: dict[str, torch.Tensor]) -> list:
    return torch.cat([w.flatten() for w in weights.values()]).tolist()


class Recorder(TrainerCallback):
    def __init__(self, args):
        self.args = args
        self.trainer = None
        self.rows: list[dict] = []
        self.synced: list = []
        self._lr = None
        self._last = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self._last is None:
            self._first_kind = {"warmup": "warmup_steps", "gradient": "gradient_steps",
                                "pseudo_sync": "pseudo_syncs"}[self.trainer.palsgd.step_kind().value]
        groups = self.trainer.palsgd.adapter.owned_groups()
        self._lr = float(groups[0].options["lr"])  # the inner LR this step runs with (before any scaling)

    def on_step_end(self, args, state, control, **kwargs):
        algo = self.trainer.palsgd
        done = {k: algo.counters[k] for k in ("warmup_steps", "gradient_steps", "pseudo_syncs")}
        if self._last is None:  # first step of this process (maybe resumed): counters as of the start
            self._last = {k: v - (1 if k == self._first_kind else 0) for k, v in done.items()}
        kind = next(k for k, v in done.items() if v != self._last[k])
        self._last = done
        self.rows.append({"step": state.global_step, "kind": kind, "lr": self._lr,
                          "peer_bytes": algo.peers.stats.bytes_sent})
        if kind != "warmup_steps" and state.global_step % self.args.H == 0:
            self.synced.append([state.global_step, flat(gathered(self.trainer, self.args.stage))])


def main() -> None:
    args = parse()
    if os.environ.get("PALSGD_TEST_DUMP_AFTER"):
        # A hang in a collective shows no error: dump every thread's stack before the test's timeout.
        faulthandler.dump_traceback_later(float(os.environ["PALSGD_TEST_DUMP_AFTER"]), exit=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # The model is built before the TrainingArguments: with a ZeRO-3 config they make from_config
    # partition it with zero.Init over the whole world (palsgd_hf refuses that); built first, it is
    # partitioned by deepspeed.initialize, within each replica.
    tokenizer = load_tokenizer("bpe-shakespeare-2048")
    model = build_causal_lm(tokenizer=tokenizer, seed=0)
    initial = flat({name: p.detach().float().clone() for name, p in model.named_parameters()})
    training_args = PALSGDTrainingArguments(
        output_dir=args.run_dir, max_steps=args.steps, per_device_train_batch_size=args.bs,
        gradient_accumulation_steps=args.ga,
        learning_rate=args.lr, optim=args.optim, lr_scheduler_type="linear", max_grad_norm=1.0, logging_steps=1,
        report_to="none",
        seed=0, save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        train_sampling_strategy="sequential", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
        bf16=args.bf16,
        deepspeed=str(RECIPES / f"zero{args.stage}.json") if args.stage and not args.from_launcher else None,
        palsgd_sync_interval=args.H, palsgd_pseudo_sync_prob=args.p, palsgd_warmup_steps=args.warmup,
        palsgd_mixing_rate=1.0, palsgd_shard_size=args.shard_size if args.stage else 1,
    )
    rank, world = training_args.process_index, training_args.world_size
    corpus = shakespeare_corpus()
    with training_args.main_process_first():
        train, val = build_lm_datasets(
            tokenizer, train_files=corpus.train_files[:4], validation_files=corpus.validation_files[:1],
            block_size=BLOCK, max_train_samples=args.bs * args.ga * world * (args.steps + 2), max_eval_samples=16,
        )
    recorder = Recorder(args)
    trainer = PALSGDTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=val, callbacks=[recorder])
    recorder.trainer = trainer
    result = trainer.train(resume_from_checkpoint=args.resume)
    eval_loss = trainer.evaluate()["eval_loss"]  # after train(): evaluating first breaks HF + DeepSpeed

    final_dir = Path(args.run_dir) / "final"
    trainer.save_model(str(final_dir))
    dist.barrier()
    saved = load_file(str(final_dir / "model.safetensors"))
    final = gathered(trainer, args.stage)
    # The file holds the global model (tied weights may be written twice under DeepSpeed: compare by name).
    saved_diff = max((saved[k].float() - w).abs().max().item() for k, w in final.items() if k in saved)
    engine = trainer.model_wrapped
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": world, "replica": trainer.palsgd.replica_index, "rows": recorder.rows,
        "synced": recorder.synced, "initial": initial, "final": flat(final), "saved_max_diff": saved_diff,
        "saved_missing": [k for k in final if k not in saved],
        "log_history": trainer.state.log_history, "train_loss": result.metrics["train_loss"], "eval_loss": eval_loss,
        "metrics": trainer.palsgd.metrics(), "global_step": trainer.state.global_step,
        "engine_global_steps": getattr(engine, "global_steps", None),
        "owned_numel": sum(t.numel() for g in trainer.palsgd.adapter.owned_groups() for t in g.tensors),
    }))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
