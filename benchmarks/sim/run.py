"""One simulated run: K workers of the real PALSGD core as threads in one process.

Every method is the real :class:`~palsgd_hf.core.algorithm.PALSGD` over a
:class:`~palsgd_hf.adapters.module.ModuleAdapter` (as ``scripts/coin_study.py`` runs it): DDP is
``method="ddp"`` (the adapter all-reduces a bare module's gradients through the communicator every
step), Local SGD ``"localsgd"``, DiLoCo ``"diloco"``, PALSGD ``"palsgd"``. Collectives meet at a thread
barrier (``tests/helpers/threads.py``).

What is held equal across methods and worker counts K: the global batch (each worker gets
global_batch / K of the same rows, so step t reads the same global batch for every K), the data order,
the model's initialization (one seed) and the learning-rate schedule (linear warm-up, cosine decay
to 10 % of the peak). Recorded: the kind of every step, which steps ended in a global sync, and the
global model's eval loss every ``eval_every`` steps (the anchor in the local phase: the model as of the
last sync) and after the final sync.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import statistics
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch

from palsgd_hf.adapters.module import ModuleAdapter
from palsgd_hf.config import PALSGDConfig
from palsgd_hf.core.algorithm import PALSGD, StepKind
from palsgd_hf.core.tensor_ops import lerp_
from palsgd_hf.lm import build_causal_lm, build_lm_datasets, load_tokenizer, shakespeare_corpus
from tests.helpers.threads import run_threads

from .wall_time import Costs

BLOCK = 64
VOCAB = 2048
TOKENIZER = "bpe-shakespeare-2048"


@dataclass(frozen=True)
class SimSpec:
    """One run. ``None`` fields take the method preset's value (see PALSGDConfig)."""

    method: str
    workers: int
    lr: float
    steps: int = 256
    global_batch: int = 16
    sync_interval: int = 16
    warmup_steps: int = 8
    pseudo_sync_prob: Optional[float] = None
    # The pull c = lr*eta/p at the peak LR; eta is derived from it. None: eta = mixing_rate.
    pull: Optional[float] = None
    mixing_rate: float = 1.0
    outer_lr: Optional[float] = None
    # 0 means plain SGD as the outer optimizer (Nesterov needs momentum > 0).
    outer_momentum: Optional[float] = None
    lr_warmup: int = 16
    eval_every: int = 16
    seed: int = 0
    preset: str = "tiny"

    def config(self) -> PALSGDConfig:
        kw = dict(method=self.method, sync_interval=self.sync_interval, warmup_steps=self.warmup_steps,
                  seed=self.seed, pseudo_sync_prob=self.pseudo_sync_prob)
        if self.method in ("palsgd", "diloco"):
            kw.update(outer_lr=self.outer_lr, outer_momentum=self.outer_momentum)
            if self.outer_momentum == 0:
                kw["outer_optimizer"] = "sgd"
        cfg = PALSGDConfig(**kw)
        if cfg.pseudo_sync_prob > 0:
            cfg.mixing_rate = self.mixing_rate if self.pull is None else self.pull * cfg.pseudo_sync_prob / self.lr
        return cfg

    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items() if v is not None)


@dataclass
class SimResult:
    spec: SimSpec
    evals: list  # (steps done, eval loss of the global model)
    kinds: list  # per step: "warmup" | "gradient" | "pseudo_sync"
    synced: list  # per step: a global sync ended the step
    model_bytes: int
    seconds: float  # real seconds the simulation took (all workers, one core)
    digests: list  # per worker: SHA-256 of its final parameters (after the last sync)

    @property
    def final_loss(self) -> float:
        return self.evals[-1][1]


