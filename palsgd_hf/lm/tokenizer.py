"""Tokenizers: a small byte-level BPE trained on local text, or any Hugging Face tokenizer.

A 2k-8k vocabulary trained on the corpus itself keeps CPU runs fast (the GPT-2 50k vocabulary
makes the embedding and output layers dominate a tiny model) and needs no network. Training takes
about a second on the Shakespeare corpus; the result is cached under
``<cache root>/tokenizers/bpe-v1-<vocab_size>-<key>/`` (``save_pretrained`` format), where ``key``
hashes the names, sizes and contents of the training files, so a changed corpus trains a new one.

``load_tokenizer`` is the one entry point scripts and recipes use. Besides Hub names and local
directories it accepts ``"bpe-shakespeare-<N>"``: the byte-level BPE with vocabulary size N trained
on the training split of ``shakespeare_corpus()`` (e.g. ``"bpe-shakespeare-2048"``). That name
shadows a local directory of the same name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ._cache import build_once, resolve_cache_dir
from .corpus import shakespeare_corpus

logger = logging.getLogger(__name__)

ENDOFTEXT = "<|endoftext|>"
BPE_SHAKESPEARE_PREFIX = "bpe-shakespeare-"
# Bump when the training recipe changes, so old cached tokenizers are not reused.
_RECIPE_VERSION = 1
_MIN_VOCAB = 256 + 1  # the byte alphabet plus <|endoftext|>
_BPE_NAME_RE = re.compile(r"^bpe-shakespeare-(\d+)$")


def train_bpe_tokenizer(
    files: Sequence[str | os.PathLike],
    vocab_size: int = 2048,
    cache_dir: str | os.PathLike | None = None,
) -> PreTrainedTokenizerFast:
    """Train (or load from the cache) a byte-level BPE on ``files``.

    ``<|endoftext|>`` is token 0 and serves as eos, bos and pad. Every string round-trips exactly
    (byte-level, no normalisation, no added prefix space).
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < _MIN_VOCAB:
        raise ValueError(
            f"vocab_size={vocab_size!r}: a byte-level BPE needs an int >= {_MIN_VOCAB} "
            "(256 byte symbols plus <|endoftext|>); use e.g. 2048."
        )
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    paths = sorted({Path(f).resolve() for f in files})
    if not paths:
        raise ValueError("files is empty: pass at least one text file to train the tokenizer on.")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"Tokenizer training files not found: {missing}. Pass existing text files.")

    key = _files_key(paths, vocab_size)
    final = resolve_cache_dir(cache_dir) / "tokenizers" / f"bpe-v{_RECIPE_VERSION}-{vocab_size}-{key}"
    build_once(final, lambda tmp: _train(paths, vocab_size, tmp), what=f"a {vocab_size}-token BPE tokenizer")
    return PreTrainedTokenizerFast.from_pretrained(str(final))


def load_tokenizer(
    name_or_path: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    **from_pretrained_kwargs,
) -> PreTrainedTokenizerBase:
    """Load a tokenizer by Hub name, local directory, or ``"bpe-shakespeare-<N>"`` (see module doc).

    Causal-LM tokenizers often have no pad token (GPT-2); one is set to eos so that evaluation and
    padding collators work, and the choice is logged.
    """
    name = str(name_or_path)
    match = _BPE_NAME_RE.match(name)
    if match:
        corpus = shakespeare_corpus(cache_dir)
        return train_bpe_tokenizer(corpus.train_files, int(match.group(1)), cache_dir=cache_dir)
    if name.startswith(BPE_SHAKESPEARE_PREFIX) and not Path(name).exists():
        raise ValueError(
            f"tokenizer {name!r} looks like the built-in BPE but is malformed: the form is "
            f"'{BPE_SHAKESPEARE_PREFIX}<vocab_size>', e.g. '{BPE_SHAKESPEARE_PREFIX}2048'."
        )
    tokenizer = AutoTokenizer.from_pretrained(name, **from_pretrained_kwargs)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("Tokenizer %s has no pad token; using its eos token %r as pad.", name, tokenizer.eos_token)
    return tokenizer


def _files_key(paths: list[Path], vocab_size: int) -> str:
    # Names + sizes + contents: renaming the cache root keeps the key, editing a file changes it.
    # Hashing is ~10 ms for 5 MB, far below the cost of training.
    entries = []
    for p in paths:
        content = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                content.update(chunk)
        entries.append([p.name, p.stat().st_size, content.hexdigest()])
    blob = json.dumps({"recipe": _RECIPE_VERSION, "vocab_size": vocab_size, "files": entries})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _train(paths: list[Path], vocab_size: int, out_dir: Path) -> None:
    # Imported here: only training needs the low-level tokenizers API.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT],  # first, so it gets id 0 (the "tiny" model preset relies on it)
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(p) for p in paths], trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=ENDOFTEXT, bos_token=ENDOFTEXT, pad_token=ENDOFTEXT
    )
    wrapped.save_pretrained(str(out_dir))
    logger.info("Trained a byte-level BPE (%d tokens) on %d files", tok.get_vocab_size(), len(paths))
