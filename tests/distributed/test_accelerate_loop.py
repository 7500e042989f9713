"""The Accelerate hooks through examples/accelerate_loop.py: 2 real processes, gradient accumulation,
``accelerator.save_state`` mid-interval, and an exact resume with ``accelerator.load_state``.

Run A is launched the way the example's docstring says (``accelerate launch --multi_gpu``, which on
a CPU-only machine is 2 gloo processes because the example passes ``Accelerator(cpu=cpu_only())``);
it saves a checkpoint after step 11, between syncs, where the two replicas differ. Run B resumes
from it under torchrun and must end bit-identical to run A. The example runs unchanged inside
scripts/accelerate_loop_probe.py, which records the weights its evaluate() sees: it evaluates every
4 steps, also in the middle of the syncing periods, where it must score the global model.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PROBE = ROOT / "tests" / "distributed" / "scripts" / "accelerate_loop_probe.py"  # runs examples/accelerate_loop.py
# 24 optimizer steps of 2 micro-batches: 6 warm-up steps, then syncs after steps 12, 18 and 24; evaluations after
# steps 4, 8, ..., 24 (8, 16 and 20 between two syncs).
ARGS = ["--max_steps", "24", "--grad_accum", "2", "--batch_size", "4", "--warmup_steps", "6", "--sync_interval", "6",
        "--eval_every", "4", "--max_eval_samples", "16", "--block_size", "64"]
EVAL_STEPS = [4, 8, 12, 16, 20, 24]
SAVE_AT = 11


ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def launch(launcher: list[str], out: Path, *extra: str) -> list[dict]:
    """Run the example on 2 processes; return the per-rank results."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([*launcher, str(PROBE), *ARGS, *extra, "--output_dir", str(out)], capture_output=True,
                          text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r, result in enumerate(results):
        result["probe"] = json.loads((out / f"probe_rank{r}.json").read_text())
    return results


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    out = tmp_path_factory.mktemp("accel") / "a"
    return out, launch(ACCELERATE, out, "--save_state_at", str(SAVE_AT))


@pytest.mark.timeout(300)
def test_example_trains_palsgd_on_two_processes(run_a):
    _, (a0, a1) = run_a
    assert a0["world_size"] == a1["world_size"] == 2 and a0["steps"] == a1["steps"] == 24
    for r in (a0, a1):
        assert r["kinds"][:6] == ["warmup"] * 6
        assert set(r["kinds"][6:]) <= {"gradient", "pseudo_sync"}
        m = r["metrics"]
        assert m["palsgd/warmup_steps"] == 6 and m["palsgd/outer_syncs"] == 3
        assert m["palsgd/gradient_steps"] + m["palsgd/pseudo_syncs"] == 18
        # a pseudo-sync step computes nothing: one loss per micro-batch of the computed steps only
        computed = m["palsgd/warmup_steps"] + m["palsgd/gradient_steps"]
        assert len(r["losses"]) == 2 * computed
    # Shared coins (the default): the replicas take the same kind of step at every step, both kinds occur.
    assert a0["kinds"] == a1["kinds"], "shared coins: the replicas ran different step kinds"
    assert {"gradient", "pseudo_sync"} <= set(a0["kinds"])
    assert a0["weights_sha256"] == a1["weights_sha256"], "finalize() left the replicas different"
    assert a0["eval_loss"] == a1["eval_loss"] < math.log(2048)
    assert [s for s, _ in a0["evals"]] == EVAL_STEPS


