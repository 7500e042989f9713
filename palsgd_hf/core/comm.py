"""The narrow communication protocol the PALSGD core talks through, with byte/time accounting.

The core never calls ``torch.distributed`` directly: it holds a :class:`Communicator` bound to
one process group (the ranks PALSGD averages over) and asks it for a handful of collectives.
Every call is counted: ``bytes_sent`` is the payload (tensor bytes) this rank contributed to a
collective, ``seconds_blocked`` the wall time this rank spent waiting for one, and
``seconds_overlapped`` the time a collective was in flight while this rank kept working (an
overlapped outer sync). Traffic the core does not issue itself (DDP's gradient buckets during
warm-up) is added with :meth:`record`.

The pseudo-gradient average goes through :class:`MeanExchange` (see there): one all-reduce in
fp32, or, with bf16 on the wire, an all-to-all plus an all-gather that accumulate in fp32; int8 and
int4 (with error feedback) take the same two phases (:mod:`~palsgd_hf.core.quantized`).

:class:`LocalCommunicator` is the single-process stand-in (one worker, every collective a no-op),
used for runs without ``torch.distributed`` and in unit tests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from .collective_guard import palsgd_issuing
from .exchange import MeanExchange, PendingReduce
from .quantized import KINDS as QUANTIZED, ErrorFeedback, QuantizedMeanExchange


@dataclass
class CommStats:
    """Counters of one communicator; they only grow and are part of the checkpoint."""

    calls: int = 0
    bytes_sent: int = 0
    seconds_blocked: float = 0.0
    seconds_overlapped: float = 0.0

    def state_dict(self) -> dict:
        return {
            "calls": self.calls, "bytes_sent": self.bytes_sent, "seconds_blocked": self.seconds_blocked,
            "seconds_overlapped": self.seconds_overlapped,
        }

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])
        self.bytes_sent = int(state["bytes_sent"])
        self.seconds_blocked = float(state["seconds_blocked"])
        self.seconds_overlapped = float(state.get("seconds_overlapped", 0.0))  # absent before overlap existed


# comm_dtype -> what MeanExchange puts on the wire: a float dtype (None: the tensor's own), or a quantizer.
WIRE_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "int8": "int8", "int4": "int4"}


def exchange_from_state(comm: "Communicator", state: dict, device: torch.device,
                        feedback: Optional[ErrorFeedback] = None):
    """An exchange saved by ``state_dict()`` (any wire), ready to continue where it stopped."""
    if state["wire"] in QUANTIZED:
        return QuantizedMeanExchange.from_state(comm, state, device, feedback)
    return MeanExchange.from_state(comm, state, device)


class Communicator:
    """Collectives over one ``torch.distributed`` process group (``None`` = the default group)."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None, timeout: Optional[timedelta] = None):
        self.group = group
        self.timeout = timeout
        self.stats = CommStats()
        self._device: Optional[torch.device] = None
        self._device_known = False

    @property
    def device(self) -> Optional[torch.device]:
        """The device the backend needs tensors on: CUDA for NCCL, None (any) for gloo."""
        if not self._device_known:
            initialized = dist.is_available() and dist.is_initialized()
            self._device = collective_device(dist.get_backend(self.group)) if initialized else None
            self._device_known = True
        return self._device

    def placed(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` itself, or a copy on :attr:`device` (NCCL serves CUDA tensors only)."""
        device = self.device
        if device is None or tensor.device == device:
            return tensor
        return tensor.to(device)

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def record(self, nbytes: int, seconds: float = 0.0) -> None:
        """Count traffic issued outside this object (e.g. DDP's gradient buckets)."""
        self.stats.calls += 1
        self.stats.bytes_sent += int(nbytes)
        self.stats.seconds_blocked += seconds

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average ``tensor`` in place over the group, blocking."""
        return self.all_reduce_mean_async(tensor).wait()

    def all_reduce_mean_async(self, tensor: torch.Tensor) -> PendingReduce:
        """Start averaging ``tensor`` in place; the returned handle's ``wait()`` finishes it."""
        size = self.size
        if size == 1:
            return PendingReduce(self, tensor, None, 1)
        self.record(tensor.numel() * tensor.element_size())
        tensor = self.placed(tensor)  # the handle returns the reduced tensor on the wire's device
        # Gloo has no AVG op, so every backend sums and the handle divides: one code path.
        with palsgd_issuing():
            work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        return PendingReduce(self, tensor, work, size)

    def mean_exchange_async(self, flat: torch.Tensor, wire=None, feedback: Optional[ErrorFeedback] = None):
        """Start averaging ``flat`` over the group, with ``wire`` (a value of :data:`WIRE_DTYPES`) on the wire;
        ``feedback`` carries the int8/int4 quantization residuals of this rank from one exchange to the next."""
        if isinstance(wire, str):
            if self.size == 1:  # nobody to send to: the exact mean (the tensor itself), no quantization noise
                return MeanExchange.launch(self, flat, None)
            return QuantizedMeanExchange.launch(self, flat, wire, feedback)
        return MeanExchange.launch(self, flat, wire)

    # The two halves of an all-reduce, for the bf16 exchange; the caller books their bytes.
    def all_to_all_async(self, output: torch.Tensor, input: torch.Tensor):
        """Equal chunks: chunk j of rank i's ``input`` lands in chunk i of rank j's ``output``."""
        if self.size == 1:
            output.copy_(input)
            return None
        _check_placed(self, output, input)
        with palsgd_issuing():
            return dist.all_to_all_single(output, input, group=self.group, async_op=True)

    def all_gather_async(self, output: torch.Tensor, input: torch.Tensor):
        """Rank i's ``input`` lands in chunk i of every rank's ``output``."""
        if self.size == 1:
            output.copy_(input)
            return None
        # Newer torch calls all_gather_into_tensor all_gather_single (and warns on the old name).
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        _check_placed(self, output, input)
        with palsgd_issuing():
            return gather(output, input, group=self.group, async_op=True)

    def all_gather_small(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` (a few values), stacked in group-rank order; blocking."""
        if self.size == 1:
            return tensor.unsqueeze(0).clone()
        out = torch.empty(self.size * tensor.numel(), dtype=tensor.dtype, device=self.device or tensor.device)
        self.record(tensor.numel() * tensor.element_size())
        start = time.perf_counter()
        work = self.all_gather_async(out, self.placed(tensor))
        if work is not None:
            work.wait()
        self.stats.seconds_blocked += time.perf_counter() - start
        return out.view(self.size, -1).to(tensor.device)

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise max over the group, blocking (used for small flags)."""
        if self.size > 1:
            self.record(tensor.numel() * tensor.element_size())
            start = time.perf_counter()
            self._in_place(tensor, lambda wire: dist.all_reduce(wire, op=dist.ReduceOp.MAX, group=self.group))
            self.stats.seconds_blocked += time.perf_counter() - start
        return tensor

    def broadcast(self, tensor: torch.Tensor, src_group_rank: int = 0) -> torch.Tensor:
        """Copy ``tensor`` from the group's rank ``src_group_rank`` to every member."""
        if self.size > 1:
            if self.rank == src_group_rank:
                self.record(tensor.numel() * tensor.element_size())
            start = time.perf_counter()
            src = dist.get_global_rank(self.group, src_group_rank) if self.group is not None else src_group_rank
            self._in_place(tensor, lambda wire: dist.broadcast(wire, src=src, group=self.group))
            self.stats.seconds_blocked += time.perf_counter() - start
        return tensor

    def _in_place(self, tensor: torch.Tensor, collective) -> None:
        """Run an in-place ``collective`` on ``tensor`` where the backend needs it, and copy back if moved."""
        wire = self.placed(tensor)
        with palsgd_issuing():
            collective(wire)
        if wire is not tensor:
            tensor.copy_(wire)

    def barrier(self) -> None:
        if self.size > 1:
            with palsgd_issuing():
                dist.barrier(group=self.group)


def collective_device(backend: str) -> Optional[torch.device]:
    """Where a backend needs the tensors of a collective: NCCL (and a NCCL+gloo pair, which picks
    by device) on the current CUDA device, gloo anywhere (CPU, or CUDA through a host copy)."""
    if "nccl" in str(backend).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return None


def _check_placed(comm: Communicator, *tensors: torch.Tensor) -> None:
    device = comm.device
    if device is not None and any(t.device != device for t in tensors):
        raise RuntimeError(
            f"PALSGD internal error: a collective got tensors on {[str(t.device) for t in tensors]} but the "
            f"{dist.get_backend(comm.group)} backend needs {device}; please report it."
        )


class LocalCommunicator(Communicator):
    """One worker alone: every collective returns its input; the accounting still runs."""

    def __init__(self):
        super().__init__(group=None)
        self._device_known = True  # no backend: no collective ever runs

    @property
    def size(self) -> int:
        return 1

    @property
    def rank(self) -> int:
        return 0
