"""Worker script: PALSGD on an FSDP2 model (``--mode fsdp``) or on the unsharded path (``--mode ref``).

``fsdp``: the world is R replicas x S ranks; ``fully_shard`` over each replica's 1-D mesh
(``palsgd_hf.adapters.fsdp.shard_mesh``), PALSGD across replicas. ``--loop raw``: a hand-written
loop with ``wrap_optimizer``; ``--loop accelerate``: the Accelerate hooks (``PALSGDAccelerate``;
accelerate has no FSDP mode on CPU, so the sharded model is not passed to ``prepare``, which would
wrap it in DDP: the optimizer and scheduler are).

``ref``: one DDP process per replica (ModuleAdapter), fed on every step the concatenation of the
micro-batches the S ranks of that replica get in ``fsdp`` mode. Same init, coin seeds, SGD,
clipping and LR schedule: the same algorithm, sharded differently.

Writes rank{R}.json: step kinds, learning rates, the full weights after every step (all-gathered
within the replica), peer-group bytes after every step, the synced steps.
"""

import argparse
import json
import os

import torch
import torch.distributed as dist

from palsgd_hf import PALSGDConfig, StepKind

IN, HIDDEN, OUT = 8, 16, 4  # every sharded dim even: each of 2 shards holds exactly half


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)  # same init on every rank and in both modes
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT))


def micro_batch(replica: int, shard: int, step: int, size: int):
    """The data of one rank of one replica: replicas see different targets, so they drift apart."""
    g = torch.Generator().manual_seed(1_000_003 * step + 1009 * replica + 101 * shard)
    x = torch.randn(size, IN, generator=g)
    y = torch.tanh(x[:, :OUT]) * (1.0 + 0.5 * replica) + 0.05 * torch.randn(size, OUT, generator=g)
    return x, y


def schedule(step: int, total: int) -> float:
    """Linear warm-up over 3 steps, then linear decay to 20%: the pull must follow it."""
    return min(1.0, (step + 1) / 3) * (1.0 - 0.8 * step / max(total, 1))


def full_weights(module) -> list:
    from torch.distributed.tensor import DTensor

    return torch.cat([(p.full_tensor() if isinstance(p, DTensor) else p).detach().reshape(-1)
                      for p in module.parameters()]).tolist()


def save_raw(path: str, rank: int, algo, inner, scheduler) -> None:
    adapter = algo.adapter
    os.makedirs(path, exist_ok=True)
    torch.save({"model": adapter.local_model_state(), "optimizer": adapter.local_optimizer_state(inner),
                "algorithm": algo.state_dict(), "scheduler": scheduler.state_dict()},
               os.path.join(path, f"rank_{rank}.pt"))


