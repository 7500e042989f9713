"""Launch a test script on N real processes with torchrun (gloo on CPU), with a timeout.

Scripts live in tests/distributed/scripts/; each writes one JSON file per rank into the output
directory it is given, which the test then reads. ``--standalone`` makes torchrun pick a free
port, so tests never collide on 29500.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "distributed" / "scripts"


def torchrun(script: str, nproc: int, out_dir: Path, *args: str, timeout: float = 240, env: dict | None = None):
    """Run ``script`` on ``nproc`` processes; return the per-rank JSON results (rank order)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(SCRIPTS / script), "--out", str(out_dir), *args,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    # Its own process group: on a timeout (or pytest-timeout's) the ranks go too, not only torchrun, so a
    # hung collective never leaves workers behind spinning on the CI's cores.
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                          start_new_session=True) as popen:
        try:
            stdout, stderr = popen.communicate(timeout=timeout)
        except BaseException:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.communicate()
            raise
    proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
    if proc.returncode != 0:
        raise AssertionError(f"{script} failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(nproc)]
