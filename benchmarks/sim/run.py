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
last sync, for every variant: overlapped and fragment syncs included) and after the final sync. For the wire
benchmark also: the bytes each step booked, the steps that launched an overlapped sync, the bytes of the final
syncs, and every worker's drift at each of its syncs.
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
from palsgd_hf.core.sync_policy import AdaptiveSchedule
from palsgd_hf.core.tensor_ops import lerp_
from palsgd_hf.lm import build_causal_lm, build_lm_datasets, load_tokenizer, shakespeare_corpus
from tests.helpers.threads import run_threads

from .modeled_clock import ModeledClock, ModeledCommunicator
from .wall_time import Costs, Link, allreduce_seconds

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
    # What travels and when (benchmarks/sim/wire.py); the defaults are the whole model, fp32, blocking.
    comm_dtype: str = "fp32"
    fragments: int = 1
    overlap_steps: int = 0
    # sync_policy='auto' decides from a modeled clock (benchmarks/sim/modeled_clock.py) on this link (bit/s).
    sync_policy: str = "fixed"
    link_bps: Optional[float] = None

    def config(self) -> PALSGDConfig:
        kw = dict(method=self.method, sync_interval=self.sync_interval, warmup_steps=self.warmup_steps,
                  seed=self.seed, pseudo_sync_prob=self.pseudo_sync_prob, comm_dtype=self.comm_dtype,
                  fragments=self.fragments, overlap_steps=self.overlap_steps, sync_policy=self.sync_policy)
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
    traffic: dict = dataclasses.field(default_factory=dict)  # see :func:`simulate`
    drifts: list = dataclasses.field(default_factory=list)  # per worker: (step, drift) at each sync it launched

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


def simulate(spec: SimSpec, costs: Optional[Costs] = None) -> SimResult:
    """Run ``spec`` to the end; the global model is evaluated on rank 0 (the others wait at the next collective).

    ``costs``: the modeled costs of a step, needed by ``sync_policy='auto'`` (its modeled clock)."""
    cfg = spec.config()
    if cfg.sync_policy == "auto" and (costs is None or spec.link_bps is None or spec.overlap_steps):
        raise ValueError("sync_policy='auto' in the simulator needs costs, link_bps and overlap_steps=0")
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
        clock = None
        if cfg.sync_policy == "auto":
            clock, link = ModeledClock(), Link("modeled", spec.link_bps)
            comm = ModeledCommunicator(comm, clock, link, costs)
            step_cost = {StepKind.GRADIENT: costs.compute_s, StepKind.PSEUDO_SYNC: costs.pull_s,
                         StepKind.WARMUP: costs.compute_s + allreduce_seconds(bytes_of(base), spec.workers, link)}
        algo = PALSGD(cfg, ModuleAdapter(model, inner), peers=comm, replica_index=rank)
        if clock is not None:
            algo.schedule = AdaptiveSchedule(cfg, clock=clock)
        kinds, synced, evals, wire, launched, drifts, intervals = [], [], [], [], [], [], []
        for t in range(spec.steps):
            kind = algo.step_kind()
            if kind is not StepKind.PSEUDO_SYNC:
                at = t * spec.global_batch + rank * b
                batch = train_ids[at : at + b]
                model(input_ids=batch, labels=batch).loss.backward()
            syncs, sent, pending = algo.counters["outer_syncs"], comm.stats.bytes_sent, algo._pending
            if clock is not None:
                clock.advance(step_cost[kind])  # before the step ends: the policy's timer reads it there
            algo.optimizer_step(inner.step)
            sched.step()
            inner.zero_grad()
            kinds.append(kind.value)
            synced.append(algo.counters["outer_syncs"] > syncs)  # blocking: this step's sync; overlap: one landed
            wire.append(comm.stats.bytes_sent - sent)
            if algo._pending is not None and algo._pending is not pending:
                launched.append(t)
            if clock is not None and (not intervals or intervals[-1][1] != algo.schedule.interval):
                intervals.append((t + 1, algo.schedule.interval))  # the auto policy's decisions
            if synced[-1] and spec.overlap_steps == 0 or launched and launched[-1] == t:
                drifts.append((t + 1, algo.last_drift))
            if rank == 0 and (t + 1) % spec.eval_every == 0 and t + 1 < spec.steps:
                with algo.global_weights():
                    evals.append((t + 1, evaluate(model, val_ids)))
        syncs, sent = algo.counters["outer_syncs"], comm.stats.bytes_sent
        if algo._pending is not None:
            algo.apply_pending()  # the sync in flight lands; its tail of bytes is booked apart from the final sync's
        tail, sent = comm.stats.bytes_sent - sent, comm.stats.bytes_sent
        algo.finalize()
        traffic = {"wire": wire, "launched": launched, "tail": tail, "final": comm.stats.bytes_sent - sent}
        if clock is not None:
            traffic["intervals"] = intervals
        synced[-1] = synced[-1] or algo.counters["outer_syncs"] > syncs
        if rank == 0:
            evals.append((spec.steps, evaluate(model, val_ids)))
        nbytes = bytes_of(model)
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
        return kinds, synced, evals, nbytes, digest, traffic, drifts

    results = run_threads(spec.workers, worker, timeout=4 * 3600)  # a long run on a loaded core is no hang
    kinds, synced, evals, nbytes, _, traffic, _ = results[0]
    return SimResult(spec, evals, kinds, synced, nbytes, time.perf_counter() - started, [r[4] for r in results],
                     traffic, [r[6] for r in results])


def bytes_of(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


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
