"""trl's SFT/DPO trainers with PALSGD, on 2 gloo processes, a small local Llama checkpoint and chat data.

Each run is tests/distributed/scripts/trl_run.py: 24 steps, H = 6, p = 0.3, 2 warm-up steps, logs every
4 steps, fp32 on CPU. Checked: one global model on both ranks at the end; trl's metrics (token accuracy,
entropy, num_tokens; DPO's rewards) and palsgd/* in log_history, with no collective across replicas
inside a local step (trl's per-micro-batch gathers are deferred to log time) and num_tokens exactly the
tokens both ranks trained on; with LoRA, bytes per sync = trainable adapter parameters x 4, the anchor
holds the adapter only, every saved adapter (mid-period checkpoints, save_model) reloads with
PeftModel.from_pretrained equal to the global model at its save, and a resume between syncs ends on the
same weights, bit for bit, as the uninterrupted run. The same LoRA checks under DeepSpeed ZeRO-2 on 4
processes (2 workers x 2 ZeRO ranks), where each rank syncs its ZeRO partition of the adapter.
"""

from __future__ import annotations

import pytest

from tests.helpers.launch import torchrun

pytest.importorskip("trl")
pytest.importorskip("peft")
pytestmark = pytest.mark.timeout(400)

STEPS, H = 24, 6
TRL_METRICS = ("mean_token_accuracy", "entropy", "num_tokens")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("trl_data")  # the checkpoint and data, built once by the first run


def run(tmp_path, data_dir, case: str, *extra: str, name: str = "run", nproc: int = 2):
    return torchrun("trl_run.py", nproc, tmp_path / f"out_{name}", "--run-dir", str(tmp_path / name),
                    "--data-dir", str(data_dir), "--case", case, *extra, timeout=360)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("trl_lora")
    # A checkpoint at step 9: three steps after the sync at step 6, so local weights differ from the global ones.
    return tmp, run(tmp, data_dir, "lora", "--save-steps", "9")


def assert_one_global_model(results, coins: str = "shared"):
    a, b = results
    assert a["final_sha"] == b["final_sha"], "the ranks ended with different models"
    assert len(a["kinds"]) == STEPS
    if coins == "shared":
        assert a["kinds"] == b["kinds"]
    assert "pseudo_sync" in a["kinds"] and "gradient" in a["kinds"], "the run never took both kinds of local step"
    assert a["metrics"]["outer_syncs"] == STEPS // H  # syncs at steps 6, 12, 18 and 24 (the last one final)


def assert_trl_metrics_local_and_exact(results, keys=TRL_METRICS):
    a = results[0]
    for r in results:
        # trl's gathers ran on neither rank inside a local step: nothing crossed replicas between syncs.
        assert r["metrics"]["foreign_collectives"] == 0 and r["metrics"]["foreign_comm_bytes"] == 0
    train_logs = [log for log in a["log_history"] if "loss" in log]
    assert [log["step"] for log in train_logs] == list(range(4, STEPS + 1, 4))
    for log in train_logs:
        assert all(k in log for k in keys), f"trl metrics missing at step {log['step']}: {sorted(log)}"
        assert "palsgd/outer_syncs" in log and "palsgd/comm_bytes" in log
        # trl's running token count: exactly the tokens every rank trained on up to this log.
        step = str(log["step"])
        assert log["num_tokens"] == sum(r["tokens_at_log"][step] for r in results)
        if "mean_token_accuracy" in log:
            assert 0.0 <= log["mean_token_accuracy"] <= 1.0 and log["entropy"] > 0
    # The combined trl metrics and the loss are the same on every rank (palsgd/* and grad_norm are each rank's own).
    shared = ("loss", *keys)
    for r in results[1:]:
        assert [{k: log.get(k) for k in shared} for log in train_logs] == [
            {k: log.get(k) for k in shared} for log in r["log_history"] if "loss" in log
        ], f"rank {r['rank']} logged other trl metrics than rank 0"


