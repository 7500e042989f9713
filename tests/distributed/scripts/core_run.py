"""Worker script: the PALSGD core on a small regression model, one rank per process (gloo).

Writes rank{R}.json with the step kinds, the weights after every step and the metrics, for
tests/distributed/test_core_gloo.py to compare across ranks.
"""

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from palsgd_hf import PALSGDConfig, StepKind, wrap_optimizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--method", default="palsgd")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--p", type=float, default=None)
    ap.add_argument("--eta", type=float, default=1.0)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--shard-size", type=int, default=1)
    ap.add_argument("--coins", default="shared", choices=["shared", "per_replica"])
    ap.add_argument("--inner", default="adamw", choices=["adamw", "sgd"])
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--ddp", action="store_true", help="wrap the model in DistributedDataParallel")
    ap.add_argument("--record-every-step", action="store_true")
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # same init everywhere
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    if args.ddp:
        model = DistributedDataParallel(model)
    if args.inner == "sgd":
        inner = torch.optim.SGD(model.parameters(), lr=args.lr)
    else:
        inner = torch.optim.AdamW(model.parameters(), lr=args.lr)
    cfg = PALSGDConfig(
        method=args.method, sync_interval=args.H, pseudo_sync_prob=args.p, mixing_rate=args.eta,
        warmup_steps=args.warmup, shard_size=args.shard_size, coins=args.coins,
    )
    opt = wrap_optimizer(model, inner, cfg)
    algo = opt.algorithm
    kinds, weights, calls, grad_norms = [], [], [], []
    for t in range(args.steps):
        g = torch.Generator().manual_seed(10_000 * rank + t)  # each rank its own data
        x = torch.randn(16, 6, generator=g)
        y = x.sum(1, keepdim=True) * (1 + 0.2 * rank) + torch.randn(16, 1, generator=g) * 0.1
        kind = algo.step_kind()
        if kind is not StepKind.PSEUDO_SYNC:
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
        # The gradient this rank steps with (DDP: the average), for the rounding bounds of the tests.
        grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
        grad_norms.append(torch.cat(grads).double().norm().item() if grads else 0.0)
        opt.step()
        opt.zero_grad()
        kinds.append(kind.value)
        calls.append(algo.peers.stats.calls)
        if args.record_every_step or (t + 1) % args.H == 0 or t + 1 == args.steps:
            weights.append([t, torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()])
    metrics = algo.metrics()
    algo.finalize()
    final = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "world": world, "replica": algo.replica_index, "kinds": kinds, "weights": weights,
         "comm_calls": calls, "grad_norms": grad_norms, "metrics": metrics, "final": final}
    ))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
