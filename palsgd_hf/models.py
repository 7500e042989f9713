"""Moved to :mod:`palsgd_hf.lm.presets`; this name stays importable for a while."""

import warnings

from .lm.presets import *  # noqa: F401,F403
from .lm.presets import MODEL_PRESETS, build_causal_lm  # noqa: F401

warnings.warn("palsgd_hf.models moved to palsgd_hf.lm; import from there.", DeprecationWarning, stacklevel=2)
