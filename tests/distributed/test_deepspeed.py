"""PALSGD on real DeepSpeed ZeRO 1/2/3 engines (CPU, gloo), against the non-DeepSpeed path.

A layout is R replicas x S ranks: ZeRO shards within each replica, PALSGD averages across them.
The reference runs the same algorithm unsharded (one DDP process per replica, ModuleAdapter) on
the same data: each reference process gets the concatenation of the micro-batches that the S
ranks of its replica get. Same model init, coins, SGD, clipping and LR schedule, so the
trajectories must agree to float32 round-off (a bound, tests/helpers/bounds.py; bf16: to bf16 precision).

Default suite: ZeRO-3 as 2 replicas x 2 shards (the stage with the most machinery), bf16 ZeRO-2
with S = 1, the refusals (ZeRO-3 resume runs through the Trainer, test_deepspeed_trainer.py).
The rest of the stage x layout x precision matrix and the raw-loop resume tests are slow.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.helpers.bounds import l2, sgd_rounding_bound
from tests.helpers.launch import torchrun

STEPS, H, WARMUP, P = 14, 4, 2, 0.3  # ds_run.py's defaults
TIMEOUT = 300
# SGD, not AdamW: AdamW turns last-bit gradient differences into visible weight differences (bounds.py).
SGD = ("--optim", "sgd", "--lr", "0.1")
# The terms of a sum that the two layouts may split or order differently: the 16 examples of the warm-up's
# all-reduce (2 replicas x 8), and the forward's inner products (16 inputs, 32 hidden units), which kernels
# of another batch shape may also sum in another order.
TERMS = 16 + 16 + 32


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The unsharded runs, one per micro-batch count S (computed once per module)."""
    cache: dict[int, list] = {}

    def get(shards: int) -> list:
        if shards not in cache:
            out = tmp_path_factory.mktemp(f"ref{shards}")
            cache[shards] = torchrun("ds_run.py", 2, out, "--mode", "ref", "--shard-size", str(shards), *SGD,
                                     timeout=TIMEOUT)
        return cache[shards]

    return get


def run_ds(out, stage: int, shards: int, *extra: str) -> list:
    nproc = 2 * shards  # always 2 replicas
    return torchrun("ds_run.py", nproc, out, "--stage", str(stage), "--shard-size", str(shards), *SGD, *extra,
                    timeout=TIMEOUT)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """Uninterrupted fp32 DeepSpeed runs, shared by the trajectory and resume tests (4-process runs are slow)."""
    cache: dict[tuple[int, int], list] = {}

    def get(stage: int, shards: int) -> list:
        if (stage, shards) not in cache:
            cache[(stage, shards)] = run_ds(tmp_path_factory.mktemp(f"ds{stage}-{shards}"), stage, shards)
        return cache[(stage, shards)]

    return get


def is_sync(t: int) -> bool:
    return t >= WARMUP and (t + 1) % H == 0


def fp32_distance_check(ref: list):
    """fp32: the weights within the rounding bound of bounds.py, over this run's learning rates."""
    # Gradient steps run at lr / (1 - p); counting every step so is an upper bound.
    bound = sgd_rounding_bound(sum(ref[0]["lrs"]) / (1 - P), tokens_per_step=TERMS)
    travelled = l2(torch.tensor(ref[0]["final"]), torch.tensor(ref[0]["initial"]))
    assert bound < travelled / 50, (bound, travelled)  # room for a wrong run to stand out

    def check(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
        distance = l2(got, want)
        assert distance <= bound, f"{what}: {distance} from the reference > {bound} (travelled {travelled})"

    return check


def check_against_reference(ds: list, ref: list, shards: int, close) -> None:
    replicas = len(ds) // shards
    assert replicas == len(ref) == 2
    for r in range(replicas):
        ranks = ds[r * shards : (r + 1) * shards]
        assert all(x["replica"] == r for x in ranks)
        assert all(x["kinds"] == ref[r]["kinds"] for x in ranks), "coins differ within a replica or from the reference"
        assert ranks[0]["lrs"] == pytest.approx(ref[r]["lrs"], rel=1e-6), "LR schedule out of step with the reference"
        assert all(x["engine_global_steps"] == STEPS for x in ranks), "the engine did not count every step"
    assert ds[0]["kinds"] != ds[shards]["kinds"], "replicas flipped identical coins"
    assert "pseudo_sync" in ds[0]["kinds"] and "gradient" in ds[0]["kinds"]

    syncs = [t for t in range(STEPS) if is_sync(t)]
    assert [t for t, _ in ds[0]["synced"]] == syncs
    for i, t in enumerate(syncs):
        weights = [torch.tensor(x["synced"][i][1]) for x in ds]
        assert all(torch.equal(weights[0], w) for w in weights), f"replicas differ right after the sync at step {t}"
        close(weights[0], torch.tensor(ref[0]["synced"][i][1]), f"the sync at step {t}")

    # Between syncs the replicas drift apart (their data differ); peers own the same partition.
    for k in range(shards):
        a, b = ds[k], ds[k + shards]
        differ = [t for t in range(WARMUP + 1, STEPS) if not is_sync(t) and a["owned"][t] != b["owned"][t]]
        assert len(differ) >= 3, f"peers {k} and {k + shards} never drifted apart between syncs"
        assert all(a["owned"][t] == b["owned"][t] for t in syncs)

    finals = [torch.tensor(x["final"]) for x in ds]
    assert all(torch.equal(finals[0], f) for f in finals), "finalize() left ranks with different models"
    close(finals[0], torch.tensor(ref[0]["final"]), "the final weights")

    # Traffic: nothing crosses replicas on a local step; a sync sends this rank's partition only.
    for x in ds:
        sent = x["peer_bytes"]
        for t in range(WARMUP + 1, STEPS):
            delta = sent[t] - sent[t - 1]
            if is_sync(t):
                assert delta == 4 * x["owned_numel"], f"rank {x['rank']} sent {delta} bytes at the sync at step {t}"
            else:
                assert delta == 0, f"rank {x['rank']} communicated at local step {t}"
    ref_sync = ref[0]["peer_bytes"][syncs[0]] - ref[0]["peer_bytes"][syncs[0] - 1]
    assert ref_sync == 4 * ref[0]["model_numel"]
    ds_sync = ds[0]["peer_bytes"][syncs[0]] - ds[0]["peer_bytes"][syncs[0] - 1]
    # 1/S of the unsharded bytes, up to ZeRO's alignment padding of the partitions.
    assert ds_sync * shards == pytest.approx(ref_sync, rel=0.01)


def bf16_close(got: torch.Tensor, want: torch.Tensor, what: str, atol: float) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=atol, msg=lambda m: f"{what}: {m}")


