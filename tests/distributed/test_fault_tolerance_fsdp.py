"""The fault-tolerant mode with replicas of 2 ranks each (FSDP2 shards inside a replica), on real processes.

Each replica is its own ``torchrun --standalone --nproc_per_node 2`` (its own torch.distributed world, gloo on
loopback); FSDP2 shards one model copy over its two ranks; PALSGD's exchanges go through torchft and a real
lighthouse, rank r of every replica exchanging shard r (tests/distributed/scripts/ft_fsdp_replica.py).

* Default: 2 replicas x 2 ranks, no failure. The run ends with one global model (per shard, the same anchor
  on both replicas, and every rank's weights equal to it) that matches the non-fault-tolerant sharded run
  (one torchrun of 4 ranks, same model, data, coins) within 1e-5 per value. Why not bit for bit: the managed
  mean is sum(w x_k) / sum(w) with w the gradient steps of the period (one fp32 multiply and divide more per
  value than the plain mean: a few ulps per sync), the rest is the same arithmetic; the weights are O(1) and
  10 syncs each add at most a few ulps (~1e-7), so 1e-5 leaves a margin of 100 and still catches any
  algorithmic difference (a missed or doubled outer step moves values by ~1e-2).
* Default, with 4 warm-up steps: the same comparison. A warm-up step's gradient mean is one managed exchange per
  rank at the step boundary (the reference averages each FSDP module's shard inside backward); with w = 1 on
  both replicas it is (g_1 + g_2) / 2 as the reference's, so the bound above is unchanged. Every warm-up step is
  exactly one managed step per rank (torchft's step count: the join, the warm-up steps, the syncs).
* Slow: 3 replicas x 2 ranks; the whole of replica 2 (launcher and both ranks) is killed mid-period and
  restarted (as torchrun --max-restarts would). The two others sync without it and keep training; both of
  its ranks rejoin at a later sync with the others' anchor shard bit for bit; the run ends with one global
  model on every rank.
* Slow, through ``FaultTolerantAccelerate`` (the optimizer prepared, the sharded model not): the same comparison
  (with warm-up), and the same whole-replica kill and rejoin.
* Slow: 3 replicas x 2 ranks with a long warm-up; the whole of replica 2 is killed during it and restarted. The
  two others go on warming up without it; both of its ranks rejoin inside the warm-up with the others' weights
  bit for bit (and stay equal to them at every later warm-up step); the run ends with one global model.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

pytest.importorskip("torchft")

from tests.helpers.ft_cluster import SCRIPTS, Cluster  # noqa: E402
from tests.helpers.launch import torchrun  # noqa: E402

H, SHARDS = 4, 2
SCRIPT = SCRIPTS / "ft_fsdp_replica.py"


def by_step(syncs: list[dict]) -> dict[int, dict]:
    return {e["step"]: e for e in syncs}


def one_global_model(results: list[dict], replicas: int) -> dict[int, list[float]]:
    """Every rank's final anchor shard equals that of the same shard on every replica, and its weights equal it."""
    assert len(results) == replicas * SHARDS, [(r["replica"], r["shard"]) for r in results]
    anchors = {}
    for shard in range(SHARDS):
        same = [r for r in results if r["shard"] == shard]
        assert len({r["anchor"] for r in same}) == 1, f"shard {shard}: the replicas end with different anchors"
        assert all(r["weights"] == r["anchor"] for r in same), f"shard {shard}: weights differ from the anchor"
        anchors[shard] = same[0]["anchor_values"]
    return anchors


@pytest.mark.slow  # the warm-up test below covers the same path plus warm-up (suite time)
@pytest.mark.timeout(300)
def test_two_sharded_replicas_match_the_unsharded_fault_free_run(tmp_path):
    two_sharded_replicas_match_the_reference(tmp_path)


@pytest.mark.timeout(300)
def test_two_sharded_replicas_warm_up_and_match_the_unsharded_fault_free_run(tmp_path):
    two_sharded_replicas_match_the_reference(tmp_path, warmup=4)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_accelerate_hooks_with_two_sharded_replicas_match_the_reference(tmp_path):
    """The same through FaultTolerantAccelerate (the optimizer prepared, the FSDP2 model not), with warm-up."""
    two_sharded_replicas_match_the_reference(tmp_path, "--accelerate", warmup=4)