def test_sft_chat_full_finetune(tmp_path, data_dir):
    results = run(tmp_path, data_dir, "sft")
    assert_one_global_model(results)
    assert_trl_metrics_local_and_exact(results)
    losses = [log["loss"] for log in results[0]["log_history"] if "loss" in log]
    assert losses[-1] < losses[0] - 1.0, f"SFT did not learn: {losses}"
    assert results[0]["anchor_numel"] == results[0]["trainable_numel"] == results[0]["total_numel"]


def test_lora_syncs_the_adapter_only(lora_run):
    _, results = lora_run
    assert_one_global_model(results)
    assert_trl_metrics_local_and_exact(results)
    a = results[0]
    adapter_bytes = 4 * a["trainable_numel"]  # fp32
    assert 0 < a["trainable_numel"] < a["total_numel"] // 50
    assert a["anchor_numel"] == a["trainable_numel"]
    for r in results:
        steps = r["per_step"]
        sync_steps = [cur for prev, cur in zip(steps, steps[1:]) if cur["outer_syncs"] > prev["outer_syncs"]]
        assert len(sync_steps) == 4
        for prev, cur in zip(steps, steps[1:]):
            if cur["outer_syncs"] > prev["outer_syncs"]:
                assert cur["comm_bytes"] - prev["comm_bytes"] == adapter_bytes, f"rank {r['rank']}, step {cur['step']}"


def test_lora_saved_adapters_are_the_global_model(lora_run):
    _, results = lora_run
    a = results[0]
    # checkpoint-9 (between syncs), checkpoint-18, checkpoint-24 and save_model's final directory.
    assert a["reloads_equal"] == {"9": True, "18": True, "24": True, "-1": True}
    assert a["local_differs_at_save"]["9"], "at step 9 the local weights should differ from the global ones"


def test_lora_resume_between_syncs_is_exact(lora_run, data_dir):
    tmp, uninterrupted = lora_run
    resumed = run(tmp, data_dir, "lora", "--save-steps", "9", "--resume-from", str(tmp / "run" / "checkpoint-9"),
                  name="resumed")
    assert resumed[0]["final_sha"] == resumed[1]["final_sha"] == uninterrupted[0]["final_sha"]
    assert resumed[0]["kinds"] == uninterrupted[0]["kinds"][9:]


def test_lora_sft_with_per_replica_coins_needs_no_collective_between_syncs(tmp_path, data_dir):
    # Stock trl gathers in every compute_loss: with per-replica coins that would be refused (CollectiveSafetyError).
    results = run(tmp_path, data_dir, "lora", "--coins", "per_replica")
    assert_one_global_model(results, coins="per_replica")
    assert results[0]["kinds"] != results[1]["kinds"], "the replicas should have drawn different coins"
    assert_trl_metrics_local_and_exact(results)


def test_dpo_with_lora(tmp_path, data_dir):
    results = run(tmp_path, data_dir, "dpo")
    assert_one_global_model(results)
    dpo_keys = ("num_tokens", "rewards/chosen", "rewards/margins", "logps/chosen")
    assert_trl_metrics_local_and_exact(results, keys=dpo_keys)


# ---------------------------------------------------------------------------------------------- ZeRO-2 + LoRA
# 4 processes = 2 PALSGD workers x 2 ZeRO-2 ranks (palsgd_shard_size=2, deepspeed=recipes/deepspeed/zero2.json),
# per-replica coins: the two ranks of a worker must draw the same coins (they shard one model copy and step it
# together), the two workers different ones, and nothing may cross workers between syncs.
SHARD = 2
FP32_BYTES = 4  # palsgd_comm_dtype='fp32' (the default): 4 bytes per element on the wire
# ZeRO-1/2 flatten each parameter group and pad it to a multiple of nccl_start_alignment_factor (2) x the ZeRO
# group size, then split it evenly (deepspeed/runtime/zero/stage_1_and_2.py, DeepSpeedZeroOptimizer.__init__;
# zero_optimization.parameter_alignment off, the default and zero2.json's). The padding is synced too.
ZERO_ALIGNMENT = 2 * SHARD


