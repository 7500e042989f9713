"""The overlapped outer sync (overlap_steps = d) against a float64 re-implementation of its rule.

The rule (docs/overlap.md, palsgd_hf/core/overlap.py): at a sync the averaged pseudo-gradient is
launched and x_launch = x kept; d local steps later (pulls still aiming at the old anchor) the outer
step lands and x <- x_bar_new + (x - x_launch); finalize() applies what is in flight, then one
blocking sync. The reference below writes that out from the rule alone, on the linear-regression
problem and AdamW reference of tests/unit/test_reference.py, and the real core runs it on K threaded
workers. Also: global_weights() during the wait, a non-finite average, resume in the middle of a
wait (fp32 and bf16, before and after the bf16 exchange's second half starts).
"""

from __future__ import annotations

import io
import time

import pytest
import torch

from palsgd_hf import PALSGD, PALSGDConfig, PALSGDConfigError, PALSGDOptimizer, StepKind
from palsgd_hf.adapters import ModuleAdapter
from palsgd_hf.core.comm import PendingReduce
from tests.helpers.threads import run_threads
from tests.unit.test_comm_dtype import ExchangeThreadCommunicator, bf16_mean_rule, run_exchange_threads
from tests.unit.test_reference import BASE_LR, BETAS, BIAS_LR_RATIO, D, EPS, WD, Linear, RefAdamW, batch, grad
from tests.unit.test_reference import initial_weights, lr_factor


# ---------------------------------------------------------------- the reference, float64, no torch.optim
def reference(cfg: PALSGDConfig, workers: int, steps: int):
    """Returns (weights after `steps` steps, weights after finalize, step kinds, outer syncs applied)."""
    w0, b0 = initial_weights()
    xs = [[w0.clone(), b0.clone()] for _ in range(workers)]
    opts = [RefAdamW([D, 1]) for _ in range(workers)]
    streams = [k if cfg.coins == "per_replica" else 0 for k in range(workers)]  # shared coins: one stream
    gens = [torch.Generator().manual_seed((cfg.seed * 1_000_003 + k * 7_919 + 17) % (2**63 - 1)) for k in streams]
    p, eta, mu, d = cfg.pseudo_sync_prob, cfg.mixing_rate, cfg.outer_momentum, cfg.overlap_steps
    st = {"anchor": None, "buf": None, "pending": None, "since": 0, "syncs": 0}
    kinds = [[] for _ in range(workers)]

    feedback = {"sent": {}, "owned": {}}  # int8/int4: the rule's residuals (tests/unit/test_quantized_exchange.py)

    def average(deltas):  # deltas[k][i]: worker k, parameter i
        if cfg.comm_dtype == "bf16":
            return [bf16_mean_rule([dk[i] for dk in deltas]) for i in range(2)]
        if cfg.comm_dtype in ("int8", "int4"):
            # Quantization blocks span the flat pseudo-gradient [w, b] as the core concatenates its owned tensors.
            from tests.unit.test_quantized_exchange import int_mean_rule

            mean = int_mean_rule([torch.cat([d.reshape(-1) for d in dk]) for dk in deltas], cfg.comm_dtype, feedback)
            return [part.reshape(d.shape) for part, d in zip(mean.split([d.numel() for d in deltas[0]]), deltas[0])]
        return [sum(dk[i] for dk in deltas) / workers for i in range(2)]

    def outer(delta):
        if cfg.outer_optimizer == "nesterov":
            st["buf"] = delta if st["buf"] is None else [mu * b + g for b, g in zip(st["buf"], delta)]
            delta = [g + mu * b for g, b in zip(delta, st["buf"])]
        st["anchor"] = [a - cfg.outer_lr * u for a, u in zip(st["anchor"], delta)]
        st["syncs"] += 1

    def pseudo_gradients():
        return [[a - x for a, x in zip(st["anchor"], xs[k])] for k in range(workers)]

    def blocking_sync():
        outer(average(pseudo_gradients()))
        xs[:] = [[a.clone() for a in st["anchor"]] for _ in range(workers)]
        st["since"] = 0

    def apply(pending):
        outer(pending["mean"])
        xs[:] = [[a + (x - l) for a, x, l in zip(st["anchor"], xs[k], pending["launch"][k])] for k in range(workers)]
        st["pending"] = None

    for t in range(steps):
        lrs = [BASE_LR * lr_factor(t), BASE_LR * BIAS_LR_RATIO * lr_factor(t)]
        if t < cfg.warmup_steps:
            gs = [grad(*xs[k], k, t) for k in range(workers)]
            mean = [sum(g[i] for g in gs) / workers for i in range(2)]
            for k in range(workers):
                xs[k] = opts[k].step(xs[k], mean, lrs)
                kinds[k].append("warmup")
            continue
        if st["anchor"] is None:
            st["anchor"] = [v.clone() for v in xs[0]]
        for k in range(workers):
            if torch.rand((), generator=gens[k]).item() < p:  # the pull aims at the current (old) anchor
                xs[k] = [x - (lr * eta / p) * (x - a) for x, a, lr in zip(xs[k], st["anchor"], lrs)]
                kinds[k].append("pseudo_sync")
            else:
                xs[k] = opts[k].step(xs[k], grad(*xs[k], k, t), [lr / (1 - p) for lr in lrs])
                kinds[k].append("gradient")
        count = t + 1
        st["since"] += 1
        if st["pending"] is not None and count == st["pending"]["apply_at"]:
            apply(st["pending"])
        if count % cfg.sync_interval == 0:
            if d == 0:
                blocking_sync()
            else:
                launch = [[x.clone() for x in xs[k]] for k in range(workers)]
                st["pending"] = {"apply_at": count + d, "mean": average(pseudo_gradients()), "launch": launch}
                st["since"] = 0
    before = [[x.clone() for x in xk] for xk in xs]
    syncs_before = st["syncs"]
    if st["pending"] is not None:
        apply(st["pending"])
    if st["anchor"] is not None and st["since"] > 0:
        blocking_sync()
    return before, xs, kinds, syncs_before


