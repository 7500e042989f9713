"""Non-finite values in a real 2-process PALSGDTrainer run: the sync after them is skipped, the workers
return to the last good anchor, the event is logged and counted (palsgd/skipped_syncs), and training
goes on to finite weights and a finite evaluation loss.

Two injections in one run: rank 1's weights turn NaN after local step 10 (a diverged step between the
syncs at 8 and 12), and rank 0's weights are NaN when it takes a pseudo-sync step at 17 or later (the
pull toward the anchor runs on NaN). Where the pull is checked: nowhere of its own. The anchor is
finite (it only moves by an outer step on a finite average), so a pull is non-finite exactly where the
worker already was, and the next sync's check of the averaged pseudo-gradient catches it for free; a
check after every pull would read all weights once more per pseudo-sync step to learn it a few steps
earlier, with nothing better to do than what the sync does.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.reliability.runs import H, STEPS, launch, losses

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("nonfinite"), "--fault", "nan-weights:1:10", "--fault", "nan-pull:0:17")


def next_sync(step: int) -> int:
    return -(-step // H) * H


def test_injections_happened_where_intended(poisoned):
    by_rank = {r["rank"]: r["injected"] for r in poisoned.results}
    assert [(i["kind"], i["step"]) for i in by_rank[1]] == [("nan-weights", 10)]
    (pull,) = by_rank[0]
    assert pull["kind"] == "nan-pull" and 17 <= pull["step"] < STEPS  # a pseudo-sync step before the last sync


def test_each_poisoned_sync_is_skipped_logged_and_counted(poisoned):
    pull_step = next(i["step"] for r in poisoned.results for i in r["injected"] if i["kind"] == "nan-pull")
    skipped_at = [next_sync(10), next_sync(pull_step)]  # 12 and the sync after the pull
    assert skipped_at[0] != skipped_at[1]
    syncs = list(range(8, STEPS + 1, H))
    for r in poisoned.results:
        assert r["metrics"]["skipped_syncs"] == 2
        assert r["metrics"]["outer_syncs"] == len(syncs) - 2
        # In the Trainer's own log history: the counter steps up exactly at the skipped syncs.
        counted = {e["step"]: e["palsgd/skipped_syncs"] for e in r["log_history"] if "palsgd/skipped_syncs" in e}
        for step, value in counted.items():
            assert value == sum(s <= step for s in skipped_at), (step, value)
        # ...and both steps up were seen: a log between the two skipped syncs and one after the second.
        assert any(skipped_at[0] <= s < skipped_at[1] for s in counted) and max(counted) >= skipped_at[1]
    assert poisoned.output.count("non-finite pseudo-gradient; outer update skipped") == 2 * 2  # per sync, per rank


def test_training_continues_to_finite_weights_and_eval_loss(poisoned, baseline):
    weights = poisoned.final_weights()
    assert all(torch.isfinite(w).all() for w in weights)
    assert torch.equal(weights[0], weights[1])  # the final sync was a real one: both hold the global model
    for r, base in zip(poisoned.results, baseline.results):
        assert math.isfinite(r["eval_loss"])
        # It learned (the untrained model scores ~7.6 = ln 2048) and stays near the clean run.
        assert r["eval_loss"] < 7.0 and abs(r["eval_loss"] - base["eval_loss"]) < 0.5
        last = max(losses(r))
        assert math.isfinite(losses(r)[last]) and last == STEPS
