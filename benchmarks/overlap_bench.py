"""Benchmark of the overlapped outer sync and bf16 pseudo-gradients over an emulated slow link.

    python benchmarks/overlap_bench.py --rate-mbit 100 --seeds 0,1,2 --out bench_overlap

Runs PALSGD (the benchmark harness's settings: GPT-Neo "small", Shakespeare, PALSGDTrainer, 2
workers, each in its own network namespace behind a tbf-shaped link) once per variant, every
variant the same number of optimizer steps (equal tokens), for each seed, and reports per variant:

* exposed communication per sync: the seconds the worker that launched the sync last blocked in
  it (it waits for no one, so that is transfer time left unhidden), from ``palsgd/sync_seconds_blocked``
  after every step, over the syncs completed before ``finalize()`` (whose last sync blocks in every
  variant); beside it the mean wait of all workers, which also counts waiting for the slower one
  (PALSGD's replicas skip compute on different steps, so they reach a sync at different times);
* seconds of communication hidden behind local steps (``palsgd/comm_seconds_overlapped``);
* the eval loss of the global model after ``finalize()`` (equal tokens), against the baseline's
  for the same seed (training at this scale is chaotic: rounding alone moves the loss by ~1%, so
  compare over several seeds);
* the pseudo-gradient bytes per sync.

The issue's targets: with overlap, exposed communication per sync <= 20% of the blocking
version's, and eval loss within 1% of it. Writes ``results.json`` and ``results.md`` into --out.
Needs root (network namespaces); ``--netns off`` runs on loopback (no shaping: a check of the
script, not of the claims).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: benchmarks/ is not installed

logger = logging.getLogger("overlap_bench")

# (label, overlap_steps, comm_dtype, fragments); the first is the baseline the others are compared with.
VARIANTS = {
    "blocking-fp32": (0, "fp32", 1),
    "overlap2-fp32": (2, "fp32", 1),
    "overlap4-fp32": (4, "fp32", 1),
    "blocking-bf16": (0, "bf16", 1),
    "overlap2-bf16": (2, "bf16", 1),
    "overlap4-bf16": (4, "bf16", 1),
    "blocking-int8": (0, "int8", 1),
    "blocking-int4": (0, "int4", 1),
    "blocking-int8-F4": (0, "int8", 4),
    "overlap2-int8-F4": (2, "int8", 4),
    "overlap2-int4-F4": (2, "int4", 4),
}


# ---------------------------------------------------------------------- one run, on every rank
def worker(spec_path: str) -> None:
    import torch.distributed as dist
    from transformers import TrainerCallback

    from benchmarks.harness.settings import MODEL_SIZES
    from benchmarks.harness.worker import load_spec, prepare_data, training_arguments
    from palsgd_hf.integrations.trainer import PALSGDTrainer
    from palsgd_hf.lm import build_causal_lm

    settings, run = load_spec(spec_path)
    targs = training_arguments(settings, "palsgd", str(Path(run["out"]).parent / "trainer"))
    # The harness's arguments plus the two settings under test (validated when the trainer reads them).
    targs.palsgd_overlap_steps = settings.extra["overlap_steps"]
    targs.palsgd_comm_dtype = settings.extra["comm_dtype"]
    targs.palsgd_fragments = settings.extra.get("fragments", 1)
    with targs.main_process_first():
        tokenizer, train, evals = prepare_data(settings)
    model = build_causal_lm(config_overrides=MODEL_SIZES[settings.model_size], tokenizer=tokenizer,
                            seed=settings.seed, preset="tiny")

    class Timeline(TrainerCallback):
        """Per optimizer step: the host clock at its end and the seconds blocked in syncs so far."""

        rows: list = []
        last: dict = {}

        def on_step_end(self, args, state, control, **kwargs):
            Timeline.last = trainer.palsgd.metrics()  # the last ones are those before finalize()
            Timeline.rows.append((state.global_step, time.time(), Timeline.last["sync_seconds_blocked"]))

    trainer = PALSGDTrainer(model=model, args=targs, train_dataset=train, eval_dataset=evals, callbacks=[Timeline()])
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    final_eval = trainer.evaluate()["eval_loss"]  # after finalize(): the global model, on every rank
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"before_finalize": Timeline.last, "after": trainer.palsgd.metrics(),
                                      "timeline": Timeline.rows, "train_seconds": train_seconds})
    if dist.get_rank() == 0:
        Path(run["out"]).write_text(json.dumps({"eval_loss": final_eval, "ranks": gathered}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------- the driver
def per_sync(record: dict, sync_interval: int, overlap: int) -> list[dict[str, float]]:
    """Each sync completed before finalize(): who launched last, and the seconds each rank blocked.

    All ranks block until the last one has launched the exchange, so a rank's wait mixes two
    things: waiting for a slower worker to arrive (load imbalance: PALSGD's replicas skip compute
    on different steps) and the transfer itself. The last rank to launch waits for no one: its
    blocked time is the exposed communication. Arrival = the host clock at the end of the launch
    step minus what that step blocked (the blocking sync's wait); the workers share the host's
    clock (one machine, one namespace each).
    """
    timelines = [{step: (t, blocked) for step, t, blocked in r["timeline"]} for r in record["ranks"]]
    last_step = max(timelines[0])
    out = []
    for launch in sorted(s for s in timelines[0] if s % sync_interval == 0 and s > 0):
        done = launch + overlap
        if done > last_step or launch - 1 not in timelines[0]:
            continue
        blocked = [tl[done][1] - tl[done - 1][1] for tl in timelines]
        arrival = [tl[launch][0] - (tl[launch][1] - tl[launch - 1][1]) for tl in timelines]
        if max(blocked) == 0.0 and overlap == 0:
            continue  # no sync at this step (still in warm-up)
        last = max(range(len(arrival)), key=arrival.__getitem__)
        out.append({"launch": launch, "exposed": blocked[last], "mean_blocked": sum(blocked) / len(blocked),
                    "arrival_skew": max(arrival) - min(arrival)})
    return out


def summarize(record: dict, sync_interval: int, overlap: int) -> dict[str, Any]:
    syncs = per_sync(record, sync_interval, overlap)
    per_rank = [r["before_finalize"] for r in record["ranks"]]
    n = max(len(syncs), 1)
    return {
        "eval_loss": record["eval_loss"],
        "syncs_measured": len(syncs),
        "exposed_s_per_sync": sum(s["exposed"] for s in syncs) / n,
        "blocked_s_per_sync": sum(s["mean_blocked"] for s in syncs) / n,
        "arrival_skew_s": sum(s["arrival_skew"] for s in syncs) / n,
        "hidden_s_per_sync": min(m["comm_seconds_overlapped"] for m in per_rank) / n,
        "train_seconds": max(r["train_seconds"] for r in record["ranks"]),
        "comm_bytes": record["ranks"][1]["after"]["comm_bytes"],
        "syncs": syncs,
    }


def aggregate(per_seed: dict[int, dict[str, Any]], base: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One variant over its seeds: per-sync figures averaged over every sync of every seed; the eval
    loss compared with the baseline of the same seed (same init, data order and coins)."""
    syncs = [x for r in per_seed.values() for x in r["syncs"]]
    n = max(len(syncs), 1)
    rel = [per_seed[s]["eval_loss"] / base[s]["eval_loss"] - 1 for s in per_seed]
    return {
        "seeds": sorted(per_seed),
        "syncs_measured": len(syncs),
        "exposed_s_per_sync": sum(x["exposed"] for x in syncs) / n,
        "blocked_s_per_sync": sum(x["mean_blocked"] for x in syncs) / n,
        "arrival_skew_s": sum(x["arrival_skew"] for x in syncs) / n,
        "hidden_s_per_sync": sum(r["hidden_s_per_sync"] * len(r["syncs"]) for r in per_seed.values()) / n,
        "eval_loss": [per_seed[s]["eval_loss"] for s in sorted(per_seed)],
        "eval_loss_vs_base": rel,
        "mean_eval_loss_vs_base": sum(rel) / len(rel),
        "comm_bytes": [per_seed[s]["comm_bytes"] for s in sorted(per_seed)],
        "train_seconds": [per_seed[s]["train_seconds"] for s in sorted(per_seed)],
    }


def markdown(results: dict[str, dict], link: str, settings: dict, steps: int) -> str:
    base = results[next(iter(results))]
    lines = [
        f"Link: {link} per worker; {settings['workers']} workers; GPT-Neo {settings['model_size']}; "
        f"{steps} optimizer steps per run (equal tokens); H={settings['sync_interval']}, "
        f"p={settings['pseudo_sync_prob']}, warm-up {settings['palsgd_warmup_steps']}; seeds {base['seeds']}.",
        "",
        "| variant | exposed comm s/sync | vs blocking | blocked s/sync (all waits) | arrival skew s | hidden s/sync "
        "| eval loss per seed (after finalize) | vs blocking, per seed | mean | MB sent (rank 1) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['exposed_s_per_sync']:.3f} | {r['exposed_s_per_sync'] / base['exposed_s_per_sync']:.1%} | "
            f"{r['blocked_s_per_sync']:.3f} | {r['arrival_skew_s']:.3f} | {r['hidden_s_per_sync']:.3f} | "
            f"{' / '.join(f'{x:.4f}' for x in r['eval_loss'])} | "
            f"{' / '.join(f'{x:+.2%}' for x in r['eval_loss_vs_base'])} | {r['mean_eval_loss_vs_base']:+.2%} | "
            f"{r['comm_bytes'][0] / 1e6:.2f} |"
        )
    lines += ["", "exposed comm = the wait of the worker that launched the sync last (it waits for no one: "
              "transfer only); blocked (all waits) also counts waiting for the slower worker to arrive."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)  # internal: one rank of one run
    ap.add_argument("--out", type=Path, default=Path("bench_overlap"))
    ap.add_argument("--rate-mbit", type=float, default=100.0)
    ap.add_argument("--netns", choices=("on", "off"), default="on")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated subset of {list(VARIANTS)}; the first is the baseline")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (model init, data order, coins)")
    ap.add_argument("--steps", type=int, default=160, help="the harness's DDP budget; PALSGD runs twice as many")
    ap.add_argument("--model-size", default="small")
    ap.add_argument("--sync-interval", type=int, default=32)
    ap.add_argument("--run-timeout", type=float, default=1800.0)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from benchmarks.harness.launch import launch
    from benchmarks.harness.netns import LinkSpec, NetnsCluster, cleanup_stale
    from benchmarks.harness.settings import BenchSettings
    from benchmarks.harness.worker import prepare_data

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise SystemExit(f"--variants {unknown or variants}: pick from {list(VARIANTS)}.")
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. 0,1,2.") from None
    # Evaluate only at the end (eval_every = steps): the score that counts is the one after finalize().
    settings = BenchSettings(model_size=args.model_size, steps=args.steps, eval_every=args.steps,
                             sync_interval=args.sync_interval, methods=("ddp", "palsgd"))
    prepare_data(settings)  # tokenize once, so the ranks read the datasets cache
    link = LinkSpec(rate_mbit=args.rate_mbit if args.netns == "on" else None)
    cluster = NetnsCluster(settings.workers, link) if args.netns == "on" else None
    runs: dict[str, dict[int, dict]] = {name: {} for name in variants}
    try:
        if cluster is not None:
            cleanup_stale()
            cluster.up()
        for seed in seeds:
            for name in variants:
                overlap, dtype, fragments = VARIANTS[name]
                run_dir = (args.out / f"{name}-seed{seed}").resolve()
                run_dir.mkdir(parents=True, exist_ok=True)
                run_settings = dataclasses.replace(settings, seed=seed,
                                                   extra={"overlap_steps": overlap, "comm_dtype": dtype,
                                                          "fragments": fragments})
                spec = {**run_settings.to_dict(), "method": "palsgd", "target_loss": None, "min_steps": 0,
                        "out": str(run_dir / "record.json")}
                (run_dir / "spec.json").write_text(json.dumps(spec, indent=1))
                logger.info("Run %s, seed %d", name, seed)
                launch([str(Path(__file__).resolve()), "--worker", str(run_dir / "spec.json")], settings.workers,
                       run_dir, cluster=cluster, timeout=args.run_timeout)
                record = json.loads((run_dir / "record.json").read_text())
                # Fragments sync every H / F steps (fragment i at floor(i H / F) of each period).
                runs[name][seed] = summarize(record, settings.sync_interval // fragments, overlap)
                logger.info("  %s", {k: v for k, v in runs[name][seed].items() if k != "syncs"})
    finally:
        if cluster is not None:
            cluster.down()
    results = {name: aggregate(runs[name], runs[variants[0]]) for name in variants}
    out = {"link": link.label, "settings": settings.to_dict(), "variants": {n: VARIANTS[n] for n in variants},
           "results": results, "runs": runs, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    (args.out / "results.json").write_text(json.dumps(out, indent=1))
    table = markdown(results, link.label, dataclasses.asdict(settings), settings.max_steps("palsgd"))
    (args.out / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
