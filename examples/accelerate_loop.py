"""A hand-written Accelerate training loop turned into PALSGD: the added lines end with ``# PALSGD``.

Causal-LM training of a tiny GPT-Neo on the offline Shakespeare corpus (palsgd_hf.lm), with
gradient accumulation, gradient clipping, an LR schedule, evaluation of the global model,
``accelerator.save_state`` / ``load_state`` checkpoints and an exact resume. Run it with two
processes (on CPU, ``--multi_gpu`` is what makes accelerate start two; ``--cpu`` starts one)::

    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_loop.py --max_steps 200
    torchrun --standalone --nproc_per_node 2 examples/accelerate_loop.py --method ddp

Each rank writes ``<output_dir>/rank<R>.json`` (losses, step kinds, metrics, a fingerprint of the
final weights) so that runs can be compared; the tests do exactly that.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import default_data_collator, get_cosine_schedule_with_warmup

from palsgd_hf import PALSGDConfig
from palsgd_hf.lm import build_lm_datasets, load_tokenizer, shakespeare_corpus
from palsgd_hf import PALSGDAccelerate, cpu_only  # PALSGD
from palsgd_hf.lm import build_causal_lm


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="palsgd", choices=["palsgd", "diloco", "localsgd", "ddp", "none"],
                    help="'none' runs the loop without PALSGD at all (plain accelerate DDP)")
    ap.add_argument("--max_steps", type=int, default=200, help="optimizer steps")
    ap.add_argument("--batch_size", type=int, default=8, help="per process, per micro-batch")
    ap.add_argument("--grad_accum", type=int, default=2)
    ap.add_argument("--block_size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--sync_interval", type=int, default=16)
    ap.add_argument("--pseudo_sync_prob", type=float, default=None)
    ap.add_argument("--mixing_rate", type=float, default=5.0, help="c = lr*eta/p = 0.075 at the peak LR")
    ap.add_argument("--warmup_steps", type=int, default=16, help="PALSGD warm-up (synchronous) steps")
    ap.add_argument("--max_train_samples", type=int, default=None)
    ap.add_argument("--max_eval_samples", type=int, default=64)
    ap.add_argument("--eval_every", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    ap.add_argument("--save_state_at", type=int, default=0, help="accelerator.save_state after this step")
    ap.add_argument("--resume_from", default=None, help="a directory written by --save_state_at")
    ap.add_argument("--output_dir", default="outputs/accelerate_loop")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    accelerator = Accelerator(
        # Without cpu=True a GPU-less machine runs every launched process as its own 1-process job.
        cpu=cpu_only(),
        gradient_accumulation_steps=args.grad_accum,
        # A seeded shuffle that save_state/load_state can restore: needed for an exact resume.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(args.seed)
    config = None if args.method == "none" else PALSGDConfig(  # PALSGD
        method=args.method, sync_interval=args.sync_interval, pseudo_sync_prob=args.pseudo_sync_prob,  # PALSGD
        mixing_rate=args.mixing_rate, warmup_steps=args.warmup_steps, seed=args.seed,  # PALSGD
    )  # PALSGD
    palsgd = PALSGDAccelerate(accelerator, config)  # PALSGD

    tokenizer = load_tokenizer("bpe-shakespeare-2048")
    corpus = shakespeare_corpus()
    with accelerator.main_process_first():  # rank 0 tokenizes, the others read its cache
        train_ds, eval_ds = build_lm_datasets(
            tokenizer, train_files=corpus.train_files, validation_files=corpus.validation_files,
            block_size=args.block_size, max_train_samples=args.max_train_samples,
            max_eval_samples=args.max_eval_samples,
        )
    model = build_causal_lm(tokenizer=tokenizer, preset="tiny", seed=args.seed)
    train_loader = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, collate_fn=default_data_collator)
    eval_loader = DataLoader(eval_ds, batch_size=args.batch_size, collate_fn=default_data_collator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    # accelerate steps a scheduler num_processes times per optimizer step (its convention).
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, 10 * accelerator.num_processes, args.max_steps * accelerator.num_processes
    )
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )
    optimizer = palsgd.wrap(model, optimizer)  # PALSGD (after prepare; before load_state)

    step = 0
    if args.resume_from:
        accelerator.load_state(args.resume_from)  # PALSGD state comes back per rank, too
        step = json.loads(open(os.path.join(args.resume_from, "loop_step.json")).read())["step"]

    losses, kinds, evals = [], [], []
    start = time.perf_counter()
    epoch, skip = divmod(step * args.grad_accum, len(train_loader))
    while step < args.max_steps:
        train_loader.set_epoch(epoch)  # the seeded shuffle of this epoch, also after a resume
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        skip = 0
        for batch in loader:
            with accelerator.accumulate(model):
                if palsgd.should_compute():  # PALSGD: False on a pseudo-sync step (no forward/backward)
                    loss = model(**batch).loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), 1.0)
                    losses.append(loss.item())
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            kinds.append(palsgd.last_step_kind.value if palsgd.last_step_kind else "ddp")  # PALSGD
            accelerator.log({"train_loss": losses[-1] if losses else float("nan"), **palsgd.metrics()}, step=step)  # PALSGD
            if args.eval_every and step % args.eval_every == 0:
                evals.append([step, evaluate(model, eval_loader, accelerator, palsgd)])
            if step == args.save_state_at:
                save_dir = os.path.join(args.output_dir, f"state_step{step}")
                accelerator.save_state(save_dir)
                if accelerator.is_main_process:
                    with open(os.path.join(save_dir, "loop_step.json"), "w") as f:
                        json.dump({"step": step}, f)
            if step >= args.max_steps:
                break
        epoch += 1

    palsgd.finalize()  # PALSGD: one last sync, every rank now holds the global model
    eval_loss = evaluate(model, eval_loader, accelerator, palsgd)
    write_result(args, accelerator, model, palsgd, losses, kinds, evals, eval_loss, time.perf_counter() - start)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@torch.no_grad()
def evaluate(model, eval_loader, accelerator, palsgd) -> float:
    """Token-mean eval loss of the global model over all processes' shards of the eval set."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with palsgd.global_weights():  # PALSGD: evaluate the global model, not this rank's drifted copy
        for batch in eval_loader:
            tokens = batch["labels"][:, 1:].numel()
            total += torch.tensor([model(**batch).loss.item() * tokens, tokens], dtype=torch.float64)
    model.train()
    total = accelerator.reduce(total, reduction="sum")
    return (total[0] / total[1]).item()


def write_result(args, accelerator, model, palsgd, losses, kinds, evals, eval_loss, seconds) -> None:
    params = torch.cat([p.detach().flatten().double() for p in accelerator.unwrap_model(model).parameters()])
    result = {
        "rank": accelerator.process_index,
        "world_size": accelerator.num_processes,
        "method": args.method,
        "steps": len(kinds),
        "kinds": kinds,
        "losses": losses,
        "evals": evals,
        "eval_loss": eval_loss,
        "perplexity": math.exp(eval_loss),
        "seconds": seconds,
        "metrics": palsgd.metrics(),  # PALSGD
        "weights_sha256": hashlib.sha256(params.numpy().tobytes()).hexdigest(),
        "weights_sum": params.sum().item(),
    }
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, f"rank{accelerator.process_index}.json"), "w") as f:
        json.dump(result, f)
    if accelerator.is_main_process:
        print(f"{args.method}: {len(kinds)} steps, eval loss {eval_loss:.4f}, perplexity {math.exp(eval_loss):.1f}, "
              f"{seconds:.1f} s, palsgd {palsgd.metrics()}")


if __name__ == "__main__":
    main()
