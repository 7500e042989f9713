"""The sync schedule: fixed H as in the paper, and sync_policy='auto' with a fake clock.

Checked: the auto rule's arithmetic on hand-computed cases (H* = t_sync (1 - rho) / (rho (1 - p) t_step),
at most a factor 2 per decision, the bounds, the drift guard); replicas that measure different times
decide the same H at the same step (two simulated workers, collectives at a thread barrier); the
whole algorithm with the policy on resumes mid-run onto the same schedule and the same weights; the
config and TrainingArguments refusals; and ``pull`` (c at the peak learning rate) deriving eta.
"""

from __future__ import annotations

import math

import pytest
import torch

from palsgd_hf import PALSGD, PALSGDConfig, PALSGDConfigError, PALSGDOptimizer, StepKind
from palsgd_hf.adapters import ModuleAdapter
from palsgd_hf.core.sync_policy import AdaptiveSchedule, FixedSchedule, build_schedule
from palsgd_hf.core.comm import LocalCommunicator
from tests.helpers.threads import run_threads
from tests.unit.test_core_state import roundtrip


class FakeClock:
    """Seconds that advance by ``tick`` at every reading."""

    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def auto(**kw) -> PALSGDConfig:
    return PALSGDConfig(sync_policy="auto", pseudo_sync_prob=0.2, **kw)


def test_fixed_schedule_is_the_papers():
    schedule = build_schedule(PALSGDConfig(sync_interval=4))
    assert isinstance(schedule, FixedSchedule)
    assert [t for t in range(1, 13) if schedule.is_due(t)] == [4, 8, 12]


def test_auto_rule_on_hand_computed_cases():
    s = AdaptiveSchedule(auto(sync_interval=32, comm_target=0.1))
    # H* = 1.0 * 0.9 / (0.1 * 0.8 * 0.1) = 112.5 -> 113, but at most 2 x 32 = 64 per decision.
    assert s.decide(32, t_step=0.1, t_sync=1.0, drift=0.01) == 64
    assert s.decide(64, t_step=0.1, t_sync=1.0, drift=0.01) == 113
    # A fast link: H* = 0.01 * 0.9 / 0.008 = 1.125 -> 2, but at most halved per decision: 113 -> 57 -> 29 ...
    assert s.decide(113, t_step=0.1, t_sync=0.01, drift=0.01) == 57
    # The bounds: never above max_sync_interval (8 x 32 = 256), never below overlap_steps + 1.
    assert s.decide(200, t_step=0.01, t_sync=10.0, drift=0.01) == 256
    low = AdaptiveSchedule(auto(sync_interval=8, overlap_steps=3))
    assert low.decide(4, t_step=1.0, t_sync=0.0, drift=0.0) == 4  # halved to 2, raised to overlap_steps + 1 = 4
    # No gradient step measured: keep H.
    assert s.decide(40, t_step=0.0, t_sync=1.0, drift=0.01) == 40


def test_auto_grows_only_while_the_drift_stays_within_twice_the_first():
    s = AdaptiveSchedule(auto(sync_interval=16))
    assert s.decide(16, t_step=0.1, t_sync=1.0, drift=0.05) == 32  # the first decision sets the baseline 0.05
    assert s.decide(32, t_step=0.1, t_sync=1.0, drift=0.10) == 64  # 2 x baseline: still allowed
    # Beyond: quality first, whatever the link asks. The drift-matched interval is 64 x 0.05 / 0.11 = 29.1,
    # bounded to a halving: 32.
    assert s.decide(64, t_step=0.1, t_sync=1.0, drift=0.11) == 32
    assert s.decide(48, t_step=0.1, t_sync=1.0, drift=0.15) == 24  # matched: floor(48 / 3) = 16, halved at most
    # Drift may take H below the user's interval (the link alone never does): 20 x 0.05 / 0.2 = 5 -> 10, a halving.
    assert s.decide(20, t_step=0.1, t_sync=1.0, drift=0.2) == 10
    assert s.decide(10, t_step=0.1, t_sync=0.0, drift=0.12) == 10  # at H <= 16 the drift updates the baseline
    assert s.baseline_drift == 0.12


