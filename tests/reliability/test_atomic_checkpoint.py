"""A crash while a checkpoint is being written leaves the previous one intact, and resuming never reads
a half-written one.

The Trainer writes ``checkpoint-N/`` in place, file by file, from every rank. PALSGDTrainer makes rank 0's
``trainer_state.json`` the last file of a checkpoint (a barrier after every rank's files) and resumes only
from checkpoints that have it (palsgd_hf/integrations/faults.py); its own per-rank files are written
atomically (palsgd_hf/state_files.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from palsgd_hf.integrations import faults as reliability
from tests.reliability.runs import launch

pytestmark = pytest.mark.timeout(600)


def test_kill_during_a_save_keeps_the_previous_checkpoint_and_resume_skips_the_partial_one(baseline, tmp_path):
    # Rank 1 dies halfway through rng_state_1.pth, the last file it writes into checkpoint-20.
    crashed = launch(tmp_path / "crashed", "--timeout", "30", "--fault", "kill-in-save:1:20", check=False)
    assert crashed.proc.returncode != 0 and [r["step"] for r in crashed.faults[1]] == [20]
    partial, previous = crashed.run_dir / "checkpoint-20", crashed.run_dir / "checkpoint-10"
    assert (partial / "rng_state_1.pth").stat().st_size < (partial / "rng_state_0.pth").stat().st_size
    # Rank 0 had finished all its files, but waited for rank 1 before marking the checkpoint complete.
    assert (partial / "palsgd_rank0.pt").is_file() and (partial / "rng_state_0.pth").is_file()
    assert not (partial / "trainer_state.json").exists()
    assert not reliability.is_complete_checkpoint(partial) and reliability.is_complete_checkpoint(previous)
    assert reliability.last_complete_checkpoint(crashed.run_dir) == str(previous)
    with pytest.raises(ValueError, match=r"checkpoint-20' is incomplete: .* resume from .*checkpoint-10"):
        reliability.resolve_resume(str(partial), str(crashed.run_dir))

    resumed = launch(tmp_path / "resumed", "--resume", "last", run_dir=crashed.run_dir)
    # Bitwise: from checkpoint-10 the resumed run replays the uninterrupted run's computations in the same order.
    for rank, (got, want) in enumerate(zip(resumed.final_weights(), baseline.final_weights())):
        assert torch.equal(got, want), f"rank {rank}: final weights differ from the uninterrupted run"
    assert reliability.is_complete_checkpoint(partial)  # rewritten, whole, by the resumed run


def test_last_complete_checkpoint_skips_what_a_crash_left(tmp_path):
    def checkpoint(step, marker):
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        if marker is not None:
            (path / "trainer_state.json").write_text(marker)
        return path

    good = checkpoint(5, json.dumps({"global_step": 5}))
    checkpoint(3, json.dumps({"global_step": 3}))
    checkpoint(12, '{"global_step": 12, "log_hist')  # killed while rank 0 wrote the marker itself
    checkpoint(30, None)  # killed before the marker
    (tmp_path / "checkpoint-40.zip").write_text("not a checkpoint directory")
    assert reliability.last_complete_checkpoint(tmp_path) == str(good)
    assert reliability.resolve_resume(True, str(tmp_path)) == str(good)
    assert reliability.resolve_resume(str(good), str(tmp_path)) == str(good)
    assert reliability.resolve_resume(None, str(tmp_path)) is None
    # As the command line gives it: `--resume_from_checkpoint true` reaches the Trainer as the string "true".
    from palsgd_hf.cli.recipe import load_recipe

    assert load_recipe("recipes/shakespeare-tiny/palsgd.yaml", ["--resume_from_checkpoint", "true"]).training[
        "resume_from_checkpoint"] == "true"
    assert reliability.resolve_resume("true", str(tmp_path)) == str(good)
    with pytest.raises(ValueError, match=r"checkpoint-30' is incomplete.*resume from .*checkpoint-5 "):
        reliability.resolve_resume(str(tmp_path / "checkpoint-30"), str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no complete checkpoint-N directory"):
        reliability.resolve_resume(True, str(empty))


def test_kill_while_writing_a_rank_file_keeps_the_previous_file(tmp_path):
    """checkpoint.save_rank_state killed mid-write (a real process, SIGKILL) leaves the old file whole."""
    script = textwrap.dedent(f"""
        import io, os, signal, torch
        from palsgd_hf.integrations import checkpoint
        checkpoint.save_rank_state({str(tmp_path)!r}, 0, 2, {{"step": 1}}, model_state={{"w": torch.ones(1000)}})
        real = torch.save
        def dying_save(obj, f, *a, **k):
            buffer = io.BytesIO(); real(obj, buffer)
            f.write(buffer.getvalue()[:1000]); f.flush(); os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        checkpoint.save_rank_state({str(tmp_path)!r}, 0, 2, {{"step": 2}}, model_state={{"w": torch.zeros(1000)}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "palsgd_rank0.pt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".palsgd_rank0.pt.tmp-")  # the cut-off write
    state = torch.load(tmp_path / "palsgd_rank0.pt", weights_only=True)
    assert state["algorithm"] == {"step": 1} and torch.equal(state["model"]["w"], torch.ones(1000))
    assert os.path.getsize(tmp_path / leftovers[0]) == 1000
