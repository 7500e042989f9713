"""PALSGD's own cost, without communication: time per step and memory, against a plain local step.

One process, two copies of the same model fed the same batches, stepped alternately so that the
machine's noise (shared cores) hits both alike:

* plain: forward + backward + ``AdamW.step()``;
* PALSGD (one worker, so every collective is a no-op and only PALSGD's local work is left):
  forward + backward + ``algo.optimizer_step(AdamW.step)`` on gradient steps (coin, LR scaling,
  bookkeeping), the pull ``x <- lerp(x, x_bar, c)`` on pseudo-sync steps, and every H steps the
  local part of a sync (pseudo-gradient, outer Nesterov step, write-back).

Reported medians: fwd+bwd, the plain optimizer step, PALSGD's optimizer step on gradient steps,
the pull, the sync's local work. PALSGD's own work per step, in expectation,

    own = (1 - p) * (opt_palsgd - opt_plain) + p * pull + sync / H,

is compared with a plain step (fwd+bwd + opt_plain). A pull *replaces* a full step, so PALSGD
also saves p * (fwd+bwd + opt_plain) per step; that saving is reported separately, not netted.
Memory: anchor + outer optimizer state (from ``algo.state_dict()``) against the model's bytes.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from typing import Any, Callable

import torch

from palsgd_hf.config import PALSGDConfig
from palsgd_hf.core.algorithm import StepKind
from palsgd_hf.lm import build_causal_lm
from palsgd_hf.attach import build_algorithm
from .settings import BenchSettings

logger = logging.getLogger(__name__)


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def measure_overhead(settings: BenchSettings, steps: int = 120, batches: list | None = None) -> dict[str, Any]:
    """Run ``steps`` alternating plain/PALSGD steps on ``settings``' model; return medians and ratios."""
    if steps < 2 * settings.sync_interval:
        raise ValueError(f"steps={steps} must be at least 2*sync_interval={2 * settings.sync_interval} "
                         "to see syncs; raise steps or lower sync_interval.")
    plain = build_causal_lm(config_overrides=settings.model_overrides, seed=settings.seed, preset="tiny")
    local = copy.deepcopy(plain)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=settings.learning_rate)
    local_opt = torch.optim.AdamW(local.parameters(), lr=settings.learning_rate)
    # H beyond the loop: optimizer_step never syncs by itself; the loop calls sync() every H steps
    # (exactly when optimizer_step would) so that its local work is timed on its own.
    H = settings.sync_interval
    config = PALSGDConfig(method="palsgd", sync_interval=steps + 1, warmup_steps=0,
                          pseudo_sync_prob=settings.pseudo_sync_prob, mixing_rate=settings.eta, seed=settings.seed)
    algo = build_algorithm(local, local_opt, config)  # no process group: a LocalCommunicator, no traffic
    gen = torch.Generator().manual_seed(settings.seed)
    shape = (settings.batch_size, settings.block_size)
    vocab = settings.model_overrides["vocab_size"]

    t: dict[str, list[float]] = {k: [] for k in ("fwd_bwd_plain", "fwd_bwd_palsgd", "opt_plain", "opt_palsgd",
                                                 "pull", "sync")}

    def _plain_step(ids: torch.Tensor) -> None:
        t["fwd_bwd_plain"].append(_timed(lambda: plain(input_ids=ids, labels=ids).loss.backward()))
        t["opt_plain"].append(_timed(plain_opt.step))
        plain_opt.zero_grad()

    def _palsgd_step(ids: torch.Tensor) -> None:
        kind_start = time.perf_counter()
        kind = algo.step_kind()
        kind_s = time.perf_counter() - kind_start
        if kind is StepKind.PSEUDO_SYNC:
            t["pull"].append(kind_s + _timed(lambda: algo.optimizer_step(local_opt.step)))
        else:
            t["fwd_bwd_palsgd"].append(_timed(lambda: local(input_ids=ids, labels=ids).loss.backward()))
            t["opt_palsgd"].append(kind_s + _timed(lambda: algo.optimizer_step(local_opt.step)))
        local_opt.zero_grad()

    for step in range(steps):
        # Timing does not depend on token values; random ids keep this free of data loading.
        ids = batches[step % len(batches)] if batches else torch.randint(0, vocab, shape, generator=gen)
        # Alternate which model goes first, so that cache and frequency effects fall on both alike.
        first, second = (_plain_step, _palsgd_step) if step % 2 == 0 else (_palsgd_step, _plain_step)
        first(ids)
        second(ids)
        if (step + 1) % H == 0:
            t["sync"].append(_timed(algo.sync))

    return _summary(t, settings, plain, algo)


def _summary(t: dict[str, list[float]], settings: BenchSettings, model: torch.nn.Module, algo) -> dict[str, Any]:
    med = {k: statistics.median(v) if v else float("nan") for k, v in t.items()}
    p, H = settings.pseudo_sync_prob, settings.sync_interval
    plain_step = med["fwd_bwd_plain"] + med["opt_plain"]
    bookkeeping = med["opt_palsgd"] - med["opt_plain"]
    own = (1 - p) * bookkeeping + p * med["pull"] + med["sync"] / H
    state = algo.state_dict()["anchor"]
    model_bytes = sum(q.numel() * q.element_size() for q in model.parameters())
    anchor_bytes = _tensor_bytes(state["tensors"])
    outer_bytes = _tensor_bytes(state["optimizer"]["state"])
    return {
        "steps": len(t["fwd_bwd_plain"]),
        "counts": {k: len(v) for k, v in t.items()},
        "median_s": med,
        "plain_step_s": plain_step,
        "gradient_step_bookkeeping_s": bookkeeping,
        "own_work_per_step_s": own,
        "own_work_ratio": own / plain_step,
        "pull_ratio": med["pull"] / plain_step,
        "compute_saved_per_step_s": p * plain_step,
        "memory": {
            "model_bytes": model_bytes,
            "anchor_bytes": anchor_bytes,
            "outer_state_bytes": outer_bytes,
            "extra_ratio": (anchor_bytes + outer_bytes) / model_bytes,
        },
        "settings": {"pseudo_sync_prob": p, "sync_interval": H, "model_size": settings.model_size,
                     "batch_size": settings.batch_size, "block_size": settings.block_size,
                     "parameters": sum(q.numel() for q in model.parameters())},
    }
