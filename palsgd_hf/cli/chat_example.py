"""``palsgd-hf chat-example DIR``: a small local "pretrained" chat checkpoint and chat data, for the SFT recipes.

The recipes in ``recipes/sft/`` fine-tune a checkpoint directory on JSON-lines chat data, as a user
does with a Hub model; this command writes both, offline, so that they run on a CPU machine:

    DIR/model/                  a tiny Llama (4 x 128) + the package's BPE tokenizer with a chat template,
                                "pretrained": fully fine-tuned for --base-steps steps on "plus" questions
    DIR/chat_train.jsonl        {"messages": [user, assistant]}: "minus" questions, a task the base has not seen
    DIR/chat_validation.jsonl   held-out "minus" conversations (another seed)
    DIR/preferences.jsonl       {"prompt", "chosen", "rejected"} "minus" pairs for DPO

The base takes about 15 s on 2 CPU cores (one process, trl's stock ``SFTTrainer``); ``--base-steps 0``
keeps the random weights (tests). palsgd_hf.lm.chat_data builds the pieces; the trl tests use them too.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import Optional, Sequence

from ..lm import build_chat_checkpoint, write_chat_jsonl, write_preference_jsonl

logger = logging.getLogger(__name__)
DEFAULT_DIR = "outputs/chat-example"


def write_chat_example(out_dir: str | Path, *, rows: int = 800, seed: int = 0, base_steps: int = 300) -> Path:
    """Write the checkpoint (trained ``base_steps`` steps on "plus") and the "minus" data under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if base_steps > 0:
        _pretrain(out, base_steps, seed)
    else:
        build_chat_checkpoint(out / "model", seed=seed)
    write_chat_jsonl(out / "chat_train.jsonl", rows, seed=seed + 2, op="minus")
    write_chat_jsonl(out / "chat_validation.jsonl", max(rows // 10, 1), seed=seed + 3, op="minus")
    write_preference_jsonl(out / "preferences.jsonl", rows, seed=seed + 2, op="minus")
    return out


def _pretrain(out: Path, steps: int, seed: int) -> None:
    """A tiny Llama fully fine-tuned on "plus" questions: a base that knows the chat format and the digits."""
    from datasets import load_dataset  # the [demo] extra
    from trl import SFTConfig, SFTTrainer  # the [trl] extra, which the SFT recipes need anyway

    scratch = out / "base-build"
    build_chat_checkpoint(scratch / "random", hidden_size=128, layers=4, seed=seed)
    plus = load_dataset("json", data_files=str(write_chat_jsonl(scratch / "plus.jsonl", 4000, seed=seed + 1)),
                        split="train")
    args = SFTConfig(output_dir=str(scratch / "run"), max_steps=steps, per_device_train_batch_size=8,
                     learning_rate=2e-3, lr_scheduler_type="constant", logging_steps=50, report_to="none", seed=seed,
                     use_cpu=True, bf16=False, activation_checkpointing=False, save_strategy="no", disable_tqdm=True,
                     max_length=64, assistant_only_loss=True, dataloader_num_workers=0)
    trainer = SFTTrainer(model=str(scratch / "random"), args=args, train_dataset=plus)
    trainer.train()
    trainer.save_model(str(out / "model"))
    trainer.processing_class.save_pretrained(str(out / "model"))
    shutil.rmtree(scratch)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="palsgd-hf chat-example", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", nargs="?", default=DEFAULT_DIR, help=f"where to write (default: {DEFAULT_DIR})")
    parser.add_argument("--rows", type=int, default=800, help="training conversations (and preference pairs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-steps", type=int, default=300,
                        help="steps of full fine-tuning on 'plus' questions for the base (0: random weights)")
    args = parser.parse_args(argv)
    if args.rows < 10:
        parser.error(f"--rows {args.rows}: at least 10 rows, so that the validation file has one.")
    if args.base_steps < 0:
        parser.error(f"--base-steps {args.base_steps}: 0 (random weights) or more.")
    out = write_chat_example(args.dir, rows=args.rows, seed=args.seed, base_steps=args.base_steps)
    print(f"wrote {out}/model, chat_train.jsonl, chat_validation.jsonl, preferences.jsonl")
    return 0
