"""Worker script: a real PALSGDTrainer run (tiny GPT-Neo, Shakespeare, gloo), one rank per process.

Launched by tests/distributed/test_trainer.py through torchrun. Besides training it records, per
optimizer step, what the tests check against the schedule: the step kind, the collectives run
between the step's start and end (counted with the torch profiler, which sees every gloo
collective, also those DDP issues from C++), the loss each computed micro-batch returned next to
the model's own loss on it, and weight snapshots (at syncs, at the evaluation step, at the end).
Writes rank{R}.json and rank{R}.pt into --out.
"""

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.profiler import ProfilerActivity, profile
from transformers import Trainer, TrainerCallback, TrainingArguments

from palsgd_hf.config import PALSGDConfig
from palsgd_hf.core.algorithm import StepKind
from palsgd_hf.lm import build_lm_datasets, load_tokenizer, shakespeare_corpus
from palsgd_hf.integrations.trainer import PALSGDTrainer, PALSGDTrainerMixin
from palsgd_hf.integrations.trainer_args import PALSGDTrainingArguments
from palsgd_hf.lm import build_causal_lm

BLOCK = 64


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--run-dir", required=True, help="the Trainer's output_dir")
    ap.add_argument("--steps", type=int, default=44)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--p", type=float, default=0.25)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.003)
    ap.add_argument("--optim", default="adamw_torch", help="the inner optimizer (TrainingArguments.optim)")
    ap.add_argument("--bs", type=int, default=4)
    ap.add_argument("--ga", type=int, default=1)
    ap.add_argument("--eval-steps", type=int, default=0)
    ap.add_argument("--eval-on", default="global")
    ap.add_argument("--save-steps", type=int, default=0)
    ap.add_argument("--save-model-at", type=int, default=0,
                    help="call trainer.save_model(<run-dir>/model-at-N) at the end of this optimizer step")
    ap.add_argument("--crash-at", type=int, default=0, help="exit (as if killed) after the checkpoint at this step")
    ap.add_argument("--resume", default=None)
    ap.add_argument("--sequential", action="store_true", help="train_sampling_strategy='sequential'")
    ap.add_argument("--regroup-from-ga", type=int, default=1,
                    help="reorder the data: each rank's batch of bs = what it reads as this many micro-batches")
    ap.add_argument("--bf16", action="store_true", help="bf16 mixed precision (autocast)")
    ap.add_argument("--mixin", action="store_true", help="PALSGDTrainerMixin + plain TrainingArguments")
    ap.add_argument("--comm-timeout", type=float, default=None,
                    help="PALSGDConfig.comm_timeout_seconds (--mixin), else palsgd_comm_timeout_seconds")
    return ap.parse_args()


