"""The peak learning rate of an LR schedule, found before training (the pull's c must stay <= 1).

A pseudo-sync step pulls by c = lr*eta/p with the learning rate of that step, so c peaks where the
schedule does: mid-run for OneCycle and cyclic schedules, not at the first step.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch


def schedule_peak_lr(optimizer: Any, scheduler: Any, steps: int) -> float:
    """The highest learning rate ``scheduler`` gives any parameter group over ``steps`` steps.

    Trainer schedules are ``LambdaLR``s: their lambdas are evaluated directly (nothing is stepped).
    Other schedulers are stepped on a saved state and restored; ReduceLROnPlateau, DeepSpeed's own
    schedulers and anything that cannot be replayed fall back to the groups' initial learning rates.
    """
    initial = max(float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups)
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler wraps one
    steps = max(1, min(int(steps or 1), 1_000_000))
    if isinstance(inner, torch.optim.lr_scheduler.LambdaLR):
        return max(base * float(fn(t)) for base, fn in zip(inner.base_lrs, inner.lr_lambdas) for t in range(steps + 1))
    if not isinstance(inner, torch.optim.lr_scheduler.LRScheduler) or isinstance(
        inner, torch.optim.lr_scheduler.ReduceLROnPlateau
    ):
        return initial
    groups = inner.optimizer.param_groups
    saved_lrs, saved_state = [g["lr"] for g in groups], inner.state_dict()
    peak = max(initial, *saved_lrs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
            for _ in range(steps):
                inner.step()
                peak = max(peak, *(float(g["lr"]) for g in groups))
    finally:
        inner.load_state_dict(saved_state)
        for g, lr in zip(groups, saved_lrs):
            g["lr"] = lr
    return peak
