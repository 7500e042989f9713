"""8-bit and 4-bit pseudo-gradients on the wire, with error feedback (``comm_dtype='int8' | 'int4'``).

Quantization: the flat tensor is cut into blocks of :data:`QBLOCK` elements; each block is sent as
integers q = round(x / s) in [-Q, Q] (Q = 127 for int8, 7 for int4; two int4 values per byte) with
one fp32 scale s = max|x| / Q per block. A block of zeros gets s = 0 and q = 0. Bytes per element:
1 + 4/256 (int8) and 1/2 + 4/256 (int4), i.e. 0.254 and 0.129 of fp32.

The exchange is the two halves of a ring all-reduce, as for bf16 (:class:`~palsgd_hf.core.comm.MeanExchange`):

1. *scatter* (all-to-all): each rank quantizes its whole (padded) buffer; rank i receives chunk i
   of every rank, dequantizes them, sums them in the input's dtype in rank order and divides by n;
2. *gather* (all-gather): each rank quantizes its mean chunk; every rank dequantizes all of them.

Every rank dequantizes the same bytes, so every replica applies the same mean, bit for bit.

Error feedback (:class:`ErrorFeedback`, one per rank, checkpointed by the algorithm): what a rank's
quantization dropped is added to what it sends next time: ``sent`` = x + r - dq(q(x + r)) for the
rank's own pseudo-gradient (phase 1), ``owned`` likewise for the mean chunk it owns (phase 2). The
applied means then telescope: after k syncs the sum of the applied means differs from the sum of the
exact means by the last residuals alone (mean over ranks of ``sent`` plus ``owned``), not by k
accumulated quantization errors (tests/unit/test_quantized_exchange.py checks this in float64).

One message per chunk carries its integers and then its scales, so each phase is one collective.

Memory: the residual of what a rank sends is one more copy of its owned tensors (in their dtype),
kept between syncs; during a sync, the padded buffer and the messages add one more copy and ~1/4
(int8) of one. With a single worker nothing is quantized (the mean is the tensor itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from .exchange import MeanExchange
from .in_flight import InFlight

if TYPE_CHECKING:
    from .comm import Communicator

QBLOCK = 256  # elements per scale
QMAX = {"int8": 127, "int4": 7}
KINDS = tuple(QMAX)


def quantize(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(integers as uint8 bytes, fp32 scales) of ``x`` (numel a multiple of QBLOCK)."""
    qmax = QMAX[kind]
    blocks = x.reshape(-1, QBLOCK)
    scales = (blocks.abs().amax(1) / qmax).to(torch.float32)
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales)).to(x.dtype)
    q = torch.round(blocks / divisor[:, None]).clamp_(-qmax, qmax).to(torch.int8).reshape(-1)
    if kind == "int8":
        return q.view(torch.uint8), scales
    nibbles = (q + 8).to(torch.uint8)  # -7..7 -> 1..15
    return nibbles[0::2] | (nibbles[1::2] << 4), scales


