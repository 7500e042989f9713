"""PALSGDOptimizer, the one wrapper: it forwards what it does not define to the inner optimizer (schedule-free
optimizers' train()/eval()), survives copying and pickling, and tells every LR scheduler down the chain that a
step happened, including a pseudo-sync step and the accumulation / DeepSpeed variants."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch

from palsgd_hf import PALSGD, PALSGDConfig, PALSGDOptimizer, StepKind
from palsgd_hf.adapters import ModuleAdapter


class ScheduleFreeLike(torch.optim.SGD):
    """The contract of schedule-free optimizers: step() and evaluation need the matching mode."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.mode = None

    def train(self):
        self.mode = "train"

    def eval(self):
        self.mode = "eval"

    def step(self, closure=None):
        if self.mode != "train":
            raise RuntimeError("Optimizer was not in train mode when step is called; call .train() first")
        return super().step(closure)


def make(inner_cls=torch.optim.SGD, p=0.5, **options):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    inner = inner_cls(model.parameters(), lr=0.1)
    cfg = PALSGDConfig(sync_interval=3, pseudo_sync_prob=p, warmup_steps=1, seed=2)
    return model, inner, PALSGDOptimizer(inner, PALSGD(cfg, ModuleAdapter(model, inner)), **options)


def train(model, opt, steps):
    kinds = []
    for _ in range(steps):
        kinds.append(opt.algorithm.step_kind())
        if kinds[-1] is not StepKind.PSEUDO_SYNC:
            model(torch.ones(2, 3)).sum().backward()
        opt.step()
        opt.zero_grad()
    return kinds


def test_train_and_eval_reach_the_inner_optimizer():
    model, inner, opt = make(ScheduleFreeLike)
    assert hasattr(opt, "train") and hasattr(opt, "eval")  # the Trainer calls them only when hasattr says so
    opt.train()
    assert inner.mode == "train"
    assert StepKind.GRADIENT in train(model, opt, 8)
    opt.eval()
    assert inner.mode == "eval"
    # A step after an evaluation whose loop skipped train() (a pseudo-sync step computes nothing): the step
    # acts on the training iterate, so the wrapper switches back first, as the inner step() itself demands.
    opt.step()
    assert inner.mode == "train"
    # Unknown names still fail as AttributeError, so hasattr stays truthful.
    assert not hasattr(make()[2], "train")
    with pytest.raises(AttributeError, match="no attribute 'no_such_thing'"):
        make()[2].no_such_thing


def test_forwarding_does_not_recurse_before_init_or_while_unpickling():
    bare = PALSGDOptimizer.__new__(PALSGDOptimizer)  # what pickle and copy create before restoring the state
    with pytest.raises(AttributeError):
        bare.optimizer
    with pytest.raises(AttributeError):
        bare.train
    model, inner, opt = make(ScheduleFreeLike)
    clone = copy.deepcopy(opt)
    clone.train()
    assert clone.optimizer is not inner and clone.optimizer.mode == "train" and inner.mode is None
    restored = pickle.loads(pickle.dumps(PALSGDOptimizer(ScheduleFreeLike([torch.zeros(2)], 0.1), algorithm=None)))
    restored.eval()
    assert restored.optimizer.mode == "eval"
    assert PALSGDOptimizer.step is make()[2].step.__func__  # torch's __setstate__ would have patched the class


