"""Worker script of the reliability tests: a real PALSGDTrainer run (tiny GPT-Neo, Shakespeare, gloo)
with faults injected on purpose.

``--fault KIND:RANK:STEP`` (repeatable) makes rank RANK misbehave at optimizer step STEP:

* ``kill``: SIGKILL itself at the end of step STEP (no clean-up, as an OOM kill or a lost node).
* ``hang``: stop answering at the end of step STEP (sleep); only the collective timeout ends the job.
* ``kill-in-save``: SIGKILL itself halfway through writing its ``rng_state_{R}.pth`` of checkpoint-STEP,
  the last file a rank writes into a checkpoint.
* ``nan-weights``: its weights become NaN at the end of step STEP (a diverged local step between syncs).
* ``nan-pull``: its weights become NaN at the start of its first pseudo-sync step >= STEP, so the pull
  toward the anchor runs on non-finite weights.

A faulting rank writes ``fault{R}.json`` (the wall-clock time and step of the fault) first. A rank that
finishes writes ``rank{R}.json`` (log history, palsgd metrics, final eval loss) and ``rank{R}.pt`` (final
weights, flat). ``--resume last`` resumes from the last complete checkpoint (``resume_from_checkpoint=True``).
"""

import argparse
import io
import json
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from palsgd_hf.core.algorithm import StepKind
from palsgd_hf.lm import build_lm_datasets, load_tokenizer, shakespeare_corpus
from palsgd_hf.integrations.trainer import PALSGDTrainer
from palsgd_hf.integrations.trainer_args import PALSGDTrainingArguments
from palsgd_hf.lm import build_causal_lm

BLOCK = 64
KINDS = ("kill", "hang", "kill-in-save", "nan-weights", "nan-pull")


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--run-dir", required=True, help="the Trainer's output_dir")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--p", type=float, default=0.25)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--bs", type=int, default=4)
    ap.add_argument("--save-steps", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=None, help="palsgd_comm_timeout_seconds")
    ap.add_argument("--resume", default=None, help="a checkpoint path, or 'last'")
    ap.add_argument("--fault", action="append", default=[], help="KIND:RANK:STEP")
    args = ap.parse_args()
    args.faults = []
    for spec in args.fault:
        kind, rank, step = spec.split(":")
        if kind not in KINDS:
            raise SystemExit(f"--fault {spec}: KIND must be one of {KINDS}")
        args.faults.append((kind, int(rank), int(step)))
    return args


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


class Faults(TrainerCallback):
    """Injects this rank's faults at their steps."""

    def __init__(self, faults, out: Path, rank: int):
        self.faults = [(kind, step) for kind, r, step in faults if r == rank]
        self.out, self.rank = out, rank
        self.injected: list[dict] = []
        if any(kind == "kill-in-save" for kind, _ in self.faults):
            self._patch_torch_save()

    def mark(self, kind: str, step: int) -> None:
        record = {"kind": kind, "step": step, "time": time.time()}
        self.injected.append(record)
        (self.out / f"fault{self.rank}.json").write_text(json.dumps(self.injected))

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step + 1  # the step about to run
        for kind, at in self.faults:
            if kind == "nan-pull" and step >= at and not self._done(kind):
                # step_kind() is drawn once per step (get_batch_samples already drew it): asking again is free.
                if optimizer.algorithm.step_kind() is StepKind.PSEUDO_SYNC:
                    self.mark(kind, step)
                    poison(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        for kind, at in self.faults:
            if state.global_step != at:
                continue
            if kind == "kill":
                self.mark(kind, at)
                os.kill(os.getpid(), signal.SIGKILL)
            elif kind == "hang":
                self.mark(kind, at)
                time.sleep(3600)
            elif kind == "nan-weights":
                self.mark(kind, at)
                poison(model)

    def _done(self, kind: str) -> bool:
        return any(r["kind"] == kind for r in self.injected)

    def _patch_torch_save(self) -> None:
        step = next(step for kind, step in self.faults if kind == "kill-in-save")
        target = f"checkpoint-{step}{os.sep}rng_state_{self.rank}.pth"
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and str(f).endswith(target):
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                data = buffer.getvalue()
                with open(f, "wb") as fh:  # half a file on disk, then the process is gone
                    fh.write(data[: len(data) // 2])
                    fh.flush()
                    os.fsync(fh.fileno())
                self.mark("kill-in-save", step)
                time.sleep(1.0)  # give the other rank time to run ahead to the end of its save
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kwargs)

        torch.save = save


def poison(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))


def main() -> None:
    args = parse()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    training_args = PALSGDTrainingArguments(
        output_dir=args.run_dir, max_steps=args.steps, per_device_train_batch_size=args.bs,
        per_device_eval_batch_size=8, learning_rate=args.lr, lr_scheduler_type="linear", max_grad_norm=1.0,
        logging_steps=1, report_to="none", seed=0, save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
        palsgd_sync_interval=args.H, palsgd_pseudo_sync_prob=args.p, palsgd_warmup_steps=args.warmup,
        palsgd_mixing_rate=1.0, palsgd_comm_timeout_seconds=args.timeout,
    )
    rank = training_args.process_index
    tokenizer = load_tokenizer("bpe-shakespeare-2048")
    corpus = shakespeare_corpus()
    with training_args.main_process_first():
        train, val = build_lm_datasets(
            tokenizer, train_files=corpus.train_files[:4], validation_files=corpus.validation_files[:1],
            block_size=BLOCK, max_train_samples=args.bs * training_args.world_size * (args.steps + 4),
            max_eval_samples=32,
        )
    model = build_causal_lm(tokenizer=tokenizer, seed=0)
    faults = Faults(args.faults, out, rank)
    trainer = PALSGDTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=val, callbacks=[faults])
    resume = True if args.resume == "last" else args.resume
    trainer.train(resume_from_checkpoint=resume)
    final = flat(trainer.model)
    eval_loss = trainer.evaluate()["eval_loss"]
    torch.save({"final": final}, out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "global_step": trainer.state.global_step, "log_history": trainer.state.log_history,
        "metrics": trainer.palsgd.metrics(), "eval_loss": eval_loss, "final_finite": bool(torch.isfinite(final).all()),
        "injected": faults.injected, "eval_loss_finite": math.isfinite(eval_loss),
    }))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
