"""Worker script: PALSGD on a DeepSpeed ZeRO engine (``--mode ds``) or on the plain path (``--mode ref``).

``ds``: the world is R replicas x S ranks; ZeRO-``--stage`` shards each replica, PALSGD averages
across replicas. A raw DeepSpeed loop: skip forward/backward on a pseudo-sync step, call
``engine.step()`` on every step.

``ref``: one process per replica, a DDP model with ModuleAdapter (shard_size 1), fed on every step
the concatenation of the micro-batches that the S ranks of the same replica get in ``ds`` mode.
Same model init, coin seeds, optimizer (``--optim``), clipping and LR schedule: the same algorithm,
sharded differently, so the two trajectories must agree.

Writes rank{R}.json: step kinds, learning rates, this rank's owned fp32 partition after every
step, the full weights after every sync and at the end, peer-group bytes after every step.
"""

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from palsgd_hf import PALSGDConfig, StepKind

IN, HIDDEN = 16, 32


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)  # same init on every rank and in both modes
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1))


def micro_batch(replica: int, shard: int, step: int, micro: int, size: int):
    """The data of one rank of one replica: replicas see different targets, so they drift apart."""
    g = torch.Generator().manual_seed(1_000_003 * step + 1009 * replica + 101 * shard + micro)
    x = torch.randn(size, IN, generator=g)
    y = torch.tanh(x[:, :4].sum(1, keepdim=True)) * (1.0 + 0.5 * replica) + 0.05 * torch.randn(size, 1, generator=g)
    return x, y


def schedule(step: int, total: int) -> float:
    """Linear warm-up over 3 steps, then linear decay to 20%: the pull must follow it."""
    return min(1.0, (step + 1) / 3) * (1.0 - 0.8 * step / max(total, 1))


def flat(tensors) -> list:
    return torch.cat([t.detach().float().reshape(-1) for t in tensors]).tolist()


