"""Command line of the benchmark: ``python benchmarks/bench.py ...`` or ``palsgd-hf bench ...``.

    bench run       every method on every link (default subcommand); JSON + markdown + PNGs
    bench overhead  PALSGD's own time per step and memory, without communication
    bench project   the alpha-beta projection to cluster scale (optionally from a results.json)
    bench report    re-render a results.json (table and plots)
    bench cleanup   remove namespaces left by a benchmark that was killed (SIGKILL)

Bad arguments are refused before any work starts, with the rule and the fix.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from .netns import LinkSpec, NetnsUnavailable
from .settings import METHODS, MODEL_SIZES, BenchSettings, tiny_settings

DEFAULT_RATES_MBIT = (100.0, 1000.0)

SUBCOMMANDS = ("run", "overhead", "project", "report", "cleanup")


def _settings_args(p: argparse.ArgumentParser) -> None:
    d = BenchSettings()
    p.add_argument("--tiny", action="store_true", help="seconds-long settings that check the harness, not the claims")
    p.add_argument("--workers", type=int, default=None,
                   help=f"worker processes, one per namespace (default {d.workers})")
    p.add_argument("--model-size", choices=sorted(MODEL_SIZES), default=None, help=f"default {d.model_size}")
    p.add_argument("--steps", type=int, default=None, help=f"DDP's optimizer steps = the token budget ({d.steps})")
    p.add_argument("--local-step-factor", type=float, default=None,
                   help=f"local methods may take this many times DDP's steps ({d.local_step_factor})")
    p.add_argument("--batch-size", type=int, default=None, help=f"sequences per worker per step ({d.batch_size})")
    p.add_argument("--block-size", type=int, default=None, help=f"tokens per sequence ({d.block_size})")
    p.add_argument("--lr", type=float, default=None, help=f"inner AdamW learning rate ({d.learning_rate})")
    p.add_argument("--eval-every", type=int, default=None, help=f"steps between evaluations ({d.eval_every})")
    p.add_argument("--sync-interval", "-H", type=int, default=None, help=f"H of every local method ({d.sync_interval})")
    p.add_argument("--pseudo-sync-prob", "-p", type=float, default=None, help=f"PALSGD's p ({d.pseudo_sync_prob})")
    p.add_argument("--mixing-rate", type=float, default=None,
                   help=f"PALSGD's eta (default: the one giving a pull c=lr*eta/p of {d.pull_coefficient})")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help=f"synchronous steps before local steps start ({d.palsgd_warmup_steps})")
    p.add_argument("--outer-lr", type=float, default=None,
                   help=f"outer Nesterov lr of DiLoCo and PALSGD ({d.outer_lr})")
    p.add_argument("--outer-momentum", type=float, default=None,
                   help=f"outer Nesterov momentum of DiLoCo and PALSGD ({d.outer_momentum})")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--methods", default=None,
                   help=f"comma-separated runs, each one of {','.join(METHODS)}, optionally with '@H' or '@auto' (e.g. "
                   f"localsgd@8, palsgd@auto); must include ddp (default {','.join(d.methods)})")


_SETTING_OF = {"workers": "workers", "model_size": "model_size", "steps": "steps",
               "local_step_factor": "local_step_factor", "batch_size": "batch_size", "block_size": "block_size",
               "lr": "learning_rate", "eval_every": "eval_every", "sync_interval": "sync_interval",
               "pseudo_sync_prob": "pseudo_sync_prob", "mixing_rate": "mixing_rate",
               "warmup_steps": "palsgd_warmup_steps", "seed": "seed", "outer_lr": "outer_lr",
               "outer_momentum": "outer_momentum"}


def settings_from(args: argparse.Namespace) -> BenchSettings:
    values = {field: getattr(args, arg) for arg, field in _SETTING_OF.items() if getattr(args, arg) is not None}
    if args.methods:
        values["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    return tiny_settings(**values) if args.tiny else BenchSettings(**values)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench", description="Time to quality of DDP, Local SGD, DiLoCo and PALSGD "
                                 "over an emulated slow link (see BENCHMARKS.md).")
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run every method on every link")
    _settings_args(run)
    run.add_argument("--rate-mbit", type=float, action="append", default=None,
                     help="a shaped link of this many Mbit/s per worker (repeatable; default "
                     f"{' and '.join(f'{r:g}' for r in DEFAULT_RATES_MBIT)}, none with --netns off)")
    run.add_argument("--no-unshaped", action="store_true", help="skip the run without shaping")
    run.add_argument("--netns", choices=("auto", "on", "off"), default="auto",
                     help="on: require namespaces; off: loopback only (unshaped); auto: namespaces if permitted")
    run.add_argument("--overhead-steps", type=int, default=None,
                     help="steps of the overhead micro-benchmark after the runs (0 = skip; default 160, tiny 16)")
    run.add_argument("--run-timeout", type=float, default=1800.0, help="seconds before one run is stopped")
    run.add_argument("--no-plots", action="store_true")
    run.add_argument("--out", type=Path, default=Path("bench_out"), help="output directory (default bench_out/)")

    ovh = sub.add_parser("overhead", help="PALSGD's own work per step and memory, no communication")
    _settings_args(ovh)
    ovh.add_argument("--overhead-steps", type=int, default=160)
    ovh.add_argument("--out", type=Path, default=None, help="write overhead.json here")

    proj = sub.add_parser("project", help="alpha-beta projection to 8-64 GPUs, 10-400 Gbit/s, 125M-7B")
    proj.add_argument("--from", dest="results", type=Path, default=None,
                      help="a results.json: use its measured overhead and steps-to-target ratios, and check the "
                           "model against its measured step times")
    proj.add_argument("--mfu", type=float, default=0.40)
    proj.add_argument("--alpha-us", type=float, default=10.0, help="latency per ring hop in microseconds")
    proj.add_argument("--sync-bytes-per-param", type=float, default=4.0, help="4 = fp32 pseudo-gradient, 2 = bf16")
    proj.add_argument("--sync-interval", "-H", type=int, default=32)
    proj.add_argument("--pseudo-sync-prob", "-p", type=float, default=0.2)
    proj.add_argument("--out", type=Path, default=Path("bench_out/projection"))

    rep = sub.add_parser("report", help="re-render a results.json")
    rep.add_argument("results", type=Path)
    rep.add_argument("--out", type=Path, default=None, help="default: the results file's directory")

    sub.add_parser("cleanup", help="remove namespaces of killed benchmark runs")
    return ap


def _links(args: argparse.Namespace) -> list[LinkSpec]:
    # Default: the sitting of BENCHMARKS.md (unshaped, 100 Mbit/s and 1 Gbit/s); --netns off runs unshaped only.
    rates = args.rate_mbit if args.rate_mbit is not None else ([] if args.netns == "off" else list(DEFAULT_RATES_MBIT))
    links = ([] if args.no_unshaped else [LinkSpec(None)]) + [LinkSpec(r) for r in rates]
    if not links:
        raise ValueError("--no-unshaped with no --rate-mbit leaves nothing to run; give a rate or drop --no-unshaped.")
    return links


def cmd_run(args: argparse.Namespace, settings: BenchSettings, command: str) -> int:
    from .report import write_report
    from .runner import run_benchmark

    bench = run_benchmark(settings, _links(args), args.out, netns=args.netns, run_timeout=args.run_timeout,
                          overhead_steps=_overhead_steps(args, settings), command=command)
    paths = write_report(bench, args.out, plots=not args.no_plots)
    print(paths["markdown"].read_text())
    print(f"Results: {args.out}")
    return 0


def _overhead_steps(args: argparse.Namespace, settings: BenchSettings) -> int:
    steps = args.overhead_steps if args.overhead_steps is not None else (16 if args.tiny else 160)
    if steps and steps < 2 * settings.sync_interval:
        raise ValueError(f"--overhead-steps {steps} must be 0 or >= 2*H = {2 * settings.sync_interval}.")
    return steps


def cmd_overhead(args: argparse.Namespace, settings: BenchSettings) -> int:
    from .overhead import measure_overhead
    from .report import overhead_table

    result = measure_overhead(settings, steps=args.overhead_steps)
    print(overhead_table(result))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "overhead.json").write_text(json.dumps(result, indent=1))
    return 0


def cmd_project(args: argparse.Namespace) -> int:
    from .projection_report import write_projection

    paths = write_projection(args.out, results=args.results, mfu=args.mfu, alpha_s=args.alpha_us * 1e-6,
                             sync_bytes_per_param=args.sync_bytes_per_param, sync_interval=args.sync_interval,
                             pseudo_sync_prob=args.pseudo_sync_prob)
    print(paths["markdown"].read_text())
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    bench = json.loads(args.results.read_text())
    paths = write_report(bench, args.out or args.results.parent)
    print(paths["markdown"].read_text())
    return 0


def cmd_cleanup() -> int:
    from .netns import check_rights, cleanup_stale

    check_rights(shape=False)
    removed = cleanup_stale()
    print(f"removed {len(removed)} stale namespaces" + (f": {', '.join(removed)}" if removed else ""))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["run", *argv]  # `bench --rate-mbit 100` means `bench run --rate-mbit 100`
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(1)  # like every rank: one thread each (the overhead benchmark runs here)
    command = "python benchmarks/bench.py " + shlex.join(argv)
    try:  # everything that can be refused is refused here, before any work starts
        settings = settings_from(args) if args.command in ("run", "overhead") else None
        _validate(args, settings)
    except (ValueError, FileNotFoundError) as err:
        print(f"bench: error: {err}", file=sys.stderr)
        return 2
    try:
        if args.command == "run":
            return cmd_run(args, settings, command)
        if args.command == "overhead":
            return cmd_overhead(args, settings)
        if args.command == "project":
            return cmd_project(args)
        if args.command == "report":
            return cmd_report(args)
        return cmd_cleanup()
    except NetnsUnavailable as err:
        print(f"bench: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # The workers were stopped and the namespaces removed on the way out (finally blocks).
        print("bench: interrupted; workers stopped, namespaces removed. Finished runs are in partial.json.",
              file=sys.stderr)
        return 130


def _validate(args: argparse.Namespace, settings: Optional[BenchSettings]) -> None:
    if args.command == "run":
        _links(args)
        _overhead_steps(args, settings)
        if args.run_timeout <= 0:
            raise ValueError(f"--run-timeout {args.run_timeout} must be > 0 seconds.")
    elif args.command == "overhead" and args.overhead_steps < 2 * settings.sync_interval:
        raise ValueError(f"--overhead-steps {args.overhead_steps} must be >= 2*H = {2 * settings.sync_interval}.")
    elif args.command == "report" and not args.results.is_file():
        raise FileNotFoundError(f"{args.results} does not exist; pass the results.json a `bench run` wrote.")
    elif args.command == "project":
        if args.results is not None and not args.results.is_file():
            raise FileNotFoundError(f"--from {args.results} does not exist; pass the results.json a `bench run` wrote.")
        checks = ((0 < args.mfu <= 1, f"--mfu {args.mfu} must lie in (0, 1]"),
                  (args.alpha_us >= 0, f"--alpha-us {args.alpha_us} must be >= 0"),
                  (args.sync_bytes_per_param > 0, f"--sync-bytes-per-param {args.sync_bytes_per_param} must be > 0"),
                  (args.sync_interval >= 1, f"--sync-interval {args.sync_interval} must be >= 1"),
                  (0 <= args.pseudo_sync_prob < 1, f"--pseudo-sync-prob {args.pseudo_sync_prob} must lie in [0, 1)"))
        for ok, message in checks:
            if not ok:
                raise ValueError(message + ".")


if __name__ == "__main__":
    sys.exit(main())
