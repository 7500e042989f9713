"""The result of a recipe run: ``<output_dir>/result.json``, written by rank 0, read by the demo.

Keys are documented in docs/cli.md. Perplexity is ``exp`` of the token-weighted mean eval loss:
the Trainer's ``eval_loss`` already is that mean, so no metric module is needed for it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from ..state_files import atomic_write

RESULT_FILE = "result.json"
RESULT_VERSION = 1


def perplexity(eval_loss: Optional[float]) -> Optional[float]:
    """exp(eval loss) in nats; inf where the exponential overflows, None without a loss."""
    if eval_loss is None:
        return None
    return math.exp(eval_loss) if eval_loss < 700 else float("inf")


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as JSON atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(payload, indent=1, default=str).encode()))


def read_result(output_dir: Path) -> dict[str, Any]:
    return json.loads((Path(output_dir) / RESULT_FILE).read_text())
