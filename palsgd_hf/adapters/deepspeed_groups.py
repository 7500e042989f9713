"""The ``mpu`` object that confines DeepSpeed ZeRO to one replica group.

``deepspeed.initialize(..., mpu=...)`` takes a "model parallel unit": DeepSpeed asks it for its
data-parallel group and shards ZeRO state over that group only. PALSGD's layout is R replicas of
S ranks (see :mod:`palsgd_hf.core.topology`): ZeRO must shard within a replica (S ranks) and
never reduce gradients across replicas, which is PALSGD's job. So the data-parallel group we hand
DeepSpeed is the replica group, and the model-parallel group is the rank alone (size 1).

The process groups (a ``replica x shard`` device mesh, :func:`~palsgd_hf.core.topology.build_process_groups`)
are created once per process and shard size (group creation is collective over the whole world, and
every group costs connections), and the same :class:`ProcessGroups` feed both DeepSpeed (through the
mpu) and the PALSGD communicators.

DeepSpeed also checks ``train_batch_size == micro_batch * grad_accum * dp_world_size``, where the
data-parallel size is now S rather than the world size; :func:`fit_batch_size` rewrites a config
whose batch size was filled in for the whole world (HF Trainer and accelerate do that).

Code that calls ``deepspeed.initialize`` itself (accelerate's ``prepare``, hence the HF Trainer)
runs inside :func:`replica_sharding`, which supplies the mpu, the batch size and the per-replica
checkpoint layout (:mod:`.deepspeed_checkpoint`) to every engine created in the block.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from datetime import timedelta
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from ..config import PALSGDConfigError
from ..core.topology import ProcessGroups, Topology, build_process_groups

logger = logging.getLogger(__name__)

# (world size, shard size) -> ReplicaMPU; one set of groups per process and layout.
_CACHE: dict[tuple[int, int], "ReplicaMPU"] = {}


class ReplicaMPU:
    """DeepSpeed's mpu interface for PALSGD: data parallel = this rank's replica group, no model parallel.

    Attributes:
        topology: the replica x shard layout of this rank.
        groups: the replica and peer groups (``None`` = the whole world), shared with PALSGD.
    """

    def __init__(self, topology: Topology, groups: ProcessGroups, self_group: dist.ProcessGroup,
                 replica_group: dist.ProcessGroup):
        self.topology = topology
        self.groups = groups
        self._self_group = self_group  # this rank alone: the (trivial) model-parallel group
        self._replica_group = replica_group

    # data parallel = ZeRO's group = the replica
    def get_data_parallel_group(self):
        return self._replica_group

    def get_data_parallel_world_size(self) -> int:
        return self.topology.shard_size

    def get_data_parallel_rank(self) -> int:
        return self.topology.shard_index

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.topology.replica_ranks(self.topology.replica_index)

    # model / tensor parallel: none (size 1)
    def get_model_parallel_group(self):
        return self._self_group

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_rank()

    def __repr__(self) -> str:
        t = self.topology
        return f"ReplicaMPU(replica {t.replica_index}/{t.num_replicas}, shard {t.shard_index}/{t.shard_size})"


def replica_mpu(shard_size: int, timeout: Optional[timedelta] = None) -> ReplicaMPU:
    """The mpu (and process groups) of this rank for ``shard_size`` ranks per replica.

    Collective on first use for a layout: every rank must call it, in the same order.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "DeepSpeed under PALSGD needs torch.distributed initialized first: call deepspeed.init_distributed() "
            "(or launch with torchrun / accelerate launch, which the HF Trainer initializes) before building the mpu."
        )
    topology = Topology.from_environment(shard_size)  # raises PALSGDConfigError if W % S != 0
    key = (topology.world_size, shard_size)
    if key not in _CACHE:
        groups = build_process_groups(topology, timeout)
        kwargs = {"timeout": timeout} if timeout is not None else {}
        self_group = None
        # One-rank groups: the model-parallel group (new_group is collective: every rank creates each).
        for rank in range(topology.world_size):
            group = dist.new_group([rank], **kwargs)
            if rank == topology.rank:
                self_group = group
        # ZeRO's data-parallel group is the mesh's replica group (the rank alone when S = 1).
        _CACHE[key] = ReplicaMPU(topology, groups, self_group, groups.replica)
        logger.info(
            "PALSGD + DeepSpeed layout: %d replicas x %d shards; ZeRO shards within replica %d (ranks %s)",
            topology.num_replicas, shard_size, topology.replica_index,
            topology.replica_ranks(topology.replica_index),
        )
    return _CACHE[key]


def fit_batch_size(ds_config: dict[str, Any], mpu: ReplicaMPU) -> dict[str, Any]:
    """A copy of ``ds_config`` whose ``train_batch_size`` counts the replica group, not the world.

    DeepSpeed checks train_batch_size == micro * grad_accum * (its data-parallel size = S). A config
    written for the whole world (micro * grad_accum * W, as HF Trainer and accelerate fill in) is
    rewritten; any other inconsistent value is an error naming both readings.
    """
    config = copy.deepcopy(ds_config)
    micro = config.get("train_micro_batch_size_per_gpu")
    accum = config.get("gradient_accumulation_steps", 1)
    total = config.get("train_batch_size")
    if not isinstance(micro, int) or not isinstance(accum, int):
        return config  # DeepSpeed derives the missing values itself from the replica size
    t = mpu.topology
    replica_total = micro * accum * t.shard_size
    if total in (None, "auto") or total == micro * accum * t.world_size:
        config["train_batch_size"] = replica_total
    elif total != replica_total:
        raise PALSGDConfigError(
            f"DeepSpeed train_batch_size={total} matches neither the replica group ({micro} micro x {accum} accum x "
            f"{t.shard_size} shards = {replica_total}) nor the world ({micro * accum * t.world_size}); under PALSGD "
            "ZeRO's data-parallel group is one replica: set train_batch_size to 'auto' or leave it out."
        )
    return config


