"""One rank of a fault-tolerant PALSGD replica sharded with FSDP2 or DeepSpeed ZeRO (tests/distributed/
test_fault_tolerance_fsdp.py, test_fault_tolerance_deepspeed.py).

Launched per replica as ``torchrun --standalone --nproc_per_node S ft_fsdp_replica.py --replica r ...``: the
replica is its own torch.distributed world of S ranks, FSDP2 shards one model copy over them
(``fully_shard(..., mesh=shard_mesh(S))``), and PALSGD's exchanges go through torchft (rank r of every replica).

``--deepspeed STAGE``: the replica is one ZeRO-STAGE engine over its S ranks instead (``deepspeed.initialize``
without an mpu; the reference: ``palsgd_hf.adapters.deepspeed.initialize`` with ``shard_size=S``), and the loop is a
raw DeepSpeed one (``engine.step()`` on every step, no forward/backward on a pseudo-sync step).

``--no-ft``: the same model, data and algorithm without fault tolerance, one torchrun of R x S ranks
(``wrap_optimizer``), the reference the fault-tolerant run is compared with.

A small MLP on a regression task; each rank reads batches seeded by (replica, shard, step), so the runs read
the same data at the same step. Writes ``events_<replica>_<rank>.jsonl`` (joined, every sync: step, replicas
in the sync, sha256 of this rank's anchor shard; every H-th warm-up step: sha256 of its weight shard) and at
the end ``result_<replica>_<rank>_<pid>.json``
(``rank<R>.json`` with ``--no-ft``)
(this rank's anchor and weight shards, their sha256).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from palsgd_hf import PALSGDConfig, StepKind

IN, HIDDEN, OUT, MICRO = 8, 16, 4, 8  # every sharded dim even: each of 2 shards holds exactly half


def batch(replica: int, shard: int, step: int):
    g = torch.Generator().manual_seed(1_000_003 * step + 1009 * replica + 101 * shard)
    x = torch.randn(MICRO, IN, generator=g)
    return x, torch.tanh(x[:, :OUT]) * (1.0 + 0.5 * replica) + 0.05 * torch.randn(MICRO, OUT, generator=g)


def sha(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--lighthouse", default=None)
    p.add_argument("--replica", type=int, default=0)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--sync-interval", type=int, default=4)
    p.add_argument("--warmup", type=int, default=0, help="warm-up steps (their gradient mean: one exchange each)")
    p.add_argument("--step-seconds", type=float, default=0.0)
    p.add_argument("--stop-file", default=None, help="when it appears, it holds the step to end at (all agree)")
    p.add_argument("--timeout", type=float, default=20.0)
    p.add_argument("--quorum-timeout", type=float, default=60.0)
    p.add_argument("--coins", default="shared", choices=["shared", "per_replica"])
    p.add_argument("--same-init", action="store_true", help="every replica from seed 0 (as the reference)")
    p.add_argument("--accelerate", action="store_true", help="through FaultTolerantAccelerate (the optimizer prepared)")
    p.add_argument("--deepspeed", type=int, default=0, help="ZeRO stage of a DeepSpeed replica (0: FSDP2)")
    p.add_argument("--no-ft", action="store_true", help="the non-fault-tolerant reference: R x S ranks, one torchrun")
    args = p.parse_args()
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))  # bounds FSDP's collectives too
    rank, world = dist.get_rank(), dist.get_world_size()
    shard_size = world // args.replicas if args.no_ft else world
    replica, shard = (rank // shard_size, rank % shard_size) if args.no_ft else (args.replica, rank)
    logging.basicConfig(level=logging.INFO,
                        format=f"[replica {replica}/{shard} %(asctime)s] %(name)s: %(message)s")
    out = Path(args.out)
    events = (out / f"events_{replica}_{shard}.jsonl").open("a", buffering=1)

    # By default replicas start from different weights (join() makes them identical: torchft's start gives each
    # shard of every replica the same shard of one replica, not necessarily the same replica for every shard);
    # --same-init starts them all from seed 0, as the reference does.
    torch.manual_seed(0 if args.no_ft or args.same_init else 17 * replica)
    model = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT))
    if not args.deepspeed:
        from torch.distributed.fsdp import fully_shard

        from palsgd_hf.adapters.fsdp import shard_mesh

        mesh = shard_mesh(shard_size)
        for layer in (model[0], model[2], model):
            fully_shard(layer, mesh=mesh)
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    config = PALSGDConfig(sync_interval=args.sync_interval, warmup_steps=args.warmup, pseudo_sync_prob=0.3,
                          mixing_rate=1.0, outer_lr=0.7, outer_momentum=0.5, seed=3, shard_size=shard_size,
                          coins=args.coins)
    session, hooks, engine = None, None, None
    if args.deepspeed:
        import deepspeed

        from palsgd_hf.adapters.deepspeed import initialize

        ds_config = {"train_micro_batch_size_per_gpu": MICRO, "zero_allow_untested_optimizer": True,
                     "zero_optimization": {"stage": args.deepspeed, "stage3_param_persistence_threshold": 16},
                     "steps_per_print": 1_000_000}
        if args.no_ft:  # R x S ranks: ZeRO within each replica (palsgd's mpu), PALSGD across
            engine, *_, algo = initialize(model=model, optimizer=inner, config=config, ds_config=ds_config)
        else:  # the replica's world is one ZeRO group: no mpu
            engine, *_ = deepspeed.initialize(model=model, optimizer=inner, config=ds_config)
    if args.no_ft:
        from palsgd_hf import wrap_optimizer

        optimizer = engine if engine is not None else wrap_optimizer(model, inner, config)
    else:
        from palsgd_hf.fault_tolerance import FaultToleranceConfig, FaultTolerantSession

        session = FaultTolerantSession(FaultToleranceConfig(
            lighthouse=args.lighthouse, replica_id=replica, replicas=args.replicas, min_replicas=2,
            timeout_seconds=args.timeout, quorum_timeout_seconds=args.quorum_timeout))
        if engine is not None:  # PALSGD bound to the engine: engine.step() is a PALSGD step
            algo, optimizer = session.build_algorithm(engine, engine.optimizer, config), engine
        elif args.accelerate:  # the Accelerate hooks: the optimizer prepared, the FSDP2 model not (no DDP around it)
            from accelerate import Accelerator

            from palsgd_hf.fault_tolerance.accelerate import FaultTolerantAccelerate

            accelerator = Accelerator(cpu=True)  # the replica's world is up already: accelerate joins it
            hooks = FaultTolerantAccelerate(accelerator, config, session)
            prepared, started = accelerator.prepare(inner), time.time()
            optimizer = hooks.wrap(model, prepared)  # builds PALSGD and joins
        else:
            optimizer = session.wrap_optimizer(model, inner, config)
    if engine is None:
        algo = hooks.algorithm if hooks is not None else optimizer.algorithm
    owned = [t for g in algo.adapter.owned_groups() for t in g.tensors]

    def event(kind: str, **extra) -> None:
        line = {"kind": kind, "t": time.time(), "pid": os.getpid(), "launcher": os.getppid(), "step": algo.step,
                "participants": session.comm.participants if session else args.replicas, **extra}
        if algo.in_local_phase:
            line["anchor"] = sha(algo.state_dict()["anchor"]["tensors"])
        events.write(json.dumps(line) + "\n")

    if session is not None:
        if hooks is None:  # the hooks joined in wrap()
            started = time.time()
            session.join()
        event("joined", rejoined=session.transfer.received > 0 and algo.step > 0, seconds=time.time() - started,
              hooks=type(hooks).__name__ if hooks is not None else None)
    stop = Path(args.stop_file) if args.stop_file else None
    while algo.step < args.steps:
        if stop is not None and stop.exists():
            args.steps, stop = int(stop.read_text()), None
            continue
        syncs, warmups = algo.counters["outer_syncs"], algo.counters["warmup_steps"]
        if (hooks.should_compute() if hooks is not None else algo.step_kind() is not StepKind.PSEUDO_SYNC):
            x, y = batch(replica, shard, algo.step)
            loss = torch.nn.functional.mse_loss((engine or model)(x), y)
            engine.backward(loss) if engine is not None else loss.backward()
        optimizer.step()  # the engine's step: PALSGD's (with the pull instead of an inner step on a pseudo-sync)
        if engine is None:
            optimizer.zero_grad()
        if algo.counters["outer_syncs"] != syncs:
            event("sync")
        if algo.counters["warmup_steps"] != warmups and algo.step % args.sync_interval == 0:
            event("warmup", weights=sha(owned))  # the replicas are identical throughout warm-up
        if args.step_seconds:
            time.sleep(args.step_seconds)
    algo.finalize()
    anchor = algo.state_dict()["anchor"]["tensors"]
    result = {"replica": replica, "shard": shard, "step": algo.step, "anchor": sha(anchor), "weights": sha(owned),
              "anchor_values": torch.cat([t.reshape(-1) for t in anchor]).tolist(),
              "ft": session.metrics() if session else {}, "counters": dict(algo.counters)}
    name = f"rank{rank}.json" if args.no_ft else f"result_{replica}_{shard}_{os.getpid()}.json"
    (out / name).write_text(json.dumps(result))
    if session is not None:
        session.shutdown()
    events.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
