"""Worker script: the FSDP layouts PALSGD refuses, each attached on 2 real gloo processes.

Every case builds a real sharded model and attaches PALSGD (``wrap_optimizer``); the refusal must
come at attach time, before any training step. Writes rank{R}.json: case -> [exception type, message]
(or ``None`` if nothing was raised).
"""

import argparse
import json
import os

import torch
import torch.distributed as dist

from palsgd_hf import PALSGDConfig, wrap_optimizer


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def attach(net: torch.nn.Module, shard_size: int) -> None:
    wrap_optimizer(net, torch.optim.SGD(net.parameters(), lr=0.1), PALSGDConfig(shard_size=shard_size))


def shard(net: torch.nn.Module, **kwargs) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in (net[0], net[2], net):
        fully_shard(layer, **kwargs)
    return net


def case_whole_world(world: int) -> None:
    # fully_shard's default mesh is the whole world: 2 ranks, but PALSGD was told every rank is a replica.
    attach(shard(model()), shard_size=1)


def case_hsdp(world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
    attach(shard(model(), mesh=mesh), shard_size=1)


def case_fsdp1(world: int) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    attach(FullyShardedDataParallel(model(), device_id=torch.device("cpu")), shard_size=world)


def case_shard_size_not_dividing(world: int) -> None:
    from palsgd_hf.adapters.fsdp import shard_mesh

    shard_mesh(world + 1)  # refused before any sharding


def case_unsharded_param(world: int) -> None:
    from torch.distributed.fsdp import fully_shard

    from palsgd_hf.adapters.fsdp import shard_mesh

    net, mesh = model(), shard_mesh(world)
    fully_shard(net[0], mesh=mesh)
    fully_shard(net, mesh=mesh, ignored_params=set(net[2].parameters()))  # net[2] stays plain tensors
    attach(net, shard_size=world)


# CPU offload is not a case here: fully_shard(offload_policy=CPUOffloadPolicy()) itself fails on a machine without
# an accelerator ("Cannot access accelerator device when none is available."), so the adapter's refusal of it
# cannot be reached on CPU.
CASES = {name[len("case_"):]: fn for name, fn in globals().items() if name.startswith("case_")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for name, fn in CASES.items():
        try:
            fn(world)
            results[name] = None
        except Exception as error:  # noqa: BLE001 - the test asserts on the type and the message
            results[name] = [type(error).__name__, str(error)]
        dist.barrier()  # every case starts together: none leaves a collective half-issued for the next
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
