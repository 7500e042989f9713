"""Harder failures of the fault-tolerant mode (slow: real processes, a replica restart each).

* A replica killed *inside* a sync, while the others' all-reduce waits for it: their exchange fails, is not
  committed, and is retried with a new quorum of the two live replicas.
* Per-replica coins: replicas take different numbers of gradient steps, so a sync's mean is weighted by them;
  a replica killed and restarted rejoins with a coin stream of its own (not a copy of its peer's).
* The Accelerate hooks (FaultTolerantAccelerate) and the Trainer (FaultTolerantTrainer): kill, restart and
  rejoin as in the hand-written loop.
* The replica serving a rejoin killed while it serves: the rejoining replica's transfer fails, and it takes
  the state from the remaining live replica at the next quorum.

Both end with one global model on every live replica.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torchft")

from tests.distributed.test_fault_tolerance import H, by_step, run_interrupted, stop_at  # noqa: E402
from tests.helpers.ft_cluster import Cluster  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

ARGS = ("--sync-interval", str(H), "--warmup", "4", "--steps", "1000000", "--step-seconds", "0.04")


def one_global_model(cluster: Cluster, replicas: int) -> None:
    results = cluster.results()
    assert len(results) == replicas, results
    assert len({r["anchor"] for r in results}) == 1 and all(r["weights"] == r["anchor"] for r in results)


def test_kill_during_a_sync(tmp_path):
    hang_at = 4 * H  # replica 2 stalls in its fourth sync (syncs fall at multiples of H)
    with Cluster(tmp_path, *ARGS, "--stop-file", str(tmp_path / "stop")) as ft:
        ft.start(0)
        ft.start(1)
        ft.start(2, "--hang-in-sync", str(hang_at))
        ft.wait_for(lambda: any(e["kind"] == "in_sync" for e in ft.events(2)), timeout=150, what="replica 2 in a sync")
        killed_at = ft.kill(2)
        ft.wait_for(lambda: any(e["t"] > killed_at for e in ft.syncs(0)), timeout=60, what="a sync without replica 2")
        stop_at(ft, margin_periods=4)
        ft.wait_all(timeout=120)
        survivors = [by_step(ft.syncs(r)) for r in (0, 1)]
        # The sync replica 2 died in was completed by the other two, after a retry.
        assert survivors[0][hang_at]["participants"] == 2 and survivors[0][hang_at]["t"] > killed_at
        assert survivors[0][hang_at]["anchor"] == survivors[1][hang_at]["anchor"]
        one_global_model(ft, 2)
        assert all(r["ft"]["failed_attempts"] >= 1 for r in ft.results())
        print(f"\nkill inside the sync at step {hang_at}: that sync completed by 2 replicas "
              f"{survivors[0][hang_at]['t'] - killed_at:.2f} s after the kill")


def test_kill_the_replica_serving_the_rejoin(tmp_path):
    with Cluster(tmp_path, *ARGS, "--stop-file", str(tmp_path / "stop"), "--slow-serve", "3") as ft:
        for r in range(3):
            ft.start(r)
        ft.wait_for(lambda: len(ft.syncs(2)) >= 2, timeout=150, what="replica 2's second sync")
        ft.kill(2)
        restarted_at = ft.start(2)
        new_pid = ft.procs[2].pid

        def serving(r: int) -> bool:  # serving the restarted replica (not the start-up's identical-start transfer)
            return any(e["kind"] == "serving" and e["t"] > restarted_at for e in ft.events(r))

        ft.wait_for(lambda: serving(0) or serving(1), timeout=150, what="a replica serving the rejoin")
        server = 0 if serving(0) else 1
        other = 1 - server
        ft.kill(server)
        ft.wait_for(lambda: len(ft.syncs(2, new_pid)) >= 2, timeout=150, what="the rejoined replica's syncs")
        stop_at(ft, margin_periods=4)
        ft.wait_all(timeout=120)
        joined = next(e for e in ft.events(2) if e["kind"] == "joined" and e["pid"] == new_pid)
        assert joined["rejoined"] and joined["failed_attempts"] >= 1  # its first transfer died with the server
        assert joined["anchor"] == by_step(ft.syncs(other))[joined["step"]]["anchor"]
        one_global_model(ft, 2)


def test_per_replica_coins_kill_and_rejoin(tmp_path):
    with Cluster(tmp_path, *ARGS, "--coins", "per_replica", "--stop-file", str(tmp_path / "stop")) as ft:
        run = run_interrupted(ft)
        survivors = [by_step(ft.syncs(r)) for r in (0, 1)]
        for step in survivors[0].keys() & survivors[1].keys():  # one of them may have joined late (min_replicas=2)
            assert survivors[1][step]["anchor"] == survivors[0][step]["anchor"], step
        joined = next(e for e in ft.events(2) if e["kind"] == "joined" and e["pid"] == run["new_pid"])
        assert joined["rejoined"] and joined["anchor"] == survivors[0][joined["step"]]["anchor"]
        one_global_model(ft, 3)
        # The coins differ, so the weights do: the gradient steps taken by each sync differ somewhere. (Not the final
        # totals: two independent Binomial(n, 0.8) totals are equal with probability ~0.08.)
        common = sorted(survivors[0].keys() & survivors[1].keys())
        taken = [(survivors[0][s]["gradient_steps"], survivors[1][s]["gradient_steps"]) for s in common]
        assert len(common) >= 10 and any(a != b for a, b in taken), taken


@pytest.mark.parametrize("integration", ["--accelerate", "--trainer"])
def test_integrations_kill_and_rejoin(tmp_path, integration):
    with Cluster(tmp_path, *ARGS, integration, "--stop-file", str(tmp_path / "stop")) as ft:
        run = run_interrupted(ft)
        survivors = [by_step(ft.syncs(r)) for r in (0, 1)]
        assert any(e["participants"] == 2 for e in survivors[0].values())
        joined = next(e for e in ft.events(2) if e["kind"] == "joined" and e["pid"] == run["new_pid"])
        assert joined["rejoined"] and joined["anchor"] == survivors[0][joined["step"]]["anchor"]
        one_global_model(ft, 3)
