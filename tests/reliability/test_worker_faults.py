"""A rank that dies or hangs mid-run: every process exits within the collective timeout, with a clear
error, and resuming from the last complete checkpoint continues the uninterrupted run exactly.

Real 2-process PALSGDTrainer runs (torchrun, gloo, Shakespeare). The fault hits rank 1 at step 15:
after checkpoint-10, between the syncs at 12 and 16, so the replicas hold different weights.
"""

from __future__ import annotations

import pytest
import torch

from palsgd_hf import PALSGDConfigError
from palsgd_hf.integrations import faults as reliability
from tests.reliability.runs import launch, losses

pytestmark = pytest.mark.timeout(600)

TIMEOUT = 6  # seconds: palsgd_comm_timeout_seconds of these runs
# Time from the fault to the end of torchrun beyond the timeout: the surviving rank's traceback and
# interpreter exit, torchrun's SIGTERM to the rest. ~2-8 s here; generous for a loaded 2-core CI machine.
MARGIN = 30
FAULT_STEP = 15


def assert_resumes_exactly(baseline, crashed, tmp_path):
    resumed = launch(tmp_path / "resumed", "--resume", "last", run_dir=crashed.run_dir)
    # Bitwise: the resumed run replays steps 11-24 with the same computations in the same order as the
    # uninterrupted one (weights, optimizer and PALSGD state, data position and RNG restored from checkpoint-10).
    for rank, (got, want) in enumerate(zip(resumed.final_weights(), baseline.final_weights())):
        assert torch.equal(got, want), f"rank {rank}: final weights differ from the uninterrupted run"
    for got, want in zip(resumed.results, baseline.results):
        after = {s: v for s, v in losses(want).items() if s > 10}
        assert {s: v for s, v in losses(got).items() if s > 10} == after
        assert got["metrics"]["outer_syncs"] == want["metrics"]["outer_syncs"]
        assert got["global_step"] == want["global_step"]


def test_killed_rank_stops_the_job_and_resume_continues_exactly(baseline, tmp_path):
    crashed = launch(tmp_path / "crashed", "--timeout", str(TIMEOUT), "--fault", f"kill:1:{FAULT_STEP}", check=False)
    assert crashed.proc.returncode != 0
    assert [r["step"] for r in crashed.faults[1]] == [FAULT_STEP]
    assert crashed.ended_at - crashed.fault_time() < TIMEOUT + MARGIN
    assert "exitcode  : -9" in crashed.output  # torchrun names the killed rank
    if "WorkerFaultError" in crashed.output:  # rank 0 reached a collective before torchrun stopped it
        assert f"rank 0 at step {FAULT_STEP}: a collective with the other ranks failed" in crashed.output
        assert "checkpoint-10: resume with resume_from_checkpoint=True" in crashed.output
    assert not (crashed.run_dir / "checkpoint-20").exists()
    assert reliability.last_complete_checkpoint(crashed.run_dir) == str(crashed.run_dir / "checkpoint-10")
    assert_resumes_exactly(baseline, crashed, tmp_path)


def hang(tmp_path):
    return launch(tmp_path / "hung", "--timeout", str(TIMEOUT), "--fault", f"hang:1:{FAULT_STEP}", check=False)


def test_hung_rank_is_stopped_by_the_collective_timeout(tmp_path):
    hung = hang(tmp_path)
    assert hung.proc.returncode != 0
    # Nothing died: only rank 0's collective timing out (after TIMEOUT, not torch's 30 minutes) ends the job.
    elapsed = hung.ended_at - hung.fault_time()
    assert TIMEOUT / 2 < elapsed < TIMEOUT + MARGIN, elapsed
    assert f"Timed out waiting {TIMEOUT * 1000}ms" in hung.output
    message = f"WorkerFaultError: rank 0 at step {FAULT_STEP}: a collective with the other ranks failed"
    assert message in hung.output
    assert f"collective timeout {TIMEOUT} s" in hung.output
    assert f"the last complete checkpoint is {hung.run_dir / 'checkpoint-10'}" in hung.output


