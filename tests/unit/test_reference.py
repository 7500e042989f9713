"""The core against an independent float64 re-implementation of ALGORITHM.md's pseudocode.

K simulated workers (threads meeting at a barrier for the all-reduce) run the real PALSGD core
with torch's AdamW and a LambdaLR schedule on per-worker linear-regression data. The reference
below re-implements, from the pseudocode alone, warm-up with averaged gradients, the per-replica
coins, the pull x <- x - (lr*eta/p)(x - x_bar), the 1/(1-p) learning-rate scaling, AdamW, and the
every-H Nesterov outer step. Any error in the pull, the scaling, the coin, the sync schedule or the
outer step moves the trajectory far beyond the 1e-9 tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch

from palsgd_hf import PALSGD, PALSGDConfig, PALSGDOptimizer, StepKind
from palsgd_hf.adapters import ModuleAdapter
from tests.helpers.threads import run_threads

D, BATCH, BASE_LR, BIAS_LR_RATIO, WD = 5, 8, 0.05, 0.5, 0.01
BETAS, EPS = (0.9, 0.99), 1e-8


def lr_factor(t: int) -> float:
    """A warm-up-then-cosine schedule, so the pull's alpha_t changes every step."""
    return min(1.0, (t + 1) / 4) * (0.5 + 0.5 * math.cos(math.pi * t / 60))


def batch(worker: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * worker + t)
    x = torch.randn(BATCH, D, generator=g, dtype=torch.float64)
    w_true = torch.arange(1, D + 1, dtype=torch.float64) * (1 + 0.3 * worker)
    y = x @ w_true + 0.5 * worker + 0.1 * torch.randn(BATCH, generator=g, dtype=torch.float64)
    return x, y


def initial_weights() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(D, generator=g, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)


# ---------------------------------------------------------------- the reference, float64, no torch.optim
def grad(w, b, worker, t):
    x, y = batch(worker, t)
    r = x @ w + b - y
    return 2 * x.T @ r / BATCH, (2 * r.mean()).reshape(1)


class RefAdamW:
    def __init__(self, n):
        self.s = 0
        self.m = [torch.zeros(k, dtype=torch.float64) for k in n]
        self.v = [torch.zeros(k, dtype=torch.float64) for k in n]

    def step(self, params, grads, lrs):
        self.s += 1
        out = []
        for i, (x, g, lr) in enumerate(zip(params, grads, lrs)):
            x = x * (1 - lr * WD)
            self.m[i] = BETAS[0] * self.m[i] + (1 - BETAS[0]) * g
            self.v[i] = BETAS[1] * self.v[i] + (1 - BETAS[1]) * g * g
            mhat = self.m[i] / (1 - BETAS[0] ** self.s)
            vhat = self.v[i] / (1 - BETAS[1] ** self.s)
            out.append(x - lr * mhat / (vhat.sqrt() + EPS))
        return out


def reference(cfg: PALSGDConfig, workers: int, steps: int):
    w0, b0 = initial_weights()
    xs = [[w0.clone(), b0.clone()] for _ in range(workers)]
    opts = [RefAdamW([D, 1]) for _ in range(workers)]
    # Shared coins: every worker draws from the stream of replica 0; per-replica coins: worker k from its own.
    streams = [k if cfg.coins == "per_replica" else 0 for k in range(workers)]
    seeds = [(cfg.seed * 1_000_003 + k * 7_919 + 17) % (2**63 - 1) for k in streams]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    anchor, buf, kinds = None, None, [[] for _ in range(workers)]
    p, eta, mu = cfg.pseudo_sync_prob, cfg.mixing_rate, cfg.outer_momentum
    for t in range(steps):
        lrs = [BASE_LR * lr_factor(t), BASE_LR * BIAS_LR_RATIO * lr_factor(t)]
        if t < cfg.warmup_steps:
            gs = [grad(*xs[k], k, t) for k in range(workers)]
            mean = [sum(g[i] for g in gs) / workers for i in range(2)]
            for k in range(workers):
                xs[k] = opts[k].step(xs[k], mean, lrs)
                kinds[k].append("warmup")
            continue
        if anchor is None:
            anchor = [v.clone() for v in xs[0]]
        for k in range(workers):
            coin = torch.rand((), generator=gens[k]).item()
            if coin < p:
                xs[k] = [x - (lr * eta / p) * (x - a) for x, a, lr in zip(xs[k], anchor, lrs)]
                kinds[k].append("pseudo_sync")
            else:
                xs[k] = opts[k].step(xs[k], grad(*xs[k], k, t), [lr / (1 - p) for lr in lrs])
                kinds[k].append("gradient")
        if (t + 1) % cfg.sync_interval == 0:
            delta = [sum(a - xs[k][i] for k in range(workers)) / workers for i, a in enumerate(anchor)]
            if cfg.outer_optimizer == "nesterov":
                buf = delta if buf is None else [mu * bb + d for bb, d in zip(buf, delta)]
                update = [d + mu * bb for d, bb in zip(delta, buf)]
            else:  # plain SGD without momentum (Local SGD)
                update = delta
            anchor = [a - cfg.outer_lr * u for a, u in zip(anchor, update)]
            xs = [[a.clone() for a in anchor] for _ in range(workers)]
    return xs, kinds


