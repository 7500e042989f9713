"""Adapter for a DeepSpeed ZeRO 1/2/3 engine: PALSGD acts on the fp32 master partitions a rank owns.

Layout: the world is R replicas x S ranks. ZeRO shards one model copy over the S ranks of a
replica (its data-parallel group, set by the ``mpu`` of :mod:`.deepspeed_groups`); PALSGD averages
across the R replicas, each rank exchanging only its own partition with the ranks that own the
same partition in the other replicas (its peer group). S = 1 is every rank its own replica.

What the core sees (``owned_groups``): one flat fp32 partition per inner-optimizer parameter
group, the very tensor the inner optimizer updates. ZeRO-1/2 keep it in
``single_partition_of_fp32_groups[i]``; ZeRO-3 in ``fp32_partitioned_groups_flat[j]`` (one per
sub-group; sub-groups of one parameter group share its options dict, so they are listed together,
or the core would scale that group's learning rate once per sub-group). The 16-bit (or fp32)
weights the model computes with are rebuilt from these partitions by ZeRO at each step, so
writing them alone would be undone; after the core writes the partitions (pull, sync),
``after_write`` refreshes the model weights: ZeRO-1/2 ``update_lp_params()`` (copy into the
bit16 partition, all-gather within the replica), ZeRO-3 copies into the partitioned 16-bit flat
buffer and re-gathers the persistent (never-released) parameters.

Gradient sync: ZeRO's reduce-scatter within the replica always stays on (it is how a sharded
replica computes its gradient). Warm-up steps must average over *all* ranks, so
``warmup_gradient_sync`` all-reduces the partition gradients ZeRO has reduced within the replica
(``averaged_gradients``) across the peer group before the inner step: the mean over S shards
then over R replicas is the mean over all R*S ranks, as in DDP. After warm-up nothing crosses
replicas between syncs.

The step: ``bind(algorithm)`` routes ZeRO's optimizer step through the PALSGD state machine, so
``engine.step()`` at an accumulation boundary is one PALSGD step (warm-up, gradient step with the
scaled LR, or the pull instead of the inner step; then a sync when due) while the engine keeps
its own bookkeeping (LR scheduler step, global step and sample counters, zero_grad). On a
pseudo-sync step a loop skips forward/backward and still calls ``engine.step()``; loops that
step the engine inside ``backward`` (accelerate, the HF Trainer) call
:meth:`DeepSpeedAdapter.finish_step` once per optimizer step.

Checkpoints: replicas differ between syncs, and every replica's ZeRO files have the same names,
so ``bind`` also redirects ``engine.save_checkpoint(dir, tag)`` to ``dir/replica_<r>/<tag>``
(DeepSpeed's own files) plus ``dir/<tag>/palsgd/rank_<k>.pt`` (this rank's PALSGD state) and
``dir/latest``; ``engine.load_checkpoint(dir)`` reads them back. The HF Trainer's
``checkpoint-N/global_step*`` lookup finds ``dir/<tag>``.

DeepSpeed internals are version-specific: the supported range is checked on construction.
"""

from __future__ import annotations

import contextlib
import logging
import os
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional

import torch

from ..core.adapter import OwnedGroup
from ..core.comm import Communicator

logger = logging.getLogger(__name__)

SUPPORTED_DEEPSPEED = (">=0.17", "<0.20")
PALSGD_STATE_DIR = "palsgd"