def test_replicas_with_different_measurements_decide_the_same_interval():
    cfg = auto(sync_interval=8, max_sync_interval=128)

    def worker(rank, comm):
        s = AdaptiveSchedule(cfg, clock=FakeClock(tick=0.05 * (rank + 1)))  # rank 1's steps are twice as slow
        s.start(step=0)
        decisions = []
        for step in range(1, 300):
            s.on_step_end(gradient_step=True)
            if s.is_due(step):
                s.after_sync(step, sync_seconds=0.4 + 0.3 * rank, drift=0.01 * (rank + 1), groups=(comm,))
                decisions.append((step, s.interval, s.last["step_seconds"], s.last["sync_seconds"]))
        return decisions

    a, b = run_threads(2, worker)
    assert a == b and len(a) >= 3
    # The agreed values: the slowest replica's step, t_step 0.1 s (one tick of 0.1 per reading), and the least
    # blocked sync, t_sync 0.4 s (the last replica to arrive waits for the transfer alone; rank 1 waited longer).
    assert a[0][2] == pytest.approx(0.1) and a[0][3] == pytest.approx(0.4)
    # H* = 0.4 * 0.9 / (0.1 * 0.8 * 0.1) = 45: 8 -> 16 -> 32 -> 45 (within a factor 2 of 32), then it stays.
    assert [h for _, h, _, _ in a[:5]] == [16, 32, 45, 45, 45]
    assert [step for step, *_ in a[:4]] == [8, 24, 56, 101]


def make(rank: int, comm, cfg: PALSGDConfig):
    model = torch.nn.Linear(4, 1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, 4, generator=g))
        model.bias.zero_()
    inner = torch.optim.AdamW(model.parameters(), lr=0.05)
    algo = PALSGD(cfg, ModuleAdapter(model, inner), peers=comm, replica_index=rank)
    algo.schedule = Scripted(cfg)
    return model, inner, PALSGDOptimizer(inner, algo)


class Scripted(AdaptiveSchedule):
    """The auto policy on a fake clock, with sync times scripted by step (the real ones are microseconds)."""

    def __init__(self, cfg):
        super().__init__(cfg, clock=FakeClock(tick=0.01))

    def after_sync(self, step, sync_seconds, drift, groups):
        super().after_sync(step, 0.05 if step < 30 else 0.002, drift, groups)


def train(model, opt, rank: int, start: int, stop: int, syncs: list) -> None:
    for t in range(start, stop):
        g = torch.Generator().manual_seed(100 * rank + t)
        x = torch.randn(8, 4, generator=g)
        if opt.algorithm.step_kind() is not StepKind.PSEUDO_SYNC:
            torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True) * (rank + 1)).backward()
        before = opt.algorithm.counters["outer_syncs"]
        opt.step()
        opt.zero_grad()
        if opt.algorithm.counters["outer_syncs"] > before:
            syncs.append((t + 1, opt.algorithm.schedule.interval))


