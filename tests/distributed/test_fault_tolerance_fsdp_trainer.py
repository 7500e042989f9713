"""``FaultTolerantTrainer`` with replicas of 2 FSDP2 ranks each, on real processes (real torchft lighthouse, gloo).

Each replica is its own ``torchrun --standalone --nproc_per_node 2`` running
tests/distributed/scripts/ft_fsdp_trainer_replica.py: ``PALSGDTrainingArguments(palsgd_shard_size=2)``, the model
sharded with ``shard_model(model, 2)`` before the Trainer (the non-fault-tolerant FSDP2 Trainer path), the
Trainer's exchanges through torchft, rank r of every replica exchanging shard r.

* Default: 2 replicas x 2 ranks, no failure. Every sync has both replicas; the run ends with one global model
  (per shard the same anchor on both replicas bit for bit, every rank's weights equal to it, both replicas save
  the same model file contents) that matches the non-fault-tolerant ``PALSGDTrainer`` run on an FSDP2 model
  (one torchrun of 2 x 2 ranks, same model, data per rank and step, coins) within 1e-5 per value, and so does
  its eval loss (relative 1e-4). Why not bit for bit: the managed mean is sum(w x_k) / sum(w) with w the
  period's gradient steps (one fp32 multiply and divide more per value than the plain mean: a few ulps per
  sync), the rest is the same arithmetic; the weights are O(1) and 6 syncs add at most a few ulps each (~1e-7),
  so 1e-5 leaves a margin of 100 and still catches an algorithmic difference (a missed or doubled outer step,
  or a replica reading another's batches, moves values by ~1e-2).
* Slow: 3 replicas x 2 ranks through the Trainer; the whole of replica 2 (launcher and both ranks) is killed
  mid-period and restarted as a new torchrun. The two others sync without it; both of its ranks rejoin at a
  later sync with their shard of the others' anchor bit for bit; the run ends with one global model.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torchft")

from tests.distributed.test_fault_tolerance_fsdp import SHARDS, kill_and_rejoin, one_global_model  # noqa: E402
from tests.helpers.ft_cluster import SCRIPTS, Cluster  # noqa: E402
from tests.helpers.launch import torchrun  # noqa: E402

H, STEPS = 4, 24
SCRIPT = SCRIPTS / "ft_fsdp_trainer_replica.py"


@pytest.mark.timeout(150)
def test_trainer_with_two_sharded_replicas_matches_the_fsdp2_trainer(tmp_path):
    args = ("--steps", str(STEPS), "--sync-interval", str(H))
    with Cluster(tmp_path / "ft", *args, "--same-init", script=SCRIPT, ranks=SHARDS) as ft:
        for r in range(2):
            ft.start(r)
        # The reference runs meanwhile: PALSGDTrainer in one torchrun of 2 replicas x 2 ranks, no fault tolerance.
        reference = torchrun(SCRIPT.name, 2 * SHARDS, tmp_path / "ref", "--no-ft", "--replicas", "2", *args,
                             timeout=120)
        ft.wait_all(timeout=120)
        results = ft.results()
        for rank in range(SHARDS):
            syncs = ft.syncs(0, rank=rank)
            assert [e["step"] for e in syncs] == list(range(H, STEPS + 1, H)), syncs
            assert all(e["participants"] == 2 for e in syncs)
            assert [e["anchor"] for e in syncs] == [e["anchor"] for e in ft.syncs(1, rank=rank)]
    anchors = one_global_model(results, 2)
    saved = {r["replica"]: r["saved"] for r in results if r["shard"] == 0}
    assert len(saved) == 2 and saved[0] == saved[1], saved  # every replica saves the same global model
    gaps = []
    for ref in reference:
        ft_rank = next(r for r in results if r["replica"] == ref["replica"] and r["shard"] == ref["shard"])
        assert ft_rank["global_step"] == ref["global_step"] == STEPS
        assert ft_rank["counters"]["outer_syncs"] == ref["counters"]["outer_syncs"] == STEPS // H
        assert ft_rank["counters"]["pseudo_syncs"] == ref["counters"]["pseudo_syncs"] > 0
        gaps.append(max(abs(a - b) for a, b in zip(anchors[ref["shard"]], ref["anchor_values"])))
        assert abs(ft_rank["eval_loss"] - ref["eval_loss"]) <= 1e-4 * ref["eval_loss"], (ft_rank, ref)
    assert max(gaps) <= 1e-5, f"{max(gaps):.3g} from the non-fault-tolerant FSDP2 Trainer run"
    print(f"\nFaultTolerantTrainer x FSDP2 (2 replicas x 2 ranks): final anchor within {max(gaps):.2g} of the "
          f"FSDP2 PALSGDTrainer run; eval loss {results[0]['eval_loss']:.5g} (reference {reference[0]['eval_loss']:.5g})")


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_trainer_kill_a_whole_sharded_replica_and_rejoin(tmp_path):
    """The launcher and both ranks of replica 2 killed at once (a lost host), then restarted as a new torchrun."""
    def kill(ft: Cluster) -> tuple[float, float]:
        killed_at = ft.kill(2)
        return killed_at, ft.start(2)

    kill_and_rejoin(tmp_path, kill, script=SCRIPT)