# ---------------------------------------------------------------- the system under test
def make_inner(model: Linear):
    inner = torch.optim.AdamW(
        [{"params": [model.w]}, {"params": [model.b], "lr": BASE_LR * BIAS_LR_RATIO}],
        lr=BASE_LR, betas=BETAS, eps=EPS, weight_decay=WD,
    )
    return inner, torch.optim.lr_scheduler.LambdaLR(inner, lr_factor)


def make(rank: int, comm, cfg: PALSGDConfig):
    model = Linear()
    inner, sched = make_inner(model)
    algo = PALSGD(cfg, ModuleAdapter(model, inner), peers=comm, replica_index=rank)
    return model, inner, sched, PALSGDOptimizer(inner, algo)


def train(model, opt, sched, rank: int, start: int, stop: int, poison_at: int | None = None) -> list[str]:
    """Steps start..stop-1 on worker ``rank``'s data; returns the step kinds."""
    kinds = []
    for t in range(start, stop):
        kind = opt.algorithm.step_kind()
        if kind is not StepKind.PSEUDO_SYNC:
            x, y = batch(rank, t)
            ((x @ model.w + model.b - y) ** 2).mean().backward()
        if t == poison_at and rank == 0:
            with torch.no_grad():
                model.w[0] = float("nan")
        opt.step()
        sched.step()
        opt.zero_grad()
        kinds.append(kind.value)
    return kinds


def weights(model) -> list[torch.Tensor]:
    return [model.w.detach().clone(), model.b.detach().clone()]


def run_core(cfg: PALSGDConfig, workers: int, steps: int):
    """Per worker: (weights after `steps`, kinds, metrics, weights after finalize)."""

    def worker(rank, comm):
        model, _, sched, opt = make(rank, comm, cfg)
        kinds = train(model, opt, sched, rank, 0, steps)
        before, metrics = weights(model), opt.algorithm.metrics()
        opt.algorithm.finalize()
        return before, kinds, metrics, weights(model)

    return run_exchange_threads(workers, worker)


def assert_matches_reference(cfg: PALSGDConfig, workers: int, steps: int) -> None:
    ref_before, ref_final, ref_kinds, ref_syncs = reference(cfg, workers, steps)
    for k, (before, kinds, metrics, final) in enumerate(run_core(cfg, workers, steps)):
        assert kinds == ref_kinds[k], f"worker {k}: step kinds differ"
        for got, want in zip(before, ref_before[k]):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
        for got, want in zip(final, ref_final[k]):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
        assert metrics["outer_syncs"] == ref_syncs
        assert metrics["skipped_syncs"] == 0


SETTINGS = [
    # (config, workers, steps): the last sync of each run is still in flight when training stops.
    pytest.param(PALSGDConfig(sync_interval=4, pseudo_sync_prob=0.3, mixing_rate=2.0, warmup_steps=3, overlap_steps=1,
                               coins="per_replica"), 3, 21, id="palsgd-H4-d1-per-replica-coins"),
    pytest.param(PALSGDConfig(sync_interval=4, pseudo_sync_prob=0.3, mixing_rate=2.0, warmup_steps=3, overlap_steps=1), 3, 21, id="palsgd-H4-d1"),
    pytest.param(
        PALSGDConfig(sync_interval=5, pseudo_sync_prob=0.5, mixing_rate=1.5, warmup_steps=0, outer_lr=0.5,
                     outer_momentum=0.8, seed=3, overlap_steps=3),
        2, 22, id="palsgd-H5-d3",
    ),
    pytest.param(PALSGDConfig(method="diloco", sync_interval=6, warmup_steps=2, overlap_steps=2), 3, 19, id="diloco-H6-d2"),
    pytest.param(PALSGDConfig(method="localsgd", sync_interval=3, warmup_steps=1, overlap_steps=2), 2, 16, id="localsgd-H3-d2-ends-on-sync"),
]


