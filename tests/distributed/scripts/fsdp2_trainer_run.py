"""Worker script: PALSGDTrainer on a model sharded with FSDP2 before the Trainer (or the plain DDP reference).

``--shard-size 2`` (4 processes): the tiny GPT-Neo, ``fully_shard`` on each block and at the root over
``shard_mesh(2)``, PALSGDTrainer with ``palsgd_shard_size=2``. ``--shard-size 1`` (2 processes): the same
model unsharded (DDP). Sequential sampling: with ``--bs`` blocks per rank and S ranks per replica,
replica r reads at step t the blocks that rank r of the 2-process run reads with ``--bs`` x S blocks
(accelerate deals batch j to rank j % world), so the two runs are one algorithm on one data stream.

Records per optimizer step the kind (from PALSGD's counters), the learning rate and the peer bytes;
the full weights after every sync (all-gathered within the replica); the final full weights; the saved
global model read back on every rank (and reloaded with ``from_pretrained`` on rank 0); the log history.
Writes rank{R}.json into --out.
"""

import argparse
import faulthandler
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from palsgd_hf.integrations.trainer import PALSGDTrainer
from palsgd_hf.integrations.trainer_args import PALSGDTrainingArguments
from palsgd_hf.lm import build_causal_lm, build_lm_datasets, load_tokenizer, shakespeare_corpus

BLOCK = 64


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--run-dir", required=True, help="the Trainer's output_dir")
    ap.add_argument("--shard-size", type=int, default=2, help="S ranks per replica (FSDP2); 1 = DDP reference")
    ap.add_argument("--bs", type=int, default=2, help="blocks per rank and micro-batch")
    ap.add_argument("--ga", type=int, default=1, help="gradient accumulation steps")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--p", type=float, default=0.25)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--optim", default="sgd", help="the inner optimizer (TrainingArguments.optim)")
    ap.add_argument("--save-steps", type=int, default=0)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (TrainingArguments.bf16)")
    ap.add_argument("--overlap-steps", type=int, default=0)
    return ap.parse_args()


def full_weights(model) -> dict[str, torch.Tensor]:
    """The full weights by name (DTensors all-gathered within the replica: every rank of it calls this)."""
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().clone()
            for n, p in model.named_parameters()}


def flat(weights: dict[str, torch.Tensor]) -> list:
    return torch.cat([w.flatten() for w in weights.values()]).tolist()


class Recorder(TrainerCallback):
    def __init__(self, args):
        self.args = args
        self.trainer = None
        self.rows: list[dict] = []
        self.synced: list = []
        self._last = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self._last is None:
            self._first_kind = {"warmup": "warmup_steps", "gradient": "gradient_steps",
                                "pseudo_sync": "pseudo_syncs"}[self.trainer.palsgd.step_kind().value]
        self._lr = float(self.trainer.palsgd.adapter.owned_groups()[0].options["lr"])

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
            self.synced.append([state.global_step, flat(full_weights(self.trainer.model))])


def shard(model, size: int):
    from torch.distributed.fsdp import fully_shard

    from palsgd_hf.adapters.fsdp import shard_mesh

    mesh = shard_mesh(size)  # collective: every rank, in the same order
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def main() -> None:
    args = parse()
    faulthandler.dump_traceback_later(float(os.environ.get("PALSGD_TEST_DUMP_AFTER", "400")), exit=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    training_args = PALSGDTrainingArguments(
        output_dir=args.run_dir, max_steps=args.steps, per_device_train_batch_size=args.bs,
        per_device_eval_batch_size=4, gradient_accumulation_steps=args.ga, learning_rate=args.lr, optim=args.optim,
        lr_scheduler_type="linear", max_grad_norm=1.0, logging_steps=1, report_to="none", seed=0,
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        train_sampling_strategy="sequential", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
        palsgd_sync_interval=args.H, palsgd_pseudo_sync_prob=args.p, palsgd_warmup_steps=args.warmup,
        palsgd_mixing_rate=1.0, palsgd_shard_size=args.shard_size, bf16=args.bf16,
        # Pinned, not the default: the tests' bound leaves room (weights travel 50x the bound) at this momentum.
        palsgd_outer_momentum=0.9,
        palsgd_overlap_steps=args.overlap_steps,
    )  # starts torch.distributed (gloo)
    rank, world = training_args.process_index, training_args.world_size
    tokenizer = load_tokenizer("bpe-shakespeare-2048")
    model = build_causal_lm(tokenizer=tokenizer, seed=0)
    initial = flat({n: p.detach().float().clone() for n, p in model.named_parameters()})
    if args.shard_size > 1:
        shard(model, args.shard_size)
    corpus = shakespeare_corpus()
    with training_args.main_process_first():
        train, val = build_lm_datasets(
            tokenizer, train_files=corpus.train_files[:4], validation_files=corpus.validation_files[:1],
            block_size=BLOCK, max_train_samples=args.bs * args.ga * world * (args.steps + 2), max_eval_samples=16,
        )
    recorder = Recorder(args)
    trainer = PALSGDTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=val,
                            processing_class=tokenizer, callbacks=[recorder])
    recorder.trainer = trainer
    result = trainer.train(resume_from_checkpoint=args.resume)
    eval_loss = trainer.evaluate()["eval_loss"]

    final_dir = Path(args.run_dir) / "final"
    trainer.save_model(str(final_dir))
    dist.barrier()
    final = full_weights(trainer.model)
    saved = load_file(str(final_dir / "model.safetensors"))  # written by rank 0, read back by every rank
    saved_diff = max((saved[k].float() - w).abs().max().item() for k, w in final.items() if k in saved)
    reloaded_diff = None
    if rank == 0:  # the file is a plain Transformers checkpoint
        reloaded = dict(AutoModelForCausalLM.from_pretrained(final_dir).named_parameters())
        reloaded_diff = max((reloaded[k].detach() - w).abs().max().item() for k, w in final.items())
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": world, "replica": trainer.palsgd.replica_index, "rows": recorder.rows,
        "synced": recorder.synced, "initial": initial, "final": flat(final), "saved_max_diff": saved_diff,
        "saved_missing": [k for k in final if k not in saved], "reloaded_max_diff": reloaded_diff,
        "log_history": trainer.state.log_history, "train_loss": result.metrics["train_loss"], "eval_loss": eval_loss,
        "metrics": trainer.palsgd.metrics(), "global_step": trainer.state.global_step,
        "adapter": type(trainer.palsgd.adapter).__name__, "wrapped": type(trainer.model_wrapped).__name__,
        "owned_numel": sum(t.numel() for g in trainer.palsgd.adapter.owned_groups() for t in g.tensors),
        "names": list(final), "checkpoints": sorted(p.name for p in Path(args.run_dir).glob("checkpoint-*")),
    }))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