@pytest.mark.slow
def test_resume_after_a_hang_continues_exactly(baseline, tmp_path):
    assert_resumes_exactly(baseline, hang(tmp_path), tmp_path)


def test_fault_errors_are_recognised_and_explained(tmp_path):
    gloo_timeout = RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                                "5000ms for recv operation to complete")
    peer_gone = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:3490")
    assert reliability.is_worker_fault(gloo_timeout) and reliability.is_worker_fault(peer_gone)
    assert not reliability.is_worker_fault(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not reliability.is_worker_fault(ValueError("Timed out waiting"))  # not a backend error type
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": 3}')
    from datetime import timedelta

    text = reliability.worker_fault_message(peer_gone, rank=1, step=7, timeout=timedelta(seconds=60),
                                            output_dir=str(tmp_path))
    assert text.startswith("rank 1 at step 7: a collective with the other ranks failed ([../gloo")
    assert "collective timeout 60 s" in text and f"{tmp_path / 'checkpoint-3'}: resume with" in text
    empty = tmp_path / "empty"
    empty.mkdir()
    text = reliability.worker_fault_message(gloo_timeout, rank=0, step=1, timeout=timedelta(seconds=5),
                                            output_dir=str(empty))
    assert "no complete checkpoint" in text and "save_steps" in text
    # Every rank alive but waiting in different collectives reads the same from inside: the message says both,
    # with this rank's PALSGD step kind to compare across the ranks' logs.
    text = reliability.worker_fault_message(gloo_timeout, rank=0, step=5, timeout=timedelta(seconds=5),
                                            output_dir=str(empty), where="step 5 (a pseudo_sync step; coins=shared)")
    assert text.startswith("rank 0 at step 5: a collective with the other ranks failed (")
    assert "in PALSGD step 5 (a pseudo_sync step; coins=shared)" in text and "waited in different collectives" in text


def test_one_setting_is_the_timeout_of_every_collective(tmp_path):
    from palsgd_hf.integrations.trainer_args import PALSGDTrainingArguments

    def args(**kw):
        return PALSGDTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kw)

    assert reliability.collective_timeout(args()).total_seconds() == 1800  # ddp_timeout's default
    assert reliability.collective_timeout(args(ddp_timeout=120)).total_seconds() == 120
    assert reliability.collective_timeout(args(ddp_timeout=120, palsgd_comm_timeout_seconds=7.5)).total_seconds() == 7.5
    # The argument is the config's field (one value, not two to keep in step).
    assert args(palsgd_comm_timeout_seconds=7.5).palsgd_config().comm_timeout_seconds == 7.5


def test_plain_training_arguments_take_the_timeout_from_the_config(tmp_path):
    # trl's SFTConfig and plain TrainingArguments have no palsgd_comm_timeout_seconds: the config carries it.
    from transformers import TrainingArguments

    from palsgd_hf import PALSGDConfig
    from palsgd_hf.integrations.trainer import resolve_palsgd_config

    def args(**kw):
        return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kw)

    cfg = PALSGDConfig(comm_timeout_seconds=45)
    assert reliability.collective_timeout(args(ddp_timeout=120), cfg).total_seconds() == 45
    assert reliability.collective_timeout(args(ddp_timeout=120), PALSGDConfig()).total_seconds() == 120
    # An explicit argument wins over the config's field (duck-typed arguments that carry one).
    with_field = args(ddp_timeout=120)
    with_field.palsgd_comm_timeout_seconds = 7.5
    assert reliability.collective_timeout(with_field, cfg).total_seconds() == 7.5
    # ddp_timeout stands in only for an unset timeout: a bad one is refused then, ignored when the config sets one.
    assert resolve_palsgd_config(args(ddp_timeout=0), cfg) is cfg
    with pytest.raises(PALSGDConfigError, match="ddp_timeout=0 must be a positive number of seconds"):
        resolve_palsgd_config(args(ddp_timeout=0), PALSGDConfig())
