"""PALSGDTrainer in real 2-process Trainer runs (torchrun, gloo, DDP): tiny GPT-Neo on Shakespeare.

One uninterrupted run (module fixture) is checked for the global model, the schedule, the
absence of collectives between syncs, the logged loss and evaluation; an interrupted run resumed
from a checkpoint between two syncs must reproduce it exactly. Two more runs check gradient
accumulation against a larger batch (also covering palsgd_eval_on='local' and the mixin form).
"""

from __future__ import annotations

import json

import pytest
import torch

from palsgd_hf.core.algorithm import coin_seed
from tests.helpers.bounds import U_FP32, l2, linear_lr_sum, sgd_rounding_bound
from tests.helpers.launch import torchrun

pytestmark = pytest.mark.timeout(600)

# The uninterrupted run: syncs after steps 8, 16, ..., 40 and a final one at 44; evaluations at 20
# (between the syncs at 16 and 24) and 40; save_model() is called at 21, five local steps after the
# sync at 16; the resumed run is interrupted at 30 (between 24 and 32).
STEPS, H, WARMUP, P, EVAL_AT, SAVE_MODEL_AT, CRASH_AT = 44, 8, 4, 0.25, 20, 21, 30
RUN = ["--steps", str(STEPS), "--H", str(H), "--warmup", str(WARMUP), "--p", str(P), "--eval-steps", str(EVAL_AT)]


def launch(out, *args):
    results = torchrun("trainer_run.py", 2, out, "--run-dir", str(out / "run"), *args, timeout=300)
    tensors = [torch.load(out / f"rank{r}.pt") for r in range(2)] if (out / "rank0.pt").exists() else None
    return results, tensors


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    results, tensors = launch(out, *RUN, "--save-model-at", str(SAVE_MODEL_AT))
    return out, results, tensors


def kinds(result):
    return [s["kind"] for s in result["steps"]]


def is_sync(step):
    return step > WARMUP and step % H == 0


def test_final_model_is_global_identical_on_all_ranks_and_saved(uninterrupted):
    _, results, tensors = uninterrupted
    assert torch.equal(tensors[0]["final"], tensors[1]["final"])
    # Before the final sync the replicas held different weights: the sync is what made them equal.
    assert not torch.allclose(tensors[0]["local_last"], tensors[1]["local_last"])
    for r in results:
        assert r["saved_missing"] == [] and r["saved_max_diff"] == 0.0  # save_model wrote exactly these weights


def test_save_model_between_syncs_writes_the_global_model(uninterrupted):
    _, _, tensors = uninterrupted
    assert not any(is_sync(s) for s in range(SAVE_MODEL_AT - 4, SAVE_MODEL_AT + 1))  # 5 local steps before it
    for rank, t in enumerate(tensors):
        # Rank 0 wrote the file; every rank reads it back: it is bit for bit this rank's anchor (the global
        # model of the sync at 16), so the same model whichever rank holds it.
        assert torch.equal(t["saved_at_save"], t["anchor_at_save"]), f"rank {rank}: save_model wrote another model"
        # ... and not this rank's own weights, which had drifted; save_model gave those back afterwards.
        assert not torch.allclose(t["saved_at_save"], t["local_at_save"]), f"rank {rank}: replica had not drifted"
        assert torch.equal(t["after_save"], t["local_at_save"]), f"rank {rank}: save_model changed the weights"
    assert torch.equal(tensors[0]["anchor_at_save"], tensors[1]["anchor_at_save"])
    assert not torch.equal(tensors[0]["local_at_save"], tensors[1]["local_at_save"])