@pytest.mark.parametrize("cfg,workers,steps", SETTINGS)
def test_overlap_matches_float64_reference(cfg, workers, steps):
    assert_matches_reference(cfg, workers, steps)


def test_reference_without_overlap_is_the_blocking_algorithm():
    """The overlap reference with d = 0 must reproduce the core's (blocking) trajectory too."""
    assert_matches_reference(PALSGDConfig(sync_interval=4, pseudo_sync_prob=0.3, mixing_rate=2.0, warmup_steps=3), 3, 21)


def test_overlap_keeps_local_progress_so_workers_differ_after_the_update():
    cfg = PALSGDConfig(method="diloco", sync_interval=4, warmup_steps=0, overlap_steps=2)
    blocking = run_core(PALSGDConfig(method="diloco", sync_interval=4, warmup_steps=0), 2, 6)
    overlapped = run_core(cfg, 2, 6)  # launch at 4, update lands at 6
    assert not torch.equal(overlapped[0][0][0], overlapped[1][0][0])
    assert not torch.equal(overlapped[0][0][0], blocking[0][0][0])
    assert torch.equal(overlapped[0][3][0], overlapped[1][3][0])  # finalize: one global model


def test_global_weights_during_the_wait_is_the_old_anchor():
    cfg = PALSGDConfig(sync_interval=4, pseudo_sync_prob=0.25, warmup_steps=0, overlap_steps=3)

    def run(rank, comm):
        model, _, sched, opt = make(rank, comm, cfg)
        algo = opt.algorithm
        train(model, opt, sched, rank, 0, 3)
        old_anchor = [a.clone() for a in algo._anchor.tensors]
        train(model, opt, sched, rank, 3, 5)  # launched after step index 3; one step into the wait
        local = weights(model)
        with algo.global_weights():
            inside = weights(model)
        outside = weights(model)
        train(model, opt, sched, rank, 5, 7)  # the update lands after step index 6
        return old_anchor, inside, local, outside, [a.clone() for a in algo._anchor.tensors]

    for old_anchor, inside, local, outside, new_anchor in run_exchange_threads(2, run):
        assert all(torch.equal(a, b) for a, b in zip(inside, old_anchor))
        assert all(torch.equal(a, b) for a, b in zip(outside, local))
        assert not torch.equal(inside[0], local[0])
        assert not torch.equal(new_anchor[0], old_anchor[0])


def test_nonfinite_average_skips_the_update_and_returns_every_worker_to_the_old_anchor():
    # H = 4, d = 2: launches at counts 4, 8, 12, 16; updates land at 6, 10, 14, 18.
    cfg = PALSGDConfig(method="diloco", sync_interval=4, warmup_steps=0, overlap_steps=2)

    def run(rank, comm):
        model, _, sched, opt = make(rank, comm, cfg)
        algo = opt.algorithm
        train(model, opt, sched, rank, 0, 10, poison_at=8)  # worker 0 turns NaN after the launch at 8
        m10, anchor10 = algo.metrics(), [a.clone() for a in algo._anchor.tensors]
        train(model, opt, sched, rank, 10, 14)  # the average launched at 12 is NaN: skipped at 14
        m14, w14, anchor14 = algo.metrics(), weights(model), [a.clone() for a in algo._anchor.tensors]
        train(model, opt, sched, rank, 14, 18)
        return m10, anchor10, m14, w14, anchor14, algo.metrics(), weights(model)

    results = run_exchange_threads(2, run)
    for m10, anchor10, m14, w14, anchor14, m18, w18 in results:
        assert (m10["outer_syncs"], m10["skipped_syncs"]) == (2, 0)  # launched before the NaN: applied
        assert (m14["outer_syncs"], m14["skipped_syncs"]) == (2, 1)
        # Every worker is back on the last good anchor, the one the update at 10 produced.
        assert all(torch.equal(w, a) and torch.equal(a, b) for w, a, b in zip(w14, anchor14, anchor10))
        assert (m18["outer_syncs"], m18["skipped_syncs"]) == (3, 1) and torch.isfinite(torch.cat(w18)).all()
    assert torch.equal(results[0][3][0], results[1][3][0])


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize(
    "comm_dtype,overlap,stop_at",
    [("fp32", 2, 9), ("bf16", 3, 9), ("bf16", 3, 10), ("int8", 3, 9), ("int4", 3, 10)],
    ids=["fp32-mid-wait", "bf16-before-gather", "bf16-during-gather", "int8-before-gather", "int4-during-gather"],
)
def test_resume_in_the_middle_of_a_wait_continues_exactly(comm_dtype, overlap, stop_at):
    # H = 8, launch at count 8; d = 3 starts the bf16 gather at count 10 and applies at 11.
    cfg = PALSGDConfig(sync_interval=8, pseudo_sync_prob=0.3, mixing_rate=2.0, warmup_steps=1,
                       overlap_steps=overlap, comm_dtype=comm_dtype)

    def in_flight(opt):
        assert opt.algorithm._pending is not None

    for (w1, m1), (w2, m2) in resume_runs(cfg, stop_at, 19, at_save=in_flight):
        assert m1["outer_syncs"] == 2