def test_the_algorithm_follows_the_decisions_and_resumes_onto_the_same_schedule():
    cfg = auto(sync_interval=4, warmup_steps=2, mixing_rate=1.0, max_sync_interval=16)

    def straight(rank, comm):
        model, _, opt = make(rank, comm, cfg)
        syncs: list = []
        train(model, opt, rank, 0, 62, syncs)
        return model.weight.detach().clone(), syncs, opt.algorithm.metrics()

    def interrupted(rank, comm):
        model, inner, opt = make(rank, comm, cfg)
        syncs: list = []
        train(model, opt, rank, 0, 25, syncs)  # between syncs
        saved = roundtrip({"model": model.state_dict(), "inner": inner.state_dict(),
                           "palsgd": opt.algorithm.state_dict()})
        model, inner, opt = make(rank, comm, cfg)
        model.load_state_dict(saved["model"])
        inner.load_state_dict(saved["inner"])
        opt.algorithm.load_state_dict(saved["palsgd"])
        train(model, opt, rank, 25, 62, syncs)
        return model.weight.detach().clone(), syncs, opt.algorithm.metrics()

    runs = run_threads(2, straight)
    (w0, syncs0, m0), (w1, syncs1, _) = runs
    assert syncs0 == syncs1 and torch.equal(w0, w1)  # the replicas agreed on every decision
    # The first period is 4 steps from the local phase (steps 2..5, sync after step 6); every later sync is
    # the previous one plus the interval decided there.
    assert syncs0[0][0] == 6
    assert all(b[0] - a[0] == a[1] for a, b in zip(syncs0, syncs0[1:]))
    intervals = [h for _, h in syncs0]
    assert max(intervals) == 16 and intervals[-1] < 16  # grew to the cap while syncs were slow, then shrank
    assert m0["sync_interval"] == intervals[-1] and 0 < m0["auto_comm_fraction"] < 1
    for (w, syncs, m), (w_ref, syncs_ref, m_ref) in zip(run_threads(2, interrupted), runs):
        assert syncs == syncs_ref and torch.equal(w, w_ref) and m == m_ref


def test_auto_settings_are_checked():
    with pytest.raises(PALSGDConfigError, match="sync_policy='sometimes' is not one of"):
        PALSGDConfig(sync_policy="sometimes")
    with pytest.raises(PALSGDConfigError, match=r"comm_target=1.5 must lie in \(0, 1\)"):
        PALSGDConfig(sync_policy="auto", comm_target=1.5)
    with pytest.raises(PALSGDConfigError, match="max_sync_interval=8 must be an integer >= 16"):
        PALSGDConfig(sync_interval=16, max_sync_interval=8)
    assert AdaptiveSchedule(auto(sync_interval=16)).high == 128 and AdaptiveSchedule(auto(sync_interval=16)).low == 2
    saved = PALSGD(PALSGDConfig(), ModuleAdapter(torch.nn.Linear(2, 1), torch.optim.SGD(
        torch.nn.Linear(2, 1).parameters(), lr=0.1))).state_dict()
    model = torch.nn.Linear(2, 1)
    other = PALSGD(auto(), ModuleAdapter(model, torch.optim.SGD(model.parameters(), lr=0.1)))
    with pytest.raises(ValueError, match="sync_policy='fixed' but this run has sync_policy='auto'"):
        other.load_state_dict(saved)


def test_pull_is_c_at_the_peak_learning_rate():
    with pytest.raises(PALSGDConfigError, match="set one of them"):
        PALSGDConfig(pull=0.03, mixing_rate=1.0)
    with pytest.raises(PALSGDConfigError, match=r"pull=1.5 must lie in \(0, 1\]"):
        PALSGDConfig(pull=1.5)
    default = PALSGDConfig()  # neither set: c = 0.1 at the peak learning rate (BENCHMARKS.md's sweep)
    assert default.pull == 0.1 and default.mixing_rate is None
    assert PALSGDConfig(method="diloco").mixing_rate == 1.0 and PALSGDConfig(method="diloco").pull is None
    user = PALSGDConfig(pull=0.03, pseudo_sync_prob=0.2)
    cfg = user.resolved(3e-3)
    assert user.mixing_rate is None and user.pull == 0.03  # the caller's config serves other learning rates too
    # eta = c p / lr = 0.03 * 0.2 / 3e-3 = 2 (up to the rounding of three float operations: a few ulps)
    assert cfg.mixing_rate == pytest.approx(2.0, rel=4 * 2.0 ** -52)
    assert cfg.check_mixing_coefficient(3e-3) == pytest.approx(0.03, rel=8 * 2.0 ** -52)
    # A loop without an integration: the core derives eta from the optimizer's initial learning rate.
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.0 if t == 0 else 1.0)  # lr 0 now, initial_lr 0.1
    algo = PALSGD(PALSGDConfig(pull=0.05, pseudo_sync_prob=0.25), ModuleAdapter(model, opt),
                  peers=LocalCommunicator())
    assert algo.config.mixing_rate == pytest.approx(0.05 * 0.25 / 0.1, rel=4 * 2.0 ** -52)
    assert math.isclose(algo.config.check_mixing_coefficient(0.1), 0.05, rel_tol=8 * 2.0 ** -52)


