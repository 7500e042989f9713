"""``palsgd-hf train`` and ``palsgd-hf demo`` end to end: real launches of 2 processes, real Trainer, real data.

Each test runs the CLI as a user would (a subprocess, offline, the Shakespeare corpus from the
project cache) and reads what it leaves behind: result.json, the saved model, the demo's table and
plot. Sizes are the smallest that still cover warm-up, local steps, pseudo-syncs and two syncs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = "recipes/shakespeare-tiny/palsgd.yaml"
SMALL = [  # 12 steps: 4 warm-up, then 8 local steps with syncs after steps 8 and 12
    "--max_steps", "12", "--eval_steps", "6", "--logging_steps", "3", "--warmup_steps", "2",
    "--max_eval_samples", "16", "--palsgd_warmup_steps", "4", "--palsgd_sync_interval", "4",
]


def run_cli(*args: str, timeout: float = 240, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "palsgd_hf.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


def check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.mark.timeout(300)
def test_train_runs_a_recipe_on_two_processes(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", TINY, *SMALL, "--output_dir", str(out))
    check(proc)
    assert "torch.distributed.run --standalone --nproc_per_node=2 -m palsgd_hf.cli.run" in proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["global_steps"] == 12 and result["method"] == "palsgd"
    ranks = result["palsgd_per_rank"]
    assert len(ranks) == 2
    for r in ranks:
        assert r["warmup_steps"] == 4 and r["gradient_steps"] + r["pseudo_syncs"] == 8
        assert r["outer_syncs"] == 2 and r["comm_bytes"] > 0
    assert sum(r["pseudo_syncs"] for r in ranks) >= 1
    computed = sum(r["warmup_steps"] + r["gradient_steps"] for r in ranks)
    assert result["tokens_read"] == 12 * 2 * 16 * 128
    assert result["tokens_computed"] == computed * 16 * 128 < result["tokens_read"]
    assert 0 < result["final_eval_loss"] < math.log(2048)  # learned something beyond a uniform guess
    assert result["final_perplexity"] == pytest.approx(math.exp(result["final_eval_loss"]), rel=1e-6)
    assert [h["step"] for h in result["eval_history"]] == [6, 12, 12]
    assert result["comm_bytes_total"] == pytest.approx(sum(r["comm_bytes"] for r in ranks))
    assert (out / "model.safetensors").is_file() and (out / "recipe.json").is_file()


@pytest.mark.timeout(300)
def test_auto_sync_interval_and_pull_through_the_trainer(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", TINY, *SMALL, "--palsgd_sync_policy", "auto", "--palsgd_mixing_rate", "null",
                   "--palsgd_pull", "0.05", "--palsgd_replica_metrics", "true", "--output_dir", str(out),
                   "--log_level", "info")
    check(proc)
    ranks = json.loads((out / "result.json").read_text())["palsgd_per_rank"]
    a, b = ranks
    # Every replica decided the same intervals at the same steps (the decisions use maxed measurements).
    assert a["outer_syncs"] == b["outer_syncs"] >= 2 and a["sync_interval"] == b["sync_interval"] >= 1
    assert a["auto_sync_seconds"] == b["auto_sync_seconds"] and a["auto_step_seconds"] == b["auto_step_seconds"]
    assert "PALSGD auto sync interval at step 8: H 4 ->" in proc.stderr  # the first period: steps 4..7
    # Per-replica rows of the last sync, all-gathered: the same on both ranks, each replica's own drift.
    rows = {k: v for k, v in a.items() if k.startswith("replica")}
    assert rows and rows == {k: v for k, v in b.items() if k.startswith("replica")}
    assert rows["replica0/drift"] == a["drift"] and rows["replica1/drift"] == b["drift"]
    # eta was derived from the cosine schedule's peak (3e-3 after its 2 warm-up steps): c = 0.05 there, so
    # eta = 0.05 * 0.2 / 3e-3 (the recipe's p and learning rate), logged with the peak c.
    assert "eta=3.333" in proc.stderr and "c = lr*eta/p = 0.05 at the peak learning rate 0.003" in proc.stderr


@pytest.mark.timeout(300)
def test_train_runs_an_sft_lora_recipe_on_a_local_checkpoint(tmp_path):
    pytest.importorskip("trl")
    peft = pytest.importorskip("peft")
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    # outputs/chat-example/ under the cwd; random base weights (the pretraining is not what this test checks)
    check(run_cli("chat-example", "--rows", "200", "--base-steps", "0", cwd=tmp_path))
    out = tmp_path / "run"
    # With packing (SFTConfig's field, through the recipe): rows packed into max_length sequences, which
    # the tests of tests/distributed/test_trl.py do not use. And a QLoRA-style frozen base: the checkpoint loads
    # in bf16 (the recipe's dtype key), the adapter trains in fp32 (peft's default), and only it is pulled and synced.
    proc = run_cli("train", str(ROOT / "recipes" / "sft" / "palsgd_lora.yaml"), *SMALL[:6], "--packing", "true",
                   "--dtype", "bfloat16",
                   "--palsgd_warmup_steps", "4", "--palsgd_sync_interval", "4", "--output_dir", str(out), cwd=tmp_path)
    check(proc)
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["global_steps"] == 12 and math.isfinite(result["final_eval_loss"])
    adapter = load_file(out / "adapter_model.safetensors")  # save_model wrote the global adapter only
    trainable = sum(t.numel() for t in adapter.values())
    assert {t.dtype for t in adapter.values()} == {torch.float32}
    for r in result["palsgd_per_rank"]:
        assert r["warmup_steps"] == 4 and r["outer_syncs"] == 2
        # Only the adapter crosses the wire, in fp32: each warm-up all-reduce and each sync send it once.
        assert r["comm_bytes"] == (r["warmup_steps"] + r["outer_syncs"]) * trainable * 4
        assert r["foreign_collectives"] == 0  # trl's metric gathers waited for the log step
    assert result["tokens_computed"] > 0  # trl's num_tokens, combined across ranks at the last log
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "outputs" / "chat-example" / "model")
    reloaded = dict(peft.PeftModel.from_pretrained(base, out).named_parameters())
    lora = {n: p for n, p in reloaded.items() if "lora_" in n}
    assert len(lora) == len(adapter) and sum(p.numel() for p in lora.values()) == trainable


@pytest.mark.timeout(180)
def test_accelerate_cpu_launch_of_one_process_is_refused(tmp_path):
    # The trap: `accelerate launch --cpu --num_processes 2` starts ONE process on a machine like this.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "palsgd_hf.cli.run", TINY,
         "--output_dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=150, env=env, cwd=ROOT,
    )
    assert proc.returncode != 0
    assert "palsgd_hf.cli.run: error: this job has 1 process but the recipe asks for launch.num_processes=2" in proc.stderr
    assert "accelerate's single-process launcher" in proc.stderr
    assert "palsgd_hf/" not in proc.stderr  # one line from us, no traceback (accelerate adds its own)
    assert not (tmp_path / "run" / "result.json").exists()


@pytest.mark.timeout(420)
def test_demo_tiny_trains_ddp_and_palsgd_and_reports(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("demo", "--tiny", "--output_dir", str(out), timeout=400)
    check(proc)
    table = proc.stdout
    assert "method" in table and "MB sent/rank" in table and "to DDP's loss, modeled s" in table
    assert "Link: EMULATED 100 MBIT/S (modeled, not measured)" in table and "modeled s @100Mbit" in table
    assert any(line.startswith("ddp ") for line in table.splitlines())
    assert any(line.startswith("palsgd ") for line in table.splitlines())
    png = out / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    summary = json.loads((out / "summary.json").read_text())
    ddp, palsgd = summary["ddp"], summary["palsgd"]
    assert ddp["palsgd"]["outer_syncs"] == 0 and palsgd["palsgd"]["outer_syncs"] >= 1
    # DDP all-reduces every step; PALSGD only in warm-up and at syncs.
    assert palsgd["palsgd"]["comm_bytes"] < ddp["palsgd"]["comm_bytes"]
    assert palsgd["tokens_computed"] < ddp["tokens_computed"] and palsgd["tokens_read"] == ddp["tokens_read"]
    for r in (ddp, palsgd):
        assert r["world_size"] == 2 and math.isfinite(r["final_eval_loss"]) and r["eval_history"]
    check_demo_link_figures(summary)


def check_demo_link_figures(summary: dict) -> None:
    """The emulated link's figures in summary.json agree with the runs' own counters and curves."""
    from palsgd_hf.cli.demo_link import Link, compare

    ddp_loss = summary["ddp"]["final_eval_loss"]
    for method, r in summary.items():
        m, history = r["modeled"], r["eval_history"]
        assert m["link"]["mbit"] == 100.0 and m["link"]["emulated"] and m["target_loss"] == ddp_loss
        assert all(h["comm_bytes"] >= 0 and 0 <= h["train_s"] <= h["elapsed_s"] for h in history)
        # Counters only grow; the last evaluation saw every byte result.json counts.
        assert [h["comm_bytes"] for h in history] == sorted(h["comm_bytes"] for h in history)
        assert history[-1]["comm_bytes"] == pytest.approx(r["palsgd"]["comm_bytes"])
        # modeled = measured + this rank's bytes x 8 / 100 Mbit/s (2 processes: the ring charges them once)
        assert m["modeled_s"] - m["measured_s"] == pytest.approx(r["palsgd"]["comm_bytes"] * 8 / 100e6)
        assert all(p["modeled_s"] >= p["measured_s"] for p in m["curve"]) and m["modeled_s"] > m["measured_s"]
        assert m["curve"][-1]["eval_loss"] == r["final_eval_loss"]
        if m["reached"]:  # time to DDP's loss is a point of the modeled curve at or below it
            hit = next(p for p in m["curve"] if p["step"] == m["time_to_target_step"])
            assert hit["modeled_s"] == m["time_to_target_s"] and hit["eval_loss"] <= ddp_loss + 1e-6
        else:
            assert r["final_eval_loss"] > ddp_loss and m["x_ddp"] is None
    assert summary["ddp"]["modeled"]["reached"] and summary["ddp"]["modeled"]["x_ddp"] == 1.0
    # DDP all-reduces once or more per step; PALSGD is charged less link time
    assert summary["ddp"]["eval_history"][-1]["comm_calls"] >= summary["ddp"]["global_steps"]
    assert summary["palsgd"]["modeled"]["modeled_s"] - summary["palsgd"]["modeled"]["measured_s"] < (
        summary["ddp"]["modeled"]["modeled_s"] - summary["ddp"]["modeled"]["measured_s"])
    # Without a link the same runs are modeled at their measured seconds.
    off = compare(summary, Link(None))
    assert all(p["modeled_s"] == p["measured_s"] for m in off.values() for p in m["curve"])


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_train_through_accelerate_launch(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "recipes/shakespeare-tiny/palsgd_accelerate.yaml", *SMALL, "--output_dir", str(out))
    check(proc)
    assert "accelerate.commands.launch" in proc.stderr and "--multi_gpu" in proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["global_steps"] == 12
    assert all(r["outer_syncs"] == 2 for r in result["palsgd_per_rank"])


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", [2, 3])
def test_train_zero_recipe_two_workers_of_two_ranks(tmp_path, stage):
    pytest.importorskip("deepspeed")
    out = tmp_path / "run"
    proc = run_cli("train", f"recipes/shakespeare-tiny/palsgd_zero{stage}.yaml", *SMALL, "--output_dir", str(out),
                   timeout=580)
    check(proc)
    result = json.loads((out / "result.json").read_text())
    ranks = result["palsgd_per_rank"]
    assert result["world_size"] == 4 and len(ranks) == 4
    # ranks 0,1 shard worker 0 and 2,3 worker 1: one coin per worker, syncs everywhere
    assert ranks[0]["pseudo_syncs"] == ranks[1]["pseudo_syncs"] and ranks[2]["pseudo_syncs"] == ranks[3]["pseudo_syncs"]
    assert all(r["outer_syncs"] == 2 for r in ranks)
    assert 0 < result["final_eval_loss"] < math.log(2048)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_train_fsdp2_recipe_two_workers_of_two_shards(tmp_path):
    """recipes/shakespeare-tiny/palsgd_fsdp2.yaml: fsdp2: true shards each worker's model over its 2 ranks."""
    out = tmp_path / "run"
    proc = run_cli("train", "recipes/shakespeare-tiny/palsgd_fsdp2.yaml", *SMALL, "--output_dir", str(out),
                   timeout=380)
    check(proc)
    result = json.loads((out / "result.json").read_text())
    ranks = result["palsgd_per_rank"]
    assert result["world_size"] == 4 and len(ranks) == 4 and result["global_steps"] == 12
    assert ranks[0]["pseudo_syncs"] == ranks[1]["pseudo_syncs"] and ranks[2]["pseudo_syncs"] == ranks[3]["pseudo_syncs"]
    # Replica 1 sends its shard (half the fp32 model) per warm-up step and per sync, plus the 4-byte finite flag
    # its 2 shards agree on at each sync (replica 0 also broadcast its shards at the start).
    half = 4 * 247168 // 2
    assert ranks[2]["comm_bytes"] == ranks[3]["comm_bytes"] == (4 + 2) * half + 2 * 4
    assert all(r["outer_syncs"] == 2 for r in ranks)
    assert 0 < result["final_eval_loss"] < math.log(2048)
    assert (out / "model.safetensors").is_file()
