"""The FaultTolerantTrainer variant of ft_replica.py: the same task, model and events, through a Trainer.

The replica's data is a fixed shard of the same least-squares task; the run ends at the step the test writes
into the stop file (the callback lowers ``state.max_steps`` to it).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments

from ft_replica import DIM, batch
from palsgd_hf.fault_tolerance.trainer import FaultTolerantTrainer


class Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(DIM, 1)

    def forward(self, x, labels=None):
        out = self.lin(x)
        return out if labels is None else {"loss": torch.nn.functional.mse_loss(out, labels)}


class Shard(torch.utils.data.Dataset):
    def __init__(self, replica: int, size: int = 1024):
        self.x, self.y = zip(*(batch(replica, i) for i in range(size // 16)))
        self.x, self.y = torch.cat(self.x), torch.cat(self.y)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "labels": self.y[i]}


class Events(TrainerCallback):
    def __init__(self, args, trainer_ref, event, started):
        self.args, self.trainer_ref, self.event, self.started = args, trainer_ref, event, started
        self.stop = Path(args.stop_file) if args.stop_file else None
        self.syncs = 0

    def on_train_begin(self, args, state, control, **kwargs):
        algo, session = self.trainer_ref[0].palsgd, self.trainer_ref[0].session
        self.syncs = algo.counters["outer_syncs"]
        self.event("joined", algo, rejoined=session.transfer.received > 0 and algo.step > 0,
                   seconds=time.time() - self.started, failed_attempts=session.comm.failed_attempts)

    def on_step_end(self, args, state, control, **kwargs):
        algo = self.trainer_ref[0].palsgd
        if algo.counters["outer_syncs"] != self.syncs:
            self.syncs = algo.counters["outer_syncs"]
            self.event("sync", algo)
        if self.stop is not None and self.stop.exists():
            state.max_steps, self.stop = int(self.stop.read_text()), None
        if self.args.step_seconds:
            time.sleep(self.args.step_seconds)


def train_with_trainer(args, session, config, event, started, finish) -> None:
    torch.manual_seed(args.replica)  # deliberately different initial weights per replica
    model = Regression()
    inner = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    training_args = TrainingArguments(
        output_dir=str(Path(args.out) / f"trainer_{args.replica}"), max_steps=args.steps,
        per_device_train_batch_size=16,
        lr_scheduler_type="constant", use_cpu=True, report_to="none", save_strategy="no", logging_steps=10_000,
        disable_tqdm=True, seed=args.replica, dataloader_num_workers=0,
    )
    ref = []
    trainer = FaultTolerantTrainer(model=model, args=training_args, train_dataset=Shard(args.replica),
                                   optimizers=(inner, None), palsgd_config=config, session=session,
                                   callbacks=[Events(args, ref, event, started)])
    ref.append(trainer)
    trainer.train()
    finish(model, trainer.palsgd)
