"""One replica of a fault-tolerant PALSGD run (tests/distributed/test_fault_tolerance*.py), its own process.

A linear model learns y = X w* + noise (least squares: convex, its steps linear in the weights) with SGD +
momentum (inner state to hand over on a rejoin). Each replica draws its own batches, seeded by
(replica, step), so an interrupted run and an uninterrupted one read the same data at the same step.
Each replica starts from its own random weights: join() must make them identical.

Writes ``events_<replica>.jsonl`` (one line when it joined and after every sync: wall time, step,
replicas in the sync, sha256 of the anchor) and, at the end, ``result_<replica>_<pid>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import signal
import time
from pathlib import Path

import torch

from palsgd_hf import PALSGDConfig, StepKind
from palsgd_hf.fault_tolerance import FaultToleranceConfig, FaultTolerantSession
from palsgd_hf.fault_tolerance.communicator import ReplicaFellBehind

DIM, BATCH, NOISE = 32, 16, 0.5


def teacher() -> torch.Tensor:
    return torch.randn(DIM, 1, generator=torch.Generator().manual_seed(1234))


def batch(replica: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100_003 * replica + step)
    x = torch.randn(BATCH, DIM, generator=g)
    return x, x @ teacher() + NOISE * torch.randn(BATCH, 1, generator=g)


def eval_loss(model: torch.nn.Module) -> float:
    """The excess loss: mean squared distance to the noiseless targets on held-out inputs."""
    x = torch.randn(512, DIM, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(x), x @ teacher()))


def anchor_sha(algo) -> str:
    state = algo.state_dict()["anchor"]
    h = hashlib.sha256()
    for t in state["tensors"]:
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def inject_faults(args, session, algo, event) -> None:
    """Stall where the test wants to kill this replica: inside a sync, or while serving a rejoin; or freeze it
    (SIGSTOP: every thread, torchft's heartbeats too) at its first exchange from step --freeze-at on (a warm-up
    step's or a sync's), before the exchange's quorum, until the test sends SIGCONT."""
    if args.freeze_at is not None:
        weighted_mean, frozen = session.comm.weighted_mean, []

        def freezing_mean(flat, weight, call):
            if algo.step >= args.freeze_at and not frozen:
                frozen.append(event("frozen", algo, call=call))
                os.kill(os.getpid(), signal.SIGSTOP)
            try:
                return weighted_mean(flat, weight, call)
            except ReplicaFellBehind as err:  # the test reads why this replica stopped
                event("fell_behind", algo, message=str(err))
                raise

        session.comm.weighted_mean = freezing_mean
    if args.hang_in_sync is not None:
        allreduce = session.manager.allreduce

        def stalling_allreduce(*a, **kw):
            if algo.step == args.hang_in_sync and session.comm.position[0] == "exchange":
                event("in_sync", algo)
                time.sleep(120)
            return allreduce(*a, **kw)

        session.manager.allreduce = stalling_allreduce
    if args.slow_serve:
        capture = session.transfer.capture

        def slow_capture():
            if algo.step > 0:  # a rejoin, not the identical start
                event("serving", algo)
                time.sleep(args.slow_serve)
            return capture()

        session.transfer.capture = slow_capture


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--lighthouse", required=True)
    p.add_argument("--replica", type=int, required=True)
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--sync-interval", type=int, default=8)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--step-seconds", type=float, default=0.0)
    p.add_argument("--accelerate", action="store_true", help="through the Accelerate hooks")
    p.add_argument("--trainer", action="store_true", help="through FaultTolerantTrainer")
    p.add_argument("--coins", default="shared", choices=["shared", "per_replica"])
    p.add_argument("--hang-in-sync", type=int, default=None, help="at this sync, stall before the all-reduce")
    p.add_argument("--slow-serve", type=float, default=0.0, help="stall this long before serving a rejoin")
    p.add_argument("--freeze-at", type=int, default=None, help="SIGSTOP itself at its exchange of this step or later")
    p.add_argument("--stop-file", default=None, help="when it appears, it holds the step to end at (all agree)")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--quorum-timeout", type=float, default=60.0)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"[replica {args.replica} %(asctime)s] %(name)s: %(message)s")
    out = Path(args.out)
    events = (out / f"events_{args.replica}.jsonl").open("a", buffering=1)

    def event(kind: str, algo, **extra) -> None:
        line = {"kind": kind, "t": time.time(), "pid": os.getpid(), "step": algo.step,
                "participants": session.comm.participants, "gradient_steps": algo.counters["gradient_steps"], **extra}
        if algo.in_local_phase:
            line["anchor"] = anchor_sha(algo)
        events.write(json.dumps(line) + "\n")

    def finish(model, algo) -> None:
        weights = hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in model.parameters())).hexdigest()
        result = {"replica": args.replica, "step": algo.step, "anchor": anchor_sha(algo), "weights": weights,
                  "eval_loss": eval_loss(model), "ft": session.metrics(), "counters": dict(algo.counters)}
        (out / f"result_{args.replica}_{os.getpid()}.json").write_text(json.dumps(result))

    torch.manual_seed(args.replica)  # deliberately different initial weights per replica
    model = torch.nn.Linear(DIM, 1)
    inner = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    config = PALSGDConfig(sync_interval=args.sync_interval, warmup_steps=args.warmup, pseudo_sync_prob=0.2,
                          mixing_rate=1.0, outer_lr=0.7, outer_momentum=0.5, seed=7, coins=args.coins)
    settings = FaultToleranceConfig(lighthouse=args.lighthouse, replica_id=args.replica, replicas=args.replicas,
                                    min_replicas=2, timeout_seconds=args.timeout,
                                    quorum_timeout_seconds=args.quorum_timeout)
    session = FaultTolerantSession(settings)
    started = time.time()
    if args.trainer:
        from ft_trainer_replica import train_with_trainer

        return train_with_trainer(args, session, config, event, started, finish)
    if args.accelerate:  # the Accelerate hooks: wrap() builds PALSGD over torchft and joins
        from accelerate import Accelerator

        from palsgd_hf.fault_tolerance.accelerate import FaultTolerantAccelerate

        accelerator = Accelerator(cpu=True)
        model, inner = accelerator.prepare(model, inner)
        hooks = FaultTolerantAccelerate(accelerator, config, session)
        optimizer = hooks.wrap(model, inner)
        algo = hooks.algorithm
        compute, backward, window = hooks.should_compute, accelerator.backward, lambda: accelerator.accumulate(model)
    else:  # the hand-written loop
        optimizer = session.wrap_optimizer(model, inner, config)
        algo = optimizer.algorithm
        inject_faults(args, session, algo, event)
        session.join()
        compute, backward, window = (lambda: algo.step_kind() is not StepKind.PSEUDO_SYNC), torch.Tensor.backward, \
            contextlib.nullcontext
    event("joined", algo, rejoined=session.transfer.received > 0 and algo.step > 0, seconds=time.time() - started,
          failed_attempts=session.comm.failed_attempts)
    stop = Path(args.stop_file) if args.stop_file else None
    while algo.step < args.steps:
        if stop is not None and stop.exists():
            args.steps, stop = int(stop.read_text()), None
            continue
        syncs = algo.counters["outer_syncs"]
        with window():
            if compute():
                x, y = batch(args.replica, algo.step)
                backward(torch.nn.functional.mse_loss(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
        if algo.counters["outer_syncs"] != syncs:
            event("sync", algo)
        if args.step_seconds:
            time.sleep(args.step_seconds)
    algo.finalize()
    finish(model, algo)
    session.shutdown()
    events.close()


if __name__ == "__main__":
    main()
