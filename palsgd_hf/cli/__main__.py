"""``python -m palsgd_hf.cli ...`` is ``palsgd-hf ...``."""

import sys

from .main import main

sys.exit(main())
