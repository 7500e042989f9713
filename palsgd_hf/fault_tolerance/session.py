"""One replica's place in a fault-tolerant PALSGD run: its torchft Manager, its PALSGD, its (re)join.

    session = FaultTolerantSession(FaultToleranceConfig(lighthouse=..., replica_id=r, replicas=3))
    optimizer = session.wrap_optimizer(model, torch.optim.AdamW(model.parameters()), PALSGDConfig(...))
    session.join()                                  # first quorum: same start, or a live peer's state
    while optimizer.algorithm.step < total_steps:   # the step may jump forward when this replica rejoins
        batch = batch_for(optimizer.algorithm.step)
        if optimizer.algorithm.step_kind() is not StepKind.PSEUDO_SYNC:
            model(batch).loss.backward()
        optimizer.step(); optimizer.zero_grad()
    optimizer.algorithm.finalize(); session.shutdown()

Each replica is its own process with its own ``torch.distributed`` world (or none); the replicas meet
only in PALSGD's exchanges, which go through :class:`~.communicator.ManagedCommunicator`. The
session starts this replica's TCP store (torchft's reconfigurable gloo group rendezvous there) and a
``Manager`` with a synchronous quorum, and hands it :class:`~.transfer.StateTransfer`'s state fns.

:meth:`FaultTolerantSession.join` runs one quorum before the first step. At a fresh start every
replica takes one replica's state (torchft's ``init_sync``; with S ranks, chosen per rank), so all start
identical; a barrier over the quorum keeps a serving replica from committing before its state was fetched. A replica
(re)started while the others train waits there for their next exchange, takes a live peer's state
and resumes at the peer's point: inside a sync it runs that sync with a zero contribution (its
anchor then equals the others' bit for bit); inside a warm-up step it continues that step.

A replica may be one process, or S ranks of its own ``torch.distributed`` world (its own torchrun) that
shard the model with FSDP2 (``fully_shard(module, mesh=shard_mesh(S))``, ``shard_size=S``). Each rank then
runs a ``Manager`` with ``rank=r, world_size=S`` and the replica's id: torchft's managed group of rank r
holds rank r of every replica in the quorum (PALSGD's peers: same shard, every replica), a rejoining rank
takes its shard's state from the same rank of a live replica, and the commit vote covers the whole replica.
A warm-up step (and every step of ``method='ddp'``) averages the gradient shards in one managed exchange at the
step boundary, after backward (``FSDPAdapter(mean_in_backward=False)``), not inside FSDP's backward: a replica
that rejoins then takes a peer's state (identical on every replica during warm-up), runs its own backward and
meets the others in that exchange, as a one-process replica does.

A replica of S ranks may instead be one DeepSpeed ZeRO-1/2/3 engine over its whole world (``deepspeed.initialize``
without an mpu, ``shard_size=S``); ``build_algorithm(engine, engine.optimizer, config)`` binds PALSGD to it and the
loop calls ``engine.step()`` on every step, skipping forward/backward on a pseudo-sync step, as without fault
tolerance. A warm-up step's mean is one managed exchange inside ``engine.step()``, after ZeRO's reduction within the
replica (before any backward of the next step): a rejoining replica meets the others there as with FSDP2. Rank r
exchanges and takes over its own fp32 partitions and their inner optimizer state; the engine's step and sample
counts come along; after a rejoin every rank of the replica rebuilds its 16-bit weights together.

Supported: a plain module (one process), FSDP2 or DeepSpeed ZeRO (S ranks), blocking fp32 exchanges at a fixed
interval (the settings that need other collectives are refused before any work, naming the fix).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed import ReduceOp

from ..adapters.fsdp import FSDPAdapter, is_fsdp2
from ..adapters.module import ModuleAdapter
from ..config import PALSGDConfig, PALSGDConfigError
from ..core.algorithm import PALSGD
from ..core.comm import Communicator, LocalCommunicator
from ..core.optimizer import PALSGDOptimizer
from .communicator import ManagedCommunicator
from .settings import FaultToleranceConfig
from .transfer import StateTransfer

logger = logging.getLogger(__name__)


class _IdenticalStart:
    """The replica's adapter, declared to start identical: join() gives every replica the first one's
    weights, so the local phase needs no broadcast (a collective the managed group does not carry)."""

    starts_identical = True

    def __init__(self, inner: ModuleAdapter):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class FaultTolerantSession:
    """This replica's torchft Manager and the PALSGD it drives (see the module docstring)."""

    def __init__(self, settings: FaultToleranceConfig):
        try:
            from torchft import Manager, ProcessGroupGloo
        except ImportError as e:  # the optional extra
            raise ImportError("the fault-tolerant mode needs torchft: pip install 'palsgd_hf[ft]'") from e
        self.settings = settings
        # A replica of S ranks is its own torch.distributed world (its own torchrun): rank r of it is shard r.
        self.group_rank, self.group_size = _replica_world()
        # The store torchft's gloo groups rendezvous in when this replica hosts a quorum, and where the
        # replica's ranks find their manager server: rank 0 starts it on a free port and tells the others.
        self._store, store_host, store_port = _replica_store(settings.hostname, self.group_rank, self.group_size)
        self.manager = Manager(
            pg=ProcessGroupGloo(timeout=settings.timeout),
            load_state_dict=self._restore,
            state_dict=self._capture,
            min_replica_size=settings.min_replicas,
            use_async_quorum=False,  # a quorum (and a state transfer) completes before the exchange it serves
            timeout=settings.timeout,
            quorum_timeout=settings.quorum_timeout,
            connect_timeout=settings.timeout,
            rank=self.group_rank,  # torchft pairs rank r of every replica in the quorum: PALSGD's peers
            world_size=self.group_size,
            store_addr=store_host,
            store_port=store_port,
            lighthouse_addr=settings.lighthouse,
            replica_id=f"palsgd_{settings.replica_id}",
            hostname=settings.hostname,
            init_sync=True,  # a fresh start takes the first replica's state: identical replicas
            checkpoint_transport=_http_transport(settings),
        )
        self.comm = ManagedCommunicator(self.manager, settings)
        self.transfer: Optional[StateTransfer] = None
        self.algorithm: Optional[PALSGD] = None
        self._gradient_steps_at_sync = 0
        self._closed = False

    # ------------------------------------------------------------------ building
    def wrap_optimizer(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        config: PALSGDConfig,
        extra_state: Optional[dict[str, Any]] = None,
    ) -> PALSGDOptimizer:
        """``optimizer`` wrapped so that each ``step()`` is a PALSGD step whose exchanges are managed.

        ``extra_state``: name -> object with ``state_dict()``/``load_state_dict()`` (an LR scheduler, a
        sampler) that a rejoining replica takes from its peer along with the PALSGD state.
        """
        return PALSGDOptimizer(optimizer, self.build_algorithm(model, optimizer, config, extra_state))

    def build_algorithm(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        config: PALSGDConfig,
        extra_state: Optional[dict[str, Any]] = None,
    ) -> PALSGD:
        """The PALSGD of this replica, its exchanges managed (for integrations that wrap the optimizer themselves)."""
        if self.algorithm is not None:
            raise RuntimeError("this FaultTolerantSession already drives a PALSGD; use one session per model.")
        _check_supported(model, config, self.group_size)
        deepspeed = _is_deepspeed(model)
        if deepspeed:
            # ZeRO over the replica's whole world; PALSGD acts on this rank's fp32 partitions and the inner optimizer
            # of them is the one whose state travels on a rejoin. The engine steps PALSGD (bind below): a warm-up
            # step's mean is one managed exchange in engine.step(), after ZeRO's reduction within the replica.
            from ..adapters.deepspeed import DeepSpeedAdapter

            adapter = DeepSpeedAdapter(model, self.comm, peers_outside_world=True)
            optimizer = model.optimizer.optimizer
        elif self.group_size > 1:
            # FSDP2 over the replica's own world: shard r exchanges with shard r of the other replicas (torchft's
            # group of rank r). No broadcast: join() gives every rank the state of the same rank of the first
            # replica. Warm-up means at the step boundary, where a restarted replica can meet the others (inside
            # backward it could not).
            adapter = FSDPAdapter(model, optimizer, self.comm, config.shard_size, broadcast=False,
                                  mean_in_backward=False)
        else:
            adapter = ModuleAdapter(model, optimizer, None)
        # The replica's ranks agree on a skipped sync over their world.
        replica = Communicator(None, self.settings.timeout) if self.group_size > 1 else LocalCommunicator()
        self.algorithm = PALSGD(
            config, adapter if deepspeed else _IdenticalStart(adapter), peers=self.comm, replica=replica,
            replica_index=self.settings.replica_id,
            anchor_device=torch.device("cpu") if config.anchor_device == "cpu" else None,
        )
        if deepspeed:
            adapter.bind(self.algorithm)
            extra_state = {"deepspeed_engine": _EngineCounters(model), **(extra_state or {})}
        self.transfer = StateTransfer(self.algorithm, optimizer, self.comm, self.settings.replica_id)
        for key, obj in (extra_state or {}).items():
            self.transfer.register(key, obj.state_dict, obj.load_state_dict)
        self.comm.position_of = lambda call, numel: (call, numel, self.transfer.phase())
        self.comm.exchange_weight = self._exchange_weight
        self.comm.on_commit = self._on_commit
        return self.algorithm

    def _exchange_weight(self) -> float:
        return float(self.algorithm.counters["gradient_steps"] - self._gradient_steps_at_sync)

    def _on_commit(self, call: str) -> None:
        if call == "exchange":
            self._gradient_steps_at_sync = self.algorithm.counters["gradient_steps"]

    def _capture(self) -> dict:
        return self._require_built().capture()

    def _restore(self, state: dict) -> None:
        self._require_built().restore(state)
        self._gradient_steps_at_sync = self.algorithm.counters["gradient_steps"]

    def _require_built(self) -> StateTransfer:
        if self.transfer is None:
            raise RuntimeError("call FaultTolerantSession.wrap_optimizer(...) before join(): the replica has no state")
        return self.transfer

    # ------------------------------------------------------------------ joining
    def join(self) -> None:
        """The first quorum of this replica (collective with the others' next exchange; see the module docstring)."""
        self._require_built()
        for attempt in range(1, self.settings.max_attempts + 1):
            self.comm.position = ("join", 0, "join")
            self.comm.start_quorum()
            peer = self.comm.healed_at
            # The ranks of a replica take one branch: a transfer that failed on one of them fails the replica's join.
            if self._replica_all(self.manager.errored() is None) and peer is not None and peer[0] != "join":
                # The others are inside an exchange and wait for us in it: resume at their point.
                self.comm.quorum_ready = True
                self._agree_counters()
                logger.info("replica %d rejoins at step %d (the others are at %s)",
                            self.settings.replica_id, self.algorithm.step, tuple(peer))
                self._rebuild_weights()
                if peer[2] == "sync":
                    self.algorithm.sync()  # its first exchange uses this quorum, with a zero contribution
                return
            self.comm.healed_at = None
            # A barrier over the quorum (torchft's group): a replica serving its state stops serving when it commits,
            # so it must not commit before the replicas it serves have fetched the state, which they have once here.
            self.manager.allreduce(torch.zeros(1), reduce_op=ReduceOp.SUM).wait()
            if self.manager.should_commit():
                self._rebuild_weights()
                self.comm.participants = self.manager.num_participants()
                logger.info("replica %d joined a quorum of %d replicas at step %d", self.settings.replica_id,
                            self.comm.participants, self.algorithm.step)
                return
            self.comm.failed_attempts += 1
            logger.warning("replica %d: join attempt %d failed (%s); retrying", self.settings.replica_id, attempt,
                           self.manager.errored())
        raise RuntimeError(
            f"replica {self.settings.replica_id} could not join in {self.settings.max_attempts} quorums; see the "
            "torchft errors above (the peer serving the state died, or the lighthouse is unreachable)."
        )

    def _replica_all(self, ok: bool) -> bool:
        """``ok`` on every rank of this replica (its own world; no collective for a one-process replica)."""
        if self.group_size == 1:
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _rebuild_weights(self) -> None:
        """After a state was restored on this replica's ranks, rebuild the weights they compute with, on all of them
        (DeepSpeed gathers them within the replica; torchft's quorum restores one rank at a time)."""
        # Stale on any rank (every rank of the replica takes this branch, so the reduction always pairs up).
        if not self._replica_all(not self.transfer.weights_stale):
            self.algorithm.adapter.after_write()
        self.transfer.weights_stale = False

    def _agree_counters(self) -> None:
        # torchft serves each rank of a rejoining replica from a live replica of its own choice, so with per-replica
        # coins the ranks may have taken different replicas' step counts: the replica reports rank 0's.
        if self.group_size > 1:
            counters = [self.algorithm.counters]
            dist.broadcast_object_list(counters, src=0)
            self.algorithm.counters.update(counters[0])
            self._gradient_steps_at_sync = self.algorithm.counters["gradient_steps"]

    # ------------------------------------------------------------------ reporting, ending
    def metrics(self) -> dict[str, float]:
        """ft/* values: replicas in the last exchange, state transfers, retried exchanges, torchft's step."""
        return {
            "participants": float(self.comm.participants),
            "rejoins": float(self.transfer.received if self.transfer else 0),
            "states_served": float(self.transfer.served if self.transfer else 0),
            "failed_attempts": float(self.comm.failed_attempts),
            "managed_steps": float(self.manager.current_step()),
        }

    def shutdown(self) -> None:
        """Stop this replica's manager server and state transport (idempotent)."""
        if not self._closed:
            self._closed = True
            self.manager.shutdown(wait=False)