def test_step_kinds_and_counters_follow_the_schedule(uninterrupted):
    out, results, _ = uninterrupted
    for rank, r in enumerate(results):
        # One coin per optimizer step after warm-up, from the generator all replicas share (coins='shared').
        gen = torch.Generator().manual_seed(coin_seed(0, 0))
        expected = ["warmup"] * WARMUP + [
            "pseudo_sync" if torch.rand((), generator=gen).item() < P else "gradient" for _ in range(STEPS - WARMUP)
        ]
        assert kinds(r) == expected
        m = r["metrics"]
        syncs = sum(is_sync(s) for s in range(1, STEPS + 1)) + (STEPS % H != 0)  # + the final sync
        assert (m["warmup_steps"], m["outer_syncs"], m["skipped_syncs"]) == (WARMUP, syncs, 0)
        assert m["pseudo_syncs"] == kinds(r).count("pseudo_sync") and m["gradient_steps"] == kinds(r).count("gradient")
    assert kinds(results[0]) == kinds(results[1])  # shared coins: every replica runs the same kind of step
    # The fraction is a binomial sample of 40 coins (shared by both replicas): allow 4 standard deviations.
    draws = STEPS - WARMUP
    pseudo = kinds(results[0]).count("pseudo_sync") / draws
    assert abs(pseudo - P) < 4 * (P * (1 - P) / draws) ** 0.5, f"pseudo-sync fraction {pseudo} far from p={P}"
    # The palsgd/* metrics are in the Trainer's own log history and in trainer_state.json.
    logged = [e for e in results[0]["log_history"] if "loss" in e]
    assert {"palsgd/outer_syncs", "palsgd/pseudo_syncs", "palsgd/comm_bytes", "palsgd/drift",
            "palsgd/mixing_coefficient"} <= set(logged[-1])
    assert logged[0]["palsgd/peak_mixing_coefficient"] == pytest.approx(0.003 * 1.0 / P)  # c = lr*eta/p, once
    assert all("palsgd/peak_mixing_coefficient" not in e for e in logged[1:])
    for e in logged:
        done = sum(is_sync(s) for s in range(1, e["step"] + 1)) + (e["step"] == STEPS and STEPS % H != 0)
        assert e["palsgd/outer_syncs"] == done
    state = json.loads((out / "run" / "trainer_state.json").read_text())
    assert any("palsgd/outer_syncs" in e for e in state["log_history"])


def test_no_collectives_between_syncs_after_warmup(uninterrupted):
    _, results, tensors = uninterrupted
    numel = results[0]["numel"]
    for r in results:
        for s in r["steps"]:
            names = s["collectives"]
            if s["kind"] == "warmup":
                assert "gloo:all_reduce" in names, f"no gradient all-reduce in warm-up step {s['step']}"
            elif is_sync(s["step"]):
                assert names == ["gloo:all_reduce"], f"sync step {s['step']}: {names}"
            else:
                assert names == [], f"local step {s['step']} communicated: {names}"
        # The byte counter agrees: after the first local step only syncs add bytes, one fp32 model each.
        logged = {e["step"]: e["palsgd/comm_bytes"] for e in r["log_history"] if "palsgd/comm_bytes" in e}
        steps = sorted(s for s in logged if s > WARMUP + 1)
        for a, b in zip(steps, steps[1:]):
            syncs = sum(is_sync(s) or s == STEPS for s in range(a + 1, b + 1))
            assert logged[b] - logged[a] == 4 * numel * syncs, f"bytes between steps {a} and {b}"


def test_logged_loss_is_the_mean_over_computed_micro_batches(uninterrupted):
    _, results, _ = uninterrupted
    for r in results:
        for mb in r["micro_batches"]:
            if mb["kind"] == "pseudo_sync":
                assert "reference" not in mb  # skipped: no forward at all
            else:  # the loss a local step trained on is the model's own mean loss on its batch (not x world)
                # Bitwise: the same forward (DDP's forward is the module's) on the same weights and batch, and the
                # same token sum S. The Trainer divides S by the token count scaled to world * n (full 64-token
                # blocks: every rank counts n) and multiplies by world: with world = 2 a power of two, that is the
                # model's own S / n exactly.
                assert mb["returned"] == mb["reference"], mb
    logged = [(e["step"], e["loss"]) for e in results[0]["log_history"] if "loss" in e]
    assert logged != [] and logged[-1][0] == STEPS
    previous = 0
    for step, loss in logged:
        computed = [mb["returned"] for r in results for mb in r["micro_batches"]
                    if previous < mb["step"] <= step and mb["kind"] != "pseudo_sync"]
        assert computed, f"a loss was logged at step {step} without any computed batch"
        # Exact in float64 here; the Trainer rounds twice in fp32 (tr_loss *= steps / computed steps, then the
        # sum of the two ranks' values in the gather's mean; /2 and /steps are exact or float64): positive
        # terms, so within (1 + u)^2 - 1 < 3u relative.
        assert loss == pytest.approx(sum(computed) / len(computed), rel=3 * U_FP32, abs=0)
        previous = step


