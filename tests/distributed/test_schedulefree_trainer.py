"""PALSGDTrainer with a schedule-free optimizer on 2 processes (gloo): the Trainer's optimizer.train()/eval()
calls reach it through the PALSGD wrapper, and pseudo-sync steps after an evaluation act on the training
iterate. Before the wrapper forwarded them: "Optimizer was not in train mode when step is called"."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.launch import torchrun

pytest.importorskip("schedulefree")


@pytest.mark.timeout(200)
def test_trainer_trains_with_a_schedule_free_optimizer(tmp_path):
    # Without forwarding the Trainer never calls optimizer.train(): "Optimizer was not in train mode".
    res = torchrun("schedulefree_trainer_run.py", 2, tmp_path, timeout=180)
    for r in res:
        m = r["metrics"]
        assert r["finite"] and m["outer_syncs"] >= 5 and m["pseudo_syncs"] > 0 and m["gradient_steps"] > 0
        assert r["train_mode_after_eval"] is False and r["train_mode_now"] is True  # both calls arrived
    # The final sync made the train-mode weights one global model. Each rank went to eval mode and back: two
    # float32 lerps with its own z (x = lerp(y, z, 1 - 1/b1), y = lerp(x, z, 1 - b1), b1 = 0.9), each within
    # 2 ulp of max(|x|, |y|, |z|), so the ranks' y agree to 4 * 2^-24 * that magnitude (doubled for safety).
    scale = max(max(abs(w) for r in res for w in r["weights"]), max(r["max_abs_z"] for r in res), 1.0)
    a, b = (torch.tensor(r["weights"]) for r in res)
    torch.testing.assert_close(a, b, rtol=0, atol=8 * 2**-24 * scale * 2)