class _EngineCounters:
    """A DeepSpeed engine's step and sample counts, which a rejoining replica takes from its peer (not its micro-step
    count: that places the accumulation boundary within the replica's own step)."""

    def __init__(self, engine):
        self.engine = engine

    def state_dict(self) -> dict:
        return {"global_steps": self.engine.global_steps, "global_samples": self.engine.global_samples}

    def load_state_dict(self, state: dict) -> None:
        self.engine.global_steps, self.engine.global_samples = state["global_steps"], state["global_samples"]


def _is_deepspeed(model) -> bool:
    return type(model).__name__ == "DeepSpeedEngine"


def _http_transport(settings: FaultToleranceConfig):
    """torchft's HTTP checkpoint transport, advertised under ``settings.hostname`` (torchft 0.2.0 advertises
    ``socket.gethostname()``, which need not resolve to an address the other replicas reach)."""
    from torchft.checkpointing import HTTPTransport

    class _Transport(HTTPTransport):
        def address(self) -> str:
            return f"http://{settings.hostname}:{self._server.socket.getsockname()[1]}/checkpoint/"

    return _Transport(timeout=settings.timeout, num_chunks=0)


def _replica_world() -> tuple[int, int]:
    """(rank, ranks) of this replica's own torch.distributed world; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _replica_store(hostname: str, rank: int, size: int):
    """The replica's store: rank 0 hosts it on a free port; its (host, port) reach the other ranks by broadcast
    over the replica's world (torchft's managers of one replica must share one store)."""
    store = dist.TCPStore(hostname, 0, is_master=True, wait_for_workers=False) if rank == 0 else None
    where = [hostname, store.port] if store is not None else [None, None]
    if size > 1:
        dist.broadcast_object_list(where, src=0)
    return store, where[0], int(where[1])


def _check_supported(model: torch.nn.Module, config: PALSGDConfig, replica_ranks: int = 1,
                     deepspeed: Optional[bool] = None) -> None:
    """Refuse, before any work, the settings whose collectives the managed exchange does not carry.
    ``deepspeed``: the model will be (or is) a ZeRO engine over the replica's world (default: it is one now)."""
    refused = {
        "overlap_steps": (config.overlap_steps != 0, "0 (blocking syncs)"),
        "comm_dtype": (config.comm_dtype != "fp32", "'fp32'"),
        "sync_policy": (config.sync_policy != "fixed", "'fixed'"),
        "replica_metrics": (bool(config.replica_metrics), "False"),
        "shard_size": (config.shard_size != replica_ranks,
                       f"{replica_ranks} (the ranks of this replica's torch.distributed world)"),
        "fragments": (getattr(config, "fragments", 1) != 1, "1"),
    }
    for name, (bad, fix) in refused.items():
        if bad:
            raise PALSGDConfigError(
                f"{name}={getattr(config, name)!r} is not supported by the fault-tolerant mode (each exchange is one "
                f"managed fp32 all-reduce per shard); use {name}={fix}, or run without fault tolerance."
            )
    if type(model).__name__ == "DistributedDataParallel":
        raise PALSGDConfigError(
            "the fault-tolerant mode got a DistributedDataParallel; a replica of one rank takes the plain module, a "
            "replica of several ranks an FSDP2 model (fully_shard over shard_mesh(S)) or a DeepSpeed ZeRO engine: "
            "pass the module itself."
        )
    if replica_ranks > 1 and not (_is_deepspeed(model) if deepspeed is None else deepspeed):
        _check_sharded_replica(model, replica_ranks)


def _check_sharded_replica(model: torch.nn.Module, replica_ranks: int) -> None:
    # Warm-up (and method='ddp') is supported: its gradient mean is one managed exchange at the step boundary.
    if not is_fsdp2(model):
        raise PALSGDConfigError(
            f"this replica's torch.distributed world has {replica_ranks} ranks but the model is neither sharded with "
            "FSDP2 nor a DeepSpeed ZeRO engine; the fault-tolerant mode shards a replica with fully_shard(module, "
            "mesh=shard_mesh(S)) or ZeRO over the replica's world (DDP inside a replica: not supported). Shard it so, "
            "or launch each replica as one process."
        )
