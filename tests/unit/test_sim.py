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
