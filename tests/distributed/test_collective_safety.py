"""Collective safety: the paths that put a collective inside a local step train to the end or stop clearly.

Each case (tests/distributed/scripts/safety_run.py) is a real 2-process PALSGDTrainer run on gloo,
p = 0.3, with a 60 s collective timeout inside the run and a test timeout around it. With shared
coins (the default) every case must train to the end with one global model on both ranks; with
per-replica coins a collective across replicas inside a local step must be refused with a
CollectiveSafetyError naming it (the alternative is a hang), while DDP's own bucket rebuild
(warm-up of one step) is made safe by design.
"""

from __future__ import annotations

import pytest

from tests.helpers.launch import torchrun

pytestmark = pytest.mark.timeout(400)


def run(tmp_path, case: str, coins: str = "shared", **env):
    return torchrun("safety_run.py", 2, tmp_path, "--run-dir", str(tmp_path / "run"), "--case", case,
                    "--coins", coins, timeout=300, env=env or None)


def assert_one_global_model(results, steps: int = 20, syncs: int = 4):
    a, b = results
    assert a["final_sha"] == b["final_sha"], "the ranks ended with different models"
    assert len(a["kinds"]) == steps and a["kinds"] == b["kinds"]
    assert "pseudo_sync" in a["kinds"] and "gradient" in a["kinds"], "the run never took both kinds of local step"
    # Syncs after steps 5, 10, 15, 20 (H = 5; the last one is the final sync).
    assert a["metrics"]["outer_syncs"] == syncs


def test_gather_in_compute_loss_trains_to_the_end_with_shared_coins(tmp_path):
    results = run(tmp_path, "gather-in-loss")
    assert_one_global_model(results)
    a = results[0]
    computed = a["kinds"].count("gradient") + a["kinds"].count("warmup")
    assert a["gathered"] == computed  # one gather per computed micro-batch, none on pseudo-sync steps
    # Every gather inside a local step is counted as foreign traffic (4 bytes: one fp32 loss).
    assert a["metrics"]["foreign_collectives"] == a["kinds"].count("gradient")
    assert a["metrics"]["foreign_comm_bytes"] == 4 * a["kinds"].count("gradient")


def test_gather_in_compute_loss_is_refused_with_per_replica_coins(tmp_path):
    with pytest.raises(AssertionError) as failed:
        run(tmp_path, "gather-in-loss", "per_replica")
    message = str(failed.value)
    assert "CollectiveSafetyError" in message
    assert "torch.distributed.all_gather" in message and "safety_run.py" in message  # names the caller
    assert "palsgd_coins='shared'" in message  # and the fix


@pytest.mark.parametrize("coins", ["shared", "per_replica"])
def test_callback_all_reduce_before_the_optimizer_step(tmp_path, coins):
    if coins == "shared":
        results = run(tmp_path, "callback-all-reduce", coins)
        assert_one_global_model(results)
        assert results[0]["metrics"]["foreign_collectives"] == 18  # every local step, both kinds
        return
    with pytest.raises(AssertionError) as failed:
        run(tmp_path, "callback-all-reduce", coins)
    assert "CollectiveSafetyError" in str(failed.value) and "on_pre_optimizer_step" in str(failed.value)


def test_one_warmup_step_with_ddp_and_per_replica_coins(tmp_path):
    # DDP rebuilds its buckets (a broadcast) in the first forward after the first synced backward; here
    # that forward is a local step that a pseudo-sync replica skips. PALSGD consumes the rebuild when
    # the local phase starts, on every rank together.
    results = run(tmp_path, "warmup-1", "per_replica")
    a, b = results
    assert a["final_sha"] == b["final_sha"]
    assert a["kinds"] != b["kinds"]  # the replicas did run different steps
    assert a["metrics"]["foreign_collectives"] == 0


def test_torch_compile_finds_ddp_and_switches_its_all_reduce_off(tmp_path):
    results = run(tmp_path, "compile")
    assert_one_global_model(results)
    a = results[0]
    assert a["model_type"] == "OptimizedModule" and a["ddp_found"]
    assert a["ddp_grad_sync"] is False  # after the final sync DDP's all-reduce is still off
    # Bytes: the warm-up's DDP buckets plus PALSGD's syncs; compare with the uncompiled run of the same case,
    # which would differ by 18 local steps' worth of gradient all-reduces had DDP kept reducing.
    plain = run(tmp_path / "plain", "callback-all-reduce")[0]
    assert a["metrics"]["comm_bytes"] == plain["metrics"]["comm_bytes"]


# Slow (~60 s quiet, 135 s loaded: the longest default test): a foreign collective under the plain Trainer stays
# in the default suite (test_gather_in_compute_loss_trains_to_the_end_with_shared_coins), and so does ZeRO
# through the Trainer (tests/distributed/test_deepspeed_trainer.py).
@pytest.mark.slow
def test_deepspeed_zero2_with_token_counting(tmp_path):
    results = run(tmp_path, "deepspeed-tokens", DS_ACCELERATOR="cpu")
    assert_one_global_model(results)
    a = results[0]
    assert a["tokens_seen"] > 0
    assert a["metrics"]["foreign_collectives"] > 0


def test_deepspeed_load_best_model_at_end_keeps_the_best_checkpoints_global_model(tmp_path):
    results = run(tmp_path, "deepspeed-best", DS_ACCELERATOR="cpu")
    a, b = results
    assert a["best_checkpoint"] and a["best_checkpoint"] == b["best_checkpoint"]
    best_step = a["best_checkpoint"].rsplit("-", 1)[1]
    assert best_step == "7"  # two local steps after the sync at 5: the replicas had drifted
    # The kept model is the anchor saved with that checkpoint, on every rank (bitwise: a copy of it), not
    # each replica's own weights there.
    assert a["owned_sha"] == a["anchors_at_save"][best_step] == b["owned_sha"]
    assert a["final_sha"] == b["final_sha"]
