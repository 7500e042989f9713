"""The fault-tolerant mode's checks: what it refuses before any work, whom it warns, and a replica that fell behind.

* The single-worker warning ("nobody to average with") is the Trainer's: a plain ``PALSGDTrainer`` alone in its
  world logs it, a ``FaultTolerantTrainer`` replica does not (its peers are the other replicas, through torchft),
  neither as one process (in this process) nor as 2 ranks sharding an FSDP2 model (in the refusals' replica).
* ``FaultTolerantTrainer.train(resume_from_checkpoint=...)`` is refused before any work (this process): after its
  join a replica holds the live replicas' state, newer than its own checkpoint.
* Refusals, on real replica worlds (torchrun, gloo) next to a live lighthouse that never forms a quorum (every
  case is refused while the Trainer or the hooks are built, so no replica ever asks for one): a session built in
  a world of another size than the Trainer's or the Accelerator's, ``FaultTolerantAccelerate`` with another
  ``shard_size`` than the replica's ranks. Each message names the value and the fix; the session built no
  PALSGD, torchft committed no exchange, the weights did not change.
* ``ReplicaFellBehind`` (slow): a replica frozen with SIGSTOP in the warm-up, before its exchange, while the two
  others go on (its heartbeat stops, so their quorums leave it out) past the warm-up into the local phase. Thawed,
  it enters its warm-up exchange; the quorum finds it behind and hands it a live peer's state, taken inside a sync:
  not a point of its own step, so it stops with ``ReplicaFellBehind`` (naming both points and the fix), and the
  others' exchange it was counted in is retried without it. Restarted, it rejoins at a later sync with the others'
  anchor bit for bit, and the run ends with one global model.
* The other side of that check (slow): frozen before a sync's exchange instead, it is thawed into a later sync of
  the others, the same point of a step: it takes a peer's state there and continues, no restart needed.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchft")

from palsgd_hf.fault_tolerance import FaultToleranceConfig, FaultTolerantSession, start_lighthouse  # noqa: E402
from tests.distributed.test_fault_tolerance import H, by_step, stop_at  # noqa: E402
from tests.distributed.test_fault_tolerance_failures import one_global_model  # noqa: E402
from tests.helpers.ft_cluster import Cluster  # noqa: E402
from tests.helpers.launch import torchrun  # noqa: E402

ALONE = "PALSGD with a single worker"


class Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, x, labels=None):
        out = self.lin(x)
        return out if labels is None else {"loss": torch.nn.functional.mse_loss(out, labels)}


@pytest.fixture
def lighthouse():
    server = start_lighthouse(2)
    yield server.address()
    server.shutdown()


@pytest.fixture
def session(lighthouse):
    """A one-process replica's session (no torch.distributed world in this process); no quorum is ever asked for."""
    built = FaultTolerantSession(FaultToleranceConfig(lighthouse=lighthouse, replica_id=0, replicas=2,
                                                      timeout_seconds=5, quorum_timeout_seconds=5))
    yield built
    built.shutdown()


