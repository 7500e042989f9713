"""``palsgd-hf``: run a recipe, check recipes, run the offline demo, run the benchmark.

    palsgd-hf demo [--tiny]                       # DDP vs PALSGD on Shakespeare, 2 CPU processes, a few minutes
    palsgd-hf train RECIPE [--key value ...]      # validate, then launch the recipe's processes
    palsgd-hf train RECIPE --dry-run              # validate and print the launch command only
    palsgd-hf check RECIPE [RECIPE ...]           # validate recipes (keys, types, PALSGD, launch)
    palsgd-hf bench ...                           # time-to-quality benchmark (benchmarks/bench.py)
    palsgd-hf chat-example [DIR]                  # a small local chat checkpoint + data for recipes/sft/

RECIPE is a YAML path, ``hub:ORG/REPO/path.yaml[@revision]`` or ``builtin:NAME``; see docs/cli.md.
Mistakes in what the user typed (a recipe key, a value, a launch that would run one process) end
with one line on stderr and exit code 2, before any process starts.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import yaml

from . import chat_example, demo, run
from .errors import report_user_errors
from .launch import build_command, check_hardware, format_command, in_launched_process, launch_env
from .preflight import check_sources
from .recipe import load_recipe

USAGE = __doc__.split("\n\n")[1]


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _show_warnings()
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        return _train(rest)
    if command == "check":
        return _check(rest)
    if command == "demo":
        return demo.main(rest)
    if command == "bench":
        return _bench(rest)
    if command == "chat-example":
        return chat_example.main(rest)
    print(f"palsgd-hf: error: unknown command {command!r}; one of train, check, demo, bench, chat-example.\n{USAGE}",
          file=sys.stderr)
    return 2


def _bench(argv: list[str]) -> int:
    """The benchmarks live in the checkout (benchmarks/, not installed): run them from there."""
    checkout = Path(__file__).resolve().parents[2]
    if not (checkout / "benchmarks" / "harness").is_dir():
        print("palsgd-hf: error: `palsgd-hf bench` runs the benchmarks of a source checkout (benchmarks/ is not "
              "installed with the package); clone the repository, `pip install -e .`, and run it there.",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(checkout))
    from benchmarks.harness.cli import main as bench_main  # the checkout's, found through the path just added

    return bench_main(argv)


def _train(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print("palsgd-hf train: error: give a recipe first: palsgd-hf train RECIPE [--key value ...]", file=sys.stderr)
        return 2
    dry_run = "--dry-run" in argv
    entry_args = [a for a in argv if a != "--dry-run"]
    if in_launched_process():
        # Already one process of a torchrun/accelerate job (the user launched `palsgd-hf train` itself).
        return run.main(entry_args)
    with report_user_errors("palsgd-hf train") as status:
        recipe = load_recipe(entry_args[0], entry_args[1:])  # everything checked before any process starts
        check_hardware(recipe)
        check_sources(recipe)  # a missing tokenizer/model/dataset: found here, not by every launched rank
        if recipe.launch.num_processes == 1 and not dry_run:
            return run.main(entry_args)
        cmd = build_command(recipe, entry_args)
        if dry_run:
            print(format_command(cmd))  # once, on stdout: what would run
            return 0
        print(f"palsgd-hf: {format_command(cmd)}", file=sys.stderr, flush=True)
        return subprocess.run(cmd, env=launch_env()).returncode
    return status.code


def _check(argv: list[str]) -> int:
    # `palsgd-hf check RECIPE [RECIPE ...] [--key value ...]`: the overrides apply to every recipe, as in train.
    first_flag = next((i for i, a in enumerate(argv) if a.startswith("--")), len(argv))
    sources, overrides = argv[:first_flag], argv[first_flag:]
    if not sources:
        print("palsgd-hf check: error: give one or more recipes (then any --key value overrides).", file=sys.stderr)
        return 2
    worst = 0
    for source in sources:
        if _is_accelerate_config(source):
            print(f"skip {source}: an accelerate launch config, not a recipe")
            continue
        with report_user_errors(f"palsgd-hf check {source}") as status:
            recipe = load_recipe(source, overrides)
            print(f"ok  {source}: {format_command(build_command(recipe, [source, *overrides]))}")
        worst = max(worst, status.code)
    return worst


def _show_warnings() -> None:
    """The library's warnings (a sync interval longer than the run, a weak pull...) reach the user of the
    command, which configures logging for its own process only (never at import)."""
    ours = logging.getLogger("palsgd_hf")
    if not ours.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("palsgd-hf: warning: %(message)s"))
        handler.setLevel(logging.WARNING)
        ours.addHandler(handler)
        ours.propagate = False


def _is_accelerate_config(source: str) -> bool:
    # So that `palsgd-hf check recipes/*/*.yaml` can pass over recipes/accelerate/*.yaml.
    try:
        raw = yaml.safe_load(open(source))
    except (OSError, yaml.YAMLError):
        return False  # not a local file (hub:, builtin:) or unreadable: load_recipe reports it
    return isinstance(raw, dict) and "distributed_type" in raw and "compute_environment" in raw

