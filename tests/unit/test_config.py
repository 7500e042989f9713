"""PALSGDConfig: presets resolve, and every validation error names the value, the rule and the fix."""

from __future__ import annotations

from datetime import timedelta

import pytest

from palsgd_hf import PALSGDConfig, PALSGDConfigError
from palsgd_hf.core import Topology


def test_presets_resolve():
    assert PALSGDConfig().pseudo_sync_prob == 0.2
    assert PALSGDConfig().outer_optimizer == "nesterov" and PALSGDConfig().outer_lr == 0.7
    d = PALSGDConfig(method="diloco")
    assert d.pseudo_sync_prob == 0.0 and d.outer_momentum == 0.9
    ls = PALSGDConfig(method="localsgd")
    assert (ls.outer_optimizer, ls.outer_lr, ls.outer_momentum) == ("sgd", 1.0, 0.0)
    assert PALSGDConfig(method="ddp").is_ddp
    assert PALSGDConfig(pseudo_sync_prob=0.0).pseudo_sync_prob == 0.0  # palsgd with p=0 is DiLoCo, allowed


BAD = [
    (dict(method="fedavg"), "method='fedavg' is not one of"),
    (dict(sync_interval=0), "sync_interval=0 must be an integer >= 1"),
    (dict(sync_interval=2.5), "sync_interval=2.5 must be an integer"),
    (dict(pseudo_sync_prob=1.0), "pseudo_sync_prob=1.0 must lie in [0, 1)"),
    (dict(pseudo_sync_prob=-0.1), "pseudo_sync_prob=-0.1 must lie in [0, 1)"),
    (dict(mixing_rate=0), "mixing_rate=0 must be > 0"),
    (dict(mixing_rate=-1.0), "mixing_rate=-1.0 must be > 0"),
    (dict(warmup_steps=-1), "warmup_steps=-1 must be an integer >= 0"),
    (dict(outer_optimizer="lion"), "outer_optimizer='lion' is not one of"),
    (dict(outer_lr=0.0), "outer_lr=0.0 must be > 0"),
    (dict(outer_momentum=1.0), "outer_momentum=1.0 must lie in [0, 1)"),
    (dict(outer_optimizer="nesterov", outer_momentum=0.0), "needs outer_momentum > 0"),
    (dict(method="diloco", pseudo_sync_prob=0.2), "contradicts method='diloco'"),
    (dict(method="localsgd", outer_lr=0.5), "contradicts method='localsgd'"),
    (dict(method="ddp", pseudo_sync_prob=0.1), "contradicts method='ddp'"),
    (dict(shard_size=0), "shard_size=0 must be an integer >= 1"),
    (dict(overlap_steps=-1), "overlap_steps=-1 must be an integer >= 0"),
    (dict(sync_interval=4, overlap_steps=4), "overlap_steps=4 must be smaller than sync_interval=4"),
    (dict(comm_dtype="fp8"), "comm_dtype='fp8' is not one of"),
    (dict(anchor_device="disk"), "anchor_device='disk' is not one of"),
    (dict(seed=-3), "seed=-3 must be an integer >= 0"),
    (dict(comm_timeout_seconds=0), "comm_timeout_seconds=0 must be a positive number of seconds"),
    (dict(comm_timeout_seconds=-5.0), "comm_timeout_seconds=-5.0 must be a positive number of seconds"),
    (dict(comm_timeout_seconds=True), "comm_timeout_seconds=True must be a positive number of seconds"),
    (dict(comm_timeout_seconds="60"), "comm_timeout_seconds='60' must be a positive number of seconds"),
    (dict(comm_timeout_seconds=float("inf")), "comm_timeout_seconds=inf must be a positive number of seconds"),
    (dict(comm_timeout_seconds=float("nan")), "comm_timeout_seconds=nan must be a positive number of seconds"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m.split(" ")[0] for _, m in BAD])
def test_bad_values_are_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(PALSGDConfigError) as err:
        PALSGDConfig(**kwargs)
    assert message in str(err.value)
    assert ";" in str(err.value)  # every message carries a fix after the rule


def test_comm_timeout_is_optional_and_converts_to_a_timedelta():
    assert PALSGDConfig().comm_timeout_seconds is None and PALSGDConfig().comm_timeout() is None
    assert PALSGDConfig(comm_timeout_seconds=90).comm_timeout() == timedelta(seconds=90)
    assert PALSGDConfig(comm_timeout_seconds=7.5).comm_timeout() == timedelta(seconds=7.5)


def test_mixing_coefficient():
    cfg = PALSGDConfig(pseudo_sync_prob=0.2, mixing_rate=1.0)
    assert cfg.check_mixing_coefficient(0.01) == pytest.approx(0.05)
    assert cfg.check_mixing_coefficient(0.0) == 0.0  # lr 0 at a schedule's end: a no-op pull
    with pytest.raises(PALSGDConfigError, match=r"c = lr\*eta/p = 0.5\*1/0.2 = 2.5 must lie in \(0, 1\]; lower mixing_rate to at most 0.4"):
        cfg.check_mixing_coefficient(0.5)


def test_topology_layout_and_error():
    t = Topology(world_size=4, rank=3, shard_size=2)
    assert (t.num_replicas, t.replica_index, t.shard_index) == (2, 1, 1)
    assert t.replica_ranks(1) == [2, 3] and t.peer_ranks(1) == [1, 3]
    with pytest.raises(PALSGDConfigError, match="world size 6 is not divisible by shard_size=4"):
        Topology(world_size=6, rank=0, shard_size=4)