class DeepSpeedAdapter:
    """The PALSGD adapter of one rank of a ZeRO 1/2/3 ``DeepSpeedEngine``.

    Args:
        engine: the engine ``deepspeed.initialize`` returned, built with the PALSGD mpu
            (``palsgd_hf.adapters.deepspeed_groups.replica_mpu``) when there is more than one replica.
        comm: communicator over this rank's peer group (the ranks owning the same partition in
            the other replicas). Collective: the initial partitions are broadcast from replica 0,
            so every replica starts from the same model (as DDP does at construction).
    """

    def __init__(self, engine, comm: Communicator):
        _check_deepspeed_version()
        if type(engine).__name__ not in ("DeepSpeedEngine", "PipelineEngine"):
            raise TypeError(f"DeepSpeedAdapter needs a deepspeed.DeepSpeedEngine, got {type(engine).__name__}.")
        self.engine = engine
        self.zero = engine.optimizer
        self.stage = int(engine.zero_optimization_stage())
        self._check_supported(comm)
        self.algorithm = None
        self._original_step: Optional[Callable] = None
        self._finished_at = 0
        self._broadcast_initial(comm)

    # ------------------------------------------------------------------ the adapter contract
    def owned_groups(self) -> list[OwnedGroup]:
        options = self.zero.optimizer.param_groups  # the live dicts the LR scheduler writes
        if self.stage in (1, 2):
            return [OwnedGroup(options[i], [t]) for i, t in enumerate(self.zero.single_partition_of_fp32_groups)]
        by_group: dict[int, list[torch.Tensor]] = {}
        for sub, flat in enumerate(self.zero.fp32_partitioned_groups_flat):
            by_group.setdefault(self.zero.sub_group_to_group_id[sub], []).append(flat)
        return [OwnedGroup(options[g], tensors) for g, tensors in sorted(by_group.items())]

    @torch.no_grad()
    def after_write(self) -> None:
        """Rebuild the model's weights from the fp32 partitions (collective within the replica)."""
        if self.stage in (1, 2):
            self.zero.update_lp_params()
            return
        # As ZeRO-3's own step does: release every gathered parameter (small "persistent" ones stay
        # gathered between steps, and all_gather skips parameters that are available), write the
        # fp32 partitions into the 16-bit ones, then gather the persistent parameters again.
        self.zero._partition_all_parameters()
        for sub in range(len(self.zero.fp32_partitioned_groups_flat)):
            # fp32 -> the 16-bit partition flat buffer, re-pointing each parameter's partition at it
            # (a same-storage copy in fp32 training).
            self.zero._reassign_or_swap_out_partitioned_parameters(sub)
        persistent = self.zero.persistent_parameters
        if persistent:
            persistent[0].all_gather(persistent)
        self.zero.invalidate_secondary_tensor()

    def set_gradient_sync(self, enabled: bool) -> None:
        """Nothing to switch: ZeRO reduces within the replica only; warm-up crosses replicas below."""

    @torch.no_grad()
    def warmup_gradient_sync(self, comm: Communicator) -> None:
        if comm.size == 1:
            return
        grads = self._reduced_gradients()
        if not grads:
            return
        # fp32 on the wire: the warm-up is short, and bf16 sums over many ranks lose bits.
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        comm.all_reduce_mean(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    # ------------------------------------------------------------------ binding to the engine
    def bind(self, algorithm) -> None:
        """Route ``engine.step()`` through ``algorithm`` and give checkpoints a per-replica layout."""
        if self.algorithm is not None:
            raise RuntimeError("this DeepSpeed engine is already bound to a PALSGD algorithm; bind it once.")
        if algorithm.adapter is not self:
            raise ValueError("bind() needs the PALSGD algorithm built with this adapter.")
        self.algorithm = algorithm
        zero = self.zero
        original = zero.step  # the bound method of ZeRO's class
        self._original_step = original

        def palsgd_step(closure=None):
            # Called by engine._take_model_step at an accumulation boundary; the engine then zeroes
            # gradients, steps its LR scheduler and counts the step, whatever kind it was.
            kind = algorithm.optimizer_step(lambda: original(closure))
            if kind.value == "pseudo_sync":
                zero.overflow = False  # no inner step ran: nothing overflowed, let the LR schedule advance

        zero.step = palsgd_step  # instance attribute: shadows the class method for this engine only
        engine = self.engine
        self._original_save = engine.save_checkpoint
        self._original_load = engine.load_checkpoint
        engine.save_checkpoint = self.save_checkpoint
        engine.load_checkpoint = self.load_checkpoint
        engine.palsgd = algorithm
        self._finished_at = algorithm.step

    def finish_step(self) -> None:
        """Once per optimizer step, after its compute (if any), in loops that step the engine inside
        ``backward`` (accelerate, the HF Trainer): on a pseudo-sync step no backward ran, so the
        engine did not step; run ``engine.step()`` at a boundary now. A no-op when it did step.
        """
        if self.algorithm is None:
            raise RuntimeError("call bind(algorithm) before stepping.")
        if self.algorithm.step == self._finished_at:
            engine = self.engine
            if engine.managed_gradient_accumulation():
                # Force a boundary for this one call (accelerate sets it before every backward anyway);
                # the private flag is restored so a loop relying on DeepSpeed's own count is unaffected.
                saved = engine._is_gradient_accumulation_boundary
                engine.set_gradient_accumulation_boundary(True)
                try:
                    engine.step()
                finally:
                    engine._is_gradient_accumulation_boundary = saved
            else:
                engine.step()
        self._finished_at = self.algorithm.step

    # ------------------------------------------------------------------ checkpoints
    def _replica_dir(self, save_dir: str) -> str:
        return os.path.join(save_dir, f"replica_{self.algorithm.replica_index}")

    def _state_file(self, save_dir: str, tag: str) -> str:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return os.path.join(save_dir, str(tag), PALSGD_STATE_DIR, f"rank_{rank}.pt")

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True, **kwargs):
        """``engine.save_checkpoint`` with one DeepSpeed directory per replica and the PALSGD state."""
        tag = str(tag) if tag is not None else f"global_step{self.engine.global_steps}"
        ok = self._original_save(
            self._replica_dir(save_dir), tag=tag, client_state=client_state or {}, save_latest=save_latest, **kwargs
        )
        path = self._state_file(save_dir, tag)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save({"algorithm": self.algorithm.state_dict(), "world_size": _world_size()}, path)
        if save_latest and _rank() == 0:
            with open(os.path.join(save_dir, "latest"), "w") as fd:
                fd.write(tag)
        _barrier()
        return ok

    def load_checkpoint(self, load_dir, tag=None, **kwargs):
        """``engine.load_checkpoint`` for a directory written by :meth:`save_checkpoint`."""
        if tag is None:
            latest = os.path.join(load_dir, "latest")
            if not os.path.isfile(latest):
                logger.warning("No 'latest' file in %s: nothing to resume (pass tag= to choose one).", load_dir)
                return None, None
            with open(latest) as fd:
                tag = fd.read().strip()
        tag = str(tag)
        replica_dir = self._replica_dir(load_dir)
        if not os.path.isdir(os.path.join(replica_dir, tag)):
            raise FileNotFoundError(
                f"{os.path.join(replica_dir, tag)} is missing: a PALSGD DeepSpeed checkpoint keeps one directory per "
                "replica; resume with the same number of processes and shard_size, from the directory that "
                "engine.save_checkpoint wrote."
            )
        load_path, client_state = self._original_load(replica_dir, tag=tag, **kwargs)
        if load_path is None:
            return load_path, client_state
        path = self._state_file(load_dir, tag)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: the PALSGD state of this rank was not saved with the checkpoint.")
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if saved.get("world_size") != _world_size():
            raise ValueError(
                f"the checkpoint in {load_dir} was written by {saved.get('world_size')} processes but this run has "
                f"{_world_size()}; PALSGD keeps one model copy per replica, so resume with the same number of processes."
            )
        self._zero_stage3_padding()  # checkpoints written before this adapter existed may hold garbage there
        self.after_write()
        self.algorithm.load_state_dict(saved["algorithm"])
        self._finished_at = self.algorithm.step
        logger.info("Resumed PALSGD + DeepSpeed from %s (tag %s, PALSGD step %d)", load_dir, tag, self.algorithm.step)
        return load_path, client_state

    # ------------------------------------------------------------------ internals
    def _reduced_gradients(self) -> list[torch.Tensor]:
        """The partition gradients ZeRO reduced within the replica, which its step() reads next."""
        out = []
        for i in sorted(self.zero.averaged_gradients):
            grads = self.zero.averaged_gradients[i]
            if grads is None:
                continue
            flat = getattr(grads, "flat_partition", None)  # ZeRO-1/2 compact buffer: the list is views of it
            out.extend([flat] if flat is not None else [g for g in grads if g is not None])
        if not out:
            raise RuntimeError(
                "PALSGD warm-up step found no reduced gradients in the ZeRO optimizer; call engine.backward(loss) "
                "on this step before engine.step()."
            )
        return out

    @torch.no_grad()
    def _zero_stage3_padding(self) -> None:
        """ZeRO-3 pads each parameter's last partition with uninitialized memory (torch.empty).

        The pseudo-gradient covers whole partitions, so garbage there (possibly NaN) would make a
        sync non-finite and skip it. Zeros stay zero: no gradient, no pull, no outer step moves them.
        """
        if self.stage != 3:
            return
        for sub, flat in enumerate(self.zero.fp32_partitioned_groups_flat):
            offset = 0
            for param in self.zero.fp16_groups[sub]:
                size = param.partition_numel()
                start = self.zero._get_param_partition_rank(param) * size
                real = min(size, max(0, param.ds_numel - start))
                if real < size:
                    flat.narrow(0, offset + real, size - real).zero_()
                offset += size

    @torch.no_grad()
    def _broadcast_initial(self, comm: Communicator) -> None:
        self._zero_stage3_padding()
        if comm.size > 1:
            for group in self.owned_groups():
                for t in group.tensors:
                    comm.broadcast(t.data, 0)
        if comm.size > 1 or self.stage == 3:
            self.after_write()

    def _check_supported(self, comm: Communicator) -> None:
        if self.stage not in (1, 2, 3):
            raise ValueError(
                f"PALSGD supports DeepSpeed ZeRO stages 1, 2 and 3, but this engine runs stage {self.stage}; set "
                "zero_optimization.stage to 1-3 in the DeepSpeed config, or train without DeepSpeed (plain DDP)."
            )
        if self.engine.fp16_enabled():
            raise ValueError(
                "PALSGD + DeepSpeed is tested with bf16 and fp32, not fp16 (dynamic loss scaling skips steps the "
                "PALSGD schedule would still count); set bf16.enabled=true instead of fp16 in the DeepSpeed config."
            )
        offload = getattr(self.zero, "cpu_offload", False) or getattr(self.zero, "offload_optimizer", False) \
            or getattr(self.zero, "offload_param", False)
        if offload:
            raise NotImplementedError(
                "PALSGD does not support ZeRO offload (offload_optimizer / offload_param) yet: the partitions it "
                "acts on then live in swapped CPU/NVMe buffers. Remove the offload_* sections, or keep the PALSGD "
                "anchor in host memory instead with anchor_device='cpu'."
            )
        needed = ("single_partition_of_fp32_groups", "update_lp_params", "averaged_gradients") if self.stage < 3 else (
            "fp32_partitioned_groups_flat", "fp16_partitioned_groups_flat", "sub_group_to_group_id",
            "_partition_all_parameters", "_reassign_or_swap_out_partitioned_parameters", "fp16_groups",
            "_get_param_partition_rank", "persistent_parameters", "invalidate_secondary_tensor",
            "averaged_gradients",
        )
        missing = [name for name in needed if not hasattr(self.zero, name)]
        if missing:
            raise RuntimeError(
                f"this DeepSpeed's ZeRO-{self.stage} optimizer ({type(self.zero).__name__}) lacks {missing}, which "
                f"PALSGD uses; install deepspeed{','.join(SUPPORTED_DEEPSPEED)}."
            )
        zero_size = torch.distributed.get_world_size(self.zero.dp_process_group)
        if zero_size * comm.size != _world_size():
            raise ValueError(
                f"ZeRO shards over {zero_size} ranks and PALSGD averages over {comm.size} replicas, but the world has "
                f"{_world_size()} ranks: ZeRO must be confined to one replica. Pass mpu=replica_mpu(shard_size) to "
                "deepspeed.initialize (palsgd_hf.adapters.deepspeed.initialize does this)."
            )


