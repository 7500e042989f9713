"""Single-process behaviour of the core: resume equivalence, non-finite syncs, runtime checks."""

from __future__ import annotations

import dataclasses
import io
import math

import pytest
import torch

from palsgd_hf import PALSGD, PALSGDConfig, PALSGDConfigError, PALSGDOptimizer, StepKind
from palsgd_hf.adapters import ModuleAdapter
from palsgd_hf.core.comm import LocalCommunicator
from tests.helpers.threads import run_threads


def make(rank: int, comm, cfg: PALSGDConfig, lr: float = 0.05):
    model = torch.nn.Linear(4, 1)
    g = torch.Generator().manual_seed(0)  # not the global RNG: worker threads would race on it
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, 4, generator=g))
        model.bias.zero_()
    inner = torch.optim.AdamW(model.parameters(), lr=lr)
    algo = PALSGD(cfg, ModuleAdapter(model, inner), peers=comm, replica_index=rank)
    return model, inner, PALSGDOptimizer(inner, algo)


def train(model, opt, rank: int, start: int, stop: int, poison_at: int | None = None) -> None:
    for t in range(start, stop):
        g = torch.Generator().manual_seed(100 * rank + t)
        x = torch.randn(8, 4, generator=g)
        y = x.sum(1, keepdim=True) * (rank + 1)
        if opt.algorithm.step_kind() is not StepKind.PSEUDO_SYNC:
            torch.nn.functional.mse_loss(model(x), y).backward()
        if t == poison_at and rank == 0:
            with torch.no_grad():
                model.weight[0, 0] = float("nan")
        opt.step()
        opt.zero_grad()


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_resume_between_syncs_continues_exactly():
    cfg = PALSGDConfig(sync_interval=5, pseudo_sync_prob=0.3, mixing_rate=1.0, warmup_steps=2)

    def straight(rank, comm):
        model, _, opt = make(rank, comm, cfg)
        train(model, opt, rank, 0, 23)
        return model.weight.detach().clone(), opt.algorithm.metrics()

    def interrupted(rank, comm):
        model, inner, opt = make(rank, comm, cfg)
        train(model, opt, rank, 0, 13)  # 13: between the syncs after steps 10 and 15
        saved = roundtrip({"model": model.state_dict(), "inner": inner.state_dict(), "palsgd": opt.algorithm.state_dict()})
        model, inner, opt = make(rank, comm, cfg)  # fresh objects, as after a restart
        model.load_state_dict(saved["model"])
        inner.load_state_dict(saved["inner"])
        opt.algorithm.load_state_dict(saved["palsgd"])
        train(model, opt, rank, 13, 23)
        return model.weight.detach().clone(), opt.algorithm.metrics()

    for (w1, m1), (w2, m2) in zip(run_threads(2, straight), run_threads(2, interrupted)):
        assert torch.equal(w1, w2)
        assert m1 == m2


def test_resume_may_change_the_collective_timeout_but_not_the_sync_interval():
    saved_cfg = PALSGDConfig(sync_interval=5, warmup_steps=2, comm_timeout_seconds=30)
    model, _, opt = make(0, LocalCommunicator(), saved_cfg)
    train(model, opt, 0, 0, 3)
    state = roundtrip(opt.algorithm.state_dict())
    assert state["config"]["comm_timeout_seconds"] == 30
    _, _, resumed = make(0, LocalCommunicator(), dataclasses.replace(saved_cfg, comm_timeout_seconds=600))
    resumed.algorithm.load_state_dict(state)  # a run-time setting: a resumed run may choose another timeout
    assert resumed.algorithm.step == 3
    _, _, other = make(0, LocalCommunicator(), dataclasses.replace(saved_cfg, sync_interval=6))
    with pytest.raises(ValueError, match="written with sync_interval=5 but this run has sync_interval=6"):
        other.algorithm.load_state_dict(state)


def test_nonfinite_pseudo_gradient_skips_the_outer_update():
    cfg = PALSGDConfig(sync_interval=4, pseudo_sync_prob=0.0, warmup_steps=0)

    def run(rank, comm):
        model, _, opt = make(rank, comm, cfg)
        train(model, opt, rank, 0, 4)  # one good sync
        anchor_before = opt.algorithm._anchor.tensors[0].clone()
        train(model, opt, rank, 4, 8, poison_at=6)  # rank 0's weights turn NaN before the 2nd sync
        m = opt.algorithm.metrics()
        # Both ranks are back on the last good anchor, and training goes on.
        w_after_skip = model.weight.detach().clone()
        train(model, opt, rank, 8, 12)
        return m, anchor_before, w_after_skip, model.weight.detach().clone(), opt.algorithm.metrics()

    for m, anchor_before, w_skip, w_end, m_end in run_threads(2, run):
        assert m["skipped_syncs"] == 1 and m["outer_syncs"] == 1
        assert torch.equal(w_skip, anchor_before)
        assert torch.isfinite(w_end).all() and m_end["outer_syncs"] == 2


def test_pull_coefficient_above_one_is_an_error_naming_the_values():
    cfg = PALSGDConfig(sync_interval=4, pseudo_sync_prob=0.5, mixing_rate=10.0, warmup_steps=0, seed=1)
    model, _, opt = make(0, None, cfg, lr=0.1)  # c = 0.1 * 10 / 0.5 = 2
    with pytest.raises(PALSGDConfigError, match=r"= 2 must lie in \(0, 1\]"):
        train(model, opt, 0, 0, 20)


def test_global_weights_swaps_the_anchor_in_and_restores_the_local_model():
    cfg = PALSGDConfig(sync_interval=10, pseudo_sync_prob=0.2, warmup_steps=0)
    model, _, opt = make(0, None, cfg)
    train(model, opt, 0, 0, 4)
    local = model.weight.detach().clone()
    with opt.algorithm.global_weights():
        assert torch.equal(model.weight, opt.algorithm._anchor.tensors[0])
        assert not torch.equal(model.weight, local)
    assert torch.equal(model.weight, local)


def test_lr_is_scaled_only_during_the_gradient_step():
    cfg = PALSGDConfig(sync_interval=100, pseudo_sync_prob=0.25, warmup_steps=0)
    model, inner, opt = make(0, None, cfg, lr=0.04)
    seen = []
    orig = inner.step

    def spy(closure=None):
        seen.append(inner.param_groups[0]["lr"])
        return orig(closure)

    inner.step = spy
    train(model, opt, 0, 0, 12)
    assert seen and all(math.isclose(lr, 0.04 / 0.75) for lr in seen)
    assert inner.param_groups[0]["lr"] == 0.04


def test_nonfinite_anchor_is_an_error_not_an_endless_skip():
    # Weights already non-finite when the local phase starts: the anchor is non-finite too, and
    # "return to the last good anchor" has nothing to return to.
    cfg = PALSGDConfig(sync_interval=2, pseudo_sync_prob=0.2, warmup_steps=1)
    model, _, opt = make(0, None, cfg)
    train(model, opt, 0, 0, 1)
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="the global model \\(anchor\\) itself is non-finite"):
        train(model, opt, 0, 1, 8)
