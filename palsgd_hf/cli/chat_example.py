"""``palsgd-hf chat-example DIR``: a small local "pretrained" chat checkpoint and chat data, for the SFT recipes.

The recipes in ``recipes/sft/`` fine-tune a checkpoint directory on JSON-lines chat data, as a user
does with a Hub model; this command writes both, offline, so that they run on a CPU machine:

    DIR/model/                  a tiny Llama (random weights) + the package's BPE tokenizer with a chat template
    DIR/chat_train.jsonl        {"messages": [user, assistant]} arithmetic questions with one exact answer
    DIR/chat_validation.jsonl   held-out conversations of the same kind (another seed)
    DIR/preferences.jsonl       {"prompt", "chosen", "rejected"} pairs for DPO

(palsgd_hf.lm.chat_data builds them; the trl tests use the same builders.)
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional, Sequence

from ..lm import build_chat_checkpoint, write_chat_jsonl, write_preference_jsonl

logger = logging.getLogger(__name__)
DEFAULT_DIR = "outputs/chat-example"


def write_chat_example(out_dir: str | Path, *, rows: int = 800, seed: int = 0) -> Path:
    """Write the checkpoint and the data files under ``out_dir``; return it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_chat_checkpoint(out / "model", seed=seed)
    write_chat_jsonl(out / "chat_train.jsonl", rows, seed=seed)
    write_chat_jsonl(out / "chat_validation.jsonl", max(rows // 10, 1), seed=seed + 1)
    write_preference_jsonl(out / "preferences.jsonl", rows, seed=seed)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="palsgd-hf chat-example", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", nargs="?", default=DEFAULT_DIR, help=f"where to write (default: {DEFAULT_DIR})")
    parser.add_argument("--rows", type=int, default=800, help="training conversations (and preference pairs)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.rows < 10:
        parser.error(f"--rows {args.rows}: at least 10 rows, so that the validation file has one.")
    out = write_chat_example(args.dir, rows=args.rows, seed=args.seed)
    print(f"wrote {out}/model, chat_train.jsonl, chat_validation.jsonl, preferences.jsonl")
    return 0
