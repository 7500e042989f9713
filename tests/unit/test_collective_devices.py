"""Every tensor PALSGD hands to a collective is on the device the backend serves.

NCCL serves CUDA tensors only: a flag built on the CPU (the skipped-sync agreement of a sharded
replica) or a pseudo-gradient left on a pinned-CPU anchor's device would crash a GPU run at its
first sync. Here the collectives of ``torch.distributed`` are replaced by recorders (one process,
identity semantics, a world that claims 2 ranks on an 'nccl' backend) and a whole PALSGD run with a
sharded replica, a pinned-CPU anchor, bf16 exchange and a skipped sync goes through them. On a CPU
machine the required device is the CPU and the test checks the plumbing; on a GPU machine (the
``cuda`` case, run by scripts/gpu_check.py) it is the check that fails without the placement code.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from palsgd_hf.adapters.module import ModuleAdapter
from palsgd_hf.config import PALSGDConfig
from palsgd_hf.core import comm as comm_module
from palsgd_hf.core.algorithm import PALSGD, StepKind
from palsgd_hf.core.comm import Communicator

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class _Done:
    def wait(self):
        return True

    def is_completed(self):
        return True


@pytest.fixture
def recorded(monkeypatch):
    calls: list[tuple[str, torch.device]] = []

    def recorder(name):
        def collective(*args, **kwargs):
            tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            calls.extend((name, t.device) for t in tensors)
            if name in ("all_to_all_single", "all_gather_into_tensor"):
                out, inp = tensors[0], tensors[1]
                out.copy_(torch.cat([inp] * (out.numel() // inp.numel())))  # both "ranks" sent the same
            return _Done() if kwargs.get("async_op") else None

        return collective

    for name in ("all_reduce", "broadcast", "all_to_all_single", "all_gather_into_tensor", "barrier"):
        monkeypatch.setattr(dist, name, recorder(name))
    monkeypatch.delattr(dist, "all_gather_single", raising=False)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_global_rank", lambda group, rank: rank)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    return calls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("comm_dtype", ["fp32", "bf16"])
def test_every_collective_tensor_is_on_the_backend_device(recorded, monkeypatch, device, comm_dtype):
    required = torch.device(device if device == "cpu" else f"cuda:{torch.cuda.current_device()}")
    monkeypatch.setattr(comm_module, "collective_device", lambda backend: required)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).to(device)
    inner = torch.optim.AdamW(model.parameters(), lr=0.01)
    cfg = PALSGDConfig(sync_interval=3, pseudo_sync_prob=0.3, warmup_steps=1, shard_size=2, anchor_device="cpu",
                       comm_dtype=comm_dtype)
    peers, replica = Communicator(group=object()), Communicator(group=object())
    algo = PALSGD(cfg, ModuleAdapter(model, inner, peers), peers=peers, replica=replica)
    for step in range(9):
        if algo.step_kind() is not StepKind.PSEUDO_SYNC:
            model(torch.randn(5, 4, device=device)).pow(2).mean().backward()
        if step == 6:
            with torch.no_grad():
                model[0].weight[0, 0] = float("nan")  # the sync after step 8 is skipped (flags agree)
        algo.optimizer_step(inner.step)
        inner.zero_grad()
    algo.finalize()
    assert algo.counters["skipped_syncs"] == 1 and algo.counters["outer_syncs"] >= 1
    names = {name for name, _ in recorded}
    assert {"all_reduce", "broadcast"} <= names and (comm_dtype == "fp32" or "all_to_all_single" in names)
    wrong = [(name, str(d)) for name, d in recorded if d != required]
    assert not wrong, f"collectives got tensors off {required}: {wrong[:5]}"
