"""A replica whose ZeRO-partitioned weights and Adam moments went non-finite, on real DeepSpeed (CPU, gloo).

The sync after the divergence is skipped and every replica returns to the last good anchor
(palsgd_hf/core/algorithm.py). That helps only if the diverged replica's inner-optimizer moments are
cleaned too: else its next gradient step turns the restored weights NaN again, every later sync is
skipped, and the global model silently freezes. ``DeepSpeedAdapter.reset_nonfinite_state`` zeroes the
non-finite entries of the ZeRO optimizer's state for the partitions the rank owns.
"""

from __future__ import annotations

import math

import pytest

from tests.helpers.launch import torchrun

STEPS, H, WARMUP, POISON_AT = 14, 4, 2, 4  # syncs after steps 3, 7, 11 (t counted from 0) and at finalize


@pytest.mark.timeout(400)
@pytest.mark.parametrize("stage,shards", [
    pytest.param(2, 1, id="zero2-S1"),
    pytest.param(3, 2, id="zero3-2x2", marks=pytest.mark.slow),
])
def test_one_skipped_sync_then_training_goes_on(tmp_path, stage, shards):
    res = torchrun("ds_run.py", 2 * shards, tmp_path, "--stage", str(stage), "--shard-size", str(shards),
                   "--steps", str(STEPS), "--H", str(H), "--warmup", str(WARMUP), "--poison-at", str(POISON_AT),
                   timeout=300)
    poisoned = res[-1]
    assert poisoned["replica"] == 1
    # The premise: the poisoned replica takes inner steps after the skipped sync (at t = 7) and before the
    # next one, which turn it non-finite again unless its moments were cleaned.
    assert "gradient" in poisoned["kinds"][8:11], poisoned["kinds"]
    for r in res:
        m = r["metrics"]
        assert m["skipped_syncs"] == 1, (r["rank"], m)  # only the sync right after the divergence
        assert m["outer_syncs"] == 3, (r["rank"], m)  # t = 3, 11 and finalize
        assert r["inner_state_finite"], r["rank"]
        assert all(math.isfinite(x) for x in r["final"]), f"rank {r['rank']} ended with non-finite weights"
    assert all(r["final"] == res[0]["final"] for r in res), "finalize() left ranks with different models"