# ---------------------------------------------------------------- the system under test
class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        w0, b0 = initial_weights()
        self.w = torch.nn.Parameter(w0.clone())
        self.b = torch.nn.Parameter(b0.clone())


def run_core(cfg: PALSGDConfig, workers: int, steps: int):
    def worker(rank, comm):
        model = Linear()
        inner = torch.optim.AdamW(
            [{"params": [model.w]}, {"params": [model.b], "lr": BASE_LR * BIAS_LR_RATIO}],
            lr=BASE_LR, betas=BETAS, eps=EPS, weight_decay=WD,
        )
        sched = torch.optim.lr_scheduler.LambdaLR(inner, lr_factor)
        algo = PALSGD(cfg, ModuleAdapter(model, inner), peers=comm, replica_index=rank)
        opt = PALSGDOptimizer(inner, algo)
        kinds = []
        for t in range(steps):
            kind = algo.step_kind()
            if kind is not StepKind.PSEUDO_SYNC:
                x, y = batch(rank, t)
                loss = ((x @ model.w + model.b - y) ** 2).mean()
                loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            kinds.append(kind.value)
        return [model.w.detach().clone(), model.b.detach().clone()], kinds, algo.metrics()

    return run_threads(workers, worker)


SETTINGS = [
    pytest.param(PALSGDConfig(sync_interval=4, pseudo_sync_prob=0.3, mixing_rate=2.0, warmup_steps=3), 3, 23, id="palsgd-H4-p0.3-warm3"),
    pytest.param(
        PALSGDConfig(sync_interval=4, pseudo_sync_prob=0.3, mixing_rate=2.0, warmup_steps=3, coins="per_replica"),
        3, 23, id="palsgd-H4-p0.3-warm3-per-replica-coins",
    ),
    pytest.param(
        PALSGDConfig(sync_interval=5, pseudo_sync_prob=0.5, mixing_rate=1.5, warmup_steps=0, outer_lr=0.5, outer_momentum=0.8, seed=3),
        2, 20, id="palsgd-H5-p0.5-nowarm",
    ),
    pytest.param(PALSGDConfig(method="diloco", sync_interval=3, warmup_steps=2), 3, 14, id="diloco-H3"),
    pytest.param(PALSGDConfig(method="localsgd", sync_interval=2, warmup_steps=1), 2, 11, id="localsgd-H2"),
]


@pytest.mark.parametrize("cfg,workers,steps", SETTINGS)
def test_core_matches_float64_reference(cfg, workers, steps):
    ref_params, ref_kinds = reference(cfg, workers, steps)
    results = run_core(cfg, workers, steps)
    for k, (params, kinds, metrics) in enumerate(results):
        assert kinds == ref_kinds[k], f"worker {k}: step kinds (coins/schedule) differ"
        for got, want in zip(params, ref_params[k]):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
        assert metrics["outer_syncs"] == sum(
            1 for t in range(cfg.warmup_steps, steps) if (t + 1) % cfg.sync_interval == 0
        )
        assert metrics["pseudo_syncs"] == ref_kinds[k].count("pseudo_sync")
    if cfg.pseudo_sync_prob > 0 and cfg.coins == "per_replica":
        # Replicas draw independent coins: their step kinds must not all coincide.
        assert len({tuple(r[1]) for r in results}) > 1
    elif cfg.pseudo_sync_prob > 0:
        # Shared coins: every replica runs the same kind of step at every step.
        assert len({tuple(r[1]) for r in results}) == 1
        assert "pseudo_sync" in results[0][1] and "gradient" in results[0][1]


@pytest.mark.parametrize("coins", ["shared", "per_replica"])
def test_workers_differ_between_syncs_and_agree_after(coins):
    cfg = PALSGDConfig(sync_interval=4, pseudo_sync_prob=0.3, mixing_rate=2.0, warmup_steps=2, coins=coins)
    at_sync = run_core(cfg, 3, 10)  # step 10: 10 % 4 != 0, workers drifted since the sync at 8
    assert not torch.equal(at_sync[0][0][0], at_sync[1][0][0])
    synced = run_core(cfg, 3, 12)  # the sync after step index 11
    for params, _, _ in synced[1:]:
        assert all(torch.equal(a, b) for a, b in zip(params, synced[0][0]))