@pytest.mark.timeout(300)
def test_evaluation_between_syncs_scores_the_global_model(run_a):
    _, (a0, a1) = run_a
    probes = [a0["probe"], a1["probe"]]
    assert [len(p) for p in probes] == [len(EVAL_STEPS) + 1] * 2  # + the evaluation after finalize()
    at = {step: (probes[0][i], probes[1][i]) for i, step in enumerate(EVAL_STEPS)}
    for step, rows in at.items():
        for rank, row in enumerate(rows):
            assert row["forwards"] > 0 and len(row["evaluated"]) == 1, (step, rank, row)
            assert row["after"] == row["before"], f"step {step}, rank {rank}: the local weights were not restored"
        # Every rank scores the same model: the global one.
        assert rows[0]["evaluated"] == rows[1]["evaluated"], f"step {step}: the ranks evaluated different models"
    for step in (4, 12, 24):  # in the warm-up and right after a sync every rank holds the global model itself
        assert at[step][0]["before"] == at[step][1]["before"] == at[step][0]["evaluated"][0], step
    for step in (8, 16, 20):  # between syncs the replicas have drifted apart; the anchor is swapped in
        assert at[step][0]["before"] != at[step][1]["before"], f"step {step}: replicas identical between syncs"
        assert all(row["evaluated"][0] != row["before"] for row in at[step]), step
    # The anchor between two syncs is the model of the last sync (16: the one at 12; 20: the one at 18).
    assert at[16][0]["evaluated"] == [at[12][0]["before"]] != at[20][0]["evaluated"]


@pytest.mark.timeout(300)
def test_save_state_writes_each_ranks_own_state(run_a):
    out, _ = run_a
    state = out / f"state_step{SAVE_AT}"
    assert (state / "model.safetensors").is_file() and (state / "custom_checkpoint_0.pkl").is_file()
    r0, r1 = (torch.load(state / "palsgd" / f"rank_{r}.pt", weights_only=False) for r in range(2))
    assert r0["algorithm"]["step"] == r1["algorithm"]["step"] == SAVE_AT
    # Between syncs the replicas differ: rank 0's weights (all accelerate saves) would be wrong for rank 1.
    assert any(not torch.equal(r0["model"][k], r1["model"][k]) for k in r0["model"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resume_from_save_state_continues_exactly(run_a, tmp_path):
    out_a, (a0, a1) = run_a
    b0, b1 = launch(TORCHRUN, tmp_path / "b", "--resume_from", str(out_a / f"state_step{SAVE_AT}"))
    for a, b in ((a0, b0), (a1, b1)):
        assert b["kinds"] == a["kinds"][SAVE_AT:], "the resumed run drew different coins"
        assert b["losses"] == a["losses"][len(a["losses"]) - len(b["losses"]):], "the resumed losses differ"
        assert b["weights_sha256"] == a["weights_sha256"], "the resumed run ended with different weights"
        assert b["metrics"]["palsgd/outer_syncs"] == a["metrics"]["palsgd/outer_syncs"]
    assert b0["eval_loss"] == a0["eval_loss"]



@pytest.mark.timeout(120)
def test_hooks_refuse_a_lonely_accelerator_and_an_unprepared_optimizer():
    # One process that believes it is rank 0 of 2 (WORLD_SIZE=2) with Accelerator() on a CPU-only
    # machine: accelerate's state is single-process there, the trap the hooks must refuse.
    script = textwrap.dedent("""
        import torch
        from accelerate import Accelerator
        from palsgd_hf import PALSGDConfig
        from palsgd_hf.integrations.accelerate import PALSGDAccelerate, cpu_only
        if not cpu_only():
            print("SKIP"); raise SystemExit
        import os
        os.environ["WORLD_SIZE"] = "2"
        try:
            PALSGDAccelerate(Accelerator(), PALSGDConfig())
        except RuntimeError as err:
            print("REFUSED", err)
        os.environ["WORLD_SIZE"] = "1"
        accelerator = Accelerator(cpu=True)
        model = torch.nn.Linear(2, 1)
        raw = torch.optim.SGD(model.parameters(), lr=0.1)
        try:
            PALSGDAccelerate(accelerator, PALSGDConfig()).wrap(model, raw)
        except TypeError as err:
            print("UNPREPARED", err)
        hooks = PALSGDAccelerate(accelerator, None)
        prepared_model, prepared = accelerator.prepare(model, raw)
        assert hooks.wrap(prepared_model, prepared) is prepared and hooks.should_compute() and hooks.metrics() == {}
        print("NOOP ok")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=100, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if "SKIP" in proc.stdout:
        pytest.skip("this machine has a GPU")
    assert "REFUSED the launcher started 2 processes (WORLD_SIZE) but the Accelerator sees 1" in proc.stdout
    assert "Accelerator(cpu=True)" in proc.stdout
    assert "UNPREPARED wrap() needs the optimizer returned by accelerator.prepare" in proc.stdout
    assert "NOOP ok" in proc.stdout