def datasets(args, training_args):
    corpus = shakespeare_corpus()
    tokenizer = load_tokenizer("bpe-shakespeare-2048")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = args.bs * args.ga * world
    n_train = per_step * (args.steps + 4)
    with training_args.main_process_first():
        train, val = build_lm_datasets(
            tokenizer, train_files=corpus.train_files[:4], validation_files=corpus.validation_files[:1],
            block_size=BLOCK, max_train_samples=n_train, max_eval_samples=32,
        )
    if args.regroup_from_ga > 1:
        train = train.select(regroup(len(train), args.bs // args.regroup_from_ga, args.regroup_from_ga, world))
    return tokenizer, train, val


def regroup(n: int, micro: int, ga: int, world: int) -> list[int]:
    """Order such that batch (t*world + r) of size ga*micro = rank r's ga micro-batches of step t.

    accelerate hands batch j of the sampler to rank j % world, so with ga micro-batches of size
    ``micro`` rank r reads, at step t, batches ((ga*t + m)*world + r) for m < ga.
    """
    order = []
    for t in range(n // (micro * ga * world)):
        for r in range(world):
            for m in range(ga):
                j = (ga * t + m) * world + r
                order.extend(range(j * micro, (j + 1) * micro))
    return order


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


class Recorder(TrainerCallback):
    """Per optimizer step: kind, collectives inside the step, palsgd metrics; weight snapshots."""

    def __init__(self, args, out: Path, rank: int):
        self.args, self.out, self.rank = args, out, rank
        self.trainer = None
        self.steps: list[dict] = []
        self.sync_snapshot = None
        self.snapshots: dict[str, torch.Tensor] = {}
        self._prof = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._prof = profile(activities=[ProfilerActivity.CPU])
        self._prof.__enter__()

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._prof.__exit__(None, None, None)
        names = [e.name for e in self._prof.events() if e.name.startswith("gloo:")]
        self._prof = None
        kind = optimizer.last_step_kind.value
        self.steps.append({"step": state.global_step, "kind": kind, "collectives": names})
        if kind == "warmup" or (state.global_step % self.args.H == 0):
            self.sync_snapshot = flat(model)  # workers hold the global model right after a sync
        if state.global_step == self.args.eval_steps:
            self.snapshots["anchor_at_eval"] = self.sync_snapshot
            self.snapshots["local_at_eval"] = flat(model)
        if state.global_step == self.args.steps:
            self.snapshots["local_last"] = flat(model)
        if state.global_step == self.args.save_model_at:
            # What a user's save_model() between two syncs writes; the weights must be this rank's own again after.
            self.snapshots["anchor_at_save"] = self.sync_snapshot
            self.snapshots["local_at_save"] = flat(model)
            self.trainer.save_model(str(Path(self.args.run_dir) / f"model-at-{state.global_step}"))
            self.snapshots["after_save"] = flat(model)

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.args.crash_at:
            (self.out / f"rank{self.rank}.json").write_text(json.dumps({"crashed_at": state.global_step}))
            dist.barrier()
            os._exit(0)  # no clean-up at all, as if the job had been killed here


class RecordingMixin:
    """Records what every computed micro-batch returned and the model's own loss on that batch."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        kind = self.palsgd.step_kind()
        row = {"step": self.state.global_step + 1, "kind": kind.value, "returned": loss.item()}
        if kind is not StepKind.PSEUDO_SYNC:
            with torch.no_grad():
                row["reference"] = self.model(**self._prepare_inputs(inputs)).loss.item()
        self.micro_batches.append(row)
        return loss


class RecordingPALSGDTrainer(RecordingMixin, PALSGDTrainer):
    micro_batches: list


class RecordingMixinTrainer(RecordingMixin, PALSGDTrainerMixin, Trainer):
    micro_batches: list


def gloo_timeout(group) -> float:
    """The timeout in force on a process group's gloo backend (None = the default group), in seconds."""
    group = group if group is not None else dist.distributed_c10d._get_default_group()
    return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()


def main() -> None:
    args = parse()
    out = Path(args.out)
    common = dict(
        output_dir=args.run_dir, max_steps=args.steps, per_device_train_batch_size=args.bs,
        per_device_eval_batch_size=8, gradient_accumulation_steps=args.ga, learning_rate=args.lr,
        optim=args.optim, lr_scheduler_type="linear", max_grad_norm=1.0, logging_steps=1, report_to="none", seed=0,
        eval_strategy="steps" if args.eval_steps else "no", eval_steps=args.eval_steps or None,
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        train_sampling_strategy="sequential" if args.sequential else "random",
        use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, bf16=args.bf16,
    )
    palsgd = dict(sync_interval=args.H, pseudo_sync_prob=args.p, warmup_steps=args.warmup, mixing_rate=1.0,
                  comm_timeout_seconds=args.comm_timeout)
    if args.mixin:
        training_args = TrainingArguments(**common)
        extra = {"palsgd_config": PALSGDConfig(**palsgd)}
        cls = RecordingMixinTrainer
    else:
        training_args = PALSGDTrainingArguments(
            **common, **{f"palsgd_{k}": v for k, v in palsgd.items()}, palsgd_eval_on=args.eval_on
        )
        extra = {}
        cls = RecordingPALSGDTrainer
    rank, world = training_args.process_index, training_args.world_size
    tokenizer, train, val = datasets(args, training_args)
    model = build_causal_lm(tokenizer=tokenizer, seed=0)
    initial = flat(model)
    recorder = Recorder(args, out, rank)
    trainer = cls(model=model, args=training_args, train_dataset=train, eval_dataset=val, callbacks=[recorder], **extra)
    recorder.trainer = trainer
    trainer.micro_batches = []
    result = trainer.train(resume_from_checkpoint=args.resume)

    final = flat(trainer.model)
    final_dir = Path(args.run_dir) / "final"
    trainer.save_model(str(final_dir))
    trainer.save_state()
    dist.barrier()
    saved = load_file(str(final_dir / "model.safetensors"))
    named = dict(trainer.model.named_parameters())
    if args.save_model_at:  # rank 0 wrote it during training; every rank reads it back (after the barrier above)
        mid = load_file(str(Path(args.run_dir) / f"model-at-{args.save_model_at}" / "model.safetensors"))
        recorder.snapshots["saved_at_save"] = torch.cat([mid[k].float().flatten() for k in named])
    saved_diff = max((saved[k].float() - p.detach()).abs().max().item() for k, p in named.items() if k in saved)
    missing = [k for k in named if k not in saved]

    post_eval = {}
    if "anchor_at_eval" in recorder.snapshots:
        # Score the recorded weights now (after finalize nothing is swapped), to compare with what the
        # evaluation at --eval-steps logged during training.
        for key in ("anchor_at_eval", "local_at_eval"):
            torch.nn.utils.vector_to_parameters(recorder.snapshots[key], trainer.model.parameters())
            post_eval[key] = trainer.evaluate()["eval_loss"]
        torch.nn.utils.vector_to_parameters(final, trainer.model.parameters())

    torch.save({"initial": initial, "final": final, **recorder.snapshots}, out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": world, "steps": recorder.steps, "micro_batches": trainer.micro_batches,
        "log_history": trainer.state.log_history, "train_metrics": result.metrics, "metrics": trainer.palsgd.metrics(),
        "saved_max_diff": saved_diff, "saved_missing": missing, "post_eval": post_eval,
        "numel": final.numel(), "global_step": trainer.state.global_step,
        "timeouts": {"default": gloo_timeout(None), "peers": gloo_timeout(trainer.palsgd.peers.group),
                     "peers_communicator": trainer.palsgd.peers.timeout.total_seconds()},
    }))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