# ---------------------------------------------------------------------- entry points
def attach(engine, config, *, comm_timeout: Optional[timedelta] = None):
    """PALSGD on an initialized ZeRO engine: build the algorithm, bind it, return it.

    The engine must have been built with ``mpu=replica_mpu(config.shard_size)`` (or, for a single
    replica, without an mpu); the same process groups feed PALSGD. Collective: every rank calls it.
    """
    from ..core.algorithm import PALSGD
    from ..core.comm import LocalCommunicator
    from .deepspeed_groups import ReplicaMPU, replica_mpu

    mpu = engine.mpu if isinstance(getattr(engine, "mpu", None), ReplicaMPU) else replica_mpu(config.shard_size, comm_timeout)
    if mpu.topology.shard_size != config.shard_size:
        raise ValueError(
            f"the engine's mpu shards over {mpu.topology.shard_size} ranks but config.shard_size={config.shard_size}; "
            "build the engine with mpu=replica_mpu(config.shard_size)."
        )
    t = mpu.topology
    peers = Communicator(mpu.groups.peers, comm_timeout) if t.world_size > 1 else LocalCommunicator()
    replica = Communicator(mpu.get_data_parallel_group(), comm_timeout) if t.shard_size > 1 else LocalCommunicator()
    adapter = DeepSpeedAdapter(engine, peers)
    anchor_device = torch.device("cpu") if config.anchor_device == "cpu" else None
    algorithm = PALSGD(
        config, adapter, peers=peers, replica=replica, replica_index=t.replica_index, anchor_device=anchor_device
    )
    adapter.bind(algorithm)
    return algorithm