def test_evaluation_scores_the_anchor(uninterrupted):
    _, results, _ = uninterrupted
    for r in results:
        logged = next(e["eval_loss"] for e in r["log_history"] if "eval_loss" in e and e["step"] == EVAL_AT)
        # Re-scored after training: the weights of the last sync before the evaluation, and the local ones.
        anchor, local = r["post_eval"]["anchor_at_eval"], r["post_eval"]["local_at_eval"]
        assert abs(anchor - local) > 1e-4  # the two models differ, so the check below can fail
        # Bitwise: the anchor swapped in for the evaluation is the bit copy taken at the sync; the same code
        # scores the same weights on the same batches again.
        assert logged == anchor


def test_resume_between_syncs_continues_the_same_trajectory(uninterrupted, tmp_path):
    _, full, full_tensors = uninterrupted
    window = range(CRASH_AT - (CRASH_AT % H) + 1, CRASH_AT + 1)
    assert any(kinds(r)[s - 1] == "gradient" for r in full for s in window), "replicas identical at the interruption"
    run = ["--run-dir", str(tmp_path / "run"), *RUN, "--save-steps", str(CRASH_AT)]
    crashed = torchrun("trainer_run.py", 2, tmp_path / "first", *run, "--crash-at", str(CRASH_AT), timeout=300)
    assert [c["crashed_at"] for c in crashed] == [CRASH_AT, CRASH_AT]
    ckpt = tmp_path / "run" / f"checkpoint-{CRASH_AT}"
    assert (ckpt / "palsgd_rank0.pt").is_file() and (ckpt / "palsgd_rank1.pt").is_file()
    resumed = torchrun("trainer_run.py", 2, tmp_path / "second", *run, "--resume", str(ckpt), timeout=300)
    for rank in range(2):
        t = torch.load(tmp_path / "second" / f"rank{rank}.pt")
        # The same computations in the same order as the uninterrupted run: the same bits.
        assert torch.equal(t["local_last"], full_tensors[rank]["local_last"]), f"rank {rank}: local weights differ"
        assert torch.equal(t["final"], full_tensors[rank]["final"]), f"rank {rank}: final weights differ"
        assert kinds(resumed[rank]) == kinds(full[rank])[CRASH_AT:]
        assert resumed[rank]["metrics"]["outer_syncs"] == full[rank]["metrics"]["outer_syncs"]


# The accumulation runs train with SGD (see tests/helpers/bounds.py for why not AdamW).
GA_STEPS, GA_LR = 24, 0.1
MIXIN_TIMEOUT = 123.0  # seconds; distinct from ddp_timeout's 1800 and torch's 30-minute default


@pytest.fixture(scope="module")
def accumulation_runs(tmp_path_factory):
    """Accumulation 2 x batch 2 vs accumulation 1 x batch 4, each rank reading the same examples per step."""
    common = ["--steps", str(GA_STEPS), "--H", "6", "--warmup", "4", "--eval-steps", "15", "--sequential",
              "--optim", "sgd", "--lr", str(GA_LR)]
    out = tmp_path_factory.mktemp("accumulation")
    two = launch(out / "ga2", *common, "--ga", "2", "--bs", "2", "--eval-on", "local")
    # The larger-batch run goes through the mixin form: plain TrainingArguments + palsgd_config=, with the
    # collective timeout set on the config (plain TrainingArguments have no palsgd_comm_timeout_seconds).
    one = launch(out / "ga1", *common, "--ga", "1", "--bs", "4", "--regroup-from-ga", "2", "--mixin",
                 "--comm-timeout", str(MIXIN_TIMEOUT))
    return two, one


