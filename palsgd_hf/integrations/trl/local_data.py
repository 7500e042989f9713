"""Moved to :mod:`palsgd_hf.lm.chat_data` (it needs no trl); this name stays one release for old imports."""

from ...lm.chat_data import (  # noqa: F401  (re-exported: every public name of the old module)
    CHAT_TEMPLATE, OPS, build_chat_checkpoint, write_chat_jsonl, write_preference_jsonl,
)
