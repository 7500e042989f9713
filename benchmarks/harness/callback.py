"""A Trainer callback that records what time to quality needs, and stops a run at its target.

Added to any training run (``trainer.add_callback(TimeToQualityCallback(...))``), it records at
every evaluation: the optimizer step, the training wall time so far with evaluation excluded
(and the total), the eval loss, and the cumulative bytes sent and seconds blocked in
collectives (``palsgd/comm_bytes`` and ``palsgd/comm_seconds``, read from the PALSGD optimizer
the Trainer hands to callbacks). It also notes the bytes when the warm-up ended, so the local
phase's bytes per step can be compared with DDP's.

With ``target_loss`` it stops training at the first evaluation whose loss is at or below the
target once ``min_steps`` steps are done (the benchmark passes DDP's step count, so every method
also has a loss at DDP's token count). Eval losses are equal on every rank (the Trainer gathers
them), so all ranks stop at the same step.

Rank 0 writes the record as JSON to ``out_path`` at the end of training.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from transformers import TrainerCallback


def _palsgd_algorithm(optimizer: Any):
    """The PALSGD state machine behind a (possibly re-wrapped) optimizer, or None."""
    seen = 0
    while optimizer is not None and seen < 5:
        if hasattr(optimizer, "algorithm"):
            return optimizer.algorithm
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return None


class TimeToQualityCallback(TrainerCallback):
    def __init__(self, target_loss: Optional[float] = None, min_steps: int = 0, out_path: Optional[str] = None):
        self.target_loss = target_loss
        self.min_steps = min_steps
        self.out_path = out_path
        self.history: list[dict[str, Any]] = []
        self.comm_at_local_start: Optional[dict[str, float]] = None
        self.stopped_at_target = False
        self._t0 = 0.0
        self._eval_seconds = 0.0
        self._last_step_end: Optional[float] = None
        self._before_local: Optional[dict[str, float]] = None
        self._training = False
        self._algo = None

    # ------------------------------------------------------------------ timing
    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()
        self._eval_seconds = 0.0
        self._training = True
        self._algo = _palsgd_algorithm(kwargs.get("optimizer"))

    def on_step_end(self, args, state, control, **kwargs):
        self._last_step_end = time.perf_counter()
        if self._algo is None:
            self._algo = _palsgd_algorithm(kwargs.get("optimizer"))
        if self._algo is None or self.comm_at_local_start is not None:
            return
        if self._algo.in_local_phase:
            # The local phase started with the step that just ended; bytes up to the step before
            # belong to the synchronous warm-up (the broadcast that starts the local phase does not).
            self.comm_at_local_start = self._before_local
        else:
            self._before_local = {"step": state.global_step, **self._comm()}

    def _comm(self, m: Optional[dict[str, float]] = None) -> dict[str, float]:
        """Bytes sent and seconds blocked so far, from ``m`` (the algorithm's metrics) or read now."""
        if self._algo is None:
            return {"comm_bytes": 0.0, "comm_seconds": 0.0}
        m = self._algo.metrics() if m is None else m
        return {"comm_bytes": m["comm_bytes"], "comm_seconds": m["comm_seconds"]}

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        now = time.perf_counter()
        if not self._training or metrics is None or "eval_loss" not in metrics:
            return
        step_end = self._last_step_end if self._last_step_end is not None else now
        algo_metrics = self._algo.metrics() if self._algo is not None else {}
        entry = {
            "step": state.global_step,
            "train_seconds": step_end - self._t0 - self._eval_seconds,
            "wall_seconds": now - self._t0,
            "eval_loss": float(metrics["eval_loss"]),
            **self._comm(algo_metrics),
        }
        if "sync_interval" in algo_metrics:  # sync_policy='auto': H as the policy moves it
            entry["sync_interval"] = algo_metrics["sync_interval"]
        self._eval_seconds += now - step_end
        self.history.append(entry)
        if (self.target_loss is not None and state.global_step >= self.min_steps
                and entry["eval_loss"] <= self.target_loss):
            self.stopped_at_target = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self._training = False
        if self.out_path and state.is_world_process_zero:
            Path(self.out_path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.out_path).write_text(json.dumps(self.record(state.global_step), indent=1))

    def record(self, steps: int) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        comm = self._comm()
        return {
            "steps": steps,
            "train_seconds": last.get("train_seconds", 0.0),
            "history": self.history,
            "comm_bytes": comm["comm_bytes"],
            "comm_seconds": comm["comm_seconds"],
            "comm_at_local_start": self.comm_at_local_start,
            "stopped_at_target": self.stopped_at_target,
            "metrics": self._algo.metrics() if self._algo is not None else {},
        }