def zero2_partition_numel(group_numel: int) -> int:
    """Elements of one parameter group's fp32 master partition on each rank of a ZeRO-2 group of SHARD ranks."""
    return -(-group_numel // ZERO_ALIGNMENT) * ZERO_ALIGNMENT // SHARD


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("trl_lora_zero2")
    return tmp, run(tmp, data_dir, "lora_zero2", "--coins", "per_replica", "--save-steps", "9", nproc=4)


def test_lora_zero2_trains_one_global_model_with_per_worker_coins(zero2_run):
    _, results = zero2_run
    assert [r["replica"] for r in results] == [0, 0, 1, 1] and all(r["zero_world"] == SHARD for r in results)
    assert len({r["final_sha"] for r in results}) == 1, "the 4 ranks ended with different models"
    assert len({r["trainable_sha"] for r in results}) == 1
    assert all(len(r["kinds"]) == STEPS and r["metrics"]["outer_syncs"] == STEPS // H for r in results)
    for worker in (results[:2], results[2:]):
        assert worker[0]["kinds"] == worker[1]["kinds"], "the two ZeRO ranks of one worker drew different coins"
        assert "pseudo_sync" in worker[0]["kinds"] and "gradient" in worker[0]["kinds"]
    assert results[0]["kinds"] != results[2]["kinds"], "per-replica coins: the workers should draw differently"
    assert_trl_metrics_local_and_exact(results)  # includes: no collective across workers inside a local step


def test_lora_zero2_sync_sends_each_ranks_adapter_partition(zero2_run):
    _, results = zero2_run
    for r in results:
        # Every trainable (adapter) tensor is in a ZeRO parameter group; each rank owns its slice of each group.
        assert sum(r["zero_group_numel"]) == r["trainable_numel"] and 0 < r["trainable_numel"] < r["total_numel"] // 50
        expected = [zero2_partition_numel(n) for n in r["zero_group_numel"]]
        assert r["owned_numel"] == expected and r["anchor_numel"] == sum(expected)
        # Here: 1,792 adapter parameters in one group -> 896 per rank -> 3,584 B per sync (half the 2-process
        # LoRA run's 7,168 B: the other half goes between the other two ranks, in parallel).
        sync_bytes = FP32_BYTES * sum(expected)
        steps = r["per_step"]
        for prev, cur in zip(steps, steps[1:]):
            sent = cur["peer_bytes"] - prev["peer_bytes"]
            if cur["step"] <= 2:  # warm-up: the partition's gradient, averaged across workers
                assert sent == sync_bytes, (r["rank"], cur["step"])
            elif cur["outer_syncs"] > prev["outer_syncs"]:
                assert sent == sync_bytes, f"rank {r['rank']}, step {cur['step']}: {sent} B at a sync"
            else:
                assert sent == 0, f"rank {r['rank']}, step {cur['step']}: {sent} B across workers in a local step"


def test_lora_zero2_saved_adapters_are_the_global_model(zero2_run):
    _, results = zero2_run
    # Rank 0 reloads checkpoint-9 (between syncs), -18, -24 and save_model's directory with PeftModel.from_pretrained.
    assert results[0]["reloads_equal"] == {"9": True, "18": True, "24": True, "-1": True}
    assert all(r["local_differs_at_save"]["9"] for r in results), "at step 9 local weights should have drifted"


def test_lora_zero2_resume_between_syncs_is_exact(zero2_run, data_dir):
    tmp, uninterrupted = zero2_run
    ckpt = tmp / "run" / "checkpoint-9"
    assert {"replica_0", "replica_1"} <= {p.name for p in ckpt.iterdir()}  # one ZeRO checkpoint per worker
    resumed = run(tmp, data_dir, "lora_zero2", "--coins", "per_replica", "--save-steps", "9", "--resume-from",
                  str(ckpt), name="resumed", nproc=4)
    for got, want in zip(resumed, uninterrupted):
        assert got["final_sha"] == want["final_sha"], f"rank {got['rank']}: resumed run ended elsewhere"
        assert got["kinds"] == want["kinds"][9:]