def two_sharded_replicas_match_the_reference(tmp_path, *extra: str, warmup: int = 0) -> None:
    steps = 10 * H
    expected = [s for s in range(H, steps + 1, H) if s > warmup]  # a sync every H steps, after warm-up
    args = ("--steps", str(steps), "--sync-interval", str(H), "--warmup", str(warmup))
    with Cluster(tmp_path / "ft", *args, "--same-init", *extra, script=SCRIPT, ranks=SHARDS) as ft:
        for r in range(2):
            ft.start(r)
        # The reference runs meanwhile: one torchrun of 2 replicas x 2 ranks, no fault tolerance.
        reference = torchrun(SCRIPT.name, 2 * SHARDS, tmp_path / "ref", "--no-ft", "--replicas", "2", *args, *extra,
                             timeout=200)
        ft.wait_all(timeout=200)
        results = ft.results()
        for rank in range(SHARDS):
            hooks = {e["hooks"] for r in range(2) for e in ft.events(r, rank) if e["kind"] == "joined"}
            assert hooks == {"FaultTolerantAccelerate" if "--accelerate" in extra else None}, hooks
            syncs = ft.syncs(0, rank=rank)
            assert [e["step"] for e in syncs] == expected, syncs
            assert all(e["participants"] == 2 for e in syncs)
            assert [e["anchor"] for e in syncs] == [e["anchor"] for e in ft.syncs(1, rank=rank)]
    anchors = one_global_model(results, 2)
    for ref in reference:
        ft_rank = next(r for r in results if r["replica"] == ref["replica"] and r["shard"] == ref["shard"])
        assert ft_rank["counters"] == ref["counters"], (ft_rank["counters"], ref["counters"])
        assert ref["counters"]["outer_syncs"] == len(expected) and ref["counters"]["warmup_steps"] == warmup
        # One managed exchange per warm-up step and per sync, plus the join: no exchange inside backward.
        assert ft_rank["ft"]["managed_steps"] == 1 + warmup + len(expected), ft_rank["ft"]
        # The bound (module docstring): a few ulps per sync on O(1) values; the warm-up means add none.
        gap = max(abs(a - b) for a, b in zip(anchors[ref["shard"]], ref["anchor_values"]))
        assert gap <= 1e-5, f"shard {ref['shard']}: {gap:.3g} from the non-fault-tolerant run"
    print(f"\nFT x {' '.join(extra) or 'FSDP2'} (2 replicas x 2 ranks, {warmup} warm-up steps): final anchor within "
          f"{max(abs(a - b) for r in reference for a, b in zip(anchors[r['shard']], r['anchor_values'])):.2g} "
          "of the non-fault-tolerant sharded run")


