"""The model and data of the fault-tolerant Trainer test replicas (ft_fsdp_trainer_replica.py, ft_checks_run.py).

A small MLP regressor that returns the Trainer's ``{"loss": ...}``, and a regression task whose sample i is drawn
from a generator seeded by i; ``Samples(replica=r, ...)`` is replica r's view of the global samples (see
ft_fsdp_trainer_replica.py for how it matches what the same rank of the reference run reads).
"""

from __future__ import annotations

import hashlib

import torch

IN, HIDDEN, OUT, MICRO = 8, 16, 4, 4  # every sharded dim even: each of 2 shards holds exactly half
EVAL_OFFSET = 10_000_000  # eval samples are drawn from seeds no training sample uses


class Regressor(torch.nn.Module):
    _no_split_modules = ["Linear"]  # shard_model shards each Linear, then the root

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT))

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": torch.nn.functional.mse_loss(out, labels)} if labels is not None else {"logits": out}


class Samples(torch.utils.data.Dataset):
    """Global samples [offset, offset + length), or replica ``replica``'s view of them (module docstring)."""

    def __init__(self, length: int, replica=None, replicas: int = 1, shards: int = 1, offset: int = 0):
        self.length, self.replica, self.replicas, self.shards, self.offset = length, replica, replicas, shards, offset

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if self.replica is not None:
            j, within = divmod(i, MICRO)
            j = self.replicas * self.shards * (j // self.shards) + self.shards * self.replica + j % self.shards
            i = j * MICRO + within
        g = torch.Generator().manual_seed(self.offset + i)
        x = torch.randn(IN, generator=g)
        return {"x": x, "labels": torch.tanh(x[:OUT]) * 1.5 + 0.05 * torch.randn(OUT, generator=g)}


def sha(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()
