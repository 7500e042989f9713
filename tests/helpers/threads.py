"""K simulated workers in one process: a Communicator whose collectives meet at a thread barrier.

It stands in for torch.distributed only where the test is about the algorithm's arithmetic
(the float64 reference comparison); real multi-process behaviour is tested on gloo.
"""

from __future__ import annotations

import threading

import torch

from palsgd_hf.core.comm import Communicator, PendingReduce


class ThreadGroup:
    def __init__(self, size: int):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots: list = [None] * size


class ThreadCommunicator(Communicator):
    def __init__(self, group: ThreadGroup, rank: int):
        super().__init__(group=None)
        self._group, self._rank = group, rank

    @property
    def size(self) -> int:
        return self._group.size

    @property
    def rank(self) -> int:
        return self._rank

    def _exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        self._group.slots[self._rank] = tensor.detach().clone()
        self._group.barrier.wait()
        values = list(self._group.slots)
        self._group.barrier.wait()
        return values

    def all_reduce_mean_async(self, tensor: torch.Tensor) -> PendingReduce:
        self.record(tensor.numel() * tensor.element_size())
        values = self._exchange(tensor)
        tensor.copy_(torch.stack(values).sum(0) / self.size)
        return PendingReduce(self, tensor, None, 1)

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor.copy_(torch.stack(self._exchange(tensor)).amax(0))
        return tensor

    def broadcast(self, tensor: torch.Tensor, src_group_rank: int = 0) -> torch.Tensor:
        tensor.copy_(self._exchange(tensor)[src_group_rank])
        return tensor

    def barrier(self) -> None:
        self._group.barrier.wait()

    # The two halves of an all-reduce, used by the bf16 exchange (MeanExchange).
    def all_to_all_async(self, output: torch.Tensor, input: torch.Tensor):
        chunk = input.numel() // self.size
        values = self._exchange(input)
        output.copy_(torch.cat([v[self.rank * chunk : (self.rank + 1) * chunk] for v in values]))
        return None

    def all_gather_async(self, output: torch.Tensor, input: torch.Tensor):
        output.copy_(torch.cat(self._exchange(input)))
        return None


def run_threads(size: int, fn, timeout: float = 120.0) -> list:
    """Run ``fn(rank, comm)`` on ``size`` threads; return their results, re-raising the first error.

    A thread still running after ``timeout`` seconds is an error (a hang, or a run longer than its caller allowed).
    """
    group = ThreadGroup(size)
    results, errors = [None] * size, []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(rank, ThreadCommunicator(group, rank))
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if errors:
        raise errors[0]
    if any(t.is_alive() for t in threads):
        group.barrier.abort()
        raise TimeoutError(f"a worker thread was still running after {timeout:g} s")
    return results
