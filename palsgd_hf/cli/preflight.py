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
"""

from __future__ import annotations

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