@pytest.fixture
def caught():
    """The warnings of the arguments' checks, caught at their logger: palsgd_hf's logger follows transformers' and
    stops propagating to the root once a Trainer exists, so caplog's root handler would miss them."""
    class Caught(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    caught, logger = Caught(), logging.getLogger("palsgd_hf.integrations.trainer_args")
    logger.addHandler(caught)
    yield caught.messages
    logger.removeHandler(caught)


def arguments(tmp_path):
    from palsgd_hf.integrations.trainer_args import PALSGDTrainingArguments

    return PALSGDTrainingArguments(output_dir=str(tmp_path), max_steps=4, use_cpu=True, report_to="none",
                                   palsgd_sync_interval=2, palsgd_mixing_rate=1.0)


@pytest.mark.timeout(60)
def test_single_worker_warning_is_for_a_plain_trainer_not_a_fault_tolerant_replica(tmp_path, session, caught):
    from palsgd_hf.fault_tolerance.trainer import FaultTolerantTrainer
    from palsgd_hf.integrations.trainer import PALSGDTrainer

    args = arguments(tmp_path)
    assert not any(ALONE in m for m in caught)  # the arguments do not know about replicas elsewhere: silent
    PALSGDTrainer(model=Regression(), args=args)
    alone = [m for m in caught if ALONE in m]
    assert len(alone) == 1 and "world size 1, palsgd_shard_size 1" in alone[0], caught
    caught.clear()
    FaultTolerantTrainer(model=Regression(), args=args, session=session)
    assert not any(ALONE in m for m in caught), caught


@pytest.mark.timeout(60)
def test_resuming_a_fault_tolerant_trainer_from_its_own_checkpoint_is_refused(tmp_path, session):
    from palsgd_hf.config import PALSGDConfigError
    from palsgd_hf.fault_tolerance.trainer import FaultTolerantTrainer

    model = Regression()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = FaultTolerantTrainer(model=model, args=arguments(tmp_path), session=session)
    for resume in (True, str(tmp_path / "checkpoint-4")):
        with pytest.raises(PALSGDConfigError) as refused:
            trainer.train(resume_from_checkpoint=resume)
        assert f"train(resume_from_checkpoint={resume!r})" in str(refused.value), refused.value
        assert "Call train() without it" in str(refused.value), refused.value
    # Refused before any work: no PALSGD, no exchange, no step, the weights as they were.
    assert session.algorithm is None and session.manager.current_step() == 0 and trainer.state.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def check_refused(case: dict, *named: str) -> None:
    """Refused with a message naming ``named`` (the value and the fix), before any work."""
    assert case["message"] is not None, "not refused"
    for part in named:
        assert part in case["message"], (part, case["message"])
    assert not case["algorithm_built"] and case["exchanges"] == 0 and not case["weights_changed"], case


@pytest.mark.timeout(150)
def test_a_session_of_another_world_or_shard_size_is_refused(tmp_path, lighthouse):
    ranks = torchrun("ft_checks_run.py", 2, tmp_path, "--case", "worlds", "--lighthouse", lighthouse, timeout=120)
    for rank in ranks:
        cases = rank["cases"]
        # Built before the arguments started the replica's world of 2 ranks: a world of 1.
        check_refused(cases["trainer_session_before_world"], "FaultTolerantSession was built in a world of 1 rank(s) "
                      "but the Trainer runs 2", "build the session after the TrainingArguments")
        check_refused(cases["accelerate_session_before_world"], "this Accelerator has 2 process(es) but the "
                      "FaultTolerantSession was built in a world of 1", "build the session after the Accelerator")
        check_refused(cases["accelerate_shard_size"], "shard_size=1 but this replica has 2 ranks",
                      "use shard_size=2", "shard_mesh(2)")
        # The same world and model: the replica's Trainer is silent, the plain Trainer warns (its world is all).
        assert not any(ALONE in m for m in rank["warnings"]["fault_tolerant"]), rank["warnings"]
        assert any(ALONE in m and "world size 2, palsgd_shard_size 2" in m for m in rank["warnings"]["plain"]), rank


def frozen(pid: int) -> bool:
    """Stopped by a signal (Linux /proc): state T."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


WARMUP = 20
ARGS = ("--sync-interval", str(H), "--warmup", str(WARMUP), "--steps", "1000000", "--step-seconds", "0.04")


def freeze_and_thaw(ft: Cluster, at: int, others_syncs: int) -> dict:
    """Replica 2 freezes itself at its first exchange from step ``at`` on (SIGSTOP, before the exchange's quorum);
    once each of the others has synced ``others_syncs`` times since, without it, it is thawed (SIGCONT)."""
    ft.start(2, "--freeze-at", str(at))  # first: it is in the first quorum, not a late joiner
    ft.start(0)
    ft.start(1)
    ft.wait_for(lambda: any(e["kind"] == "frozen" for e in ft.events(2)) and frozen(ft.procs[2].pid),
                timeout=150, what="replica 2 frozen")
    (freeze,) = [e for e in ft.events(2) if e["kind"] == "frozen"]
    ft.wait_for(lambda: all(sum(e["t"] > freeze["t"] for e in ft.syncs(r)) >= others_syncs for r in (0, 1)),
                timeout=150, what="the others' syncs while replica 2 is frozen")
    assert frozen(ft.procs[2].pid)
    assert all(e["participants"] == 2 for r in (0, 1) for e in ft.syncs(r) if e["t"] > freeze["t"])
    os.kill(ft.procs[2].pid, signal.SIGCONT)
    return {**freeze, "thawed_at": time.time()}


def check_the_end(ft: Cluster, pid: int) -> dict:
    """The run ended with one global model; replica 2's process ``pid`` took the others' anchor bit for bit at every
    sync it made. Its first such sync (the joined event, or the first sync after a thaw) is returned."""
    stop_at(ft, margin_periods=4)
    ft.wait_all(timeout=150)
    survivors = [by_step(ft.syncs(r)) for r in (0, 1)]
    for step in survivors[0].keys() & survivors[1].keys():
        assert survivors[1][step]["anchor"] == survivors[0][step]["anchor"], step
    for step, event in by_step(ft.syncs(2, pid)).items():
        assert event["anchor"] == survivors[0][step]["anchor"], step
    one_global_model(ft, 3)
    return survivors[0]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_replica_frozen_in_the_warm_up_falls_behind_and_rejoins_after_a_restart(tmp_path):
    with Cluster(tmp_path, *ARGS, "--stop-file", str(tmp_path / "stop")) as ft:
        # The others go past the warm-up without it: a sync, which only the local phase has.
        freeze = freeze_and_thaw(ft, at=3, others_syncs=1)
        assert freeze["call"] == "all_reduce_mean" and freeze["step"] < WARMUP, freeze
        thawed_pid = ft.procs[2].pid
        assert ft.wait_exit(2, timeout=90) != 0
        (fell,) = [e for e in ft.events(2) if e["kind"] == "fell_behind"]
        message = fell["message"]
        assert fell["pid"] == thawed_pid and "replica 2 fell behind" in message, message
        assert "'exchange'" in message and "'sync'" in message, message  # the peer's point: inside a sync
        assert "'all_reduce_mean'" in message and "'warmup'" in message, message  # its own: the warm-up exchange
        assert "Restart the replica" in message, message

        restarted_at = ft.start(2)
        new_pid = ft.procs[2].pid
        ft.wait_for(lambda: len(ft.syncs(2, new_pid)) >= 2, timeout=150, what="the restarted replica's syncs")
        survivors = check_the_end(ft, new_pid)
        joined = next(e for e in ft.events(2) if e["kind"] == "joined" and e["pid"] == new_pid)
        assert joined["rejoined"] and joined["step"] > WARMUP, joined
        assert joined["anchor"] == survivors[joined["step"]]["anchor"]
        # The exchange the thawed replica was counted in (it never contributed) was not committed, then retried.
        assert all(r["ft"]["failed_attempts"] >= 1 for r in ft.results() if r["replica"] != 2), ft.results()
    print(f"\nreplica 2 frozen at warm-up step {freeze['step']}, stopped with ReplicaFellBehind once thawed; "
          f"restarted, it rejoined at step {joined['step']}, {joined['t'] - restarted_at:.2f} s after its restart")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_replica_frozen_at_a_sync_takes_a_peers_state_at_that_sync_and_continues(tmp_path):
    """The other side of the check: frozen before a sync's exchange, it is thawed while the others are (or will be)
    in a later sync, the same point of a step. It takes a peer's state in that exchange, contributes nothing, and
    continues from the others' step with their anchor, with no restart."""
    at = WARMUP + 2 * H
    with Cluster(tmp_path, *ARGS, "--stop-file", str(tmp_path / "stop")) as ft:
        freeze = freeze_and_thaw(ft, at=at, others_syncs=3)
        assert freeze["call"] == "exchange" and freeze["step"] >= at and freeze["step"] % H == 0, freeze
        pid = ft.procs[2].pid
        ft.wait_for(lambda: sum(e["t"] > freeze["thawed_at"] for e in ft.syncs(2, pid)) >= 2, timeout=120,
                    what="replica 2's syncs after the thaw")
        survivors = check_the_end(ft, pid)
        first = next(e for e in ft.syncs(2, pid) if e["t"] > freeze["thawed_at"])
        assert first["step"] >= freeze["step"] + 3 * H and first["anchor"] == survivors[first["step"]]["anchor"], first
        assert not [e for e in ft.events(2) if e["kind"] == "fell_behind"]
        assert next(r for r in ft.results() if r["replica"] == 2)["ft"]["rejoins"] >= 1
    print(f"\nreplica 2 frozen before the sync of step {freeze['step']}, "
          f"thawed {freeze['thawed_at'] - freeze['t']:.1f} s later: "
          f"took a peer's state in the sync of step {first['step']}, {first['t'] - freeze['thawed_at']:.2f} s after")
