"""The alpha-beta projection: its formulas, its limits, and the command that writes it."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.harness.cli import main
from benchmarks.harness.projection import (
    Hardware,
    Scenario,
    allreduce_seconds,
    default_grid,
    project,
    speedups,
    step_times,
)

REPO = Path(__file__).resolve().parents[2]


def test_ring_allreduce_formula():
    # 2 GPUs: each link carries the whole message once: 1e9 bytes at 8e9 bit/s = 1 s, plus 2 hops.
    assert allreduce_seconds(1e9, 2, 8e9, 1e-3) == pytest.approx(1.0 + 2e-3)
    # Many GPUs: the bandwidth term tends to 2x the message.
    assert allreduce_seconds(1e9, 1000, 8e9, 0.0) == pytest.approx(2 * 999 / 1000)
    assert allreduce_seconds(1e9, 1, 8e9, 1.0) == 0.0


def test_step_times_against_hand_computation():
    hw = Hardware(peak_flops=1e15, mfu=0.5, alpha_s=0.0, grad_bytes_per_param=2, sync_bytes_per_param=4)
    sc = Scenario(params=1e9, gpus=2, link_gbit=16, tokens_per_gpu=1e4, sync_interval=10, pseudo_sync_prob=0.2,
                  own_work_ratio=0.0)
    t = step_times(sc, hw)
    assert t["compute"] == pytest.approx(6 * 1e9 * 1e4 / 5e14)  # 0.12 s
    assert t["grad_allreduce"] == pytest.approx(2e9 * 8 / 16e9)  # 1 s
    assert t["ddp"] == pytest.approx(1.12) and t["ddp_overlap"] == pytest.approx(1.0)
    assert t["diloco"] == pytest.approx(0.12 + 2.0 / 10)
    assert t["palsgd"] == pytest.approx(0.8 * 0.12 + 0.2)


def test_limits():
    hw = Hardware(alpha_s=0.0)
    # p = 0 and no overhead: PALSGD is DiLoCo.
    sc = Scenario(1.3e9, 8, 100, 1e5, pseudo_sync_prob=0.0, own_work_ratio=0.0)
    t = step_times(sc, hw)
    assert t["palsgd"] == pytest.approx(t["diloco"])
    # Compute-bound (huge bandwidth): the edge over DiLoCo tends to 1/(1-p+eps), over DDP likewise.
    fast = step_times(Scenario(1.3e9, 8, 1e9, 1e5, pseudo_sync_prob=0.2, own_work_ratio=0.01), hw)
    assert speedups(fast)["vs_diloco"] == pytest.approx(1 / 0.81, rel=1e-4)
    assert speedups(fast)["vs_ddp_overlap"] == pytest.approx(1 / 0.81, rel=1e-4)
    # Needing more steps eats the edge: at 1/(1-p+eps) times DDP's steps PALSGD only ties.
    assert speedups(fast, {"palsgd": 1 / 0.81})["vs_ddp_overlap"] == pytest.approx(1.0, rel=1e-4)
    # Communication-bound: the edge over DDP grows without bound as the link slows, the one over DiLoCo -> 1.
    slow = [speedups(step_times(Scenario(1.3e9, 64, b, 1e4), hw)) for b in (100, 10, 1, 0.01)]
    assert all(a["vs_ddp"] < b["vs_ddp"] for a, b in zip(slow, slow[1:]))
    assert slow[-1]["vs_diloco"] == pytest.approx(1.0, abs=0.01)


def test_model_size_cancels_without_latency():
    hw = Hardware(alpha_s=0.0)
    ratios = {p: speedups(step_times(Scenario(p, 16, 50, 2e4), hw))["vs_ddp"] for p in (125e6, 1.3e9, 7e9)}
    assert max(ratios.values()) == pytest.approx(min(ratios.values()))


def test_default_grid_covers_the_issue_ranges():
    rows = project(default_grid())
    scen = [r["scenario"] for r in rows]
    assert {s["params"] for s in scen} == {125e6, 1.3e9, 7e9}
    assert {s["gpus"] for s in scen} == {8, 64} and {s["link_gbit"] for s in scen} == {10, 100, 400}
    with pytest.raises(ValueError, match="gpus >= 2"):
        dataclasses.replace(default_grid()[0], gpus=1)


def test_project_command_writes_files(tmp_path):
    out = tmp_path / "proj"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench.py"), "project", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| 7B | 64 | 10 |" in proc.stdout
    data = json.loads((out / "projection.json").read_text())
    assert len(data["rows"]) == 18
    assert (out / "projection.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["project", "--mfu", "1.5"], "--mfu 1.5 must lie in (0, 1]"),
    (["project", "--from", "missing.json"], "does not exist"),
    (["run", "--rate-mbit", "100", "--netns", "off", "--tiny"], "needs network namespaces"),
    (["run", "--tiny", "--methods", "palsgd"], "must include 'ddp'"),
    (["run", "--tiny", "--overhead-steps", "3"], "--overhead-steps 3 must be 0 or >= 2*H"),
    (["run", "--no-unshaped", "--rate-mbit", "0"], "rate_mbit=0.0 must be > 0"),
    (["report", "nothing.json"], "does not exist"),
])
def test_cli_refuses_bad_arguments_before_work(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = ["--out", str(tmp_path / "o")] if args[0] in ("run", "project") else []
    assert main([*args, *out]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before any work
