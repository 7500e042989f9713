"""Where a recipe comes from: a local YAML path, ``hub:ORG/REPO/path.yaml[@revision]`` (downloaded with
``huggingface_hub``, so offline it must be in the cache) or ``builtin:NAME`` (shipped in cli/builtin/),
and how the relative paths inside it resolve (working directory, then the recipe's own directory,
then the same Hub repo).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the key, the rule and the fix."""


class Locator:
    """Where a recipe lives, and how relative paths inside it resolve."""

    def __init__(self, source: str):
        self.source = source
        self.hub: Optional[tuple[str, str, Optional[str]]] = None
        if source.startswith("hub:"):
            self.hub = _parse_hub(source)
            self.path = _hub_download(*self.hub, what=f"recipe {source}")
        elif source.startswith("builtin:"):
            name = source[len("builtin:"):]
            self.path = BUILTIN_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
            if not self.path.is_file():
                known = sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))
                raise RecipeError(f"recipe {source}: no built-in recipe {name!r}; built-in recipes: {known}.")
        else:
            self.path = Path(source).expanduser()
            if not self.path.is_file():
                raise RecipeError(
                    f"recipe {source}: file not found (relative to {os.getcwd()}); give a path to a YAML file, "
                    "hub:ORG/REPO/path.yaml[@revision] or builtin:NAME."
                )
        self.path = self.path.resolve()

    def resolve(self, key: str, ref: str) -> str:
        if not isinstance(ref, str) or not ref:
            raise RecipeError(f"{key}={ref!r}: expected a file path.")
        candidates = [Path(ref).expanduser()]
        if not candidates[0].is_absolute():
            candidates.append(self.path.parent / ref)
        for c in candidates:
            if c.is_file():
                return str(c.resolve())
        if self.hub is not None and not Path(ref).is_absolute():
            repo, filename, revision = self.hub
            inner = os.path.normpath(os.path.join(os.path.dirname(filename), ref))
            return str(_hub_download(repo, inner, revision, what=f"{key} of recipe {self.source}"))
        raise RecipeError(
            f"{key}={ref!r}: file not found (tried {', '.join(str(c) for c in candidates)}); fix the path "
            "(relative paths are tried against the working directory, then the recipe's directory)."
        )


def _parse_hub(source: str) -> tuple[str, str, Optional[str]]:
    body, _, revision = source[len("hub:"):].partition("@")
    parts = body.split("/")
    if len(parts) < 3 or not all(parts):
        raise RecipeError(f"recipe {source}: a Hub recipe is hub:ORG/REPO/path/in/repo.yaml[@revision].")
    return "/".join(parts[:2]), "/".join(parts[2:]), revision or None


def _hub_download(repo: str, filename: str, revision: Optional[str], *, what: str) -> Path:
    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename, revision=revision))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as err:
        raise RecipeError(
            f"{what}: could not fetch {filename!r} from Hub repo {repo!r} (revision {revision or 'main'}): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. Check the repo, path and "
            "revision; offline (HF_HUB_OFFLINE=1) the file must already be in the Hugging Face cache."
        ) from None
