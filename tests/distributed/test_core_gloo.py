"""The PALSGD core on real torch.distributed process groups (gloo, 2 and 4 processes)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.launch import torchrun


def weights_at(result, step):
    return dict((t, w) for t, w in result["weights"])[step]


@pytest.mark.parametrize("ddp", [False, True], ids=["bare", "ddp"])
def test_workers_identical_after_sync_and_differ_between(tmp_path, ddp):
    H, steps = 4, 22
    res = torchrun(
        "core_run.py", 2, tmp_path, "--H", str(H), "--p", "0.3", "--steps", str(steps), "--warmup", "3",
        "--record-every-step", *(["--ddp"] if ddp else []),
    )
    a, b = res
    for t in range(3):  # warm-up: synchronous, identical
        assert weights_at(a, t) == pytest.approx(weights_at(b, t), abs=1e-6)
    last_sync, drifted = 2, 0
    for t in range(3, steps):
        wa, wb = torch.tensor(weights_at(a, t)), torch.tensor(weights_at(b, t))
        if (t + 1) % H == 0:
            assert torch.equal(wa, wb), f"replicas differ right after the sync at step {t}"
            last_sync = t
        elif any(r["kinds"][s] == "gradient" for r in res for s in range(last_sync + 1, t + 1)):
            # a local gradient step on different data since the last sync: the replicas drift apart
            assert not torch.allclose(wa, wb), f"replicas identical between syncs at step {t}"
            drifted += 1
    assert drifted >= 8
    assert a["final"] == b["final"]  # finalize() gives every rank the global model
    # After warm-up nothing is communicated between syncs: call counts change only at syncs.
    for t in range(4, steps):
        if (t + 1) % H != 0 and t + 1 != 4:
            assert a["comm_calls"][t] == a["comm_calls"][t - 1], f"collective at local step {t}"
    assert a["metrics"]["outer_syncs"] == sum(1 for t in range(3, steps) if (t + 1) % H == 0)


@pytest.mark.parametrize("coins", ["per_replica", "shared"])
def test_coins_agree_within_replica_and_per_replica_coins_differ_across(tmp_path, coins):
    res = torchrun("core_run.py", 4, tmp_path, "--shard-size", "2", "--warmup", "0", "--steps", "300", "--p", "0.3",
                   "--H", "10", "--coins", coins)
    by_replica = {}
    for r in res:
        by_replica.setdefault(r["replica"], []).append(r["kinds"])
    assert sorted(by_replica) == [0, 1]
    for kinds in by_replica.values():
        assert kinds[0] == kinds[1], "ranks of one replica flipped different coins"
    if coins == "per_replica":
        assert by_replica[0][0] != by_replica[1][0], "two replicas flipped identical coins"
    else:
        assert by_replica[0][0] == by_replica[1][0], "shared coins: the replicas ran different step kinds"
    for kinds in by_replica.values():
        frac = kinds[0].count("pseudo_sync") / len(kinds[0])
        assert abs(frac - 0.3) < 0.08, f"pseudo-sync fraction {frac} far from p=0.3"


def test_localsgd_h1_sgd_equals_ddp(tmp_path):
    common = ["--inner", "sgd", "--lr", "0.05", "--steps", "12"]
    local = torchrun("core_run.py", 2, tmp_path / "local", "--method", "localsgd", "--H", "1", "--warmup", "0", *common)
    ddp = torchrun("core_run.py", 2, tmp_path / "ddp", "--method", "ddp", "--ddp", *common)
    torch.testing.assert_close(torch.tensor(local[0]["final"]), torch.tensor(ddp[0]["final"]), rtol=1e-5, atol=1e-6)
    assert ddp[0]["metrics"]["warmup_steps"] == 12 and ddp[0]["metrics"]["outer_syncs"] == 0
    assert ddp[0]["metrics"]["comm_bytes"] > 0  # DDP's buckets are counted by the comm hook
