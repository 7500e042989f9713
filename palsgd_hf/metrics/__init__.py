"""``evaluate`` metric modules shipped with palsgd_hf, loadable offline by path.

The metric scripts of the ``evaluate`` Hub (``evaluate.load("perplexity")``) need network; the
modules here live in the package (``metrics/<name>/<name>.py``) and load from disk.
"""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent
AVAILABLE = ("lm_perplexity",)


def metric_path(name: str) -> Path:
    """The directory of the shipped metric ``name`` (what ``evaluate.load`` takes)."""
    if name not in AVAILABLE:
        raise ValueError(f"metric {name!r} is not shipped with palsgd_hf; choose one of {AVAILABLE}.")
    return METRICS_DIR / name


def load_metric(name: str = "lm_perplexity", **kwargs):
    """``evaluate.load`` of a shipped metric, in memory (no arrow files written)."""
    import evaluate  # ~4 s to import: only when a metric is actually loaded

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(metric_path(name)), **kwargs)
