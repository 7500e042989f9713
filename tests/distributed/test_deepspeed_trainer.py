"""PALSGDTrainer with ``deepspeed=recipes/deepspeed/zero<N>.json``: real Trainer, real DeepSpeed, real data.

2 replicas x 2 ZeRO-3 shards (4 processes) against the plain DDP PALSGDTrainer with 2 processes
reading the same data (sequential sampling, twice the per-rank batch): the same algorithm, so
the same coins, learning rates, losses and weights; the saved model is the global one; and a
run resumed from a checkpoint taken between two syncs (replicas differ there) ends bit-identical
to the uninterrupted run. The resume also guards against hangs: its first forward passes are
ones where only one replica computes, while the Trainer logs through world-wide collectives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers.bounds import U_FP32, l2, linear_lr_sum, sgd_rounding_bound
from tests.helpers.launch import SCRIPTS, torchrun

STEPS, H, WARMUP, P = 16, 4, 3, 0.25
TIMEOUT = 420
# A test may wait for two launches (the first one also builds the DDP and ZeRO-3 fixtures).
pytestmark = pytest.mark.timeout(2 * TIMEOUT + 60)
# The equivalence runs train with SGD (tests/helpers/bounds.py says why not AdamW).
LR = 0.1
SGD = ["--optim", "sgd", "--lr", str(LR)]
# Per step 256 tokens per replica (DDP: one rank's 4 blocks of 64; ZeRO-3: two ranks' 2 blocks, reduce-scattered),
# 512 in the warm-up's all-reduce; gradient steps run at lr / (1 - p).
TOKENS = 512
BOUND = sgd_rounding_bound(linear_lr_sum(LR, STEPS) / (1 - P), tokens_per_step=TOKENS)


def trainer_run(out, nproc: int, *args: str) -> list:
    return torchrun(
        "ds_trainer_run.py", nproc, out, "--run-dir", str(out / "run"), "--steps", str(STEPS), "--H", str(H),
        "--warmup", str(WARMUP), *args, timeout=TIMEOUT, env={"PALSGD_TEST_DUMP_AFTER": str(TIMEOUT - 60)},
    )


def kinds(result) -> list:
    return [row["kind"] for row in result["rows"]]


def losses(result, after: int = 0) -> dict:
    """The logged training loss by step."""
    return {h["step"]: h["loss"] for h in result["log_history"] if "loss" in h and h["step"] > after}


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return trainer_run(tmp_path_factory.mktemp("ddp"), 2, "--stage", "0", "--bs", "4", *SGD)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    return out, trainer_run(out, 4, "--stage", "3", "--shard-size", "2", "--bs", "2", "--save-steps", "6", *SGD)


def test_zero3_trainer_matches_ddp_trainer(ddp, zero3):
    _, ds = zero3
    for r in ds:
        ref = ddp[r["replica"]]
        assert kinds(r) == kinds(ref), f"rank {r['rank']}: step kinds differ from its replica's DDP run"
        # The same scheduler code on the same step counts: the same floats.
        assert [x["lr"] for x in r["rows"]] == [x["lr"] for x in ref["rows"]]
        assert r["global_step"] == r["engine_global_steps"] == STEPS  # pseudo-sync steps stepped the engine too
    # Shared coins (the default): both replicas take the same kind of step at every step.
    assert kinds(ds[0]) == kinds(ds[2]) and "pseudo_syncs" in kinds(ds[0]) and "gradient_steps" in kinds(ds[0])

    # Weights: only the split of fp32 sums differs (BOUND, from tests/helpers/bounds.py, covers the whole run
    # and so every sync in it); the distance they travel leaves room for a wrong run to stand out.
    assert torch.equal(torch.tensor(ds[0]["initial"]), torch.tensor(ddp[0]["initial"]))
    travelled = l2(torch.tensor(ddp[0]["final"]), torch.tensor(ddp[0]["initial"]))
    assert BOUND < travelled / 50, (BOUND, travelled)
    syncs = [s for s in range(WARMUP + 1, STEPS + 1) if s % H == 0]
    assert [s for s, _ in ds[0]["synced"]] == syncs
    for i, s in enumerate(syncs):
        weights = [torch.tensor(r["synced"][i][1]) for r in ds]
        assert all(torch.equal(weights[0], w) for w in weights), f"replicas differ right after the sync at step {s}"
        distance = l2(weights[0], torch.tensor(ddp[0]["synced"][i][1]))
        assert distance <= BOUND, f"sync at step {s}: {distance} from the DDP run > {BOUND}"
    finals = [torch.tensor(r["final"]) for r in ds]
    assert all(torch.equal(finals[0], f) for f in finals)
    distance = l2(finals[0], torch.tensor(ddp[0]["final"]))
    assert distance <= BOUND, f"final weights: {distance} from the DDP run > {BOUND} (travelled {travelled})"
    assert all(r["saved_max_diff"] == 0.0 and r["saved_missing"] == [] for r in ds), "save_model wrote another model"
    # Losses: to first order a weight difference d moves a loss by <= ||grad loss|| d (the Trainer logs the
    # gradient norm before clipping), and the token mean of positive losses, summed in another split, by
    # <= 2 n u loss.
    grad_norm = max(h["grad_norm"] for h in ddp[0]["log_history"] if "grad_norm" in h)
    assert losses(ds[0]).keys() == losses(ddp[0]).keys()
    for step, loss in losses(ddp[0]).items():
        assert abs(losses(ds[0])[step] - loss) <= grad_norm * BOUND + 2 * TOKENS * U_FP32 * loss, step
    # Evaluated on the final weights; a gradient norm of the eval loss like the training loss's is assumed.
    eval_loss = ddp[0]["eval_loss"]
    assert abs(ds[0]["eval_loss"] - eval_loss) <= grad_norm * BOUND + 2 * TOKENS * U_FP32 * eval_loss

    # No cross-replica traffic on local steps; a sync sends this rank's ZeRO-3 partition only.
    for r in ds:
        sent = [0] + [x["peer_bytes"] for x in r["rows"]]
        for s in range(WARMUP + 1, STEPS + 1):
            assert sent[s] - sent[s - 1] == (4 * r["owned_numel"] if s % H == 0 else 0), (r["rank"], s)


def test_zero3_trainer_resume_between_syncs_is_exact(zero3, tmp_path):
    out, full = zero3
    ckpt = out / "run" / "checkpoint-6"
    names = {p.name for p in ckpt.iterdir()}
    assert {"replica_0", "replica_1", "global_step6", "latest"} <= names, names
    assert sorted(p.name for p in (ckpt / "global_step6" / "palsgd").iterdir()) == [f"rank_{k}.pt" for k in range(4)]
    resumed = trainer_run(tmp_path, 4, "--stage", "3", "--shard-size", "2", "--bs", "2", *SGD, "--resume", str(ckpt))
    for a, b in zip(full, resumed):
        assert b["rows"] == a["rows"][6:], f"rank {a['rank']}: resumed steps differ"
        assert b["synced"] == a["synced"][1:]
        assert b["final"] == a["final"]
        assert losses(b, after=6) == losses(a, after=6) and len(losses(a, after=6)) >= 5
        assert b["metrics"]["outer_syncs"] == a["metrics"]["outer_syncs"]


@pytest.mark.slow
def test_accelerate_launch_use_deepspeed_recipe(tmp_path):
    """`accelerate launch --use_deepspeed --deepspeed_config_file recipes/deepspeed/zero2.json` (S = 1).

    On CPU accelerate alone would count one process; use_cpu=True makes the Trainer create
    PartialState(cpu=True) first, which is the documented work-around (on GPUs nothing is needed).
    """
    recipe = SCRIPTS.parents[2] / "recipes" / "deepspeed" / "zero2.json"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--deepspeed_config_file", str(recipe),
        "--num_processes", "2", "--num_machines", "1", "--main_process_port", "0",
        str(SCRIPTS / "ds_trainer_run.py"), "--out", str(tmp_path), "--run-dir", str(tmp_path / "run"),
        "--steps", str(STEPS), "--H", str(H), "--warmup", str(WARMUP), "--stage", "2", "--from-launcher",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PALSGD_TEST_DUMP_AFTER": str(TIMEOUT - 60)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert proc.returncode == 0, proc.stderr[-6000:]
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["replica"] for r in res] == [0, 1] and kinds(res[0]) == kinds(res[1])  # shared coins
    for r in res:
        assert r["engine_global_steps"] == r["global_step"] == STEPS
        assert r["saved_max_diff"] == 0.0
    for (s, a), (_, b) in zip(res[0]["synced"], res[1]["synced"]):
        assert a == b, f"replicas differ right after the sync at step {s}"
    assert res[0]["final"] == res[1]["final"]


@pytest.mark.slow
def test_zero2_trainer_gradient_accumulation(tmp_path):
    """Two micro-batches per optimizer step: accelerate steps the engine once per optimizer step, and a
    pseudo-sync step (no backward at all) still takes exactly one engine step at its boundary."""
    res = trainer_run(tmp_path, 4, "--stage", "2", "--shard-size", "2", "--bs", "1", "--ga", "2")
    for r in res:
        assert r["global_step"] == r["engine_global_steps"] == STEPS
        assert kinds(r) == kinds(res[2 * r["replica"]])
        sent = [0] + [x["peer_bytes"] for x in r["rows"]]
        for s in range(WARMUP + 1, STEPS + 1):
            assert sent[s] - sent[s - 1] == (4 * r["owned_numel"] if s % H == 0 else 0), (r["rank"], s)
    assert "pseudo_syncs" in kinds(res[0]) and kinds(res[0]) == kinds(res[2])  # shared coins
    for i, (s, _) in enumerate(res[0]["synced"]):
        assert all(r["synced"][i][1] == res[0]["synced"][i][1] for r in res), f"replicas differ after the sync at {s}"
