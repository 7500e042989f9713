"""Launching the reliability worker (scripts/fault_run.py) on 2 real processes, and reading what it left.

Unlike tests/helpers/launch.py this expects runs to fail on purpose: it returns the finished process,
its wall-clock end, and whatever the ranks wrote (results of the ranks that finished, fault records of
the ranks that misbehaved).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

SCRIPT = Path(__file__).resolve().parent / "scripts" / "fault_run.py"
NPROC = 2
# The schedule every reliability run shares: 24 steps, 4 of warm-up, syncs after steps 8, 12, 16, 20, 24,
# checkpoints at 10 and 20 (both between two syncs, where the replicas differ).
STEPS, H, WARMUP, SAVE_STEPS = 24, 4, 4, 10
COMMON = ["--steps", str(STEPS), "--H", str(H), "--warmup", str(WARMUP), "--save-steps", str(SAVE_STEPS)]


@dataclass
class Run:
    out: Path
    run_dir: Path
    proc: subprocess.CompletedProcess
    ended_at: float
    results: list = field(default_factory=list)  # rank{R}.json of the ranks that finished, rank order
    faults: dict = field(default_factory=dict)  # rank -> its fault records

    @property
    def output(self) -> str:
        return self.proc.stdout + self.proc.stderr

    def final_weights(self) -> list[torch.Tensor]:
        return [torch.load(self.out / f"rank{r}.pt")["final"] for r in range(NPROC)]

    def fault_time(self) -> float:
        return min(record["time"] for records in self.faults.values() for record in records)


def launch(out: Path, *args: str, run_dir: Optional[Path] = None, check: bool = True, timeout: float = 300) -> Run:
    """Run the worker on NPROC processes (torchrun, free port); ``check`` asserts that it succeeded."""
    out.mkdir(parents=True, exist_ok=True)
    run_dir = run_dir or out / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NPROC}", str(SCRIPT),
           "--out", str(out), "--run-dir", str(run_dir), *COMMON, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    run = Run(out, run_dir, proc, time.time())
    if check and proc.returncode != 0:
        raise AssertionError(f"run failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    run.results = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    run.faults = {int(p.stem[len("fault"):]): json.loads(p.read_text()) for p in out.glob("fault*.json")}
    return run


def losses(result: dict) -> dict[int, float]:
    """Logged training loss by step."""
    return {e["step"]: e["loss"] for e in result["log_history"] if "loss" in e}