def test_schedulefree_adamw_steps_through_the_wrapper():
    schedulefree = pytest.importorskip("schedulefree")
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    inner = schedulefree.AdamWScheduleFree(model.parameters(), lr=0.01, warmup_steps=2)
    opt = PALSGDOptimizer(inner, PALSGD(PALSGDConfig(sync_interval=3, pseudo_sync_prob=0.3, warmup_steps=1, seed=2),
                                        ModuleAdapter(model, inner)))
    opt.train()  # without forwarding: AttributeError here, and the inner step refuses to run in eval mode
    kinds = train(model, opt, 10)
    assert StepKind.GRADIENT in kinds and StepKind.PSEUDO_SYNC in kinds
    opt.eval()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_every_scheduler_in_the_chain_sees_a_pseudo_sync_step():
    class Outer:  # an optimizer wrapping the torch one, as accelerate's does
        def __init__(self, optimizer):
            self.optimizer = optimizer
            self.param_groups = optimizer.param_groups

        def step(self, closure=None):
            return self.optimizer.step(closure)

        def zero_grad(self, set_to_none=True):
            self.optimizer.zero_grad(set_to_none=set_to_none)

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(inner, 1)
    cfg = PALSGDConfig(sync_interval=3, pseudo_sync_prob=0.9, warmup_steps=0, mixing_rate=0.5, seed=2)
    opt = PALSGDOptimizer(Outer(inner), PALSGD(cfg, ModuleAdapter(model, inner)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Detected call of lr_scheduler.step() before optimizer.step()"
        kind = opt.algorithm.step_kind()
        assert kind is StepKind.PSEUDO_SYNC
        opt.step()
        sched.step()


def test_accumulation_variant_steps_once_per_window_and_reports_the_kind():
    boundary = iter([False, True, False, True, False, True])
    seen = []
    model, inner, opt = make(is_boundary=lambda: next(boundary), after_step=seen.append)
    for _ in range(6):
        if opt.algorithm.step_kind() is not StepKind.PSEUDO_SYNC:
            model(torch.ones(2, 3)).sum().backward()
        opt.step()
    assert opt.algorithm.step == 3 and len(seen) == 3 and seen[-1] is opt.last_step_kind


def test_engine_steps_variant_finishes_the_step_through_the_adapter():
    model, inner, opt = make()
    calls = []
    opt.algorithm.adapter.finish_step = lambda: calls.append(1)
    engine_opt = PALSGDOptimizer(inner, opt.algorithm, engine_steps=True)
    assert engine_opt.step() is None and calls == [1] and inner._opt_called
    assert opt.algorithm.step == 0  # the engine counts its steps itself



def schedule_free_mid_period():
    """A schedule-free run between two syncs: the local weights differ from the anchor."""
    schedulefree = pytest.importorskip("schedulefree")
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    inner = schedulefree.AdamWScheduleFree(model.parameters(), lr=0.05)
    cfg = PALSGDConfig(sync_interval=100, pseudo_sync_prob=0.3, warmup_steps=1, seed=2)
    opt = PALSGDOptimizer(inner, PALSGD(cfg, ModuleAdapter(model, inner)))
    opt.train()
    train(model, opt, 8)
    anchor = opt.algorithm._anchor.tensors[0].clone()
    assert not torch.equal(model.weight, anchor)
    return model, inner, opt, anchor


def as_eval_iterate(y, z, beta1=0.9):
    return torch.lerp(y, z, 1 - 1 / beta1)


def test_global_weights_swaps_the_training_iterate_whatever_the_mode():
    # Two float32 lerps per mode switch: results agree to a few ulps of the weights (|w| < 2 here).
    close = dict(rtol=0, atol=1e-6)
    # In train mode, evaluating inside the block: the optimizer must be back in train mode before the
    # local weights return, or its next train() would move them (10% toward z).
    model, inner, opt, anchor = schedule_free_mid_period()
    y_local, z = model.weight.detach().clone(), inner.state[model.weight]["z"].clone()
    with opt.global_weights():
        opt.eval()
        torch.testing.assert_close(model.weight.detach(), as_eval_iterate(anchor, z), **close)
    opt.train()
    torch.testing.assert_close(model.weight.detach(), y_local, **close)
    # Already in eval mode: the block sees the anchor's eval iterate and the local eval iterate comes back.
    opt.eval()
    x_local = model.weight.detach().clone()
    with opt.global_weights():
        assert inner.param_groups[0]["train_mode"] is False
        torch.testing.assert_close(model.weight.detach(), as_eval_iterate(anchor, z), **close)
    assert inner.param_groups[0]["train_mode"] is False
    torch.testing.assert_close(model.weight.detach(), x_local, **close)
