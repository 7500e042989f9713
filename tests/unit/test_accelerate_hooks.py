"""PALSGDAccelerate in one process with a real CPU Accelerator: its per-rank file is THE state file, written
atomically, and a pseudo-sync step leaves no stale accelerate step state (overflow flag, GradScaler record)."""

from __future__ import annotations

import pytest
import torch

from palsgd_hf import PALSGDConfig, StepKind, state_files

accelerate = pytest.importorskip("accelerate")
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from palsgd_hf.integrations.accelerate import PALSGDAccelerate  # noqa: E402


@pytest.fixture
def accelerator(request, monkeypatch):
    # accelerate keeps process-wide singletons: start each test from a clean, single-process CPU state.
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield accelerate.Accelerator(cpu=True, mixed_precision=getattr(request, "param", "no"))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def build(accelerator, *, scaler=None, p=0.5):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (t + 1))
    model, sched = accelerator.prepare(model, sched)
    if scaler is not None:
        # accelerate scales fp16 losses on CUDA only; give it a CPU GradScaler after the model was prepared (so
        # the model runs without fp16 autocast) and before the optimizer is, which takes the scaler then.
        accelerator.scaler, accelerator.native_amp = scaler, True
    opt = accelerator.prepare(opt)
    sched.optimizers = [opt]
    hooks = PALSGDAccelerate(accelerator, PALSGDConfig(sync_interval=4, pseudo_sync_prob=p, warmup_steps=1, seed=1))
    return model, hooks, hooks.wrap(model, opt), sched, opt


def step(accelerator, model, hooks, optimizer, sched, clip=False):
    kind = hooks.algorithm.step_kind()
    if hooks.should_compute():
        accelerator.backward(model(torch.ones(2, 4)).pow(2).mean())
    if clip:  # a loop that clips on every step, also on pseudo-sync steps (no gradients there)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    sched.step()
    optimizer.zero_grad()
    return kind


def test_save_state_writes_the_one_state_file_and_a_failing_save_keeps_the_previous(accelerator, tmp_path):
    model, hooks, optimizer, sched, _ = build(accelerator)
    for _ in range(3):
        step(accelerator, model, hooks, optimizer, sched)
    accelerator.save_state(str(tmp_path))
    path = tmp_path / "palsgd" / "rank_0.pt"
    saved = state_files.load(path, rank=0, world_size=1)  # the shared layout, rank and world checked
    assert saved["algorithm"]["step"] == 3 and set(saved["model"]) == {"weight", "bias"}

    class Bomb:  # pickling raises after the tensors before it were written: a crash mid-write
        def __reduce__(self):
            raise OSError("disk full (simulated)")

    step(accelerator, model, hooks, optimizer, sched)
    real = hooks.algorithm.state_dict
    hooks.algorithm.state_dict = lambda: {**real(), "pad": torch.zeros(100_000), "bomb": Bomb()}
    with pytest.raises(OSError, match="disk full"):
        accelerator.save_state(str(tmp_path))
    assert state_files.load(path, rank=0, world_size=1)["algorithm"]["step"] == 3  # the previous file, whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["rank_0.pt"]


def test_a_pseudo_sync_step_is_not_an_overflow_skipped_step(accelerator):
    model, hooks, optimizer, sched, accelerated = build(accelerator, p=0.9)
    kinds = []
    for _ in range(12):
        # As if the previous inner step had overflowed: a pseudo-sync step must clear it, as a real step would.
        accelerated._is_overflow = True
        before = sched.scheduler.last_epoch
        kinds.append(step(accelerator, model, hooks, optimizer, sched))
        if kinds[-1] is StepKind.PSEUDO_SYNC:
            assert not accelerated.step_was_skipped and sched.scheduler.last_epoch == before + 1, len(kinds)
    assert StepKind.PSEUDO_SYNC in kinds


@pytest.mark.parametrize("accelerator", ["fp16"], indirect=True)
def test_a_grad_scaler_unscaled_on_a_pseudo_sync_step_does_not_break_the_next_step(accelerator):
    scaler = torch.amp.GradScaler("cpu")
    model, hooks, optimizer, sched, _ = build(accelerator, scaler=scaler, p=0.5)
    kinds = [step(accelerator, model, hooks, optimizer, sched, clip=True) for _ in range(16)]
    # Reaching here means no "unscale_() has already been called on this optimizer since the last update()".
    assert StepKind.PSEUDO_SYNC in kinds and StepKind.GRADIENT in kinds[kinds.index(StepKind.PSEUDO_SYNC):]


def test_the_config_timeout_is_the_default_of_comm_timeout(accelerator):
    from datetime import timedelta

    assert PALSGDAccelerate(accelerator, PALSGDConfig(comm_timeout_seconds=45)).comm_timeout == timedelta(seconds=45)
    explicit = PALSGDAccelerate(accelerator, PALSGDConfig(comm_timeout_seconds=45), comm_timeout=timedelta(seconds=9))
    assert explicit.comm_timeout == timedelta(seconds=9)  # an explicit argument wins
    assert PALSGDAccelerate(accelerator, PALSGDConfig()).comm_timeout is None  # the process group's own
    assert PALSGDAccelerate(accelerator, None).comm_timeout is None