def load_raw(path: str, rank: int, algo, inner, scheduler) -> None:
    state = torch.load(os.path.join(path, f"rank_{rank}.pt"), weights_only=False)
    algo.adapter.load_local_model_state(state["model"])
    algo.adapter.load_local_optimizer_state(inner, state["optimizer"])
    algo.load_state_dict(state["algorithm"])
    scheduler.load_state_dict(state["scheduler"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", choices=["fsdp", "ref"], default="fsdp")
    ap.add_argument("--loop", choices=["raw", "accelerate"], default="raw")
    ap.add_argument("--shard-size", type=int, default=2, help="S (fsdp); the micro-batches per replica (ref)")
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--p", type=float, default=0.3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--momentum", type=float, default=0.5, help="SGD momentum (inner state a resume must restore)")
    ap.add_argument("--micro", type=int, default=4, help="micro-batch size per rank")
    ap.add_argument("--bf16", action="store_true", help="FSDP2 mixed precision: bf16 compute, fp32 shards and reduce")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (loss / accum)")
    ap.add_argument("--overlap-steps", type=int, default=0)
    ap.add_argument("--comm-dtype", default="fp32")
    ap.add_argument("--save-at", type=int, default=None, help="also save a checkpoint after this many steps")
    ap.add_argument("--resume", default=None, help="checkpoint directory to resume from")
    args = ap.parse_args()

    accelerator = None
    if args.loop == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)  # brings up the gloo group (MULTI_CPU: accelerate's only CPU mode)
    else:
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    S = args.shard_size
    replica, shard = (rank // S, rank % S) if args.mode == "fsdp" else (rank, None)
    cfg = PALSGDConfig(
        sync_interval=args.H, pseudo_sync_prob=args.p, warmup_steps=args.warmup, mixing_rate=1.0,
        shard_size=S if args.mode == "fsdp" else 1, seed=3,
        # Independent coins per replica: replicas then run different step kinds, and the collective guard
        # (refusing mode) must let every FSDP collective through (they stay inside the replica).
        coins="per_replica", overlap_steps=args.overlap_steps, comm_dtype=args.comm_dtype,
    )
    model = make_model()
    if args.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from palsgd_hf.adapters.fsdp import shard_mesh

        mesh = shard_mesh(S)
        policy = {}
        if args.bf16:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            policy["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in (model[0], model[2], model):
            fully_shard(layer, mesh=mesh, **policy)
        module = model
    else:
        from torch.nn.parallel import DistributedDataParallel

        module = DistributedDataParallel(model)
    inner = torch.optim.SGD(module.parameters(), lr=args.lr, momentum=args.momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(inner, lambda t: schedule(t, args.steps))
    if accelerator is not None:
        from palsgd_hf import PALSGDAccelerate

        # The scheduler stays unprepared: accelerate would step it once per process per step (no split_batches).
        prepared = accelerator.prepare(inner)
        accelerator.register_for_checkpointing(scheduler)
        hooks = PALSGDAccelerate(accelerator, cfg)
        opt = hooks.wrap(module, prepared)
    else:
        from palsgd_hf import wrap_optimizer

        opt = wrap_optimizer(module, inner, cfg)
    algo = opt.algorithm

    if args.resume:
        if accelerator is not None:
            accelerator.load_state(args.resume)
        else:
            load_raw(args.resume, rank, algo, inner, scheduler)
    start = algo.step

    record = {"kinds": [], "lrs": [], "weights": [], "peer_bytes": [], "synced": [], "initial": full_weights(module)}
    owned = [t for g in algo.adapter.owned_groups() for t in g.tensors]
    record["owned_numel"] = sum(t.numel() for t in owned)
    record["owned_dtypes"] = sorted({str(t.dtype) for t in owned})
    for t in range(start, args.steps):
        computes = hooks.should_compute() if accelerator is not None else algo.step_kind() is not StepKind.PSEUDO_SYNC
        kind = algo.step_kind()
        record["lrs"].append(float(algo.adapter.owned_groups()[0].options["lr"]))
        for m in range(args.accum if computes else 0):
            step_id = t * args.accum + m
            if args.mode == "fsdp":
                x, y = micro_batch(replica, shard, step_id, args.micro)
            else:
                parts = [micro_batch(replica, s, step_id, args.micro) for s in range(S)]
                x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            loss = torch.nn.functional.mse_loss(module(x), y) / args.accum
            if accelerator is not None:
                accelerator.backward(loss)
            else:
                loss.backward()
        if computes:
            # On DTensors the norm is all-reduced over the shard mesh only: inside the replica.
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        scheduler.step()
        opt.zero_grad()
        # A world-wide collective at every step boundary, as the HF Trainer's logging does: FSDP must not
        # leave anything pending on a replica that skipped its forward.
        dist.all_reduce(torch.ones(1))
        record["kinds"].append(kind.value)
        record["weights"].append(full_weights(module))
        record["peer_bytes"].append(algo.peers.stats.bytes_sent)
        if kind is not StepKind.WARMUP and (t + 1) % args.H == 0:
            record["synced"].append(t)
        if args.save_at is not None and t + 1 == args.save_at and args.mode == "fsdp":
            path = os.path.join(args.out, "ckpt")
            if accelerator is not None:
                accelerator.save_state(path)
            else:
                save_raw(path, rank, algo, inner, scheduler)

    algo.finalize()
    record["final"] = full_weights(module)
    if args.mode == "fsdp":
        # The global model as a full state dict, the way a hand-written FSDP2 loop saves it (gathered per replica).
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
        record["full_state_dict"] = torch.cat([v.reshape(-1) for v in full.values()]).tolist()
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