@contextlib.contextmanager
def replica_sharding(shard_size: int, comm_timeout: Optional[timedelta] = None) -> Iterator[None]:
    """Make every ``deepspeed.initialize`` call inside the block shard ZeRO within one replica.

    The call gets ``mpu=replica_mpu(shard_size)`` (unless it passes its own), a ``train_batch_size``
    counted over the replica, and its engine the per-replica checkpoint layout. Attach PALSGD to
    the engine afterwards (``palsgd_hf.adapters.deepspeed.attach``).
    """
    import deepspeed

    from . import deepspeed_checkpoint

    original = deepspeed.initialize
    mpu = replica_mpu(shard_size, comm_timeout)

    def initialize_in_replica(*args, **kwargs):
        if kwargs.get("mpu") is None:
            kwargs["mpu"] = mpu
            for key in ("config", "config_params"):
                if isinstance(kwargs.get(key), dict):
                    kwargs[key] = fit_batch_size(kwargs[key], mpu)
            _check_not_partitioned_over_world(kwargs.get("model"), mpu)
        result = original(*args, **kwargs)
        if result[0].zero_optimization_stage() == 3:
            confine_zero3_consistency_checks(kwargs["mpu"])
        deepspeed_checkpoint.install(result[0], mpu.topology.replica_index)
        return result

    deepspeed.initialize = initialize_in_replica
    try:
        yield
    finally:
        deepspeed.initialize = original


def _check_not_partitioned_over_world(model, mpu: ReplicaMPU) -> None:
    """A model built under ``deepspeed.zero.Init`` is already partitioned, over zero.Init's group."""
    if model is None:
        return
    for p in model.parameters():
        group = getattr(p, "ds_process_group", None)
        if group is not None and dist.get_world_size(group) != mpu.topology.shard_size:
            raise PALSGDConfigError(
                f"the model's parameters were partitioned by deepspeed.zero.Init over {dist.get_world_size(group)} "
                f"ranks, but PALSGD shards each replica over shard_size={mpu.topology.shard_size}. Build the model "
                "before creating the TrainingArguments / HfDeepSpeedConfig (then zero.Init is not used), or pass "
                "data_parallel_group=replica_mpu(shard_size).get_data_parallel_group() to zero.Init."
            )
        return


def confine_zero3_consistency_checks(mpu: ReplicaMPU) -> None:
    """Make ZeRO-3's "same list on every rank" checks compare within the replica, not the world.

    ZeRO-3 records the order in which modules fetch their parameters during the first forward
    passes after it starts (and again whenever that order changes, e.g. after an evaluation), and
    checks that every rank recorded the same order with broadcasts over the *whole world*
    (``deepspeed.runtime.zero.utils.assert_ints_same_as_other_ranks``). Under PALSGD one replica
    may skip its forward (a pseudo-sync step) while another runs one, so a world-wide check hangs:
    a replica that resumes from a checkpoint or evaluates mid-run would wait forever. Only the
    ranks sharing one ZeRO partitioning must agree, so the check runs over the replica group.
    Process-wide (one PALSGD layout per process); idempotent.
    """
    from deepspeed.runtime.zero import partition_parameters, partitioned_param_coordinator, stage3

    if mpu.topology.num_replicas == 1:
        return
    group = mpu.get_data_parallel_group()
    src = mpu.topology.replica_ranks(mpu.topology.replica_index)[0]

    def assert_ints_same_within_replica(ints: list[int]) -> None:
        from deepspeed.accelerator import get_accelerator

        device = torch.device(get_accelerator().current_device_name())
        length = torch.tensor([len(ints)], dtype=torch.long, device=device)
        dist.broadcast(length, src=src, group=group)
        if int(length.item()) != len(ints):
            raise RuntimeError(
                f"ZeRO-3 ranks of replica {mpu.topology.replica_index} disagree: rank {src} has a list of "
                f"{int(length.item())} entries, rank {dist.get_rank()} of {len(ints)}."
            )
        values = torch.tensor(ints, dtype=torch.long, device=device)
        dist.broadcast(values, src=src, group=group)
        if values.tolist() != list(ints):
            raise RuntimeError(
                f"ZeRO-3 ranks of replica {mpu.topology.replica_index} disagree on a list: rank {src} has "
                f"{values.tolist()[:16]}..., rank {dist.get_rank()} {list(ints)[:16]}..."
            )

    assert_ints_same_within_replica.palsgd_replica = True
    for module in (partitioned_param_coordinator, partition_parameters, stage3):
        # These modules imported the function by name; replace each module's own reference.
        if not getattr(getattr(module, "assert_ints_same_as_other_ranks", None), "palsgd_replica", False):
            module.assert_ints_same_as_other_ranks = assert_ints_same_within_replica
