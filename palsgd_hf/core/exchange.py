"""Averaging one flat tensor over a group, launched now and finished later: the pseudo-gradient exchange.

:class:`PendingReduce` is one all-reduce in flight; :class:`MeanExchange` the mean of a flat tensor
in fp32 (one all-reduce) or bf16 (two phases, see there); int8/int4 subclass it
(:mod:`~palsgd_hf.core.quantized`). :class:`~palsgd_hf.core.comm.Communicator` launches them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from .in_flight import InFlight as _InFlight

if TYPE_CHECKING:
    from .comm import Communicator


class PendingReduce:
    """An all-reduce in flight: :meth:`wait` blocks until the averaged tensor is ready."""

    def __init__(self, comm: "Communicator", tensor: torch.Tensor, work, size: int):
        self._flight, self._size = _InFlight(comm, work), size
        self.tensor = tensor
        self.launched_at = self._flight.launched_at
        self.seconds_blocked = 0.0

    def is_completed(self) -> bool:
        return self._flight.work is None or self._flight.work.is_completed()

    def wait(self) -> torch.Tensor:
        if self._flight.work is not None:
            self.seconds_blocked += self._flight.wait()
            if self._size > 1:
                self.tensor.div_(self._size)
        return self.tensor


class MeanExchange:
    """The mean over the group of one flat tensor (a pseudo-gradient), launched now, finished later.

    * fp32 wire (``wire=None``): one all-reduce (sum) of the tensor itself, divided by n.
    * bf16 wire: ``mean = bf16( (sum_k fp32(bf16(x_k))) / n )``, the sum accumulated in the tensor's
      own dtype (fp32; fp64 stays fp64) in rank order, through the two halves of a ring all-reduce:

      1. *scatter* (all-to-all): the bf16 buffer, zero-padded to n equal chunks, is cut so that
         rank i receives chunk i of every rank, sums them in fp32 and divides by n;
      2. *gather* (all-gather): each rank's mean chunk, rounded to bf16, goes to every rank.

      Each input is rounded once and the mean once. A plain bf16 all-reduce would round after
      every addition along the ring (n - 1 roundings, in an order the backend picks). Bytes: each
      phase moves (n-1)/n of the bf16 buffer per rank, 2(n-1)/n in all, exactly half of a ring
      all-reduce in fp32 (an all-gather of whole bf16 buffers instead would move n-1 buffers per
      rank, n/4 of fp32's traffic: worse from 5 workers on). The price is a second collective
      launch (one more latency term) and, when overlapped, a point at which phase 2 is started.

    ``comm_bytes`` books the payload of the equivalent all-reduce (N x element size, as for every
    all-reduce; half of it per bf16 phase), so bf16 shows exactly half of fp32 for the same model
    up to the padding (fewer than n elements).

    Phase 2 is started only from :meth:`advance` (or :meth:`wait`), which callers reach at the same
    point of the program on every rank: never from a background thread, so every rank issues its
    collectives on the group in the same order (gloo and NCCL pair them by order). :meth:`drain`
    waits for what is in flight without starting anything, which makes :meth:`state_dict` safe to
    call on any subset of ranks.
    """

    def __init__(self, comm: "Communicator", numel: int, dtype: torch.dtype, wire: Optional[torch.dtype]):
        self.comm, self.numel, self.dtype, self.wire = comm, numel, dtype, wire
        self.phase = "reduce" if wire is None else "scatter"
        self.seconds_blocked = 0.0
        self._buffer: Optional[torch.Tensor] = None
        self._pending: Optional[PendingReduce] = None  # fp32 wire
        self._flight: Optional[_InFlight] = None  # bf16 wire, the phase in flight
        self._send: Optional[torch.Tensor] = None

    # ---------------------------------------------------------------- lifecycle
    @classmethod
    def launch(cls, comm: "Communicator", flat: torch.Tensor, wire: Optional[torch.dtype] = None) -> "MeanExchange":
        """Start averaging ``flat`` (consumed: the fp32 path reduces it in place)."""
        ex = cls(comm, flat.numel(), flat.dtype, wire)
        if wire is None:
            ex._pending = comm.all_reduce_mean_async(flat)
            return ex
        n = comm.size
        chunk = -(-flat.numel() // n)
        send = torch.zeros(chunk * n, dtype=wire, device=comm.device or flat.device)
        send[: flat.numel()].copy_(flat)
        ex._buffer = torch.empty_like(send)
        if n > 1:
            comm.record(chunk * n * send.element_size() // 2)
        ex._send = send  # alive until the scatter finished (NCCL reads it on its own stream)
        ex._flight = _InFlight(comm, comm.all_to_all_async(ex._buffer, send))
        return ex

    def advance(self) -> None:
        """bf16: finish the scatter, sum in fp32 and start the gather. A no-op in any other phase.

        Collective (it launches the all-gather): every rank of the group must call it at the same
        point of its program.
        """
        if self.phase != "scatter":
            return
        self._wait_flight()
        self._send = None
        n = self.comm.size
        rows = self._buffer.view(n, -1)
        total = rows[0].to(self.dtype)
        for row in rows[1:]:  # rank order, so that a reference can reproduce the sum exactly
            total.add_(row.to(self.dtype))
        mine = total.div_(n).to(self.wire)
        self._buffer = torch.empty(rows.numel(), dtype=self.wire, device=mine.device)
        if n > 1:
            self.comm.record(rows.numel() * mine.element_size() // 2)
        self._flight = _InFlight(self.comm, self.comm.all_gather_async(self._buffer, mine))
        self.phase = "gather"

    def wait(self) -> torch.Tensor:
        """The mean, flat, in the input's dtype (blocks for what is still in flight)."""
        self.advance()
        self.drain()
        if self.phase == "gather":
            self._buffer = self._buffer[: self.numel].to(self.dtype)
        self.phase = "done"
        return self._buffer

    def drain(self) -> None:
        """Wait for the collective in flight, if any; launch nothing."""
        if self._pending is not None:
            self._buffer = self._pending.wait()
            self.seconds_blocked += self._pending.seconds_blocked
            self._pending = None
        self._wait_flight()

    def _wait_flight(self) -> None:
        if self._flight is not None:
            self.seconds_blocked += self._flight.wait()
            self._flight = None

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        """Drain, then the buffer of the current phase (resuming continues at the same phase)."""
        self.drain()
        return {
            "wire": None if self.wire is None else str(self.wire).replace("torch.", ""),
            "dtype": str(self.dtype).replace("torch.", ""),
            "numel": self.numel,
            "phase": self.phase,
            "buffer": self._buffer.detach().cpu().clone(),
        }

    @classmethod
    def from_state(cls, comm: "Communicator", state: dict, device: torch.device) -> "MeanExchange":
        wire = None if state["wire"] is None else getattr(torch, state["wire"])
        ex = cls(comm, int(state["numel"]), getattr(torch, state["dtype"]), wire)
        ex.phase = state["phase"]
        ex._buffer = state["buffer"].to(device)
        if ex.phase == "scatter" and ex._buffer.numel() % comm.size != 0:
            raise ValueError(
                f"the checkpoint holds a bf16 pseudo-gradient exchange cut for another number of workers "
                f"({ex._buffer.numel()} elements do not split over {comm.size}); resume with the same number "
                "of processes and shard layout."
            )
        return ex
