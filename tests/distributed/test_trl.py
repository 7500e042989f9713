"""trl's SFT/DPO trainers with PALSGD, on 2 gloo processes, a small local Llama checkpoint and chat data.

Each run is tests/distributed/scripts/trl_run.py: 24 steps, H = 6, p = 0.3, 2 warm-up steps, logs every
4 steps, fp32 on CPU. Checked: one global model on both ranks at the end; trl's metrics (token accuracy,
entropy, num_tokens; DPO's rewards) and palsgd/* in log_history, with no collective across replicas
inside a local step (trl's per-micro-batch gathers are deferred to log time) and num_tokens exactly the
tokens both ranks trained on; with LoRA, bytes per sync = trainable adapter parameters x 4, the anchor
holds the adapter only, every saved adapter (mid-period checkpoints, save_model) reloads with
PeftModel.from_pretrained equal to the global model at its save, and a resume between syncs ends on the
same weights, bit for bit, as the uninterrupted run.
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


def run(tmp_path, data_dir, case: str, *extra: str, name: str = "run"):
    return torchrun("trl_run.py", 2, tmp_path / f"out_{name}", "--run-dir", str(tmp_path / name),
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
    a, b = results
    for r in results:
        # trl's gathers ran on neither rank inside a local step: nothing crossed replicas between syncs.
        assert r["metrics"]["foreign_collectives"] == 0 and r["metrics"]["foreign_comm_bytes"] == 0
    train_logs = [log for log in a["log_history"] if "loss" in log]
    assert [log["step"] for log in train_logs] == list(range(4, STEPS + 1, 4))
    for log in train_logs:
        assert all(k in log for k in keys), f"trl metrics missing at step {log['step']}: {sorted(log)}"
        assert "palsgd/outer_syncs" in log and "palsgd/comm_bytes" in log
        # trl's running token count: exactly the tokens both ranks trained on up to this log.
        step = str(log["step"])
        assert log["num_tokens"] == a["tokens_at_log"][step] + b["tokens_at_log"][step]
        if "mean_token_accuracy" in log:
            assert 0.0 <= log["mean_token_accuracy"] <= 1.0 and log["entropy"] > 0
    # The combined trl metrics and the loss are the same on every rank (palsgd/* and grad_norm are each rank's own).
    shared = ("loss", *keys)
    assert [{k: log.get(k) for k in shared} for log in train_logs] == [
        {k: log.get(k) for k in shared} for log in b["log_history"] if "loss" in log
    ], "the ranks logged different trl metrics"


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
