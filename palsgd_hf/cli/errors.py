"""How the command line reports a user's mistake: one stderr line, exit code 2, no traceback.

Used by ``palsgd-hf`` and by the per-process entry (``python -m palsgd_hf.cli.run``), where every
rank prints the line: the first rank to exit makes torchrun stop the others, so rank 0 alone would
often be killed before its line got out. Bugs (any other exception) still raise.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Iterator

from ..config import PALSGDConfigError
from .launch import LaunchError
from .recipe import RecipeError


@dataclass
class Status:
    code: int = 0


@contextlib.contextmanager
def report_user_errors(prog: str = "palsgd-hf") -> Iterator[Status]:
    """Turn the user's mistakes into one stderr line and exit code 2 (no traceback); bugs still raise."""
    status = Status()
    try:
        yield status
    except (RecipeError, LaunchError, PALSGDConfigError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        status.code = 2
