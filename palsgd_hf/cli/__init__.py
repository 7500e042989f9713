"""The ``palsgd-hf`` command: recipes (YAML) checked, launched and run, the demo, the benchmark entry.

    main.py       the command (train, check, demo, bench)     errors.py   one-line user errors
    recipe.py     a recipe: keys, types, overrides, checks     preflight.py  data/model/tokenizer exist
    recipe_source.py  where a recipe comes from (path, hub:, builtin:) and how its paths resolve
    launch.py     the launch command (torchrun / accelerate)   run.py      the per-process entry
    result.py     result.json                                  demo.py     DDP vs PALSGD, offline
    builtin/      the demo's recipes (``builtin:NAME``)
"""

from .main import main

__all__ = ["main"]
