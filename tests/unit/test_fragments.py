"""Fragment (streaming) syncs against a float64 re-implementation of their rule.

The rule (palsgd_hf/core/fragments.py): the owned values, read as one flat vector of N values, are cut
at floor(i N / F); fragment i is synced after step t when (t + 1) mod H == floor(i H / F), with its own
averaged pseudo-gradient, its own outer (Nesterov) step on its own momentum, and its own int8/int4
residuals; the other fragments keep their local values. Overlapped (d >= 1), a fragment's average lands
d steps after its launch and keeps the local progress of its values. finalize() syncs every fragment.
The reference below writes that out on the flat [w, b] vector of the linear-regression problem of
tests/unit/test_reference.py (6 values, so fragments cut inside w and across w and b); the real core
runs on K threaded workers. With F = 1 the reference reduces to the overlap reference exactly.
"""

from __future__ import annotations

import pytest
import torch

from palsgd_hf import PALSGD, PALSGDConfig, PALSGDConfigError
from palsgd_hf.adapters import ModuleAdapter
from palsgd_hf.core.fragments import FragmentLayout, due_fragment
from tests.unit.test_comm_dtype import bf16_mean_rule, run_exchange_threads
from tests.unit.test_overlap import reference as overlap_reference, resume_runs, run_core
from tests.unit.test_reference import BASE_LR, BIAS_LR_RATIO, D, RefAdamW, grad, initial_weights, lr_factor

N = D + 1  # the flat vector [w, b]


# ---------------------------------------------------------------- the rule's pieces
def test_layout_cuts_the_flat_vector_inside_and_across_tensors():
    two = FragmentLayout([5, 1], 2)  # bounds 0, 3, 6
    assert two.pieces == [(0, 0, 3, 0), (0, 3, 5, 1), (1, 0, 1, 1)]
    assert two.members == [[0], [1, 2]] and [two.numel(f) for f in range(2)] == [3, 3]
    three = FragmentLayout([5, 1], 3)  # bounds 0, 2, 4, 6
    assert three.pieces == [(0, 0, 2, 0), (0, 2, 4, 1), (0, 4, 5, 2), (1, 0, 1, 2)]
    assert FragmentLayout([5, 1], 1).pieces == [(0, 0, 5, 0), (1, 0, 1, 0)]


def test_fragment_i_is_due_at_its_offset_of_every_period():
    assert [(s, due_fragment(s, 8, 4)) for s in range(1, 17) if due_fragment(s, 8, 4) is not None] == [
        (2, 1), (4, 2), (6, 3), (8, 0), (10, 1), (12, 2), (14, 3), (16, 0)]
    assert [s for s in range(1, 11) if due_fragment(s, 5, 2) is not None] == [2, 5, 7, 10]  # offsets 0, 2
    assert [s for s in range(1, 9) if due_fragment(s, 4, 1) is not None] == [4, 8]  # F = 1: the paper's schedule