def test_gradient_accumulation_matches_a_larger_batch(accumulation_runs):
    (two, two_t), (one, one_t) = accumulation_runs
    for rank in range(2):
        assert kinds(two[rank]) == kinds(one[rank])  # one coin per optimizer step, not per micro-batch
        assert len(two[rank]["micro_batches"]) == 2 * len(one[rank]["micro_batches"])
        # Only the split of fp32 sums differs: 2 x 128 or 1 x 256 tokens per rank, 512 in the warm-up's
        # all-reduce. Gradient steps run at lr / (1 - p). The bound and its derivation: tests/helpers/bounds.py.
        bound = sgd_rounding_bound(linear_lr_sum(GA_LR, GA_STEPS) / (1 - P), tokens_per_step=512)
        travelled = l2(one_t[rank]["final"], one_t[rank]["initial"])
        assert bound < travelled / 50, (bound, travelled)  # room for a wrong run to stand out
        for key in ("local_last", "final"):
            distance = l2(two_t[rank][key], one_t[rank][key])
            assert distance <= bound, f"rank {rank} {key}: {distance} > {bound} (weights travelled {travelled})"
    assert "gradient" in kinds(two[0]) and "pseudo_sync" in kinds(two[0])


def test_collective_timeout_comes_from_the_config_or_ddp_timeout(accumulation_runs):
    (two, _), (one, _) = accumulation_runs
    for rank in range(2):
        # PALSGDConfig(comm_timeout_seconds=...) with plain TrainingArguments: on the default group (DDP's
        # warm-up all-reduce, the Trainer's gathers) and on PALSGD's own peer group, as read back from gloo.
        assert one[rank]["timeouts"] == {"default": MIXIN_TIMEOUT, "peers": MIXIN_TIMEOUT,
                                         "peers_communicator": MIXIN_TIMEOUT}
        # Unset (PALSGDTrainingArguments without palsgd_comm_timeout_seconds): ddp_timeout's default.
        assert two[rank]["timeouts"] == {"default": 1800.0, "peers": 1800.0, "peers_communicator": 1800.0}


def test_eval_on_local_scores_each_workers_own_model(accumulation_runs):
    (two, _), (one, _) = accumulation_runs
    for r, expected in ((two[0], "local_at_eval"), (one[0], "anchor_at_eval")):
        logged = next(e["eval_loss"] for e in r["log_history"] if "eval_loss" in e and e["step"] == 15)
        assert abs(r["post_eval"]["anchor_at_eval"] - r["post_eval"]["local_at_eval"]) > 1e-4
        assert logged == r["post_eval"][expected]  # the same weights scored by the same code: the same bits


@pytest.mark.slow
def test_resume_is_exact_under_bf16_mixed_precision(tmp_path):
    """The resume check again with bf16 autocast (CPU): 3 more runs, so not in the default suite."""
    run = [*RUN, "--bf16", "--save-steps", str(CRASH_AT)]
    _, full = launch(tmp_path / "full", *run)
    torchrun("trainer_run.py", 2, tmp_path / "first", "--run-dir", str(tmp_path / "run"), *run,
             "--crash-at", str(CRASH_AT), timeout=300)
    ckpt = tmp_path / "run" / f"checkpoint-{CRASH_AT}"
    _, resumed = launch(tmp_path / "second", *run, "--resume", str(ckpt))
    for rank in range(2):
        torch.testing.assert_close(resumed[rank]["final"], full[rank]["final"], rtol=0, atol=1e-6)
