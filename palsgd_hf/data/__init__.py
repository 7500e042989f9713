"""Moved to :mod:`palsgd_hf.lm`; this name stays importable for a while."""

import warnings

from ..lm import *  # noqa: F401,F403
from ..lm import __all__  # noqa: F401

warnings.warn("palsgd_hf.data moved to palsgd_hf.lm; import from there.", DeprecationWarning, stacklevel=2)
