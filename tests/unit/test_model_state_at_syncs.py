"""What the core keeps consistent besides the trained weights: buffers, the trained set, the pull.

* Floating-point buffers (BatchNorm statistics) are averaged over the workers at every sync, so the
  global model is one model (before, each worker kept its own and rank 0's were saved).
* The tensors paired with anchors are fixed at attach time: freezing one mid-run keeps every anchor
  aligned; unfreezing one that has no anchor is a clear error, not a silently local parameter.
* A pull coefficient c > 1 reached mid-run (a schedule the integration could not see) lands on the
  anchor (c = 1) with one warning instead of crashing the run.

Syncs: H = 4 after 2 warm-up steps, so after step indices 3, 7, 11 ((t + 1) % H == 0).
"""

from __future__ import annotations

import logging

import pytest
import torch

from palsgd_hf.adapters.module import ModuleAdapter
from palsgd_hf.config import PALSGDConfig
from palsgd_hf.core.algorithm import PALSGD, StepKind
from tests.helpers.threads import run_threads

CFG = PALSGDConfig(sync_interval=4, pseudo_sync_prob=0.25, warmup_steps=2)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, 4)
        self.norm = torch.nn.BatchNorm1d(4)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.norm(self.lin(x)))


def make(rank, comm, cfg=CFG, lr=0.05):
    model = Net()
    inner = torch.optim.SGD(model.parameters(), lr=lr)
    return model, inner, PALSGD(cfg, ModuleAdapter(model, inner), peers=comm, replica_index=rank)


def compute(model, algo, rank, t):
    if algo.step_kind() is not StepKind.PSEUDO_SYNC:
        g = torch.Generator().manual_seed(100 * rank + t)
        x = torch.randn(8, 3, generator=g) + 3 * rank  # each worker sees different data statistics
        model(x).pow(2).mean().backward()


def buffers(model):
    return torch.cat([model.norm.running_mean, model.norm.running_var]).clone()


def test_batchnorm_statistics_are_averaged_at_a_sync():
    def worker(rank, comm):
        model, inner, algo = make(rank, comm)
        before = None
        for t in range(4):
            compute(model, algo, rank, t)
            if t == 3:
                before = buffers(model)  # this worker's statistics just before the sync after step 3
            algo.optimizer_step(inner.step)
            inner.zero_grad()
        assert algo.counters["outer_syncs"] == 1
        return before, buffers(model)

    (before0, after0), (before1, after1) = run_threads(2, worker)
    assert not torch.allclose(before0, before1), "the workers' statistics never differed: the test shows nothing"
    assert torch.equal(after0, after1)
    # Exact up to one rounding of (a + b) / 2 in fp32: the thread communicator sums in the same order.
    torch.testing.assert_close(after0, (before0 + before1) / 2, rtol=0, atol=0)


def test_freezing_a_parameter_mid_run_keeps_every_anchor_aligned():
    def worker(rank, comm):
        model, inner, algo = make(rank, comm)
        for t in range(12):
            if t == 5:
                model.lin.bias.requires_grad_(False)  # between the syncs after steps 3 and 7
            compute(model, algo, rank, t)
            algo.optimizer_step(inner.step)
            inner.zero_grad()
        return [p.detach().clone() for p in model.parameters()], algo.counters["outer_syncs"]

    (w0, syncs), (w1, _) = run_threads(2, worker)
    assert syncs == 3
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))  # one global model after the sync at step 11


def test_unfreezing_a_parameter_without_an_anchor_is_a_clear_error():
    model = Net()
    model.lin.bias.requires_grad_(False)
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    algo = PALSGD(PALSGDConfig(sync_interval=4, pseudo_sync_prob=0.25, warmup_steps=0), ModuleAdapter(model, inner))
    algo.optimizer_step(inner.step)
    model.lin.bias.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"became trainable after PALSGD was attached.*requires_grad before"):
        for _ in range(4):
            algo.optimizer_step(inner.step)


def test_a_pull_above_one_mid_run_lands_on_the_anchor_with_one_warning(caplog):
    model = Net()
    inner = torch.optim.SGD(model.parameters(), lr=0.01)  # c = 0.01 * 1 / 0.5 = 0.02 when the local phase starts
    cfg = PALSGDConfig(sync_interval=100, pseudo_sync_prob=0.5, warmup_steps=0, seed=1)
    algo = PALSGD(cfg, ModuleAdapter(model, inner))
    algo.step_kind()
    anchor = [a.clone() for a in algo._anchor.tensors]
    for g in inner.param_groups:
        g["lr"] = 2.0  # a cyclic schedule's peak, unseen by the core: c = 4
    with caplog.at_level(logging.WARNING, logger="palsgd_hf.core.algorithm"):
        pulls = 0
        while pulls < 2:
            kind = algo.step_kind()
            if kind is StepKind.GRADIENT:
                model(torch.randn(4, 3)).pow(2).mean().backward()
            algo.optimizer_step(inner.step)
            inner.zero_grad()
            if kind is StepKind.PSEUDO_SYNC:
                pulls += 1
                assert all(torch.equal(p.detach(), a) for p, a in zip(model.parameters(), anchor))
    assert algo.last_mixing_coefficient == 1.0
    assert sum("using c = 1" in r.message for r in caplog.records) == 1
