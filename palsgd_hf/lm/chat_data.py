"""A small "pretrained" chat checkpoint and chat data, built offline: for tests, examples and CPU comparisons.

* :func:`build_chat_checkpoint` saves a tiny Llama (``LlamaForCausalLM``, random weights) with the
  package's byte-level BPE tokenizer and a chat template into a directory, the layout of a Hub
  checkpoint: ``AutoModelForCausalLM.from_pretrained(dir)`` and trl's ``model="dir"`` load it.
* :func:`write_chat_jsonl` writes conversational data (``messages``) as JSON lines: arithmetic
  questions with one exact answer each (``op`` "plus" or "minus"), so that a few hundred CPU steps
  show learning, and a base trained on one operation can be fine-tuned on the other.
* :func:`write_preference_jsonl` writes the same questions as DPO preference pairs.

The chat template marks the assistant turns with ``{% generation %}``, which trl's
``assistant_only_loss=True`` needs (loss on the answers only).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterator

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_chat_checkpoint(out_dir: str | Path, *, hidden_size: int = 64, layers: int = 2, seed: int = 0,
                          tokenizer: str = "bpe-shakespeare-2048") -> Path:
    """Save a tiny Llama + tokenizer (with :data:`CHAT_TEMPLATE`) to ``out_dir``; return it."""
    # transformers' model classes cost seconds to import: only when a checkpoint is built.
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .tokenizer import load_tokenizer

    out = Path(out_dir)
    tok = load_tokenizer(tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


OPS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b}


def _questions(n: int, seed: int, op: str = "plus") -> Iterator[tuple[str, str, str]]:
    """(question, right answer, wrong answer) triples, reproducible from the seed."""
    if op not in OPS:
        raise ValueError(f"op={op!r} is not one of {sorted(OPS)}; pick one of them.")
    rng = random.Random(seed)
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        right = OPS[op](a, b)
        wrong = right + rng.choice([-10, -1, 1, 10])
        yield f"What is {a} {op} {b}?", f"{a} {op} {b} is {right}.", f"{a} {op} {b} is {wrong}."


def write_chat_jsonl(path: str | Path, n: int, *, seed: int = 0, op: str = "plus") -> Path:
    """``n`` conversations ``{"messages": [user, assistant]}`` as JSON lines."""
    path = Path(path)
    with path.open("w") as f:
        for question, right, _ in _questions(n, seed, op):
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": right}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def write_preference_jsonl(path: str | Path, n: int, *, seed: int = 0, op: str = "plus") -> Path:
    """``n`` conversational preference pairs ``{"prompt", "chosen", "rejected"}`` as JSON lines (for DPO)."""
    path = Path(path)
    with path.open("w") as f:
        for question, right, wrong in _questions(n, seed, op):
            f.write(json.dumps({
                "prompt": [{"role": "user", "content": question}],
                "chosen": [{"role": "assistant", "content": right}],
                "rejected": [{"role": "assistant", "content": wrong}],
            }) + "\n")
    return path
