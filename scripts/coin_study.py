"""What shared coins cost (or save) against per-replica coins: quality and straggling, measured.

K workers of the real PALSGD core train a tiny GPT-Neo on the offline Shakespeare corpus in one
process (one thread per worker, collectives at a thread barrier: tests/helpers/threads.py), each on
its own shard of the data, for several seeds and both coin modes, with the same data, model init
and learning-rate schedule. Reported per mode: the global model's validation loss at the end
(median and spread over seeds), and the straggling a real cluster would pay at each sync: the
slowest replica's gradient steps in the period minus the mean (with shared coins it is 0 by
construction; with per-replica coins every sync waits for the replica that flipped the most
gradient steps).

    .venv/bin/python scripts/coin_study.py --workers 4 --steps 240 --seeds 3
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from palsgd_hf.adapters.module import ModuleAdapter  # noqa: E402
from palsgd_hf.config import PALSGDConfig  # noqa: E402
from palsgd_hf.core.algorithm import PALSGD, StepKind  # noqa: E402
from palsgd_hf.lm import build_lm_datasets, load_tokenizer, shakespeare_corpus  # noqa: E402
from palsgd_hf.lm import build_causal_lm  # noqa: E402
from tests.helpers.threads import run_threads  # noqa: E402

BLOCK, BATCH = 64, 4


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--p", type=float, default=0.2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eta", type=float, default=1.0)
    return ap.parse_args()


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    tokenizer = load_tokenizer("bpe-shakespeare-2048")
    corpus = shakespeare_corpus()
    train, val = build_lm_datasets(
        tokenizer, train_files=corpus.train_files[:8], validation_files=corpus.validation_files[:1],
        block_size=BLOCK, max_train_samples=args.workers * BATCH * args.steps, max_eval_samples=64,
    )
    train_ids = torch.tensor(train["input_ids"])
    val_ids = torch.tensor(val["input_ids"])
    rows = []
    for coins in ("shared", "per_replica"):
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            started = time.perf_counter()
            loss, straggle = run(args, coins, seed, train_ids, val_ids)
            rows.append((coins, seed, loss, straggle))
            print(f"{coins:12s} seed {seed}: eval loss {loss:.4f}, straggling {straggle:.2f} steps/sync "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    print(f"\nK={args.workers} workers, {args.steps} steps, H={args.H}, p={args.p}, lr={args.lr}, eta={args.eta}")
    print("| coins | eval loss, median (min-max) over seeds | straggling: slowest replica's extra gradient steps "
          "per sync (mean) |")
    print("|---|---|---|")
    for coins in ("shared", "per_replica"):
        losses = [r[2] for r in rows if r[0] == coins]
        straggles = [r[3] for r in rows if r[0] == coins]
        print(f"| {coins} | {statistics.median(losses):.4f} ({min(losses):.4f}-{max(losses):.4f}) | "
              f"{statistics.mean(straggles):.2f} ({statistics.mean(straggles) / (args.H * (1 - args.p)):.1%} of a "
              "period's gradient steps) |")


def run(args, coins: str, seed: int, train_ids: torch.Tensor, val_ids: torch.Tensor) -> tuple[float, float]:
    cfg = PALSGDConfig(sync_interval=args.H, pseudo_sync_prob=args.p, mixing_rate=args.eta, warmup_steps=8,
                       outer_momentum=0.5, seed=seed, coins=coins)

    # Built once, copied per worker: build_causal_lm seeds torch's global generator, and worker threads doing that
    # at the same time interleave their draws, so the workers (and the runs) would start from different models.
    base = build_causal_lm(vocab_size=2048, seed=seed)

    def worker(rank, comm):
        model = copy.deepcopy(base)
        inner = torch.optim.AdamW(model.parameters(), lr=args.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(inner, lambda t: max(0.0, 1 - t / args.steps))
        algo = PALSGD(cfg, ModuleAdapter(model, inner), peers=comm, replica_index=rank)
        gradient_steps, per_period = 0, []
        for t in range(args.steps):
            kind = algo.step_kind()
            if kind is not StepKind.PSEUDO_SYNC:
                at = (t * args.workers + rank) * BATCH % len(train_ids)
                batch = train_ids[at : at + BATCH]
                model(input_ids=batch, labels=batch).loss.backward()
                gradient_steps += kind is StepKind.GRADIENT
            algo.optimizer_step(inner.step)
            sched.step()
            inner.zero_grad()
            if algo.in_local_phase and algo.step % args.H == 0:
                per_period.append(gradient_steps)
                gradient_steps = 0
        algo.finalize()
        with torch.no_grad():
            loss = sum(model(input_ids=b, labels=b).loss.item() for b in val_ids.split(16)) / len(val_ids.split(16))
        return loss, per_period

    results = run_threads(args.workers, worker)
    periods = list(zip(*[r[1] for r in results]))
    straggle = statistics.mean(max(p) - statistics.mean(p) for p in periods) if periods else 0.0
    return results[0][0], straggle


if __name__ == "__main__":
    main()
