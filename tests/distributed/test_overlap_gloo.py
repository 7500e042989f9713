"""Overlapped and bf16 outer syncs on real torch.distributed process groups (gloo).

The collectives here are real and asynchronous (gloo runs them on its own threads while the
script keeps training): the all-reduce, the bf16 all-to-all + all-gather over the peer groups,
a checkpoint taken while one is in flight. Results are compared with the float64 reference of
tests/unit/test_overlap.py; the timing test measures the seconds blocked per sync with and
without overlap on a model large enough for the all-reduce to take real time. On DeepSpeed ZeRO-2
partitions (2 replicas x 2 shards) overlap is compared with the unsharded path (fp32 on the wire,
within a rounding bound), and a ZeRO checkpoint taken in the middle of a bf16 wait is resumed (slow).
"""

from __future__ import annotations

import pytest
import torch

from palsgd_hf import PALSGDConfig
from tests.helpers.bounds import l2, sgd_rounding_bound
from tests.helpers.launch import torchrun
from tests.unit.test_overlap import reference


def assert_runs_match_reference(results, cfg: PALSGDConfig, replicas: int, steps: int, rule=reference) -> None:
    """``rule``: the float64 reference (tests/unit/test_overlap.py's, or tests/unit/test_fragments.py's)."""
    ref_before, ref_final, ref_kinds, ref_syncs = rule(cfg, replicas, steps)
    for r in results:
        k = r["replica"]
        assert r["kinds"] == ref_kinds[k], f"rank {r['rank']}: step kinds differ"
        for got, want in zip(r["before"], ref_before[k]):
            torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want, rtol=1e-9, atol=1e-11)
        for got, want in zip(r["final"], ref_final[k]):
            torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want, rtol=1e-9, atol=1e-11)
        assert r["metrics"]["outer_syncs"] == ref_syncs


