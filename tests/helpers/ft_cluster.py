"""Replicas of a fault-tolerant run as real processes on loopback, with a lighthouse, kills and timeouts.

Each replica runs tests/distributed/scripts/ft_replica.py in its own process (and process group, so that
a kill takes everything it started); with ``ranks=S > 1`` it runs a script under its own
``torchrun --standalone --nproc_per_node S`` (a replica of S ranks, its own torch.distributed world), and a
kill takes the launcher and every rank (torchrun starts each rank in a session of its own). The lighthouse
runs in the test process on a free port. Every wait has a deadline; on a timeout or a replica exiting with
an error the replicas' logs are in the message.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from palsgd_hf.fault_tolerance import start_lighthouse

SCRIPTS = Path(__file__).resolve().parents[1] / "distributed" / "scripts"
SCRIPT = SCRIPTS / "ft_replica.py"


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), found before a kill: torchrun's ranks are in sessions of
    their own, so killing its process group would leave them running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Cluster:
    """Start, kill and restart replicas; read their events and results."""

    def __init__(self, out: Path, *args: str, heartbeat_timeout_ms: int = 1000, join_timeout_ms: int = 3000,
                 script: Path = SCRIPT, ranks: int = 1, restarts: int = 0):
        self.out, self.args, self.script, self.ranks, self.restarts = out, args, script, ranks, restarts
        out.mkdir(parents=True, exist_ok=True)
        self.lighthouse = start_lighthouse(2, join_timeout_ms=join_timeout_ms,
                                           heartbeat_timeout_ms=heartbeat_timeout_ms)
        self.procs: dict[int, subprocess.Popen] = {}
        self.finished: list[subprocess.Popen] = []
        self._logs: list = []

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        for replica in list(self.procs):
            self.kill(replica)
        self.lighthouse.shutdown()
        for log in self._logs:
            log.close()

    def start(self, replica: int, *extra: str) -> float:
        log = (self.out / f"log_{replica}.txt").open("a")
        self._logs.append(log)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        launcher = [] if self.ranks == 1 else [
            "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.ranks}",
            f"--max-restarts={self.restarts}"]
        self.procs[replica] = subprocess.Popen(
            [sys.executable, *launcher, str(self.script), "--out", str(self.out), "--lighthouse",
             self.lighthouse.address(), "--replica", str(replica), *self.args, *extra],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        return time.time()

    def kill(self, replica: int) -> float:
        proc = self.procs.pop(replica)
        ranks = descendants(proc.pid)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        killed = time.time()
        proc.wait(timeout=30)
        return killed

    def wait_exit(self, replica: int, timeout: float) -> int:
        """Wait for ``replica``'s process (its torchrun) to end by itself; its exit code. Past ``timeout`` it is
        killed and the test fails: something inside the replica hung."""
        proc = self.procs[replica]
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(replica)
            raise AssertionError(f"replica {replica} did not end within {timeout} s{self.logs()}") from None
        self.procs.pop(replica)
        return rc

    def events(self, replica: int, rank: int | None = None) -> list[dict]:
        """The events of ``replica`` (of its rank ``rank`` in a replica of several ranks)."""
        path = self.out / (f"events_{replica}.jsonl" if rank is None else f"events_{replica}_{rank}.jsonl")
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]

    def syncs(self, replica: int, pid: int | None = None, rank: int | None = None) -> list[dict]:
        """Its syncs (of the process ``pid``: the replica's process, or its torchrun launcher)."""
        return [e for e in self.events(replica, rank)
                if e["kind"] == "sync" and (pid is None or pid in (e["pid"], e.get("launcher")))]

    def wait_for(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while not done():
            for replica, proc in self.procs.items():
                if proc.poll() not in (None, 0):
                    raise AssertionError(f"replica {replica} failed (rc={proc.returncode}) while waiting for {what}"
                                         f"{self.logs()}")
            if time.time() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}{self.logs()}")
            time.sleep(0.05)

    def wait_all(self, timeout: float) -> None:
        """Wait for every running replica to finish (exit 0)."""
        self.wait_for(lambda: all(p.poll() is not None for p in self.procs.values()), timeout, "the end of the run")
        failed = {r: p.returncode for r, p in self.procs.items() if p.returncode != 0}
        if failed:
            raise AssertionError(f"replicas {failed} ended with an error{self.logs()}")
        self.finished.extend(self.procs.values())
        self.procs.clear()

    def results(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.out.glob("result_*.json"))]

    def logs(self) -> str:
        return "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.out.glob("log_*.txt")))
