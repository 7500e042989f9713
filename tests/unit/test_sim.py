"""The simulated-scale benchmark (benchmarks/sim): its workers, its step records and its modeled wall time."""

from __future__ import annotations

import pytest

from benchmarks.sim.run import SimSpec, simulate
from benchmarks.sim.wall_time import Costs, Link, allreduce_seconds, modeled_times, time_to_target


def test_ddp_workers_stay_bitwise_identical():
    # Averaged gradients from one common initialization keep every replica on the same weights, bit for bit.
    # (Workers built concurrently from torch's global generator started from different models: this caught it.)
    res = simulate(SimSpec(method="ddp", workers=2, lr=3e-3, steps=6, global_batch=4, eval_every=3, lr_warmup=2))
    assert res.digests[0] == res.digests[1]
    assert res.kinds == ["warmup"] * 6 and not any(res.synced)
    assert [s for s, _ in res.evals] == [3, 6]


def test_palsgd_records_its_steps_and_ends_on_one_global_model():
    spec = SimSpec(method="palsgd", workers=2, lr=3e-3, steps=8, global_batch=4, sync_interval=3,
                   warmup_steps=2, pull=0.1, outer_momentum=0.5, eval_every=4, lr_warmup=2)
    res = simulate(spec)
    assert res.kinds[:2] == ["warmup", "warmup"] and set(res.kinds[2:]) <= {"gradient", "pseudo_sync"}
    # Syncs after steps 3 and 6 (t + 1 counts every step), and the final sync after step 8.
    assert [i + 1 for i, s in enumerate(res.synced) if s] == [3, 6, 8]
    assert res.digests[0] == res.digests[1]
    # The pull is set at the peak LR: eta = c p / lr.
    assert spec.config().mixing_rate == pytest.approx(0.1 * 0.2 / 3e-3)


def test_modeled_time_against_hand_computation():
    link = Link("test", 1e9, hop_latency_s=50e-6)
    # Ring all-reduce of 1 MB over 4 workers: 2*3/4 * 8e6 bit / 1e9 bit/s + 6 hops * 50 us = 12 + 0.3 ms.
    assert allreduce_seconds(1e6, 4, link) == pytest.approx(0.0123)
    assert allreduce_seconds(1e6, 1, link) == 0.0
    costs = Costs(compute_s=0.01, pull_s=0.001, sync_local_s=0.002)
    times = modeled_times(["warmup", "gradient", "pseudo_sync", "gradient"], [False, False, False, True],
                          1e6, 4, costs, link)
    assert times == pytest.approx([0.0223, 0.0323, 0.0333, 0.0333 + 0.01 + 0.0123 + 0.002])
    assert time_to_target([(2, 5.0), (4, 4.0)], times, 4.5) == pytest.approx(times[3])
    assert time_to_target([(2, 5.0), (4, 4.0)], times, 3.0) is None
    with pytest.raises(ValueError, match="unknown step kind"):
        modeled_times(["local"], [False], 1e6, 4, costs, link)


def test_modeled_time_charges_each_sync_the_bytes_it_booked():
    from benchmarks.sim.wall_time import modeled_times_traffic

    link = Link("test", 1e9, hop_latency_s=0.0)
    costs = Costs(compute_s=0.01, pull_s=0.001, sync_local_s=0.004)
    kinds = ["warmup", "gradient", "gradient", "gradient", "pseudo_sync"]
    # Two workers: a ring all-reduce of M bytes takes 8 M / 1e9 s. Model 1e6 bytes: a warm-up step pays 8 ms.
    blocking = {"wire": [1e6, 0, 5e5, 0, 0], "launched": [], "tail": 0, "final": 0}
    times = modeled_times_traffic(kinds, [False, False, True, False, False], blocking, 1e6, 2, costs, link, 0, 2)
    # Step 2 syncs one of F = 2 fragments: half the local work (2 ms) + 4 ms for its 5e5 bytes.
    assert times == pytest.approx([0.018, 0.028, 0.028 + 0.01 + 0.006, 0.054, 0.055])
    # Overlapped (d = 2): launched after step 1, lands after step 3; 1.25e6 bytes (both halves) take 10 ms, of
    # which steps 2 and 3 hide 10 + 10 ms: nothing exposed. The end: one final sync of 1e6 bytes (8 ms + 4 ms).
    flying = {"wire": [1e6, 1e6, 2.5e5, 0, 0], "launched": [1], "tail": 0, "final": 1e6}
    times = modeled_times_traffic(kinds, [False, False, False, True, False], flying, 1e6, 2, costs, link, 2, 1)
    assert times == pytest.approx([0.018, 0.032, 0.042, 0.052, 0.053 + 0.012])
    # A link 4x slower: the same transfer takes 40 ms, 20 ms of it hidden, 20 ms exposed at the landing step.
    slow = Link("slow", 2.5e8, hop_latency_s=0.0)
    times = modeled_times_traffic(kinds, [False, False, False, True, False], flying, 1e6, 2, costs, slow, 2, 1)
    assert times[3] - times[2] == pytest.approx(0.01 + 0.02)


def test_auto_policy_in_the_simulator_decides_from_the_modeled_link():
    """A slow modeled link makes the interval grow, a free one keeps the user's; every replica decides the same."""
    costs = Costs(compute_s=0.01, pull_s=0.0001, sync_local_s=0.001)

    def run(bps):
        spec = SimSpec(method="palsgd", workers=2, lr=3e-3, steps=20, global_batch=4, sync_interval=4, warmup_steps=2,
                       pull=0.1, outer_momentum=0.5, eval_every=10, lr_warmup=2, sync_policy="auto", link_bps=bps)
        return simulate(spec, costs)

    slow, free = run(1e6), run(1e12)
    # 1 Mbit/s: a 2 MB sync takes ~16 s against 10 ms steps: H doubles at every decision (the most it may move).
    assert slow.traffic["intervals"] == [(1, 4), (6, 8), (14, 16)]
    # Free: nothing to hide, and a cheap link alone never takes H below the user's 4.
    assert free.traffic["intervals"] == [(1, 4)]
    for res in (slow, free):
        assert res.digests[0] == res.digests[1]  # the run ends on one global model: the replicas agreed
    assert run(1e6).traffic["intervals"] == slow.traffic["intervals"]  # deterministic given the model


def test_runs_recorded_before_the_wire_fields_keep_their_keys():
    import dataclasses

    from benchmarks.sim.sweep import key_of, spec_key

    spec = SimSpec(method="ddp", workers=2, lr=3e-3)
    old = {k: v for k, v in dataclasses.asdict(spec).items()
           if k not in ("comm_dtype", "fragments", "overlap_steps", "sync_policy", "link_bps")}
    assert spec_key(old) == key_of(spec)
    assert key_of(dataclasses.replace(spec, comm_dtype="int8")) != key_of(spec)
