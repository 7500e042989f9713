"""The same seed and launch give the same trajectory: two identical 2-process PALSGDTrainer runs end with
bit-identical weights and log the same losses and PALSGD counters at every step.

Holds for one machine and software stack on CPU (gloo sums two ranks in a fixed order). Not promised:
equality across different numbers of processes, hardware or library versions, or on GPUs with
non-deterministic kernels (see docs/reliability.md).
"""

from __future__ import annotations

import pytest
import torch

from tests.reliability.runs import launch

pytestmark = pytest.mark.timeout(600)

# Logged values that are measurements of time, not of the trajectory.
TIMINGS = ("seconds", "runtime", "per_second")


def trajectory(result):
    return [{k: v for k, v in e.items() if not any(t in k for t in TIMINGS)} for e in result["log_history"]]


def test_same_seed_and_launch_give_the_same_trajectory(baseline, tmp_path):
    again = launch(tmp_path / "again")
    for first, second in zip(baseline.final_weights(), again.final_weights()):
        assert torch.equal(first, second)
    for first, second in zip(baseline.results, again.results):
        assert trajectory(first) == trajectory(second)
        assert [e for e in trajectory(first) if "loss" in e]  # there is a trajectory to compare
        assert first["eval_loss"] == second["eval_loss"]