@torch.no_grad()
def poison(algo, engine) -> None:
    """A replica that diverged: NaN weights and NaN Adam moments in the partitions this rank owns."""
    state = engine.optimizer.optimizer.state
    for group in algo.adapter.owned_groups():
        for tensor in group.tensors:
            tensor.fill_(float("nan"))
            for value in state[tensor].values():
                if torch.is_tensor(value) and value.is_floating_point():
                    value.fill_(float("nan"))
    algo.adapter.after_write()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", choices=["ds", "ref"], default="ds")
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=2, help="S (ds); the micro-batches per replica (ref)")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--p", type=float, default=0.3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--optim", choices=["adamw", "sgd"], default="adamw",
                    help="the inner optimizer (sgd for the equivalence tests: tests/helpers/bounds.py says why)")
    ap.add_argument("--micro", type=int, default=4, help="micro-batch size per rank")
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--save-at", type=int, default=None, help="save a checkpoint after this many steps, then stop")
    ap.add_argument("--resume", default=None, help="checkpoint directory to resume from")
    ap.add_argument("--poison-at", type=int, default=None,
                    help="after this step, replica 1's owned partitions and inner-optimizer state turn NaN (ds mode)")
    args = ap.parse_args()

    if args.mode == "ds":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    S = args.shard_size
    replica, shard = (rank // S, rank % S) if args.mode == "ds" else (rank, None)
    cfg = PALSGDConfig(
        sync_interval=args.H, pseudo_sync_prob=args.p, warmup_steps=args.warmup, mixing_rate=1.0,
        shard_size=S if args.mode == "ds" else 1, seed=3,
        # Independent coins per replica: the reference then runs different step kinds per replica, and the
        # collective guard (refusing mode) must let every ZeRO-internal collective through.
        coins="per_replica",
    )
    model = make_model()
    if args.optim == "sgd":
        inner = torch.optim.SGD(model.parameters(), lr=args.lr)
    else:
        inner = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(inner, lambda t: schedule(t, args.steps))

    if args.mode == "ds":
        from palsgd_hf.adapters.deepspeed import initialize

        ds_config = {
            "train_micro_batch_size_per_gpu": args.micro,
            "gradient_accumulation_steps": args.accum,
            "gradient_clipping": 1.0,
            "zero_optimization": {"stage": args.stage, "stage3_param_persistence_threshold": 64},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": args.bf16},
            "steps_per_print": 1_000_000,
        }
        engine, _, _, _, algo = initialize(
            model=model, optimizer=inner, lr_scheduler=scheduler, config=cfg, ds_config=ds_config
        )
        module = engine.module
        dtype = torch.bfloat16 if args.bf16 else torch.float32
    else:
        from torch.nn.parallel import DistributedDataParallel

        from palsgd_hf import wrap_optimizer

        module = DistributedDataParallel(model) if world > 1 else model
        opt = wrap_optimizer(module, inner, cfg)
        algo = opt.algorithm
        dtype = torch.float32

    start = 0
    if args.resume:
        if args.mode != "ds":
            raise SystemExit("--resume is for --mode ds")
        engine.load_checkpoint(args.resume)
        start = algo.step
    stop = args.save_at if args.save_at is not None else args.steps

    def full_weights() -> list:
        if args.mode == "ds" and args.stage == 3:
            with deepspeed.zero.GatheredParameters(list(module.parameters())):
                return flat(module.parameters())
        return flat(module.parameters())

    record = {"kinds": [], "lrs": [], "owned": [], "peer_bytes": [], "synced": [], "losses": []}
    for t in range(start, stop):
        kind = algo.step_kind()
        record["lrs"].append(float(algo.adapter.owned_groups()[0].options["lr"]))
        loss_value = None
        for m in range(args.accum):
            if kind is StepKind.PSEUDO_SYNC:
                if args.mode == "ds":
                    engine.step()  # no forward/backward; the engine still takes (and counts) the step
                continue
            if args.mode == "ds":
                x, y = micro_batch(replica, shard, t, m, args.micro)
                loss = torch.nn.functional.mse_loss(engine(x.to(dtype)).float(), y)
                engine.backward(loss)
                engine.step()
            else:
                parts = [micro_batch(replica, s, t, m, args.micro) for s in range(S)]
                x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
                loss = torch.nn.functional.mse_loss(module(x), y) / args.accum
                loss.backward()
            loss_value = float(loss.detach())
        if args.mode == "ref":
            if kind is not StepKind.PSEUDO_SYNC:
                torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            opt.step()
            scheduler.step()
            opt.zero_grad()
        # Log the mean loss over all ranks every step, as the HF Trainer does: a world-wide collective
        # while one replica may have skipped its forward (ZeRO-3's own checks must not hang on it).
        logged = torch.tensor([loss_value if loss_value is not None else 0.0, float(loss_value is not None)])
        dist.all_reduce(logged)
        if args.poison_at == t and args.mode == "ds" and algo.replica_index == 1:
            poison(algo, engine)
        record["kinds"].append(kind.value)
        record["losses"].append(loss_value)
        owned = [t_ for g in algo.adapter.owned_groups() for t_ in g.tensors]
        record["owned"].append(flat(owned))
        record["peer_bytes"].append(algo.peers.stats.bytes_sent)
        if kind is not StepKind.WARMUP and (t + 1) % args.H == 0:
            record["synced"].append([t, full_weights()])

    if args.save_at is not None:
        engine.save_checkpoint(os.path.join(args.out, "ckpt"))
    else:
        algo.finalize()
    if args.mode == "ds":
        state = engine.optimizer.optimizer.state
        record["inner_state_finite"] = all(
            bool(torch.isfinite(v).all()) for t_ in state for v in state[t_].values()
            if torch.is_tensor(v) and v.is_floating_point()
        )
    result = {
        "rank": rank, "world": world, "replica": algo.replica_index, "shard": shard, "start": start, **record,
        "metrics": algo.metrics(), "final": full_weights(),
        "engine_global_steps": engine.global_steps if args.mode == "ds" else None,
        "owned_numel": sum(t_.numel() for g in algo.adapter.owned_groups() for t_ in g.tensors),
        "model_numel": sum(p.numel() for p in make_model().parameters()),
        "initial": flat(make_model().parameters()),  # every rank's and mode's starting weights
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