SLOW = pytest.mark.slow
STAGE_LAYOUTS = [
    pytest.param(3, 2, id="zero3-2x2"),
    pytest.param(1, 2, id="zero1-2x2", marks=SLOW),
    pytest.param(2, 2, id="zero2-2x2", marks=SLOW),
    pytest.param(1, 1, id="zero1-S1", marks=SLOW),
    pytest.param(2, 1, id="zero2-S1", marks=SLOW),
    pytest.param(3, 1, id="zero3-S1", marks=SLOW),
]


@pytest.mark.parametrize("stage,shards", STAGE_LAYOUTS)
def test_zero_matches_unsharded_path(full_run, reference, stage, shards):
    ds, ref = full_run(stage, shards), reference(shards)
    check_against_reference(ds, ref, shards, fp32_distance_check(ref))


@pytest.mark.parametrize("stage,shards", [
    pytest.param(2, 1, id="zero2-S1"),
    pytest.param(2, 2, id="zero2-2x2", marks=SLOW),
    pytest.param(3, 2, id="zero3-2x2", marks=SLOW),
])
def test_bf16_follows_fp32_reference(tmp_path, reference, stage, shards):
    ds = run_ds(tmp_path, stage, shards, "--bf16")
    # The full weights are bf16 copies of the fp32 masters: equal to ~2^-8 relative. Everything else
    # (coins, LR, sync equality, bytes) is checked exactly.
    check_against_reference(ds, reference(shards), shards, functools.partial(bf16_close, atol=2e-2))


# ZeRO-3 resume in the default suite runs through the Trainer (test_deepspeed_trainer.py).
@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resume_is_exact(tmp_path, full_run, stage):
    full = full_run(stage, 2)
    run_ds(tmp_path / "saved", stage, 2, "--save-at", "7")  # step 7: between two syncs, replicas differ
    ckpt = tmp_path / "saved" / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["global_step7", "latest", "replica_0", "replica_1"]
    for replica in ("replica_0", "replica_1"):  # one ZeRO file set per replica: no overwriting
        names = sorted(p.name for p in (ckpt / replica / "global_step7").iterdir())
        assert len([n for n in names if "optim_states" in n]) == 2, names
    # The resumed loop logs a world-wide mean loss every step while one replica may skip its forward:
    # ZeRO-3 re-records its fetch trace after a restart, and its checks must stay within the replica.
    resumed = run_ds(tmp_path / "resumed", stage, 2, "--resume", str(ckpt))
    for a, b in zip(full, resumed):
        assert b["start"] == 7
        assert b["kinds"] == a["kinds"][7:] and b["lrs"] == a["lrs"][7:]
        assert b["owned"] == a["owned"][7:], f"rank {a['rank']}: resumed trajectory differs"
        assert b["final"] == a["final"]
        assert b["metrics"]["outer_syncs"] == a["metrics"]["outer_syncs"]
        assert b["engine_global_steps"] == a["engine_global_steps"]


def test_refusals_name_value_rule_and_fix(tmp_path):
    res = torchrun("ds_errors.py", 2, tmp_path, timeout=TIMEOUT)
    for r in res:
        assert r["zero_over_world"][0] == "ValueError" and "confined to one replica" in r["zero_over_world"][1]
        assert r["stage0"][0] == "ValueError" and "stage 0" in r["stage0"][1]
        assert r["offload"][0] == "NotImplementedError" and "offload" in r["offload"][1]
        assert r["not_divisible"][0] == "PALSGDConfigError" and "shard_size=4" in r["not_divisible"][1]
        assert r["batch_size"][0] == "PALSGDConfigError" and "train_batch_size=6" in r["batch_size"][1]
