"""The benchmark harness end to end, tiny: real PALSGDTrainer runs on Shakespeare, 2 workers.

With the rights to create network namespaces (root, as in CI), each worker runs in its own
namespace behind a 100 Mbit/s tbf-shaped link; without them the same command runs on loopback,
unshaped. Checks what the harness promises: every run recorded with its eval history, the
target and its comparison computed, DDP's bytes counted per step and PALSGD's only at syncs,
the link measured near its shaped rate, the JSON / markdown / PNG written, and no namespace left.
The claims themselves are the full benchmark's job (BENCHMARKS.md), not this test's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.harness.netns import NAME_PREFIX, list_namespaces, netns_available

REPO = Path(__file__).resolve().parents[2]
NETNS, _ = netns_available()


@pytest.mark.timeout(300)
def test_tiny_benchmark_end_to_end(tmp_path):
    out = tmp_path / "bench"
    link = ["--rate-mbit", "100", "--no-unshaped", "--netns", "on"] if NETNS else ["--netns", "off"]
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench.py"), "run", "--tiny", "--methods", "ddp,palsgd",
           "--overhead-steps", "0", "--out", str(out), *link]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        stdout, stderr = proc.communicate(timeout=280)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, f"{stdout[-3000:]}\n{stderr[-6000:]}"
    # Namespaces carry their creator's pid: none of this run's may be left (others may be running).
    assert not [n for n in list_namespaces() if n.startswith(f"{NAME_PREFIX}{proc.pid}x")]

    bench = json.loads((out / "results.json").read_text())
    assert bench["netns"] is NETNS
    (label, entry), = bench["links"].items()
    assert label == ("100mbit" if NETNS else "unshaped")
    settings = bench["settings"]
    ddp, palsgd = entry["runs"]["ddp"], entry["runs"]["palsgd"]

    # DDP ran its budget and was evaluated at every eval step; its last loss is the target.
    assert ddp["steps"] == settings["steps"]
    assert [h["step"] for h in ddp["history"]] == list(range(settings["eval_every"], settings["steps"] + 1,
                                                             settings["eval_every"]))
    summary = entry["summary"]
    assert summary["palsgd"]["target_loss"] == ddp["history"][-1]["eval_loss"]
    # PALSGD ran at least DDP's steps (equal tokens) and at most its budget; it stops only at the target.
    assert settings["steps"] <= palsgd["steps"] <= round(settings["steps"] * settings["local_step_factor"])
    if palsgd["steps"] < round(settings["steps"] * settings["local_step_factor"]):
        assert palsgd["stopped_at_target"] and palsgd["history"][-1]["eval_loss"] <= ddp["history"][-1]["eval_loss"]
    for run in (ddp, palsgd):
        losses = [h["eval_loss"] for h in run["history"]]
        assert all(0 < x < 10 for x in losses) and losses[-1] < losses[0]  # it learned something
        times = [h["train_seconds"] for h in run["history"]]
        assert times == sorted(times) and times[-1] <= run["launch_seconds"]

    # Bytes: DDP sends one gradient-sized payload per step (the model's fp32 bytes); after warm-up PALSGD
    # sends only at syncs (every H steps): DDP kept the replicas identical, so the local phase starts
    # without a broadcast.
    model_bytes = ddp["comm_bytes"] / ddp["steps"]
    assert 0.9e6 < model_bytes < 1.1e6  # the tiny GPT-Neo has ~0.25M parameters
    start = palsgd["comm_at_local_start"]
    assert start["step"] == settings["palsgd_warmup_steps"]
    local_messages = (palsgd["comm_bytes"] - start["comm_bytes"]) / model_bytes
    syncs = palsgd["metrics"]["outer_syncs"] + palsgd["metrics"]["skipped_syncs"]
    assert syncs == (palsgd["steps"] - settings["palsgd_warmup_steps"]) // settings["sync_interval"]
    assert local_messages == pytest.approx(syncs, abs=0.01)  # the syncs, nothing else
    assert palsgd["metrics"]["pseudo_syncs"] > 0

    if NETNS:
        fit = entry["probe"]["fit"]
        assert 60 < fit["link_mbit_s"] < 105, fit  # tbf at 100 Mbit/s measures ~93-95 Mbit/s

    md = (out / "results.md").read_text()
    assert "| PALSGD (H 4) |" in md and "Targets on" in md
    assert (out / f"loss_{label}.png").read_bytes()[:4] == b"\x89PNG"