def test_replica_metrics_hold_every_replicas_row_after_each_sync():
    from palsgd_hf.core.replica_stats import FIELDS
    from tests.unit.test_comm_dtype import run_exchange_threads

    cfg = PALSGDConfig(sync_interval=4, pseudo_sync_prob=0.3, mixing_rate=1.0, warmup_steps=2, coins="per_replica",
                       replica_metrics=True)

    def worker(rank, comm):
        model, inner, opt = make(rank, comm, cfg)
        opt.algorithm.schedule = FixedSchedule(cfg)
        kinds = []
        before = dict(opt.algorithm.counters)
        for t in range(10):  # syncs after steps 4 and 8; rows of the second: steps 5..8
            g = torch.Generator().manual_seed(100 * rank + t)
            x = torch.randn(8, 4, generator=g)
            kind = opt.algorithm.step_kind()
            if kind is not StepKind.PSEUDO_SYNC:
                torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)).backward()
            opt.step()
            opt.zero_grad()
            kinds.append(kind.value)
            if t + 1 == 4:
                before = dict(opt.algorithm.counters)
            if t + 1 == 8:
                after = dict(opt.algorithm.counters)
                metrics = opt.algorithm.metrics()
        return kinds, before, after, metrics, opt.algorithm.last_drift

    results = run_exchange_threads(3, worker)
    for kinds, before, after, metrics, _ in results:
        for i, (_, b, a, _, drift) in enumerate(results):
            assert metrics[f"replica{i}/gradient_steps"] == a["gradient_steps"] - b["gradient_steps"]
            assert metrics[f"replica{i}/pseudo_syncs"] == a["pseudo_syncs"] - b["pseudo_syncs"]
            assert metrics[f"replica{i}/sync_seconds"] >= 0
            assert metrics[f"replica{i}/drift"] == drift > 0  # each replica's own drift at the sync after step 8
        assert {k for k in metrics if k.startswith("replica")} == {f"replica{i}/{f}" for i in range(3) for f in FIELDS}
    assert len({tuple(r[0]) for r in results}) > 1  # per-replica coins: the replicas ran different steps


def test_a_free_link_and_a_single_replica_do_not_drive_the_interval_to_one():
    s = AdaptiveSchedule(auto(sync_interval=32))
    intervals = [32]
    for _ in range(3):  # nothing blocked: H* = 0, but a cheap link alone never goes below the user's H
        intervals.append(s.decide(intervals[-1], t_step=0.1, t_sync=0.0, drift=0.01))
    assert intervals == [32, 32, 32, 32]
    # From a longer interval (grown while syncs were slow) it comes back down by halvings, to the user's H.
    assert [s.decide(h, t_step=0.1, t_sync=0.0, drift=0.01) for h in (256, 128, 64, 40)] == [128, 64, 32, 32]
    one = AdaptiveSchedule(auto(sync_interval=8))
    one.start(step=0)
    one.after_sync(8, sync_seconds=5.0, drift=0.1, groups=(LocalCommunicator(),))
    assert one.interval == 8 and one.next_sync == 16  # one replica: nobody to wait for, H stays


def test_a_resume_with_a_larger_overlap_never_schedules_over_a_sync_in_flight():
    saved = AdaptiveSchedule(auto(sync_interval=8))
    saved.interval, saved.next_sync = 1, 20
    resumed = AdaptiveSchedule(auto(sync_interval=8, overlap_steps=3))
    resumed.load_state_dict(saved.state_dict())
    assert resumed.interval == 4  # raised to overlap_steps + 1