def stop_at(ft: Cluster, margin_periods: int = 6) -> int:
    """Tell every replica to end at one step some periods ahead (a multiple of H)."""
    latest = max(e["step"] for r in range(3) for s in range(SHARDS) for e in ft.events(r, s))
    end = (latest // H + margin_periods) * H
    tmp = ft.out / "stop.tmp"
    tmp.write_text(str(end))
    tmp.rename(ft.out / "stop")  # atomic: a rank reads all of it or nothing
    return end


def kill_and_rejoin(tmp_path, kill, restarts: int = 0, coins: str = "shared", script=SCRIPT, extra=()) -> dict:
    """3 replicas x 2 ranks; ``kill(ft)`` takes replica 2 down mid-period after its second sync (and restarts it,
    or lets its torchrun do it). Checks that the survivors go on, that every rank of replica 2 rejoins with its
    shard of the others' anchor bit for bit, and that the run ends with one global model. ``script``: the replica
    (the hand-written loop, or FaultTolerantTrainer: tests/distributed/test_fault_tolerance_fsdp_trainer.py)."""
    with Cluster(tmp_path, "--replicas", "3", "--steps", "1000000", "--sync-interval", str(H), "--step-seconds",
                 "0.1", "--stop-file", str(tmp_path / "stop"), "--coins", coins, *extra, script=script, ranks=SHARDS,
                 restarts=restarts) as ft:
        for r in range(3):
            ft.start(r)
        ft.wait_for(lambda: all(len(ft.syncs(2, rank=s)) >= 2 for s in range(SHARDS)), timeout=200,
                    what="replica 2's second sync on both ranks")
        victims = {s: ft.syncs(2, rank=s)[-1]["pid"] for s in range(SHARDS)}
        killed_at, restarted_at = kill(ft)

        def rejoined(shard: int) -> list[dict]:
            return [e for e in ft.events(2, shard) if e["kind"] == "joined" and e["t"] > killed_at]

        ft.wait_for(lambda: all(rejoined(s) and len(ft.syncs(2, rejoined(s)[0]["pid"], s)) >= 2
                                for s in range(SHARDS)), timeout=200, what="the restarted replica's syncs")
        steps = stop_at(ft)
        ft.wait_all(timeout=200)
        results = ft.results()
        for shard in range(SHARDS):
            survivors = [by_step(ft.syncs(r, rank=shard)) for r in (0, 1)]
            killed_step = max(e["step"] for e in ft.syncs(2, victims[shard], shard))
            after_kill = sorted(s for s in survivors[0] if survivors[0][s]["t"] > killed_at)
            # The survivors synced without the dead replica, and kept training to the end.
            assert any(survivors[0][s]["participants"] == 2 for s in after_kill), after_kill
            assert max(survivors[0]) == steps and max(survivors[1]) == steps
            for step in survivors[0].keys() & survivors[1].keys():  # one may have joined late (min_replicas=2)
                assert survivors[1][step]["anchor"] == survivors[0][step]["anchor"], (shard, step)
            # This rank of the restarted replica rejoined at a later sync with its shard of the others' anchor.
            joined = rejoined(shard)[0]
            assert joined.get("hooks") == ("FaultTolerantAccelerate" if "--accelerate" in extra else None), joined
            assert joined["pid"] != victims[shard] and joined["rejoined"] and joined["step"] > killed_step, joined
            assert joined["anchor"] == survivors[0][joined["step"]]["anchor"]
            for step, event in by_step(ft.syncs(2, joined["pid"], shard)).items():
                assert event["anchor"] == survivors[0][step]["anchor"], (shard, step)
            assert survivors[0][steps]["participants"] == 3  # the last sync had all three again
    one_global_model([r for r in results if r["step"] == steps], 3)
    for replica in range(3):  # the ranks of a replica report one history (rank 0's after a rejoin)
        counters = [r["counters"] for r in results if r["replica"] == replica]
        assert counters[0] == counters[1], (replica, counters)
    again = [r for r in results if r["replica"] == 2]
    assert len(again) == SHARDS and all(r["ft"]["rejoins"] >= 1 for r in again), again
    print(f"\nFT x {' '.join(extra) or 'FSDP2'} (3 replicas x 2 ranks): replica 2 down at step {killed_step}, "
          f"rejoined at step {joined['step']}, {joined['t'] - restarted_at:.2f} s after its restart (join() "
          f"{joined['seconds']:.2f} s); the run ended at step {steps} with one global model")
    return {"killed_step": killed_step, "joined": joined}


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_kill_a_whole_sharded_replica_and_rejoin_per_shard(tmp_path):
    """The launcher and both ranks of replica 2 killed at once (a lost host), then the replica restarted."""
    def kill(ft: Cluster) -> tuple[float, float]:
        killed_at = ft.kill(2)
        return killed_at, ft.start(2)

    kill_and_rejoin(tmp_path, kill)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_accelerate_hooks_kill_a_whole_sharded_replica_and_rejoin(tmp_path):
    """The same through FaultTolerantAccelerate."""
    def kill(ft: Cluster) -> tuple[float, float]:
        killed_at = ft.kill(2)
        return killed_at, ft.start(2)

    kill_and_rejoin(tmp_path, kill, extra=("--accelerate",))


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_one_dead_rank_ends_its_replica_which_restarts_and_rejoins(tmp_path):
    """Only rank 1 of replica 2 killed: its replica's world is broken. Its torchrun stops the other rank and ends
    (no rank is left hanging in a collective); the replica is then restarted whole, as a scheduler (or torchrun
    --max-restarts) would, and rejoins. With per-replica coins: replicas take different step kinds (the ranks of
    one replica must agree, or FSDP's collectives inside it would pair a forward with nothing and time out),
    syncs are weighted means, and the restarted replica draws from a coin stream reseeded from (seed, replica,
    step) on both of its ranks alike."""
    def kill(ft: Cluster) -> tuple[float, float]:
        os.kill(ft.syncs(2, rank=1)[-1]["pid"], signal.SIGKILL)
        killed_at = time.time()
        rc = ft.wait_exit(2, timeout=60)
        ended = time.time() - killed_at
        assert rc != 0 and ended < 30, (rc, ended)  # far below the collective and quorum timeouts
        print(f"\nrank 1 of replica 2 killed: the replica's torchrun ended (rc={rc}) {ended:.2f} s later")
        return killed_at, ft.start(2)

    kill_and_rejoin(tmp_path, kill, coins="per_replica")


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_kill_a_whole_sharded_replica_during_warm_up_and_rejoin(tmp_path):
    """Replica 2 (launcher and both ranks) killed during a long warm-up and restarted: it rejoins inside the
    warm-up (at one of the others' per-step exchanges) with their weights bit for bit."""
    kill_during_warm_up_and_rejoin(tmp_path)


def kill_during_warm_up_and_rejoin(tmp_path, *extra: str) -> None:
    """3 replicas x 2 ranks with a long warm-up; replica 2 killed during it and restarted (see the test above)."""
    warmup = 400  # 0.1 s per step: > 40 s of warm-up, far longer than a restart (6-14 s measured)
    steps = warmup + 4 * H
    with Cluster(tmp_path, "--replicas", "3", "--steps", str(steps), "--warmup", str(warmup), "--sync-interval",
                 str(H), "--step-seconds", "0.1", *extra, script=SCRIPT, ranks=SHARDS) as ft:
        for r in range(3):
            ft.start(r)

        def warmups(replica: int, shard: int, after: float = 0.0) -> dict[int, dict]:
            return by_step([e for e in ft.events(replica, shard) if e["kind"] == "warmup" and e["t"] > after])

        ft.wait_for(lambda: all(len(warmups(2, s)) >= 3 for s in range(SHARDS)), timeout=200,
                    what="replica 2's warm-up steps")
        killed_step = max(max(warmups(2, s)) for s in range(SHARDS))
        killed_at = ft.kill(2)
        restarted_at = ft.start(2)
        ft.wait_all(timeout=300)
        results = ft.results()
        for shard in range(SHARDS):
            joined = [e for e in ft.events(2, shard) if e["kind"] == "joined" and e["t"] > killed_at][0]
            # It rejoined inside the warm-up, after the kill, with the others' state.
            assert joined["rejoined"] and killed_step < joined["step"] < warmup, joined
            survivors = [warmups(r, shard) for r in (0, 1)]
            # The survivors warmed up without it meanwhile (their exchanges had 2 participants) ...
            assert any(e["participants"] == 2 and e["t"] < joined["t"] for e in warmups(0, shard, killed_at).values())
            # ... and from its rejoin on it holds their weights at every warm-up step, bit for bit.
            again = warmups(2, shard, killed_at)
            assert again and all(e["participants"] == 3 for e in again.values()), again
            for step, event in again.items():
                assert event["weights"] == survivors[0][step]["weights"] == survivors[1][step]["weights"], step
            syncs = ft.syncs(2, rank=shard)
            assert [e["step"] for e in syncs] == list(range(warmup + H, steps + 1, H)), syncs
    one_global_model(results, 3)
    assert all(r["ft"]["rejoins"] >= 1 for r in results if r["replica"] == 2), results
    print(f"\nFT x {' '.join(extra) or 'FSDP2'} (3 replicas x 2 ranks): replica 2 killed at warm-up step "
          f"{killed_step}, rejoined at step {joined['step']} {joined['t'] - restarted_at:.2f} s after its restart "
          f"(join() {joined['seconds']:.2f} s); one global model at step {steps}")
