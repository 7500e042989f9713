"""The PALSGD core on real torch.distributed process groups (gloo, 2 and 4 processes)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers.bounds import U_FP32, l2
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
    for t in range(3):  # warm-up: both ranks step from the same weights with the same all-reduced gradient
        assert torch.equal(torch.tensor(weights_at(a, t)), torch.tensor(weights_at(b, t))), f"warm-up step {t}"
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


# Local SGD with H = 1 (SGD inner, outer SGD at lr 1) vs DDP. Both step x <- x - lr (g_0 + g_1) / 2; Local SGD
# averages parameters (y_r = x - lr g_r, d_r = x - y_r, x' = x - (d_0 + d_1) / 2), DDP gradients. With
# u = 2^-24 and first order in u, each fp32 operation rounds by u times its result: Local SGD's result is within
# u (|x| + |x'| + 4 lr gbar) of the exact step (y_r: u (|x| + 2 lr |g_r|), d_r and the sum: u lr |g_r| each,
# x': u |x'|), DDP's within u (|x'| + 2 lr gbar), gbar = (|g_0| + |g_1|) / 2. In L2 norm a step adds at most
# e_t = u (||x_t|| + 2 ||x_t+1|| + 6 lr (||g_0|| + ||g_1||) / 2). A gradient step carries an earlier difference
# with a factor <= 1 + lr L (L: the curvature of the mean loss), e^(lr L T) over T steps.
LOCALSGD_LR, LOCALSGD_STEPS = 0.05, 12
# The Hessian of this regression problem (core_run.py's data and model) has spectral norm 5.4-7.3 at every point
# of the float64 trajectory: a property of the problem, the same on any machine.
CURVATURE = 8.0


def initial_weights() -> torch.Tensor:
    torch.manual_seed(0)  # core_run.py's model and init
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def localsgd_vs_ddp_bound(local: list) -> float:
    norms = [torch.tensor(weights).double().norm().item() for _, weights in local[0]["weights"]]  # after each step
    before = [initial_weights().double().norm().item()] + norms[:-1]
    per_step = sum(
        U_FP32 * (x0 + 2 * x1 + 6 * LOCALSGD_LR * (g0 + g1) / 2)
        for x0, x1, g0, g1 in zip(before, norms, local[0]["grad_norms"], local[1]["grad_norms"])
    )
    return math.exp(LOCALSGD_LR * CURVATURE * LOCALSGD_STEPS) * per_step


def test_localsgd_h1_sgd_equals_ddp(tmp_path):
    common = ["--inner", "sgd", "--lr", str(LOCALSGD_LR), "--steps", str(LOCALSGD_STEPS)]
    local = torchrun("core_run.py", 2, tmp_path / "local", "--method", "localsgd", "--H", "1", "--warmup", "0", *common)
    ddp = torchrun("core_run.py", 2, tmp_path / "ddp", "--method", "ddp", "--ddp", *common)
    assert local[0]["final"] == local[1]["final"] and ddp[0]["final"] == ddp[1]["final"]  # one model per run
    bound = localsgd_vs_ddp_bound(local)
    travelled = l2(torch.tensor(ddp[0]["final"]), initial_weights())
    assert bound < travelled / 50, (bound, travelled)  # room for a wrong run to stand out
    distance = l2(torch.tensor(local[0]["final"]), torch.tensor(ddp[0]["final"]))
    assert distance <= bound, f"Local SGD H=1 ends {distance} from DDP > {bound} (travelled {travelled})"
    assert ddp[0]["metrics"]["warmup_steps"] == 12 and ddp[0]["metrics"]["outer_syncs"] == 0
    assert ddp[0]["metrics"]["comm_bytes"] > 0  # DDP's buckets are counted by the comm hook
