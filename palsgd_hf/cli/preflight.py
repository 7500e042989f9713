"""Before running a recipe here: does every model, tokenizer and Hub dataset it names exist?

Without this check a missing tokenizer directory or an uncached Hub name offline is found by every
launched process at once, after its imports, each with a traceback. ``palsgd-hf train`` (before it
launches) and ``palsgd_hf.cli.run`` (before its process group) call :func:`check_sources`; recipe
validation alone (``palsgd-hf check``) does not, since a recipe may be meant for another machine.

* a name that exists as a local path is used as one;
* a name that can only be a path (absolute, ``./``, ``../``, ``~``, two or more ``/``) must exist;
* any other name is a Hub repo id (``gpt2``, ``ORG/NAME``). Offline (``HF_HUB_OFFLINE``, or
  ``HF_DATASETS_OFFLINE`` for datasets) it must already be in a local cache; online the run fetches
  it and reports what the Hub says.

The built-in tokenizer ``bpe-shakespeare-<N>`` is built on demand and only checked for its form.

Local JSON / JSON-lines data files are also read up to their first row, which must hold what the
trainer reads: a string in ``text_column`` for ``causal_lm`` (chat rows there mean ``trainer: sft``),
``messages`` / ``text`` / ``prompt`` + ``completion`` for ``sft``, ``chosen`` + ``rejected`` for ``dpo``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from ..lm import resolve_cache_dir
from .recipe import RecipeError

BPE_PREFIX = "bpe-shakespeare-"
_TRUE = ("1", "ON", "YES", "TRUE")


def check_sources(recipe) -> None:
    """Raise :class:`~palsgd_hf.cli.recipe.RecipeError` for the first model/tokenizer/dataset this machine lacks."""
    spec = recipe.spec
    for key, name, kind in (("model", spec.model, "model"), ("tokenizer", spec.tokenizer, "model"),
                            ("dataset_name", spec.dataset_name, "dataset")):
        problem = missing_source(key, name, kind)
        if problem is not None:
            raise RecipeError(f"recipe {recipe.source}: {problem}")
    for path in (spec.train_files or []) + (spec.validation_files or []):
        problem = wrong_rows(path, spec.trainer, spec.text_column)
        if problem is not None:
            raise RecipeError(f"recipe {recipe.source}: {problem}")


# What each trainer reads from a row: any one of these groups of columns.
ROW_COLUMNS = {"sft": (("messages",), ("text",), ("prompt", "completion")), "dpo": (("chosen", "rejected"),)}


def wrong_rows(path: str, trainer: str, text_column: str = "text") -> Optional[str]:
    """Why the first row of a local JSON/JSON-lines file does not fit ``trainer``; None if it does (or not JSON)."""
    row = _first_row(Path(path))
    if row is None:
        return None
    if trainer == "causal_lm":
        value = row.get(text_column)
        if isinstance(value, str):
            return None
        if value is None:
            return f"{path}: its rows have no {text_column!r} column (they have {sorted(row)}); set text_column."
        chat = " (chat data: use trainer: sft)" if isinstance(value, list) else ""
        return f"{path}: text_column={text_column!r} holds {type(value).__name__}, not text{chat}."
    groups = ROW_COLUMNS[trainer]
    if any(all(c in row for c in group) for group in groups):
        return None
    wanted = " or ".join("+".join(group) for group in groups)
    return f"{path}: trainer: {trainer} reads rows with {wanted}; its first row has {sorted(row)}."


def _first_row(path: Path) -> Optional[dict]:
    if path.suffix.lower() not in (".json", ".jsonl") or not path.is_file():
        return None
    with path.open(encoding="utf-8") as f:
        head = f.readline().strip()
    try:
        row = json.loads(head)
    except ValueError:
        return None  # a JSON document over several lines (a list of rows): datasets will read it
    if isinstance(row, list):
        row = row[0] if row else None
    return row if isinstance(row, dict) else None


def missing_source(key: str, name: Optional[str], repo_type: str = "model") -> Optional[str]:
    """Why ``name`` (recipe key ``key``) cannot be loaded, as one sentence with the fix; None if it can."""
    if name is None:
        return None
    if key == "tokenizer" and name.startswith(BPE_PREFIX):
        if name[len(BPE_PREFIX):].isdigit():
            return None
        return f"tokenizer={name!r} is malformed: the built-in BPE is '{BPE_PREFIX}<vocab_size>'; use e.g. " \
               f"'{BPE_PREFIX}2048'."
    if Path(name).expanduser().exists():
        return None
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name):
        return (f"{key}={name!r}: not found (no such local path in {os.getcwd()}, and not a Hub repo id ORG/NAME); "
                "fix the path.")
    if _offline(repo_type) and not _cached(name, repo_type):
        flag = "HF_DATASETS_OFFLINE/HF_HUB_OFFLINE" if repo_type == "dataset" else "HF_HUB_OFFLINE"
        return (f"{key}={name!r} is not a local directory and not in the Hugging Face cache, and {flag}=1 forbids "
                "downloading it; download it once with network access (or give a local path), or unset "
                f"{flag.split('/')[0]}.")
    return None


def _offline(repo_type: str) -> bool:
    names = ["HF_HUB_OFFLINE"] + (["HF_DATASETS_OFFLINE"] if repo_type == "dataset" else [])
    return any(os.environ.get(n, "0").upper() in _TRUE for n in names)


def _cached(repo_id: str, repo_type: str) -> bool:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    hub = Path(os.environ.get("HF_HUB_CACHE", constants.HF_HUB_CACHE))
    snapshots = hub / repo_folder_name(repo_id=repo_id, repo_type=repo_type) / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return True
    if repo_type != "dataset":
        return False
    # datasets also reloads a Hub dataset offline from its own cache of prepared data (``ORG___NAME``),
    # which palsgd_hf keeps under its cache root unless HF_DATASETS_CACHE is set (lm/blocks.py).
    roots = [os.environ.get("HF_DATASETS_CACHE"), resolve_cache_dir(None) / "datasets",
             Path(constants.HF_HOME) / "datasets"]
    folder = repo_id.replace("/", "___")
    return any(root is not None and (Path(root) / folder).is_dir() for root in roots)
