"""The modeled wall time of a simulated run (label every number from here "modeled").

A step's time is what one worker spends on it, all workers in parallel:

* a synchronous step (DDP, or PALSGD's warm-up): compute of one worker's micro-batch + a ring
  all-reduce of the gradients (the model's bytes);
* a local gradient step: compute only;
* a pseudo-sync step: the pull alone (no forward/backward), measured;
* a global sync (after the step that ends a period, and the final one): a ring all-reduce of the
  pseudo-gradient (the model's bytes) + the local work of the outer step, measured.

A ring all-reduce of M bytes over K workers sends 2(K-1)/K * M bytes per worker and takes 2(K-1)
latency-bound hops: ``2(K-1)/K * 8 M / bandwidth + 2(K-1) * hop_latency``. Nothing overlaps compute
(DDP's bucketed overlap would hide part of its all-reduce; this model charges it in full, which favours
the local methods, and says so). The start-of-local-phase broadcast of the core is not charged: after a
synchronous warm-up (or from a common initialization, as here) it is redundant (issue 17).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

# Step kinds as the simulator records them (palsgd_hf.core.step_kinds.StepKind values).
WARMUP, GRADIENT, PSEUDO_SYNC = "warmup", "gradient", "pseudo_sync"


@dataclass(frozen=True)
class Link:
    """One worker's network link: bandwidth in bit/s both ways, latency per hop of a ring collective."""

    name: str
    bits_per_second: float
    hop_latency_s: float = 50e-6


LINKS = (Link("100 Mbit/s", 100e6), Link("1 Gbit/s", 1e9), Link("10 Gbit/s", 10e9))


@dataclass(frozen=True)
class Costs:
    """Measured on this machine (medians) for one worker's micro-batch at a given K."""

    compute_s: float  # forward + backward + inner optimizer step of one micro-batch
    pull_s: float  # one pseudo-sync pull of every parameter
    sync_local_s: float  # the outer step's local work (pseudo-gradient, outer optimizer, write-back)


def allreduce_seconds(nbytes: float, workers: int, link: Link) -> float:
    """Modeled time of a ring all-reduce of ``nbytes`` over ``workers`` (0 for one worker)."""
    if workers <= 1:
        return 0.0
    hops = 2 * (workers - 1)
    return hops / workers * 8.0 * nbytes / link.bits_per_second + hops * link.hop_latency_s


def modeled_times(
    kinds: Sequence[str], synced: Sequence[bool], model_bytes: float, workers: int, costs: Costs, link: Link
) -> list[float]:
    """Cumulative modeled seconds after each step: ``out[t]`` is the time when step t (and its sync) ends."""
    if len(kinds) != len(synced):
        raise ValueError(f"kinds ({len(kinds)}) and synced ({len(synced)}) must have one entry per step")
    allreduce = allreduce_seconds(model_bytes, workers, link)
    per_kind = {WARMUP: costs.compute_s + allreduce, GRADIENT: costs.compute_s, PSEUDO_SYNC: costs.pull_s}
    total, out = 0.0, []
    for kind, sync in zip(kinds, synced):
        if kind not in per_kind:
            raise ValueError(f"unknown step kind {kind!r}; expected one of {sorted(per_kind)}")
        total += per_kind[kind] + (allreduce + costs.sync_local_s if sync else 0.0)
        out.append(total)
    return out


def time_to_target(
    evals: Sequence[tuple[int, float]], times: Sequence[float], target: float
) -> float | None:
    """Modeled seconds at the first evaluation (step count, loss) at or below ``target``; None if never."""
    for steps, loss in evals:
        if loss <= target:
            return times[steps - 1] if steps > 0 else 0.0
    return None


def modeled_times_traffic(kinds: Sequence[str], synced: Sequence[bool], traffic: dict, model_bytes: float,
                          workers: int, costs: Costs, link: Link, overlap: int, fragments: int) -> list[float]:
    """Cumulative modeled seconds after each step, charging each sync the bytes it really booked.

    For the wire benchmark (fp32 / bf16 / int8 / int4, fragments, overlap). ``traffic`` is what
    :func:`benchmarks.sim.run.simulate` records: ``wire`` (bytes booked by each step), ``launched`` (steps
    that launched an overlapped sync), ``tail`` (bytes of the sync in flight booked at the end) and
    ``final`` (the bytes of the final syncs). A sync's payload M is priced as a ring all-reduce of M bytes
    (the bf16 / int8 / int4 exchanges move the same volume as one: a reduce-scatter plus an all-gather).

    * blocking (``overlap`` = 0): the step that syncs pays the outer step's local work (1/F of the whole
      model's for one fragment) plus the transfer;
    * overlapped: the launching step pays the local work; the transfer runs behind the next d steps, and the
      step where it lands pays only what those steps did not hide: max(0, transfer - their modeled time).
      (Overlap is modeled as perfect: on real machines the background transfer competes for the cores.)
    * the end: a sync still in flight lands (its exposed part), then one blocking sync of every fragment.
    """
    allreduce = allreduce_seconds(model_bytes, workers, link)
    per_kind = {WARMUP: costs.compute_s + allreduce, GRADIENT: costs.compute_s, PSEUDO_SYNC: costs.pull_s}
    wire, launched = traffic["wire"], set(traffic["launched"])
    local = costs.sync_local_s / fragments
    total, out, flight = 0.0, [], None  # flight: (modeled time at launch, transfer seconds)

    def payload(start: int) -> float:  # bytes from a launch until the next launch (the exchange's two halves)
        end = next((t for t in sorted(launched) if t > start), len(wire))
        return sum(wire[start:end]) + (traffic["tail"] if end == len(wire) else 0)

    for t, kind in enumerate(kinds):
        total += per_kind[kind]
        if overlap and flight is not None and synced[t]:
            total += max(0.0, flight[1] - (total - flight[0]))
            flight = None
        if overlap and t in launched:
            total += local
            flight = (total, allreduce_seconds(payload(t), workers, link))
        elif not overlap and wire[t] and kind != WARMUP:  # in the local phase only a sync sends anything
            total += local + allreduce_seconds(wire[t], workers, link)
        out.append(total)
    if flight is not None:
        total += max(0.0, flight[1] - (total - flight[0]))
    if traffic["final"]:
        total += costs.sync_local_s + allreduce_seconds(traffic["final"], workers, link)
    if out:
        out[-1] = total
    return out
