"""Regression: a few exact PALSGD trajectories, stored as JSON fixtures, must not change.

The float64 reference test (tests/unit/test_reference.py) says the core is *right*; this one says
it has not *moved*: a refactor (the package reshape, a new wire format, a new adapter) that changes
any step kind, any weight or any counter of these runs fails here, in the torchft style
(``diloco_regression_test.py``). K workers of the real core run in threads (tests/helpers/threads.py)
on float64 linear regression with torch's AdamW, a LambdaLR schedule and the real communicator
code paths (fp32 and bf16 exchange, overlap, shared and per-replica coins).

Regenerate after an intended change: ``PALSGD_REGEN_FIXTURES=1 python -m pytest tests/regression``,
then review the JSON diff like code.

Tolerance: the runs are float64 (u = 2^-53 = 1.1e-16), about 30 steps on 6 weights. The machine
enters only through BLAS kernel choice (FMA or not, the summation order of the 8-row matmul): a
relative difference of at most n*u = 8 * 1.1e-16 ~ 1e-15 per reduction. Each AdamW step maps a
relative perturbation of the gradient through m/(sqrt(v) + eps), whose sensitivity here is at most
~1e2 (|g| >> eps = 1e-8 on this problem), so 30 steps bound the drift by 30 * 1e2 * 1e-15 = 3e-12
relative: rtol = 1e-10, atol = 1e-12 leave a margin of 30x and are still far below the 1e-3 to 1
that any change of the algorithm produces. The bf16 exchange rounds to a 2^-8 grid; a 1e-12 input
difference changes a rounding only if it straddles a rounding boundary (probability ~1e-12 / 2^-8
per value), so it keeps the same tolerance.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from palsgd_hf import PALSGD, PALSGDConfig, StepKind
from palsgd_hf.adapters import ModuleAdapter
from tests.helpers.threads import run_threads

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REGEN = os.environ.get("PALSGD_REGEN_FIXTURES") == "1"
D, BATCH = 5, 8

CASES = {
    "palsgd_shared": (PALSGDConfig(sync_interval=4, pseudo_sync_prob=0.3, mixing_rate=2.0, warmup_steps=3), 3, 26),
    "palsgd_per_replica_overlap_bf16": (
        PALSGDConfig(sync_interval=5, pseudo_sync_prob=0.3, mixing_rate=1.5, warmup_steps=2, overlap_steps=2,
                     comm_dtype="bf16", coins="per_replica", outer_momentum=0.8, seed=4), 3, 28),
    "diloco": (PALSGDConfig(method="diloco", sync_interval=3, warmup_steps=2), 2, 20),
    "localsgd_h1": (PALSGDConfig(method="localsgd", sync_interval=1, warmup_steps=0), 2, 12),
}


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.w = torch.nn.Parameter(torch.randn(D, generator=g, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))


def batch(worker: int, t: int):
    g = torch.Generator().manual_seed(1000 * worker + t)
    x = torch.randn(BATCH, D, generator=g, dtype=torch.float64)
    y = x @ (torch.arange(1, D + 1, dtype=torch.float64) * (1 + 0.3 * worker)) + 0.5 * worker
    return x, y


def trajectory(cfg: PALSGDConfig, workers: int, steps: int) -> list[dict]:
    def worker(rank, comm):
        model = Linear()
        inner = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(inner, lambda t: 0.5 + 0.5 * math.cos(math.pi * t / 40))
        algo = PALSGD(cfg, ModuleAdapter(model, inner), peers=comm, replica_index=rank)
        rows = []
        for t in range(steps):
            kind = algo.step_kind()
            if kind is not StepKind.PSEUDO_SYNC:
                x, y = batch(rank, t)
                ((x @ model.w + model.b - y) ** 2).mean().backward()
            algo.optimizer_step(inner.step)
            sched.step()
            inner.zero_grad()
            rows.append({"kind": kind.value, "w": model.w.tolist(), "b": model.b.item()})
        algo.finalize()
        counters = {k: v for k, v in algo.counters.items()}
        return {"steps": rows, "final": model.w.tolist() + [model.b.item()], "counters": counters}

    return run_threads(workers, worker)


ADDED_SINCE = {"fragments": 1}


@pytest.mark.parametrize("name", sorted(CASES))
def test_trajectory_matches_its_fixture(name):
    cfg, workers, steps = CASES[name]
    got = trajectory(cfg, workers, steps)
    path = FIXTURES / f"{name}.json"
    if REGEN:
        FIXTURES.mkdir(exist_ok=True)
        path.write_text(json.dumps({"config": cfg.to_dict(), "workers": got}, indent=1) + "\n")
        pytest.skip(f"regenerated {path.name}")
    want = json.loads(path.read_text())
    # A setting added after the fixture was written is absent from it and must hold the default that reproduces the
    # recorded trajectory (fragments=1: the unfragmented algorithm, whose trajectory these fixtures hold).
    config = {k: v for k, v in cfg.to_dict().items() if k in want["config"] or ADDED_SINCE.get(k, object()) != v}
    assert want["config"] == config, "the case's config changed: regenerate the fixture on purpose"
    atol = 1e-12  # see the module docstring
    for k, (g, w) in enumerate(zip(got, want["workers"])):
        assert [r["kind"] for r in g["steps"]] == [r["kind"] for r in w["steps"]], f"worker {k}: step kinds moved"
        assert g["counters"] == w["counters"], f"worker {k}: counters moved"
        for t, (gr, wr) in enumerate(zip(g["steps"], w["steps"])):
            torch.testing.assert_close(torch.tensor(gr["w"] + [gr["b"]]), torch.tensor(wr["w"] + [wr["b"]]),
                                       rtol=1e-10, atol=atol, msg=lambda m: f"worker {k}, step {t}: {m}")
        torch.testing.assert_close(torch.tensor(g["final"]), torch.tensor(w["final"]), rtol=1e-10, atol=atol)
