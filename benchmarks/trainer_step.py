"""Does a PALSGD local gradient step through PALSGDTrainer cost more than a stock Trainer step? Measured side by side.

    .venv/bin/python benchmarks/trainer_step.py --rounds 3          # ~3 minutes on 2 CPU cores

One process, no communication: the stock ``transformers.Trainer`` and ``PALSGDTrainer`` (method
diloco, so every local step is a gradient step; warm-up 20 steps, no sync before the end) train the
same GPT-Neo (4 layers x 128, the 2k Shakespeare BPE, 16 blocks of 128 tokens per step, AdamW, clip
1.0) on the same data. Each run is its own subprocess; the two kinds alternate ``--rounds`` times so
that the machine's load (shared cores) hits both alike. A callback times every optimizer step (from
one step's end to the next's); the table shows the median over steps 40..end of each run (the local
phase for PALSGD) and the median over rounds, and the ratio PALSGD / stock. What the issue reported
(0.477 s per PALSGD local step vs 0.328 s for accelerate's LocalSGD loop) compared the Trainer with a
hand-written loop over a shaped link; this isolates what PALSGD adds to the Trainer's own step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

STEPS, WARMUP, FROM = 120, 20, 40


def run_one(kind: str, out: Path) -> None:
    """One training run in this process; writes the per-step seconds to ``out``."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from palsgd_hf import PALSGDTrainer, PALSGDTrainingArguments
    from palsgd_hf.lm import build_causal_lm, build_lm_datasets, load_tokenizer, shakespeare_corpus

    torch.set_num_threads(1)
    tok = load_tokenizer("bpe-shakespeare-2048")
    corpus = shakespeare_corpus()
    train, _ = build_lm_datasets(tok, train_files=corpus.train_files[:4], validation_files=corpus.validation_files[:1],
                                 block_size=128, max_train_samples=16 * STEPS, max_eval_samples=8)
    model = build_causal_lm(None, {"num_layers": 4, "hidden_size": 128, "num_heads": 4}, tokenizer=tok, seed=0)

    class Timer(TrainerCallback):
        def __init__(self):
            self.seconds, self.last = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.last is None:
                self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.seconds.append(now - self.last)
            self.last = now

    timer = Timer()
    common = dict(output_dir=str(out.parent / f"run_{kind}"), max_steps=STEPS, per_device_train_batch_size=16,
                  learning_rate=2e-3, report_to="none", logging_steps=10_000, save_strategy="no", disable_tqdm=True,
                  use_cpu=True, dataloader_num_workers=0, max_grad_norm=1.0, seed=0)
    if kind == "stock":
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=train,
                          data_collator=default_data_collator, callbacks=[timer])
    else:
        args = PALSGDTrainingArguments(**common, palsgd_method="diloco", palsgd_sync_interval=1000,
                                       palsgd_warmup_steps=WARMUP)
        trainer = PALSGDTrainer(model=model, args=args, train_dataset=train, data_collator=default_data_collator,
                                callbacks=[timer])
    trainer.train()
    out.write_text(json.dumps(timer.seconds))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="outputs/trainer_step")
    ap.add_argument("--one", choices=["stock", "palsgd"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    if args.one:
        run_one(args.one, out)
        return
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    medians: dict[str, list[float]] = {"stock": [], "palsgd": []}
    for r in range(args.rounds):
        for kind in ("stock", "palsgd"):
            path = out / f"{kind}_{r}.json"
            subprocess.run([sys.executable, __file__, "--one", kind, "--out", str(path)], check=True, env=env,
                           timeout=1800, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            medians[kind].append(statistics.median(json.loads(path.read_text())[FROM:]))
    stock, palsgd = (statistics.median(medians[k]) for k in ("stock", "palsgd"))
    lines = ["| loop | median s/step per round | median | vs stock |", "|---|---|---|---|",
             f"| stock Trainer | {', '.join(f'{m:.3f}' for m in medians['stock'])} | {stock:.3f} | 1.00 |",
             f"| PALSGDTrainer local gradient step | {', '.join(f'{m:.3f}' for m in medians['palsgd'])} | "
             f"{palsgd:.3f} | {palsgd / stock:.2f} |"]
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