def dequantize(payload: torch.Tensor, scales: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """The values ``quantize`` encoded, in ``dtype``."""
    if kind == "int8":
        q = payload.view(torch.int8)
    else:
        q = torch.stack(((payload & 0xF).to(torch.int8) - 8, (payload >> 4).to(torch.int8) - 8), 1).reshape(-1)
    return (q.to(dtype).reshape(-1, QBLOCK) * scales.to(dtype)[:, None]).reshape(-1)


def payload_bytes(numel: int, kind: str) -> int:
    return numel if kind == "int8" else numel // 2


def encode(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(message bytes = integers then scales, what the receiver will decode) of one chunk."""
    payload, scales = quantize(x, kind)
    message = torch.cat((payload, scales.view(torch.uint8)))
    return message, dequantize(payload, scales, kind, x.dtype)


def decode(message: torch.Tensor, numel: int, kind: str, dtype: torch.dtype) -> torch.Tensor:
    size = payload_bytes(numel, kind)
    return dequantize(message[:size], message[size:].view(torch.float32), kind, dtype)


def chunk_of(numel: int, workers: int) -> int:
    """Elements of each rank's chunk: ``numel`` split over ``workers``, rounded up to whole blocks."""
    return -(-max(numel, 1) // (workers * QBLOCK)) * QBLOCK


@dataclass
class ErrorFeedback:
    """One rank's quantization residuals: of what it sends (phase 1) and of the mean chunk it owns (phase 2).

    ``layout`` = (workers, chunk) of the exchanges that produced them: the owned residual belongs to this
    rank's chunk of that split, so a run resumed with another split must not reuse it.
    """

    sent: Optional[torch.Tensor] = None
    owned: Optional[torch.Tensor] = None
    layout: Optional[tuple[int, int]] = None

    def state_dict(self) -> dict:
        return {"sent": None if self.sent is None else self.sent.detach().cpu().clone(),
                "owned": None if self.owned is None else self.owned.detach().cpu().clone(),
                "layout": self.layout}

    def load_state_dict(self, state: dict, device: torch.device, workers: int, numel: int) -> None:
        """Restore the residuals, refusing those of another split (``workers`` ranks, ``numel`` elements)."""
        layout = state.get("layout")
        if layout is not None and tuple(layout) != (workers, chunk_of(numel, workers)):
            raise ValueError(
                f"the checkpoint's int8/int4 residuals were made for {layout[0]} workers with chunks of {layout[1]} "
                f"values, but this run has {workers} workers and chunks of {chunk_of(numel, workers)}; resume with "
                "the same number of processes, shard layout and model."
            )
        self.sent = None if state["sent"] is None else state["sent"].to(device)
        self.owned = None if state["owned"] is None else state["owned"].to(device)
        self.layout = None if layout is None else tuple(layout)


def _add_residual(x: torch.Tensor, residual: Optional[torch.Tensor], what: str) -> None:
    if residual is None:
        return
    if residual.numel() != x.numel():
        raise ValueError(
            f"the saved {what} quantization residual has {residual.numel()} elements but this exchange has "
            f"{x.numel()}; resume with the same model, number of processes and shard layout."
        )
    x.add_(residual.to(x.device, x.dtype))


class QuantizedMeanExchange(MeanExchange):
    """The mean over the group of one flat tensor, int8/int4 on the wire (the two phases of ``MeanExchange``)."""

    def __init__(self, comm: "Communicator", numel: int, dtype: torch.dtype, kind: str,
                 feedback: Optional[ErrorFeedback]):
        super().__init__(comm, numel, dtype, wire=None)
        self.phase, self.kind, self.feedback = "scatter", kind, feedback
        self.chunk = chunk_of(numel, comm.size)  # elements per rank's chunk
        self.row = payload_bytes(self.chunk, kind) + 4 * (self.chunk // QBLOCK)  # message bytes per chunk

    @classmethod
    def launch(cls, comm: "Communicator", flat: torch.Tensor, kind: str,
               feedback: Optional[ErrorFeedback] = None) -> "QuantizedMeanExchange":
        ex = cls(comm, flat.numel(), flat.dtype, kind, feedback)
        n = comm.size
        padded = torch.zeros(n * ex.chunk, dtype=flat.dtype, device=flat.device)
        padded[: flat.numel()].copy_(flat)
        if feedback is not None:
            _add_residual(padded[: flat.numel()], feedback.sent, "sent")
            feedback.layout = (n, ex.chunk)
        rows = []
        for i in range(n):  # chunk by chunk, in place: one padded copy of the tensor at a time, not several
            segment = padded[i * ex.chunk:(i + 1) * ex.chunk]
            message, values = encode(segment, kind)
            rows.append(message)
            segment.sub_(values)  # what quantization dropped: the residual
        if feedback is not None:
            feedback.sent = padded[: flat.numel()]
        send = torch.cat(rows).to(comm.device or flat.device)
        ex._buffer = torch.empty_like(send)
        if n > 1:
            comm.record(send.numel() // 2)
        ex._send = send
        ex._flight = InFlight(comm, comm.all_to_all_async(ex._buffer, send))
        return ex

    def advance(self) -> None:
        """Finish the scatter, average this rank's chunk and start the gather (collective)."""
        if self.phase != "scatter":
            return
        self._wait_flight()
        self._send = None
        n = self.comm.size
        rows = self._buffer.view(n, self.row)
        total = decode(rows[0], self.chunk, self.kind, self.dtype)
        for row in rows[1:]:  # rank order, so that a reference can reproduce the sum exactly
            total.add_(decode(row, self.chunk, self.kind, self.dtype))
        mine = total.div_(n)
        if self.feedback is not None:
            _add_residual(mine, self.feedback.owned, "owned")
        message, values = encode(mine, self.kind)
        if self.feedback is not None:
            self.feedback.owned = (mine - values).clone()
        self._buffer = torch.empty(n * self.row, dtype=torch.uint8, device=message.device)
        if n > 1:
            self.comm.record(self._buffer.numel() // 2)
        self._flight = InFlight(self.comm, self.comm.all_gather_async(self._buffer, message))
        self.phase = "gather"

    def wait(self) -> torch.Tensor:
        """The mean, flat, in the input's dtype."""
        self.advance()
        self.drain()
        if self.phase == "gather":
            rows = self._buffer.view(self.comm.size, self.row)
            mean = torch.cat([decode(row, self.chunk, self.kind, self.dtype) for row in rows])
            self._buffer = mean[: self.numel]
        self.phase = "done"
        return self._buffer

    def state_dict(self) -> dict:
        """Drain, then the bytes of the current phase (the residuals are the algorithm's to save)."""
        return {**super().state_dict(), "wire": self.kind}

    @classmethod
    def from_state(cls, comm: "Communicator", state: dict, device: torch.device,
                   feedback: Optional[ErrorFeedback] = None) -> "QuantizedMeanExchange":
        ex = cls(comm, int(state["numel"]), getattr(torch, state["dtype"]), state["wire"], feedback)
        ex.phase = state["phase"]
        ex._buffer = state["buffer"].to(device)
        if ex.phase != "done" and ex._buffer.numel() != comm.size * ex.row:
            raise ValueError(
                f"the checkpoint holds an {ex.kind} pseudo-gradient exchange cut for another number of workers "
                f"({ex._buffer.numel()} bytes, not {comm.size} x {ex.row}); resume with the same number of "
                "processes and shard layout."
            )
        return ex
