"""Worker script: PALSGDTrainer with a schedule-free optimizer (AdamWScheduleFree), one rank per process.

Schedule-free optimizers refuse to step unless ``optimizer.train()`` was called, and evaluate the
right iterate only after ``optimizer.eval()``; the Trainer calls both when ``hasattr(optimizer,
"train")``, so the PALSGD wrapper must forward them. Writes rank{R}.json into --out.
"""

import argparse
import json
import math
from pathlib import Path

import schedulefree
import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from palsgd_hf import PALSGDConfig
from palsgd_hf.integrations.trainer import PALSGDTrainerMixin


class Data(Dataset):
    def __len__(self):
        return 256

    def __getitem__(self, i):
        x = torch.randn(4, generator=torch.Generator().manual_seed(i))
        return {"x": x, "labels": x.sum(0, keepdim=True)}


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, x, labels=None):
        out = self.lin(x)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


class Trainer_(PALSGDTrainerMixin, Trainer):
    pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = Model()
    opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=0.01)
    targs = TrainingArguments(
        output_dir=str(Path(args.out) / "run"), max_steps=24, per_device_train_batch_size=4, report_to="none",
        use_cpu=True, lr_scheduler_type="constant", logging_steps=8, save_strategy="no", eval_strategy="steps",
        eval_steps=10, ddp_timeout=60,
    )
    trainer = Trainer_(
        model=model, args=targs, train_dataset=Data(), eval_dataset=Data(), optimizers=(opt, None),
        palsgd_config=PALSGDConfig(sync_interval=4, pseudo_sync_prob=0.3, warmup_steps=2, seed=1),
    )
    trainer.train()  # ends with an evaluation (24 is not a multiple of eval_steps): eval mode
    eval_loss = trainer.evaluate()["eval_loss"]
    train_mode_after_eval = opt.param_groups[0]["train_mode"]
    # PALSGD syncs the train-mode iterate (y); the eval-mode one is rebuilt from y and the optimizer's
    # per-replica z, which PALSGD does not average. Back to train mode through the wrapper to compare y.
    trainer.optimizer.train()
    result = {
        "rank": dist.get_rank(), "eval_loss": eval_loss, "finite": math.isfinite(eval_loss),
        "metrics": trainer.palsgd.metrics(), "train_mode_after_eval": train_mode_after_eval,
        "train_mode_now": opt.param_groups[0]["train_mode"],
        "weights": torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist(),
        "max_abs_z": max(float(opt.state[p]["z"].abs().max()) for p in model.parameters()),
    }
    Path(args.out, f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