SECONDS = ("comm_seconds", "sync_seconds_blocked", "comm_seconds_overlapped")


def resume_runs(cfg: PALSGDConfig, stop_at: int, steps: int, at_save=None, workers: int = 2):
    """Per worker: ((weights, metrics) uninterrupted, (weights, metrics) restarted from a checkpoint at ``stop_at``),
    after checking that they agree: weights bit for bit, metrics except the seconds. ``at_save(opt)`` may check the
    state being saved."""

    def straight(rank, comm):
        model, _, sched, opt = make(rank, comm, cfg)
        train(model, opt, sched, rank, 0, steps)
        return weights(model), opt.algorithm.metrics()

    def interrupted(rank, comm):
        model, inner, sched, opt = make(rank, comm, cfg)
        train(model, opt, sched, rank, 0, stop_at)
        if at_save is not None:
            at_save(opt)
        saved = roundtrip({"model": model.state_dict(), "inner": inner.state_dict(), "sched": sched.state_dict(),
                           "palsgd": opt.algorithm.state_dict()})
        model, inner, sched, opt = make(rank, comm, cfg)  # fresh objects, as after a restart
        model.load_state_dict(saved["model"])
        inner.load_state_dict(saved["inner"])
        sched.load_state_dict(saved["sched"])
        opt.algorithm.load_state_dict(saved["palsgd"])
        train(model, opt, sched, rank, stop_at, steps)
        return weights(model), opt.algorithm.metrics()

    pairs = list(zip(run_exchange_threads(workers, straight), run_exchange_threads(workers, interrupted)))
    for (w1, m1), (w2, m2) in pairs:
        assert all(torch.equal(a, b) for a, b in zip(w1, w2))
        assert {k: v for k, v in m1.items() if k not in SECONDS} == {k: v for k, v in m2.items() if k not in SECONDS}
    return pairs


class _SlowWork:
    """A collective that completes at ``done_at`` (no future: the hidden time is counted up to wait())."""

    done_at = 0.0

    def is_completed(self) -> bool:
        return time.perf_counter() >= self.done_at

    def wait(self) -> bool:
        time.sleep(max(0.0, self.done_at - time.perf_counter()))
        return True


class _SlowCommunicator(ExchangeThreadCommunicator):
    """Averages like the threaded communicator, but each all-reduce takes DELAY seconds from its launch."""

    DELAY = 0.5

    def all_reduce_mean_async(self, tensor):
        mean = super().all_reduce_mean_async(tensor).tensor
        work = _SlowWork()
        pending = PendingReduce(self, mean, work, 1)
        work.done_at = pending.launched_at + self.DELAY
        return pending


def test_metrics_report_blocked_and_overlapped_seconds():
    cfg = PALSGDConfig(sync_interval=4, warmup_steps=0, overlap_steps=1, method="diloco")

    def worker(rank, comm):
        model, _, sched, opt = make(rank, comm, cfg)
        train(model, opt, sched, rank, 0, 8)
        return opt.algorithm.metrics()

    delay = _SlowCommunicator.DELAY
    for metrics in run_threads(2, lambda rank, comm: worker(rank, _SlowCommunicator(comm._group, rank))):
        assert metrics["outer_syncs"] == 1  # launched at 4 (landed at 5) and at 8 (still in flight)
        # The exchange that landed was in flight for >= DELAY from its launch: the time this rank kept
        # training (overlapped) plus the time it then waited (blocked) covers all of it, both read from the
        # same clock. One local step of this linear model takes milliseconds, so a sync time that was not
        # booked as blocked makes the sum fall short of DELAY.
        assert metrics["sync_seconds_blocked"] + metrics["comm_seconds_overlapped"] >= delay
        assert 0 < metrics["comm_seconds_overlapped"] < delay
        # Time blocked in exchanges is part of all the time blocked in collectives.
        assert metrics["comm_seconds"] >= metrics["sync_seconds_blocked"]


def test_overlap_must_be_shorter_than_the_sync_interval():
    with pytest.raises(PALSGDConfigError, match="overlap_steps=4 must be smaller than sync_interval=4"):
        PALSGDConfig(sync_interval=4, overlap_steps=4)