# ---------------------------------------------------------------- the reference, float64, no torch.optim
def reference(cfg: PALSGDConfig, workers: int, steps: int):
    """Returns (weights after `steps` steps, weights after finalize, step kinds, fragment syncs applied)."""
    from tests.unit.test_quantized_exchange import int_mean_rule

    w0, b0 = initial_weights()
    xs = [[w0.clone(), b0.clone()] for _ in range(workers)]
    opts = [RefAdamW([D, 1]) for _ in range(workers)]
    streams = [k if cfg.coins == "per_replica" else 0 for k in range(workers)]
    gens = [torch.Generator().manual_seed((cfg.seed * 1_000_003 + k * 7_919 + 17) % (2**63 - 1)) for k in streams]
    p, eta, mu, d, F, H = (cfg.pseudo_sync_prob, cfg.mixing_rate, cfg.outer_momentum, cfg.overlap_steps,
                           cfg.fragments, cfg.sync_interval)
    cut = [slice((i * N) // F, ((i + 1) * N) // F) for i in range(F)]
    offsets = [(i * H) // F for i in range(F)]
    st = {"anchor": None, "buf": torch.zeros(N, dtype=torch.float64), "pending": None, "since": 0, "syncs": 0}
    feedback = [{"sent": {}, "owned": {}} for _ in range(F)]
    kinds = [[] for _ in range(workers)]

    def flat(k):
        return torch.cat(xs[k])

    def set_flat(k, v):
        xs[k] = [v[:D].clone(), v[D:].clone()]

    def average(f):
        deltas = [st["anchor"][cut[f]] - flat(k)[cut[f]] for k in range(workers)]
        if cfg.comm_dtype == "bf16":
            return bf16_mean_rule(deltas)
        if cfg.comm_dtype in ("int8", "int4"):
            return int_mean_rule(deltas, cfg.comm_dtype, feedback[f])
        return sum(deltas) / workers

    def outer(f, mean):
        if cfg.outer_optimizer == "nesterov":
            st["buf"][cut[f]] = mu * st["buf"][cut[f]] + mean  # torch's first step: buf = g = mu * 0 + g
            mean = mean + mu * st["buf"][cut[f]]
        st["anchor"][cut[f]] = st["anchor"][cut[f]] - cfg.outer_lr * mean
        st["syncs"] += 1

    def blocking_sync(f):
        outer(f, average(f))
        for k in range(workers):
            v = flat(k)
            v[cut[f]] = st["anchor"][cut[f]]
            set_flat(k, v)

    def apply(pending):
        f = pending["fragment"]
        outer(f, pending["mean"])
        for k in range(workers):
            v = flat(k)
            v[cut[f]] = st["anchor"][cut[f]] + (v[cut[f]] - pending["launch"][k])
            set_flat(k, v)
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
            st["anchor"] = flat(0).clone()
        anchor = [st["anchor"][:D], st["anchor"][D:]]
        for k in range(workers):
            if torch.rand((), generator=gens[k]).item() < p:  # the pull aims at the anchor as it is now
                xs[k] = [x - (lr * eta / p) * (x - a) for x, a, lr in zip(xs[k], anchor, lrs)]
                kinds[k].append("pseudo_sync")
            else:
                xs[k] = opts[k].step(xs[k], grad(*xs[k], k, t), [lr / (1 - p) for lr in lrs])
                kinds[k].append("gradient")
        count = t + 1
        st["since"] += 1
        if st["pending"] is not None and count == st["pending"]["apply_at"]:
            apply(st["pending"])
        if count % H in offsets:
            f = offsets.index(count % H)
            if d == 0:
                blocking_sync(f)
            else:
                launch = [flat(k)[cut[f]].clone() for k in range(workers)]
                st["pending"] = {"apply_at": count + d, "mean": average(f), "launch": launch, "fragment": f}
            if F == 1:
                st["since"] = 0
    before = [[x.clone() for x in xk] for xk in xs]
    syncs_before = st["syncs"]
    if st["pending"] is not None:
        apply(st["pending"])
    if st["anchor"] is not None and st["since"] > 0:
        for f in range(F):
            blocking_sync(f)
    return before, xs, kinds, syncs_before


def assert_matches_reference(cfg: PALSGDConfig, workers: int, steps: int) -> None:
    ref_before, ref_final, ref_kinds, ref_syncs = reference(cfg, workers, steps)
    for k, (before, kinds, metrics, final) in enumerate(run_core(cfg, workers, steps)):
        assert kinds == ref_kinds[k], f"worker {k}: step kinds differ"
        # Bound: the core's AdamW and the reference's agree to ~1e-12 relative (as in tests/unit/test_reference.py);
        # a wrong cut, offset, momentum slice or kept progress moves the weights by >1e-3.
        for got, want in zip(before, ref_before[k]):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
        for got, want in zip(final, ref_final[k]):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
        assert metrics["outer_syncs"] == ref_syncs and metrics["skipped_syncs"] == 0


def _cfg(**kw) -> PALSGDConfig:
    return PALSGDConfig(**{"pseudo_sync_prob": 0.3, "mixing_rate": 2.0, "warmup_steps": 3, **kw})


SETTINGS = [
    pytest.param(_cfg(sync_interval=4, fragments=2), 3, 21, id="F2-H4"),
    pytest.param(_cfg(sync_interval=6, fragments=3, coins="per_replica", warmup_steps=2), 2, 25,
                 id="F3-H6-per-replica"),
    pytest.param(_cfg(sync_interval=5, fragments=2, warmup_steps=0, outer_lr=0.5, outer_momentum=0.8), 2, 22,
                 id="F2-H5-uneven-offsets"),
    pytest.param(_cfg(sync_interval=4, fragments=2, overlap_steps=1), 3, 21, id="F2-H4-d1"),
    pytest.param(_cfg(sync_interval=9, fragments=3, overlap_steps=2, comm_dtype="bf16"), 2, 26, id="F3-H9-d2-bf16"),
    pytest.param(_cfg(sync_interval=4, fragments=2, comm_dtype="int8"), 3, 21, id="F2-H4-int8"),
    pytest.param(_cfg(sync_interval=6, fragments=2, overlap_steps=2, comm_dtype="int4"), 2, 23, id="F2-H6-d2-int4"),
    pytest.param(PALSGDConfig(method="diloco", sync_interval=6, warmup_steps=2, fragments=3), 3, 19, id="diloco-F3"),
    pytest.param(PALSGDConfig(method="localsgd", sync_interval=4, warmup_steps=1, fragments=4), 2, 14,
                 id="localsgd-F4"),
]


@pytest.mark.parametrize("cfg,workers,steps", SETTINGS)
def test_fragments_match_the_float64_reference(cfg, workers, steps):
    assert_matches_reference(cfg, workers, steps)


@pytest.mark.parametrize("cfg", [_cfg(sync_interval=4), _cfg(sync_interval=4, overlap_steps=2, comm_dtype="int8")])
def test_one_fragment_is_the_unfragmented_rule_exactly(cfg):
    """F = 1 in the reference above is the overlap reference (tests/unit/test_overlap.py) bit for bit..."""
    mine, theirs = reference(cfg, 3, 21), overlap_reference(cfg, 3, 21)
    for a, b in zip(mine[:2], theirs[:2]):
        assert all(torch.equal(x, y) for xk, yk in zip(a, b) for x, y in zip(xk, yk))
    assert mine[2:] == theirs[2:]
    assert_matches_reference(cfg, 3, 21)  # ...and the core matches it


def test_one_fragment_keeps_the_owned_tensors_whole():
    """F = 1: the anchor holds the parameters' own shapes, so checkpoints are those of the unfragmented algorithm."""
    model = torch.nn.Linear(4, 3)
    algo = PALSGD(_cfg(sync_interval=4, warmup_steps=0), ModuleAdapter(model, torch.optim.SGD(model.parameters(), 0.1)))
    algo.step_kind()
    assert [a.shape for a in algo._anchor.tensors] == [p.shape for p in model.parameters()]
    owned = algo._owned_tensors()
    assert all(o is p for o, p in zip(owned, model.parameters()))


def test_peak_bytes_of_a_sync_fall_by_the_number_of_fragments():
    """fp32: a fragment sync sends N/F values; a period sends N, as one whole-model sync does."""
    def run(fragments):
        cfg = PALSGDConfig(method="diloco", sync_interval=8, warmup_steps=0, fragments=fragments)

        def worker(rank, comm):
            torch.manual_seed(0)
            model = torch.nn.Linear(63, 64)  # 4096 values, a multiple of 4
            inner = torch.optim.SGD(model.parameters(), lr=0.1)
            algo = PALSGD(cfg, ModuleAdapter(model, inner), peers=comm, replica_index=rank)
            sent = []
            for t in range(16):
                algo.step_kind()
                x = torch.randn(2, 63, generator=torch.Generator().manual_seed(10 * rank + t))
                model(x).square().sum().backward()
                before = comm.stats.bytes_sent
                algo.optimizer_step(inner.step)
                inner.zero_grad()
                sent.append(comm.stats.bytes_sent - before)
            return sent

        return run_exchange_threads(2, worker)[0]

    whole, four = run(1), run(4)
    assert [b for b in whole if b] == [4096 * 4] * 2  # the syncs after steps 8 and 16
    assert [b for b in four if b] == [4096] * 8  # fragments at counts 2, 4, 6, 8, 10, ...
    assert sum(whole) == sum(four)


@pytest.mark.parametrize("interval,fragments,comm_dtype,overlap,stop_at", [
    (6, 3, "fp32", 0, 7), (6, 3, "int8", 1, 8), (8, 2, "int4", 2, 9),
], ids=["fp32-between-fragments", "int8-in-flight", "int4-in-flight"])
def test_resume_between_fragment_syncs_continues_exactly(interval, fragments, comm_dtype, overlap, stop_at):
    # H = 6, F = 3: fragments at counts 2, 4, 6, 8, ...; H = 8, F = 2: at 4, 8, ... The stop falls with fragments
    # synced since the period began and the whole model not yet; with d >= 1, one fragment's average in flight.
    cfg = _cfg(sync_interval=interval, fragments=fragments, warmup_steps=1, overlap_steps=overlap,
               comm_dtype=comm_dtype)

    def mid_period(opt):
        assert opt.algorithm.counters["outer_syncs"] >= 1 and opt.algorithm._since_sync > 0
        assert (opt.algorithm._pending is not None) == (overlap > 0)

    resume_runs(cfg, stop_at, 20, at_save=mid_period)


def test_a_checkpoint_of_another_fragment_count_is_refused():
    cfg2, cfg1 = _cfg(sync_interval=4, fragments=2, warmup_steps=0), _cfg(sync_interval=4, warmup_steps=0)
    model = torch.nn.Linear(4, 3)
    state = PALSGD(cfg2, ModuleAdapter(model, torch.optim.SGD(model.parameters(), 0.1))).state_dict()
    with pytest.raises(ValueError, match="fragments=2 but this run has fragments=1"):
        PALSGD(cfg1, ModuleAdapter(model, torch.optim.SGD(model.parameters(), 0.1))).load_state_dict(state)


@pytest.mark.parametrize("kw,message", [
    ({"sync_interval": 4, "fragments": 5}, "fragments=5 must be at most sync_interval=4"),
    ({"sync_interval": 8, "fragments": 2, "sync_policy": "auto"}, "needs sync_policy='fixed'"),
    ({"sync_interval": 8, "fragments": 4, "overlap_steps": 2}, "overlap_steps=2 must be smaller than"),
    ({"fragments": 0}, "fragments=0 must be an integer >= 1"),
])
def test_impossible_fragment_settings_are_refused(kw, message):
    with pytest.raises(PALSGDConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PALSGDConfig(**kw)