CASES = [
    # H = 8, launch at count 8 and 16; d = 3 starts the bf16 gather at 10 and applies at 11.
    pytest.param(2, 1, "fp32", 2, None, id="2proc-fp32-d2"),
    pytest.param(2, 1, "bf16", 3, 10, id="2proc-bf16-d3-resume-during-gather"),
    pytest.param(4, 2, "bf16", 3, 9, id="4proc-2replicas-bf16-d3-resume-before-gather"),
    pytest.param(2, 1, "int8", 3, 10, id="2proc-int8-d3-resume-during-gather"),
]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("nproc,shard_size,comm_dtype,overlap,resume_at", CASES)
def test_overlap_on_gloo_matches_the_float64_reference(tmp_path, nproc, shard_size, comm_dtype, overlap, resume_at):
    steps, H = 19, 8
    cfg = PALSGDConfig(sync_interval=H, pseudo_sync_prob=0.3, mixing_rate=2.0, warmup_steps=2,
                       overlap_steps=overlap, comm_dtype=comm_dtype)
    args = ["--H", str(H), "--p", "0.3", "--eta", "2.0", "--warmup", "2", "--steps", str(steps),
            "--overlap", str(overlap), "--comm-dtype", comm_dtype, "--shard-size", str(shard_size)]
    if resume_at is not None:
        args += ["--resume-at", str(resume_at)]
    results = torchrun("overlap_run.py", nproc, tmp_path, *args)
    assert_runs_match_reference(results, cfg, nproc // shard_size, steps)
    if resume_at is not None:
        assert all(r["in_flight_at_save"] for r in results)
    # Bytes booked before finalize: 2 warm-up gradient all-reduces and the broadcast that starts the
    # local phase (from replica 0), all float64 (8 bytes x 6 values); the two syncs' exchanges
    # (bf16: 2 bytes per value); with shards, a 4-byte finite flag per applied sync in the replica.
    # int8: the 6 values padded to one 256-value block per rank, 256 bytes + a 4-byte scale per chunk message,
    # each of the two phases booking half of the 2 x 260 bytes.
    per_sync = {"fp32": 6 * 8, "bf16": 6 * 2, "int8": 2 * 260}[comm_dtype]
    for r in results:
        expected = 2 * 48 + (48 if r["replica"] == 0 else 0) + 2 * per_sync + (2 * 4 if shard_size > 1 else 0)
        assert r["metrics"]["comm_bytes"] == expected


def _timing_run(tmp_path):
    """16 MiB pseudo-gradient, 2 steps of real compute to hide it behind, blocking and overlapped."""
    return torchrun("overlap_run.py", 2, tmp_path, "--task", "timing", "--H", "4", "--overlap", "2",
                    "--steps", "16", "--width", "2048", "--batch", "128")


@pytest.mark.timeout(240)
def test_overlap_runs_the_sync_in_flight_with_the_same_bytes(tmp_path):
    res = _timing_run(tmp_path)
    assert all(r["overlap2"]["comm_seconds_overlapped"] > 0 for r in res)
    assert all(r["overlap0"]["comm_bytes"] == r["overlap2"]["comm_bytes"] for r in res)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_overlap_hides_the_sync_behind_local_steps(tmp_path):
    """The time blocked per sync with overlap must be a small part of the blocking one. A timing claim:
    on a loaded 2-core machine gloo's background threads compete with the compute they should hide
    behind, so it runs with -m slow on a quiet machine (the measured figures: docs/overlap.md)."""
    res = _timing_run(tmp_path)
    blocking = max(r["overlap0"]["sync_seconds_blocked"] / r["overlap0"]["outer_syncs"] for r in res)
    overlapped = max(r["overlap2"]["sync_seconds_blocked"] / r["overlap2"]["outer_syncs"] for r in res)
    assert overlapped <= 0.5 * blocking, f"blocked per sync: {overlapped:.4f}s with overlap vs {blocking:.4f}s without"


# ---------------------------------------------------------------- DeepSpeed ZeRO partitions
# overlap_ds_run.py = tests/distributed/scripts/ds_run.py (ZeRO vs. the unsharded DDP path on the
# same data) with overlap_steps and comm_dtype set. 2 replicas x 2 ZeRO shards, H = 4, 14 steps:
# launches at counts 4, 8, 12, updates land 2 steps later. SGD (tests/helpers/bounds.py says why not AdamW).
ZERO_ARGS = ("--overlap", "2", "--shard-size", "2", "--optim", "sgd", "--lr", "0.1")
# The equivalence exchanges fp32: bf16 on the wire rounds each pseudo-gradient, and two values a rounding
# apart on either side of a bf16 rounding boundary land one bf16 ulp (2^-7 relative) apart, so no fp32
# bound holds for it. bf16 exchanges of shards are checked against the float64 reference above
# (4proc-2replicas-bf16); the resume below runs with bf16 on the wire.
ZERO_FP32 = (*ZERO_ARGS, "--comm-dtype", "fp32")
ZERO_BF16 = (*ZERO_ARGS, "--comm-dtype", "bf16")
# ds_run.py's p; the terms that the two layouts may sum in other orders: 16 examples in the warm-up's
# all-reduce, the forward's inner products over 16 inputs and 32 hidden units (as in test_deepspeed.py).
ZERO_P, ZERO_TERMS = 0.3, 16 + 16 + 32


@pytest.fixture(scope="module")
def zero_full(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero_full")
    return torchrun("overlap_ds_run.py", 4, out, "--mode", "ds", "--stage", "2", *ZERO_FP32, timeout=300)


@pytest.mark.timeout(600)
def test_zero_partitions_with_overlap_match_the_unsharded_path(tmp_path, zero_full):
    ref = torchrun("overlap_ds_run.py", 2, tmp_path, "--mode", "ref", *ZERO_FP32, timeout=300)
    # Only the split of fp32 sums differs: the bound of tests/helpers/bounds.py over this run's learning rates
    # (gradient steps at lr / (1 - p)). Overlap keeps its gains: x <- x_bar_new + (x - x_launch) carries a
    # worker's difference made before the launch through x_bar_new only, one made after it with gain 1.
    bound = sgd_rounding_bound(sum(ref[0]["lrs"]) / (1 - ZERO_P), tokens_per_step=ZERO_TERMS)
    travelled = l2(torch.tensor(ref[0]["final"]), torch.tensor(ref[0]["initial"]))
    assert bound < travelled / 50, (bound, travelled)  # room for a wrong run to stand out
    for x in zero_full:
        r = ref[x["replica"]]
        assert x["kinds"] == r["kinds"]
        # The weights at each launch (replicas differ then) and after finalize (one global model).
        for (t, got), (t_ref, want) in zip(x["synced"], r["synced"]):
            assert t == t_ref
            distance = l2(torch.tensor(got), torch.tensor(want))
            assert distance <= bound, f"rank {x['rank']} at the launch at step {t}: {distance} > {bound}"
        distance = l2(torch.tensor(x["final"]), torch.tensor(ref[0]["final"]))
        assert distance <= bound, f"rank {x['rank']}, final weights: {distance} > {bound} (travelled {travelled})"
        assert x["metrics"]["outer_syncs"] == r["metrics"]["outer_syncs"] == 4  # 3 overlapped + finalize's
        assert x["metrics"]["skipped_syncs"] == 0
    assert all(x["final"] == zero_full[0]["final"] for x in zero_full)
    assert zero_full[0]["synced"][1][1] != zero_full[2]["synced"][1][1]  # replicas differ at a launch


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_zero_resume_in_the_middle_of_a_wait_is_exact(tmp_path):
    # Saved after 5 steps: the sync launched at 4 is in flight (it lands at 6), bf16 on the wire.
    run = ("--mode", "ds", "--stage", "2", *ZERO_BF16)
    zero_full = torchrun("overlap_ds_run.py", 4, tmp_path / "full", *run, timeout=300)
    torchrun("overlap_ds_run.py", 4, tmp_path / "saved", *run, "--save-at", "5", timeout=300)
    resumed = torchrun("overlap_ds_run.py", 4, tmp_path / "resumed", *run, "--resume", str(tmp_path / "saved" / "ckpt"),
                       timeout=300)
    for a, b in zip(zero_full, resumed):
        assert b["start"] == 5 and b["kinds"] == a["kinds"][5:]
        assert b["owned"] == a["owned"][5:], f"rank {a['rank']}: resumed trajectory differs"
        assert b["final"] == a["final"]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("overlap,fragments,syncs", [("0", "1", 4), ("2", "1", 4), ("1", "2", 8)],
                         ids=["blocking", "overlap2", "overlap1-2-fragments"])
def test_zero_int8_with_residuals_resumes_exactly(tmp_path, overlap, fragments, syncs):
    """int8 on the wire with error feedback over ZeRO-2 partitions (2 replicas x 2 shards): one global model at
    the end, and a checkpoint after 5 steps (residuals of the sync at 4 held; with overlap 2, that sync in flight)
    resumes onto the same trajectory, bit for bit. With 2 fragments each rank cuts its own flat partition in two,
    synced at counts 2 mod 4 and 0 mod 4 (6 fragment syncs, then finalize's 2)."""
    run = ("--mode", "ds", "--stage", "2", *ZERO_ARGS[2:], "--overlap", overlap, "--comm-dtype", "int8",
           "--fragments", fragments)
    full = torchrun("overlap_ds_run.py", 4, tmp_path / "full", *run, timeout=300)
    torchrun("overlap_ds_run.py", 4, tmp_path / "saved", *run, "--save-at", "5", timeout=300)
    resumed = torchrun("overlap_ds_run.py", 4, tmp_path / "resumed", *run, "--resume", str(tmp_path / "saved" / "ckpt"),
                       timeout=300)
    assert all(x["final"] == full[0]["final"] for x in full)
    assert all(x["metrics"]["outer_syncs"] == syncs and x["metrics"]["skipped_syncs"] == 0 for x in full)
    for a, b in zip(full, resumed):
        assert b["owned"] == a["owned"][5:] and b["final"] == a["final"], f"rank {a['rank']}: resumed run differs"


# ---------------------------------------------------------------- the HF Trainer
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_trainer_checkpoint_in_the_middle_of_a_wait_resumes_exactly(tmp_path):
    """PALSGDTrainer (tiny GPT-Neo, DDP): H = 8, d = 2, bf16; the checkpoint at step 17 is taken while
    the exchange launched at 16 is in flight (it lands at 18)."""
    run = ["--steps", "44", "--H", "8", "--warmup", "4", "--p", "0.25", "--overlap", "2", "--comm-dtype", "bf16"]
    full = torchrun("overlap_trainer_run.py", 2, tmp_path / "full", "--run-dir", str(tmp_path / "full_run"), *run,
                    timeout=600)
    resume_run = [*run, "--run-dir", str(tmp_path / "run"), "--save-steps", "17"]
    torchrun("overlap_trainer_run.py", 2, tmp_path / "first", *resume_run, "--crash-at", "17", timeout=600)
    ckpt = tmp_path / "run" / "checkpoint-17"
    resumed = torchrun("overlap_trainer_run.py", 2, tmp_path / "second", *resume_run, "--resume", str(ckpt),
                       timeout=600)
    for rank in range(2):
        a, b = torch.load(tmp_path / "full" / f"rank{rank}.pt"), torch.load(tmp_path / "second" / f"rank{rank}.pt")
        assert torch.equal(a["final"], b["final"]) and torch.equal(a["local_last"], b["local_last"])
        assert [s["kind"] for s in resumed[rank]["steps"]] == [s["kind"] for s in full[rank]["steps"]][17:]
        assert resumed[rank]["metrics"]["outer_syncs"] == full[rank]["metrics"]["outer_syncs"] == 6
        assert full[rank]["metrics"]["comm_seconds_overlapped"] > 0
