"""Measured comparison: LoRA SFT of a small local checkpoint on 2 CPU processes, DDP vs PALSGD, with trl.

    .venv/bin/python scripts/trl_lora_compare.py --out runs/trl_lora      # a few minutes on 2 CPU cores

1. The base ("pretrained") checkpoint: a tiny Llama (palsgd_hf.lm.chat_data) fully
   fine-tuned on "plus" questions, one process, stock trl ``SFTTrainer``.
2. For each method, ``torchrun`` runs this script with ``--worker`` on 2 processes: LoRA SFT on
   "minus" questions with ``PALSGDSFTTrainer`` (``palsgd_method="ddp"``, the DDP baseline through
   the same code path, or PALSGD), then the eval loss (assistant tokens only) of the global model
   on held-out "minus" questions.
3. A markdown table on stdout (and table.md): eval loss, bytes each rank sent, bytes per sync, wall time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger("trl_lora_compare")

METHODS = ("ddp", "palsgd")


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="working directory (checkpoint, data, runs, table)")
    ap.add_argument("--steps", type=int, default=200, help="LoRA SFT optimizer steps per method")
    ap.add_argument("--base-steps", type=int, default=300, help="full fine-tuning steps of the base checkpoint")
    ap.add_argument("--worker", choices=METHODS, default=None, help=argparse.SUPPRESS)
    return ap.parse_args()


def sft_kwargs(out_dir: Path, steps: int) -> dict:
    """The SFT settings every run shares (fp32 on CPU, loss on the assistant answers)."""
    return dict(output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=8, per_device_eval_batch_size=16,
                learning_rate=2e-3, lr_scheduler_type="constant", logging_steps=20, report_to="none", seed=0,
                use_cpu=True, bf16=False, gradient_checkpointing=False, save_strategy="no", disable_tqdm=True,
                max_length=64, assistant_only_loss=True, dataloader_num_workers=0)


def build_base(work: Path, steps: int) -> Path:
    """The tiny Llama trained on "plus" questions: a checkpoint that knows the chat format and digits."""
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    from palsgd_hf.lm import build_chat_checkpoint, write_chat_jsonl

    base = work / "base"
    if (base / "done").exists():
        return base
    build_chat_checkpoint(work / "random", hidden_size=128, layers=4)
    plus = load_dataset("json", data_files=str(write_chat_jsonl(work / "plus.jsonl", 4000, seed=1)), split="train")
    trainer = SFTTrainer(model=str(work / "random"), args=SFTConfig(**sft_kwargs(work / "base_run", steps)),
                         train_dataset=plus)
    trainer.train()
    trainer.save_model(str(base))
    trainer.processing_class.save_pretrained(str(base))
    (base / "done").write_text("ok")
    return base


def worker(work: Path, method: str, steps: int) -> None:
    """One LoRA SFT run (2 processes under torchrun); rank 0 writes <method>.json."""
    import torch.distributed as dist
    from datasets import load_dataset
    from peft import LoraConfig

    from palsgd_hf.integrations.trl import PALSGDSFTConfig, PALSGDSFTTrainer

    # PALSGD: H = 16, p = 0.2, pull c = lr*eta/p = 2e-3*5/0.2 = 0.05 per pseudo-sync step, 8 warm-up steps.
    palsgd = dict(palsgd_method="ddp") if method == "ddp" else dict(
        palsgd_sync_interval=16, palsgd_pseudo_sync_prob=0.2, palsgd_mixing_rate=5.0, palsgd_warmup_steps=8)
    args = PALSGDSFTConfig(**sft_kwargs(work / f"run_{method}", steps), **palsgd)
    train = load_dataset("json", data_files=str(work / "minus_train.jsonl"), split="train")
    held_out = load_dataset("json", data_files=str(work / "minus_eval.jsonl"), split="train")
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    trainer = PALSGDSFTTrainer(model=str(work / "base"), args=args, train_dataset=train, eval_dataset=held_out,
                               peft_config=lora)
    before = trainer.evaluate()["eval_loss"]
    out = trainer.train()
    after = trainer.evaluate()
    m = trainer.palsgd.metrics()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    if args.process_index == 0:
        (work / f"{method}.json").write_text(json.dumps({
            "method": method, "eval_loss_before": before, "eval_loss": after["eval_loss"],
            "eval_token_accuracy": after.get("eval_mean_token_accuracy"), "train_runtime": out.metrics["train_runtime"],
            "comm_bytes": m["comm_bytes"], "outer_syncs": m["outer_syncs"], "trainable": trainable,
            "gradient_steps": m["gradient_steps"] + m["warmup_steps"], "pseudo_syncs": m["pseudo_syncs"],
            "foreign_collectives": m["foreign_collectives"],
        }))
    dist.barrier()
    dist.destroy_process_group()


def table(work: Path) -> str:
    rows = [json.loads((work / f"{m}.json").read_text()) for m in METHODS]
    lines = ["| method | eval loss (before -> after) | eval token acc. | bytes sent per rank | bytes per sync "
             "| computed / pseudo-sync steps | train time |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        per_sync = f"{4 * r['trainable']:,} ({r['outer_syncs']:.0f} syncs)" if r["method"] != "ddp" else "every step"
        lines.append(
            f"| {r['method']} | {r['eval_loss_before']:.3f} -> {r['eval_loss']:.3f} | {r['eval_token_accuracy']:.3f} "
            f"| {r['comm_bytes']:,.0f} | {per_sync} | {r['gradient_steps']:.0f} / {r['pseudo_syncs']:.0f} "
            f"| {r['train_runtime']:.1f} s |")
    return "\n".join(lines)


def main() -> None:
    args = parse()
    work = Path(args.out).resolve()
    if args.worker:
        worker(work, args.worker, args.steps)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work.mkdir(parents=True, exist_ok=True)
    from palsgd_hf.lm import write_chat_jsonl

    build_base(work, args.base_steps)
    write_chat_jsonl(work / "minus_train.jsonl", 4000, seed=2, op="minus")
    write_chat_jsonl(work / "minus_eval.jsonl", 256, seed=3, op="minus")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for method in METHODS:
        logger.info("LoRA SFT with method=%s on 2 processes ...", method)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        __file__, "--out", str(work), "--steps", str(args.steps), "--worker", method],
                       check=True, env=env, timeout=3600)
    result = table(work)
    (work / "table.md").write_text(result + "\n")
    logger.info("\n%s", result)


if __name__ == "__main__":
    main()
