"""The one optimizer wrapper: every ``step()`` goes through the PALSGD state machine.

Training loops (the HF Trainer, Accelerate loops, plain PyTorch) call ``optimizer.step()`` once
per optimizer step. Wrapping the inner optimizer makes that one call do the right thing: a
warm-up step, a gradient step with the scaled learning rate, or a pseudo-sync pull instead of
the inner step, followed by a global sync when one is due. Everything else is the inner
optimizer's: ``param_groups``/``state``/``zero_grad``/``state_dict`` explicitly, and any other
attribute by forwarding (``train()``/``eval()`` of schedule-free optimizers, which the Trainer
calls when ``hasattr(optimizer, "train")``; accelerate's ``step_was_skipped``; ...). LR schedulers
bound to either object see the same groups. Optimizers with modes step in train mode (``step()``
switches back if an evaluation left them in eval mode), and :meth:`PALSGDOptimizer.global_weights`
swaps the anchor in and out in train mode, so the training iterate is never mistaken for the eval one.

Two variants, as options of the same class (the integrations pick them):

* ``is_boundary`` (accelerate's gradient accumulation): ``step()`` is called once per micro-batch
  and only the call for which ``is_boundary()`` is true is a PALSGD step; the others are no-ops,
  as they are for accelerate's own optimizer. Right after a PALSGD step ``after_step(kind)`` runs
  (the Accelerate hooks draw the next coin there and settle accelerate's step state).
* ``engine_steps`` (DeepSpeed under accelerate / the HF Trainer): the engine runs the PALSGD step
  inside ``backward``; ``step()`` only completes an optimizer step that had no backward (a
  pseudo-sync step) through the adapter's ``finish_step()``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch

from .algorithm import PALSGD, StepKind


class PALSGDOptimizer(torch.optim.Optimizer):
    """Wrap ``optimizer`` so that each ``step()`` is one PALSGD step of ``algorithm``.

    Args:
        optimizer: the inner optimizer (a torch optimizer, or one wrapping it, e.g. accelerate's).
        algorithm: the PALSGD state machine built for the same model and optimizer.
        is_boundary: when given, only calls for which it returns True are optimizer steps.
        after_step: called with the step's kind after each PALSGD step this wrapper runs.
        engine_steps: the backend steps inside backward (DeepSpeed); ``step()`` finishes the step.
    """

    # Deliberately no super().__init__: this object owns no parameters or state of its own
    # (the same pattern as accelerate's AcceleratedOptimizer); isinstance checks still pass.
    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        algorithm: PALSGD,
        *,
        is_boundary: Optional[Callable[[], bool]] = None,
        after_step: Optional[Callable[[StepKind], None]] = None,
        engine_steps: bool = False,
    ):
        self.optimizer = optimizer
        self.algorithm = algorithm
        self.last_step_kind: Optional[StepKind] = None
        self._is_boundary = is_boundary
        self._after_step = after_step
        self._engine_steps = engine_steps

    def step(self, closure: Optional[Callable[[], Any]] = None):
        if self._is_boundary is not None and not self._is_boundary():
            return None  # a micro-batch inside an accumulation window: not an optimizer step
        # The pull, the sync and the inner step all act on the training iterate. Optimizers with modes
        # (schedule-free: train()/eval() swap the weights between two iterates) step only in train mode,
        # and an integration that skips a pseudo-sync step's compute also skips the loop's train() call
        # (the Trainer makes it in training_step): after an evaluation the pull would hit the eval iterate.
        train = getattr(self.optimizer, "train", None)
        if callable(train):
            train()
        result = []
        if self._engine_steps:
            self.algorithm.adapter.finish_step()  # the engine took (or now takes) the PALSGD step
        else:
            self.last_step_kind = self.algorithm.optimizer_step(
                lambda: result.append(self.optimizer.step(closure))
            )
            if self._after_step is not None:
                self._after_step(self.last_step_kind)
        self._mark_stepped()
        return result[0] if result else None

    def _mark_stepped(self) -> None:
        # torch's LR scheduler warns "lr_scheduler.step() before optimizer.step()" unless the optimizer it is
        # bound to has _opt_called set, which only its own step() does. A pseudo-sync step skips the inner step
        # on purpose, and the scheduler may be bound to any optimizer down the chain (accelerate's wrapper, the
        # torch optimizer inside it, ZeRO's): tell each of them that this step happened.
        opt, seen = self.optimizer, set()
        while opt is not None and id(opt) not in seen:
            seen.add(id(opt))
            try:
                opt._opt_called = True
            except AttributeError:  # an optimizer that refuses new attributes (slots) has no scheduler hook
                pass
            opt = getattr(opt, "optimizer", None)

    @contextlib.contextmanager
    def global_weights(self) -> Iterator[None]:
        """``algorithm.global_weights()`` (the anchor in the weights, e.g. to evaluate it), mode-aware.

        Optimizers with modes (schedule-free: ``eval()`` turns the weights into another iterate built
        from them and the optimizer's state) must swap the anchor, a training iterate, in and out in
        train mode; else the local weights come back while the optimizer believes they are the eval
        iterate, and its next ``train()`` moves them. Inside the block the optimizer is in the mode it
        was in before; afterwards, in the mode the block left it in (the local weights back).
        """
        evaluating = _in_eval_mode(self.optimizer)
        if evaluating:
            self.optimizer.train()
        left_in_eval = evaluating
        with self.algorithm.global_weights():
            if evaluating:
                self.optimizer.eval()
            try:
                yield
            finally:
                # The Trainer's evaluation_loop calls optimizer.eval() inside the block: leave it so.
                left_in_eval = _in_eval_mode(self.optimizer)
                if _has_modes(self.optimizer):
                    self.optimizer.train()
        if left_in_eval:
            self.optimizer.eval()

    # ------------------------------------------------------------------ the inner optimizer's
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

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def __getattr__(self, name: str) -> Any:
        # Runs only for names not found on the wrapper. Read the inner optimizer from __dict__: while an
        # instance is being unpickled or copied (before __init__ or __setstate__ set it) "self.optimizer"
        # would call __getattr__ again, forever. Dunders stay the wrapper's (copy/pickle probe them).
        inner = self.__dict__.get("optimizer")
        if inner is None or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(inner, name)

    # torch.optim.Optimizer's pickling keeps only defaults/state/param_groups and patches the class's step();
    # this wrapper's state is its __dict__ (inner optimizer, algorithm, options).
    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"PALSGDOptimizer({self.optimizer!r})"


def _has_modes(optimizer) -> bool:
    return callable(getattr(optimizer, "train", None)) and any("train_mode" in g for g in optimizer.param_groups)


def _in_eval_mode(optimizer) -> bool:
    # Schedule-free optimizers keep their mode in every param group ("train_mode"); others have no modes.
    return _has_modes(optimizer) and any(g.get("train_mode") is False for g in optimizer.param_groups)
