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

Checkpoints: every replica is a ZeRO group whose files have the same names, and replicas differ
between syncs, so engines get a per-replica checkpoint layout carrying the PALSGD state too
(:mod:`.deepspeed_checkpoint`); ``engine.save_checkpoint`` / ``load_checkpoint`` are called as usual.

Entry points: :func:`initialize` (``deepspeed.initialize`` + :func:`attach`) for a raw DeepSpeed
loop; :func:`attach` + :func:`DeepSpeedStepOptimizer` for an engine that accelerate created inside
``deepspeed_groups.replica_sharding`` (the HF Trainer path). In the fault-tolerant mode
(palsgd_hf/fault_tolerance/session.py) each replica is its own world and one ZeRO group over all of it
(``peers_outside_world=True``): the session builds the adapter, and a rejoining rank takes over its own fp32
partitions and their inner optimizer state (:meth:`DeepSpeedAdapter.local_optimizer_state`).

DeepSpeed internals are version-specific: the supported range is checked on construction (:mod:`.deepspeed_checks`).
"""

from __future__ import annotations

import contextlib
import logging
from datetime import timedelta
from typing import Any, Iterator, Optional

import torch

from ..core.adapter import OwnedGroup
from ..core.comm import Communicator
from ..core.optimizer import PALSGDOptimizer
from . import deepspeed_checkpoint
from .deepspeed_checks import check_deepspeed_version, check_engine

logger = logging.getLogger(__name__)

class DeepSpeedAdapter:
    """The PALSGD adapter of one rank of a ZeRO 1/2/3 ``DeepSpeedEngine``.

    Args:
        engine: the engine ``deepspeed.initialize`` returned, built with the PALSGD mpu
            (``palsgd_hf.adapters.deepspeed_groups.replica_mpu``) when there is more than one replica.
        comm: communicator over this rank's peer group (the ranks owning the same partition in
            the other replicas). Collective: on a fresh engine the partitions are broadcast from
            replica 0, so every replica starts from the same model (as DDP does at construction).
        peers_outside_world: the peers are other replicas reached outside torch.distributed (the
            fault-tolerant mode: each replica is its own world and ZeRO shards over all of it). No
            broadcast then: the session's join gives every replica the same state.
    """

    # after_write gathers within the replica: a state loaded outside the step (a rejoin) rebuilds the weights
    # only where every rank of the replica calls it (palsgd_hf/fault_tolerance/session.py).
    after_write_is_collective = True

    def __init__(self, engine, comm: Communicator, *, peers_outside_world: bool = False):
        check_deepspeed_version()
        if type(engine).__name__ != "DeepSpeedEngine":
            raise TypeError(f"DeepSpeedAdapter needs a deepspeed.DeepSpeedEngine, got {type(engine).__name__}.")
        self.engine = engine
        self.zero = engine.optimizer
        self.stage = int(engine.zero_optimization_stage())
        self._peers_outside_world = peers_outside_world
        check_engine(engine, self.zero, self.stage, comm, peers_outside_world)
        self.algorithm = None
        self._stepped = False  # did the engine take a PALSGD step since the last finish_step()?
        self._broadcast_initial(comm)

    # ------------------------------------------------------------------ the adapter contract
    # The partitions are broadcast from replica 0 at construction (or restored, identical, from a checkpoint
    # written in warm-up) and warm-up averages over every rank: identical when the local phase starts.
    starts_identical = True

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

    @torch.no_grad()
    def reset_nonfinite_state(self) -> None:
        """Zero the non-finite entries of the inner optimizer's state for the partitions this rank owns.

        Called by the core after a sync was skipped for a non-finite pseudo-gradient: the owned
        partitions are back on the anchor, but a replica that diverged still has NaN/inf moments
        (Adam's exp_avg/exp_avg_sq), keyed by the very fp32 partitions of ``owned_groups``; its next
        step would turn them non-finite again and every later sync would be skipped too.
        """
        state = self.zero.optimizer.state
        for group in self.owned_groups():
            for tensor in group.tensors:
                for value in state.get(tensor, {}).values():
                    if torch.is_tensor(value) and value.is_floating_point():
                        torch.nan_to_num_(value, nan=0.0, posinf=0.0, neginf=0.0)

    def local_optimizer_state(self, inner: torch.optim.Optimizer) -> dict[str, Any]:
        """The inner optimizer's state of this rank's partitions (what a rejoining replica's rank takes over)."""
        with self._inner_params_listed():
            return inner.state_dict()

    def load_local_optimizer_state(self, inner: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        with self._inner_params_listed():
            inner.load_state_dict(state)

    @contextlib.contextmanager
    def _inner_params_listed(self) -> Iterator[None]:
        # ZeRO-3 lists a sub-group's fp32 partition in the inner optimizer's param_groups only while it steps
        # it, so the optimizer's state_dict cannot name the tensors its state is keyed by; list them all meanwhile
        # (as ZeRO-3's own checkpointing does).
        if self.stage != 3:
            yield
            return
        self.zero._set_fp32_optimizer_param_groups()
        try:
            yield
        finally:
            self.zero._clear_fp32_optimizer_param_groups()

    def set_gradient_sync(self, enabled: bool) -> None:
        """Nothing to switch: ZeRO reduces within the replica only; warm-up crosses replicas below."""

    @torch.no_grad()
    def warmup_gradient_sync(self, comm: Communicator) -> None:
        if comm.size == 1:
            return
        grads = self._reduced_gradients()
        # fp32 on the wire: the warm-up is short, and bf16 sums over many ranks lose bits.
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        comm.all_reduce_mean(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    # ------------------------------------------------------------------ binding to the engine
    def bind(self, algorithm) -> None:
        """Route ``engine.step()`` through ``algorithm``; checkpoints then carry its state (per replica)."""
        if self.algorithm is not None:
            raise RuntimeError("this DeepSpeed engine is already bound to a PALSGD algorithm; bind it once.")
        if algorithm.adapter is not self:
            raise ValueError("bind() needs the PALSGD algorithm built with this adapter.")
        self.algorithm = algorithm
        zero = self.zero
        original = zero.step  # the bound method of ZeRO's class

        def palsgd_step(closure=None):
            # Called by engine._take_model_step at an accumulation boundary; the engine then zeroes
            # gradients, steps its LR scheduler and counts the step, whatever kind it was.
            kind = algorithm.optimizer_step(lambda: original(closure))
            self._stepped = True
            if kind.value == "pseudo_sync":
                zero.overflow = False  # no inner step ran: nothing overflowed, let the LR schedule advance

        zero.step = palsgd_step  # instance attribute: shadows the class method for this engine only
        self.engine.palsgd = algorithm
        # Checkpoints: per-replica layout (installed at engine creation by replica_sharding, else now),
        # now including this algorithm's state; a state loaded before binding is applied here.
        checkpoints = deepspeed_checkpoint.install(self.engine, algorithm.replica_index)
        # The algorithm's index names the replica's files: an engine built in a fault-tolerant replica's own world
        # was installed as replica 0 of that world.
        checkpoints.replica_index = algorithm.replica_index
        checkpoints.attach(algorithm)

    def finish_step(self) -> None:
        """Once per optimizer step, after its compute (if any), in loops that step the engine inside
        ``backward`` (accelerate, the HF Trainer): on a pseudo-sync step no backward ran, so the
        engine did not step; run ``engine.step()`` at a boundary now. A no-op when it did step.
        """
        if self.algorithm is None:
            raise RuntimeError("call bind(algorithm) before stepping.")
        if not self._stepped:
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
        self._stepped = False

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
        checkpoints = getattr(self.engine, "palsgd_checkpoints", None)
        resumed = self.engine.global_steps > 0 or (checkpoints is not None and checkpoints.pending_state is not None)
        # A fresh start: make the replicas identical (as DDP does). Never after a checkpoint was loaded
        # (the HF Trainer loads before PALSGD attaches): between syncs the replicas' states differ.
        if comm.size > 1 and not resumed and not self._peers_outside_world:
            for group in self.owned_groups():
                for t in group.tensors:
                    comm.broadcast(t.data, 0)
        if comm.size > 1 or self.stage == 3:
            self.after_write()


# ---------------------------------------------------------------------- entry points
def attach(engine, config, *, comm_timeout: Optional[timedelta] = None):
    """PALSGD on an initialized ZeRO engine: build the algorithm, bind it, return it.

    The engine must have been built with ``mpu=replica_mpu(config.shard_size)`` (or, for a single
    replica, without an mpu); the same process groups feed PALSGD. Collective: every rank calls it.
    ``comm_timeout`` defaults to ``config.comm_timeout_seconds``.
    """
    if comm_timeout is None:
        comm_timeout = config.comm_timeout()
    from ..core.algorithm import PALSGD
    from ..core.comm import LocalCommunicator
    from .deepspeed_groups import ReplicaMPU, confine_zero3_consistency_checks, replica_mpu

    mpu = getattr(engine, "mpu", None)
    if not isinstance(mpu, ReplicaMPU):
        mpu = replica_mpu(config.shard_size, comm_timeout)
    if mpu.topology.shard_size != config.shard_size:
        raise ValueError(
            f"the engine's mpu shards over {mpu.topology.shard_size} ranks but config.shard_size={config.shard_size}; "
            "build the engine with mpu=replica_mpu(config.shard_size)."
        )
    if engine.zero_optimization_stage() == 3:
        confine_zero3_consistency_checks(mpu)  # already done when the engine came from replica_sharding
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

    from .deepspeed_groups import replica_sharding

    if comm_timeout is None:
        comm_timeout = config.comm_timeout()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed()
    with replica_sharding(config.shard_size, comm_timeout):
        engine, opt, loader, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config, **kwargs
        )
    return engine, opt, loader, scheduler, attach(engine, config, comm_timeout=comm_timeout)


def DeepSpeedStepOptimizer(optimizer, algorithm) -> PALSGDOptimizer:  # noqa: N802 (the former class's name)
    """The optimizer a loop steps once per optimizer step when the engine steps inside ``backward``.

    accelerate (hence the HF Trainer) runs ``engine.step()`` inside ``accelerator.backward`` and
    makes the optimizer's ``step()`` a no-op. Then a pseudo-sync step, which has no backward, would
    never step; this optimizer's ``step()`` takes it (:meth:`DeepSpeedAdapter.finish_step`). Not for
    loops that call ``engine.step()`` themselves. Kept for callers of the former class: it is
    ``PALSGDOptimizer(optimizer, algorithm, engine_steps=True)``.
    """
    return PALSGDOptimizer(optimizer, algorithm, engine_steps=True)
