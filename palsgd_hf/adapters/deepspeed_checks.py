"""What PALSGD needs of a DeepSpeed engine, checked when its adapter is built (value, rule, fix).

The ZeRO stage, the precision, no offload, the ZeRO internals PALSGD acts on (version-specific: the supported
DeepSpeed range is pinned here) and where ZeRO shards: within one replica, or over the whole world of a
fault-tolerant replica (palsgd_hf/adapters/deepspeed.py says why each matters).
"""

from __future__ import annotations

import torch

from ..core.comm import Communicator

SUPPORTED_DEEPSPEED = (">=0.17", "<0.20")


def check_engine(engine, zero, stage: int, comm: Communicator, peers_outside_world: bool) -> None:
    """Refuse an engine PALSGD cannot drive (``zero``: its ZeRO optimizer; ``comm``: PALSGD's peers)."""
    if stage not in (1, 2, 3):
        raise ValueError(
            f"PALSGD supports DeepSpeed ZeRO stages 1, 2 and 3, but this engine runs stage {stage}; set "
            "zero_optimization.stage to 1-3 in the DeepSpeed config, or train without DeepSpeed (plain DDP)."
        )
    if engine.fp16_enabled():
        raise ValueError(
            "PALSGD + DeepSpeed is tested with bf16 and fp32, not fp16 (dynamic loss scaling skips steps the "
            "PALSGD schedule would still count); set bf16.enabled=true instead of fp16 in the DeepSpeed config."
        )
    offload = getattr(zero, "cpu_offload", False) or getattr(zero, "offload_optimizer", False) \
        or getattr(zero, "offload_param", False)
    if offload:
        raise NotImplementedError(
            "PALSGD does not support ZeRO offload (offload_optimizer / offload_param) yet: the partitions it "
            "acts on then live in swapped CPU/NVMe buffers. Remove the offload_* sections, or keep the PALSGD "
            "anchor in host memory instead with anchor_device='cpu'."
        )
    needed = ("single_partition_of_fp32_groups", "update_lp_params", "averaged_gradients") if stage < 3 else (
        "fp32_partitioned_groups_flat", "fp16_partitioned_groups_flat", "sub_group_to_group_id",
        "_partition_all_parameters", "_reassign_or_swap_out_partitioned_parameters", "fp16_groups",
        "_get_param_partition_rank", "persistent_parameters", "invalidate_secondary_tensor",
        "averaged_gradients", "_set_fp32_optimizer_param_groups", "_clear_fp32_optimizer_param_groups",
    )
    missing = [name for name in needed if not hasattr(zero, name)]
    if missing:
        raise RuntimeError(
            f"this DeepSpeed's ZeRO-{stage} optimizer ({type(zero).__name__}) lacks {missing}, which "
            f"PALSGD uses; install deepspeed{','.join(SUPPORTED_DEEPSPEED)}."
        )
    zero_size = torch.distributed.get_world_size(zero.dp_process_group)
    if peers_outside_world and zero_size != _world_size():
        raise ValueError(
            f"ZeRO shards over {zero_size} ranks but this fault-tolerant replica's world has {_world_size()}: a "
            "replica is one ZeRO group over all of its ranks. Build the engine without an mpu (or with "
            "replica_mpu(world size)), one torchrun per replica."
        )
    if not peers_outside_world and zero_size * comm.size != _world_size():
        raise ValueError(
            f"ZeRO shards over {zero_size} ranks and PALSGD averages over {comm.size} replicas, but the world has "
            f"{_world_size()} ranks: ZeRO must be confined to one replica. Pass mpu=replica_mpu(shard_size) to "
            "deepspeed.initialize (palsgd_hf.adapters.deepspeed.initialize does this)."
        )


def check_deepspeed_version() -> None:
    import deepspeed
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    spec = SpecifierSet(",".join(SUPPORTED_DEEPSPEED))
    version = Version(deepspeed.__version__.split("+")[0])
    if version not in spec:
        raise RuntimeError(
            f"PALSGD acts on DeepSpeed ZeRO internals that change between releases; it is tested with "
            f"deepspeed{spec}, found {version}. Install a supported version: pip install 'deepspeed{spec}'."
        )


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