def initialize(*, model, config, ds_config: dict[str, Any], optimizer=None, comm_timeout=None, **kwargs):
    """``deepspeed.initialize`` under PALSGD: ZeRO confined to each replica, the engine bound.

    Returns ``(engine, optimizer, dataloader, lr_scheduler, algorithm)``: DeepSpeed's four results
    and the PALSGD state machine (``algorithm.step_kind()``, ``metrics()``, ``finalize()``).
    ``kwargs`` go to ``deepspeed.initialize`` (``lr_scheduler``, ``model_parameters``, ...).
    """
    import deepspeed

    from .deepspeed_groups import fit_batch_size, replica_mpu

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed()
    mpu = replica_mpu(config.shard_size, comm_timeout)
    engine, opt, loader, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=fit_batch_size(ds_config, mpu), mpu=mpu, **kwargs
    )
    return engine, opt, loader, scheduler, attach(engine, config, comm_timeout=comm_timeout)


@contextlib.contextmanager
def replica_sharding(shard_size: int, comm_timeout: Optional[timedelta] = None) -> Iterator[None]:
    """Make every ``deepspeed.initialize`` inside the block shard ZeRO within a replica.

    For code that calls ``deepspeed.initialize`` itself (accelerate's ``prepare``, hence the HF
    Trainer): the call gets ``mpu=replica_mpu(shard_size)`` and a ``train_batch_size`` counted over
    the replica. Afterwards call :func:`attach` on the engine.
    """
    import deepspeed

    from .deepspeed_groups import fit_batch_size, replica_mpu

    original = deepspeed.initialize

    def initialize_in_replica(*args, **kw):
        if kw.get("mpu") is None:
            mpu = replica_mpu(shard_size, comm_timeout)
            kw["mpu"] = mpu
            for key in ("config", "config_params"):
                if isinstance(kw.get(key), dict):
                    kw[key] = fit_batch_size(kw[key], mpu)
            _check_not_zero_init_over_world(kw.get("model"), mpu)
        return original(*args, **kw)

    deepspeed.initialize = initialize_in_replica
    try:
        yield
    finally:
        deepspeed.initialize = original


def _check_not_zero_init_over_world(model, mpu) -> None:
    """ZeRO-3 models created under ``zero.Init`` are already partitioned, over whatever group it had."""
    if model is None or mpu.topology.num_replicas == 1:
        return
    for p in model.parameters():
        group = getattr(p, "ds_process_group", None)
        if group is not None and torch.distributed.get_world_size(group) != mpu.topology.shard_size:
            raise ValueError(
                f"the model's parameters were partitioned by deepspeed.zero.Init over {torch.distributed.get_world_size(group)} "
                f"ranks, but PALSGD shards each replica over {mpu.topology.shard_size}. Build the model before creating "
                "the TrainingArguments / HfDeepSpeedConfig (so zero.Init is not used), or pass "
                "data_parallel_group=replica_mpu(shard_size).get_data_parallel_group() to zero.Init."
            )
        return


def _check_deepspeed_version() -> None:
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


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
