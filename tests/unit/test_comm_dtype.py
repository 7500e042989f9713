"""bf16 on the wire: the pseudo-gradient is rounded to bf16, summed in fp32, and its mean rounded once.

The exchange (all-to-all of bf16 chunks, a sum in the accumulation dtype, all-gather of the bf16
mean) is checked against the rule written out in float64, on K threaded workers; then the whole
algorithm with comm_dtype='bf16' against the float64 reference of tests/unit/test_overlap.py (which
implements that rule), and the bytes booked against fp32's.
"""

from __future__ import annotations

import pytest
import torch

from palsgd_hf import PALSGDConfig
from palsgd_hf.core.comm import MeanExchange
from tests.helpers.threads import ThreadCommunicator, run_threads

BF16_EPS = 2.0**-7  # bf16 keeps 8 significant bits: one step is 2^-7 relative, rounding errs by half of it


# The threaded communicator speaks both halves of an all-reduce (all-to-all, all-gather) itself now; the old
# names stay for the tests that import them.
ExchangeThreadCommunicator = ThreadCommunicator


def run_exchange_threads(size: int, fn):
    """``run_threads`` with communicators that also speak the bf16 exchange."""
    return run_threads(size, lambda rank, comm: fn(rank, ExchangeThreadCommunicator(comm._group, rank)))


def bf16_mean_rule(values: list[torch.Tensor]) -> torch.Tensor:
    """The documented rule in float64: bf16(sum_k float(bf16(x_k)) / n), summed in rank order."""
    rounded = [v.to(torch.bfloat16).to(torch.float64) for v in values]
    total = rounded[0].clone()
    for r in rounded[1:]:
        total += r
    return (total / len(values)).to(torch.bfloat16).to(torch.float64)


def worker_vector(rank: int, numel: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(50 + rank)
    # Mixed magnitudes, so that a bf16 sum (rounding after each addition) would differ from ours.
    return torch.randn(numel, generator=g) * torch.logspace(-3, 2, numel)


@pytest.mark.parametrize("workers,numel", [(2, 1000), (3, 1001), (4, 7)])
def test_bf16_exchange_follows_the_rule_and_its_rounding_bound(workers, numel):
    def run(rank, comm):
        ex = comm.mean_exchange_async(worker_vector(rank, numel), torch.bfloat16)
        return ex.wait(), comm.stats.bytes_sent

    results = run_exchange_threads(workers, run)
    values = [worker_vector(k, numel).double() for k in range(workers)]
    exact = torch.stack(values).mean(0)
    rule = bf16_mean_rule(values)
    for got, _ in results:
        assert got.dtype == torch.float32 and got.shape == (numel,)
        assert torch.equal(got, results[0][0])  # every worker holds the same mean
        # The fp32 sum may land on the other side of a bf16 rounding boundary than the float64 one,
        # so the rule holds up to one bf16 step of the mean.
        torch.testing.assert_close(got.double(), rule, rtol=BF16_EPS, atol=1e-30)
        # Error against the exact mean: each input rounded once, the mean once (each <= 2^-8 relative).
        bound = BF16_EPS / 2 * (torch.stack(values).abs().mean(0) + exact.abs()) * 1.001 + 1e-12
        assert ((got.double() - exact).abs() <= bound).all()
    # The rounding really happened: fp32 on the wire would have been far more exact.
    assert (results[0][0].double() - exact).abs().max() > 1e-4 * exact.abs().max()
    chunk = -(-numel // workers)
    assert results[0][1] == chunk * workers * 2  # the payload of an all-reduce of the padded bf16 buffer


def test_bf16_books_half_the_bytes_of_fp32():
    def run(dtype):
        def fn(rank, comm):
            comm.mean_exchange_async(worker_vector(rank, 4096), dtype).wait()
            return comm.stats.bytes_sent, comm.stats.calls

        return run_exchange_threads(2, fn)[0]

    fp32_bytes, fp32_calls = run(None)
    bf16_bytes, bf16_calls = run(torch.bfloat16)
    assert fp32_bytes == 4096 * 4 and bf16_bytes == fp32_bytes // 2
    assert (fp32_calls, bf16_calls) == (1, 2)  # one all-reduce vs. its two halves


def test_single_worker_still_rounds_like_the_wire():
    x = worker_vector(0, 64)
    from palsgd_hf.core.comm import LocalCommunicator

    got = LocalCommunicator().mean_exchange_async(x.clone(), torch.bfloat16).wait()
    assert torch.equal(got, x.to(torch.bfloat16).float())
    assert LocalCommunicator().mean_exchange_async(x.clone()).wait().equal(x)


def test_exchange_checkpoint_between_its_halves_resumes_to_the_same_mean():
    def run(rank, comm):
        straight = comm.mean_exchange_async(worker_vector(rank, 301), torch.bfloat16).wait()
        ex = comm.mean_exchange_async(worker_vector(rank, 301), torch.bfloat16)
        state = ex.state_dict()  # after the scatter, before the gather
        assert state["phase"] == "scatter"
        resumed = MeanExchange.from_state(comm, state, torch.device("cpu"))
        return straight, resumed.wait()

    for straight, resumed in run_exchange_threads(3, run):
        assert torch.equal(straight, resumed)


@pytest.mark.parametrize("overlap", [0, 2])
def test_bf16_training_matches_the_float64_reference(overlap):
    from tests.unit.test_overlap import assert_matches_reference

    cfg = PALSGDConfig(
        sync_interval=4, pseudo_sync_prob=0.3, mixing_rate=2.0, warmup_steps=2, comm_dtype="bf16", overlap_steps=overlap
    )
    assert_matches_reference(cfg, workers=3, steps=21)


def test_bf16_and_fp32_training_stay_close():
    """bf16 perturbs each outer step by ~2^-8 of the pseudo-gradient: the runs must stay close."""
    from tests.unit.test_overlap import run_core

    # No warm-up: its gradient all-reduces (fp32 either way) would blur the byte comparison.
    fp32 = run_core(PALSGDConfig(sync_interval=4, pseudo_sync_prob=0.2, warmup_steps=0), 2, 30)
    bf16 = run_core(PALSGDConfig(sync_interval=4, pseudo_sync_prob=0.2, warmup_steps=0, comm_dtype="bf16"), 2, 30)
    for (p32, _, m32, _), (p16, _, m16, _) in zip(fp32, bf16):
        w32, w16 = torch.cat(p32), torch.cat(p16)
        assert not torch.equal(w32, w16)
        assert (w32 - w16).norm() <= 0.01 * w32.norm()
        assert m16["comm_bytes"] == m32["comm_bytes"] / 4  # this model is float64: 8 bytes vs 2 per value
