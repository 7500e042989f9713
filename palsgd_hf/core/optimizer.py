"""An optimizer wrapper that routes every ``step()`` through the PALSGD state machine.

Training loops (the HF Trainer, Accelerate loops, plain PyTorch) call ``optimizer.step()`` once
per optimizer step. Wrapping the inner optimizer makes that one call do the right thing: a
warm-up step, a gradient step with the scaled learning rate, or a pseudo-sync pull instead of
the inner step, followed by a global sync when one is due. Everything else (``param_groups``,
``state``, ``zero_grad``, ``state_dict``) is the inner optimizer's, so LR schedulers bound to
either object see the same groups.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .algorithm import PALSGD


class PALSGDOptimizer(torch.optim.Optimizer):
    # Deliberately no super().__init__: this object owns no parameters or state of its own
    # (the same pattern as accelerate's AcceleratedOptimizer); isinstance checks still pass.
    def __init__(self, optimizer: torch.optim.Optimizer, algorithm: PALSGD):
        self.optimizer = optimizer
        self.algorithm = algorithm
        self.last_step_kind = None

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self):
        return self.optimizer.defaults

    def step(self, closure: Optional[Callable[[], Any]] = None):
        result = []
        self.last_step_kind = self.algorithm.optimizer_step(lambda: result.append(self.optimizer.step(closure)))
        # A pseudo-sync step skips the inner step on purpose; tell an LR scheduler bound to the inner
        # optimizer that this step happened, or it warns that scheduler.step() came first.
        self.optimizer._opt_called = True
        return result[0] if result else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"PALSGDOptimizer({self.optimizer!r})"