@lru_cache(maxsize=4)
def load_data(train_blocks: int, eval_blocks: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``train_blocks`` training blocks and ``eval_blocks`` validation blocks (ids, BLOCK tokens)."""
    tokenizer = load_tokenizer(TOKENIZER)
    corpus = shakespeare_corpus()
    train, val = build_lm_datasets(
        tokenizer, train_files=corpus.train_files, validation_files=corpus.validation_files[:1],
        block_size=BLOCK, max_train_samples=train_blocks, max_eval_samples=eval_blocks,
    )
    train_ids, val_ids = torch.tensor(train["input_ids"]), torch.tensor(val["input_ids"])
    if len(train_ids) < train_blocks:
        raise ValueError(f"the corpus has {len(train_ids)} blocks of {BLOCK} tokens; a run needs {train_blocks}")
    return train_ids, val_ids


def lr_lambda(steps: int, warmup: int):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10 % of the peak at ``steps``."""
    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        progress = min(1.0, (t - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def micro_batch(spec: SimSpec) -> int:
    if spec.global_batch % spec.workers:
        raise ValueError(f"global_batch={spec.global_batch} must be divisible by workers={spec.workers}")
    return spec.global_batch // spec.workers


def evaluate(model: torch.nn.Module, val_ids: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        chunks = val_ids.split(16)
        loss = sum(model(input_ids=b, labels=b).loss.item() for b in chunks) / len(chunks)
    model.train()
    return loss


def simulate(spec: SimSpec) -> SimResult:
    """Run ``spec`` to the end; the global model is evaluated on rank 0 (the others wait at the next collective)."""
    cfg = spec.config()
    b = micro_batch(spec)
    train_ids, val_ids = load_data(spec.steps * spec.global_batch)
    started = time.perf_counter()
    # Built once, copied per worker: build_causal_lm seeds torch's global generator, and threads doing that
    # concurrently interleave their draws (every worker, and every run, would start from a different model).
    base = build_causal_lm(vocab_size=VOCAB, seed=spec.seed, preset=spec.preset)

    def worker(rank, comm):
        model = copy.deepcopy(base)
        inner = torch.optim.AdamW(model.parameters(), lr=spec.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(inner, lr_lambda(spec.steps, spec.lr_warmup))
        algo = PALSGD(cfg, ModuleAdapter(model, inner), peers=comm, replica_index=rank)
        kinds, synced, evals = [], [], []
        for t in range(spec.steps):
            kind = algo.step_kind()
            if kind is not StepKind.PSEUDO_SYNC:
                at = t * spec.global_batch + rank * b
                batch = train_ids[at : at + b]
                model(input_ids=batch, labels=batch).loss.backward()
            syncs = algo.counters["outer_syncs"]
            algo.optimizer_step(inner.step)
            sched.step()
            inner.zero_grad()
            kinds.append(kind.value)
            synced.append(algo.counters["outer_syncs"] > syncs)
            if rank == 0 and (t + 1) % spec.eval_every == 0 and t + 1 < spec.steps:
                with algo.global_weights():
                    evals.append((t + 1, evaluate(model, val_ids)))
        syncs = algo.counters["outer_syncs"]
        algo.finalize()
        synced[-1] = synced[-1] or algo.counters["outer_syncs"] > syncs
        if rank == 0:
            evals.append((spec.steps, evaluate(model, val_ids)))
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
        return kinds, synced, evals, nbytes, digest

    results = run_threads(spec.workers, worker)
    kinds, synced, evals, nbytes, _ = results[0]
    return SimResult(spec, evals, kinds, synced, nbytes, time.perf_counter() - started, [r[4] for r in results])


def _quartile(xs: list[float]) -> float:
    # The lower quartile, not the median: the machine is shared, and other users' processes only ever add time.
    return statistics.quantiles(xs, n=4)[0]


def measure_costs(spec: SimSpec, repeats: int = 12) -> Costs:
    """Compute of one worker's micro-batch step, one pull and one outer step's local work, measured here
    (lower quartile over ``repeats``)."""
    b = micro_batch(spec)
    train_ids, _ = load_data(spec.steps * spec.global_batch)
    model = build_causal_lm(vocab_size=VOCAB, seed=spec.seed, preset=spec.preset)
    inner = torch.optim.AdamW(model.parameters(), lr=spec.lr)
    compute = []
    for i in range(repeats + 3):
        batch = train_ids[i * b : (i + 1) * b]
        t0 = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        inner.step()
        inner.zero_grad()
        compute.append(time.perf_counter() - t0)
    params = [p for p in model.parameters()]
    anchors = [p.detach().clone() for p in params]
    pulls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            lerp_(params, anchors, 0.05)
        pulls.append(time.perf_counter() - t0)
    # The outer step's local work, through the real core with one worker (its collectives are no-ops).
    cfg = PALSGDConfig(method="diloco", sync_interval=10**6, warmup_steps=0, outer_momentum=0.5)
    algo = PALSGD(cfg, ModuleAdapter(model, inner))
    algo.step_kind()
    algo.optimizer_step(lambda: None)
    syncs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        algo.sync()
        syncs.append(time.perf_counter() - t0)
    return Costs(_quartile(compute[3:]), _quartile(pulls), _quartile(syncs))
