"""The warm-up gradient mean of a fault-tolerant FSDP2 replica, taken at the step boundary (one exchange).

``palsgd_hf.adapters.fsdp._mean_gradient_shards`` is what ``FSDPAdapter(mean_in_backward=False)`` runs in a
warm-up step: every rank sends its gradient shards of all parameters in one exchange with the same rank of the
other replicas. Its arithmetic is checked here on plain tensors (a local shard is a plain tensor) with
simulated replicas (threads); the real processes, FSDP2 and torchft are tests/distributed/
test_fault_tolerance_fsdp.py's. What must hold: the same number of values from every replica whichever
parameters have a gradient (mismatched buffers would pair wrongly), the mean where any replica has a gradient
(zeros counted for the others, as DDP counts unused parameters), no gradient where none has one, and so the
same gradients on every replica.
"""

from __future__ import annotations

import torch

from palsgd_hf.adapters.fsdp import _mean_gradient_shards
from tests.helpers.threads import run_threads

REPLICAS = 3


def grads_of(replica: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(replica)
    return {"a": torch.randn(2, 3, generator=g), "b": torch.randn(4, generator=g)}


def test_one_exchange_the_mean_where_any_replica_has_a_gradient_and_none_where_none_has():
    def replica(rank: int, comm):
        params = {name: torch.zeros(shape, requires_grad=True) for name, shape in
                  (("a", (2, 3)), ("b", (4,)), ("unused", (5,)), ("empty", (0,)))}
        own = grads_of(rank)
        params["a"].grad = own["a"].clone()
        params["empty"].grad = torch.zeros(0)  # a rank whose shard of a small parameter is empty
        if rank != 1:  # replica 1 computed no gradient for b (e.g. a branch its batch did not take)
            params["b"].grad = own["b"].clone()
        _mean_gradient_shards(list(params.values()), comm)
        return {name: p.grad for name, p in params.items()}, comm.stats.bytes_sent

    results = run_threads(REPLICAS, replica)
    grads = [grads_of(r) for r in range(REPLICAS)]
    # Sums of 3 fp32 values then a division: the expected values are computed the same way (the thread
    # communicator sums the stacked buffers), so equality is exact up to the summation order, 2 ulps of O(1).
    mean_a = sum(g["a"] for g in grads) / REPLICAS
    mean_b = (grads[0]["b"] + grads[2]["b"]) / REPLICAS  # replica 1 counts as zeros
    for got, sent in results:
        torch.testing.assert_close(got["a"], mean_a, rtol=0, atol=1e-6)
        torch.testing.assert_close(got["b"], mean_b, rtol=0, atol=1e-6)  # created on replica 1 too
        assert got["unused"] is None and got["empty"] is not None and got["empty"].numel() == 0
        # One fp32 exchange: every value of every parameter (with a gradient or not) plus one flag per parameter.
        assert sent == (6 + 4 + 5 + 0 + 4) * 4, sent
    assert all(torch.equal(results[0][0][k], r[0][k]) for r in results for k in ("a", "b"))
