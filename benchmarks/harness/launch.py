"""Start one distributed job: one torchrun per worker, each inside its own network namespace.

With a :class:`~benchmarks.harness.netns.NetnsCluster`, worker ``i`` runs
``ip netns exec <ns i> torchrun --nnodes N --node_rank i --nproc_per_node 1 --master_addr <ns 0>``:
the multi-node launch a user runs across machines, with every byte between workers crossing the
shaped links (gloo is told to use the namespace's ``eth0``). Without a cluster the job is a single
``torchrun --standalone --nproc_per_node N`` on loopback (free port).

Every process is started in its own session so that :func:`launch` can stop the whole tree of a
worker (torchrun's agent and its child) on failure, timeout or Ctrl-C, before the namespaces go.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .netns import NetnsCluster

CHECKOUT = Path(__file__).resolve().parents[2]

logger = logging.getLogger(__name__)

MASTER_PORT = 29400  # inside our own namespaces nothing else listens, so a fixed port is safe there


class LaunchError(RuntimeError):
    """A worker failed or timed out; the message quotes the end of its log."""


@dataclass
class WorkerProcess:
    rank: int
    proc: subprocess.Popen
    log: Path


def worker_command(
    target: Sequence[str], rank: int, num_workers: int, cluster: Optional[NetnsCluster]
) -> list[str]:
    """The command line of worker ``rank``; ``target`` is ``["-m", module, args...]`` or ``[script, args...]``."""
    run = [sys.executable, "-m", "torch.distributed.run", "--max_restarts", "0"]
    if target and target[0] == "-m":
        target = ["--module", *target[1:]]
    if cluster is None:
        return [*run, "--standalone", f"--nproc_per_node={num_workers}", *target]
    return [
        *cluster.exec_prefix(rank), *run,
        f"--nnodes={num_workers}", f"--node_rank={rank}", "--nproc_per_node=1",
        f"--master_addr={cluster.address(0)}", f"--master_port={MASTER_PORT}", *target,
    ]


def worker_env(cluster: Optional[NetnsCluster], extra: Optional[dict] = None) -> dict:
    env = {
        **os.environ,
        # One thread per rank: the ranks share the machine's cores, and oversubscription would
        # turn compute time into noise.
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    # Workers run `-m benchmarks.harness.worker`: the checkout must be importable (it is not installed).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(CHECKOUT), os.environ.get("PYTHONPATH", "")) if p)
    if cluster is not None:
        env["GLOO_SOCKET_IFNAME"] = cluster.device
    env.update(extra or {})
    return env


def launch(
    target: Sequence[str],
    num_workers: int,
    log_dir: Path,
    *,
    cluster: Optional[NetnsCluster] = None,
    timeout: float = 600.0,
    env: Optional[dict] = None,
) -> float:
    """Run the job to completion; return its wall time in seconds. Raises :class:`LaunchError`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    full_env = worker_env(cluster, env)
    # Standalone torchrun starts all ranks itself; in namespaces each worker has its own torchrun.
    launches = 1 if cluster is None else num_workers
    workers: list[WorkerProcess] = []
    start = time.perf_counter()
    try:
        for rank in range(launches):
            log = log_dir / f"worker{rank}.log"
            cmd = worker_command(target, rank, num_workers, cluster)
            with open(log, "w") as fh:
                fh.write("$ " + " ".join(cmd) + "\n")
                fh.flush()
                proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
            workers.append(WorkerProcess(rank, proc, log))
        _wait(workers, start + timeout)
        return time.perf_counter() - start
    finally:
        _stop(workers)


def _wait(workers: list[WorkerProcess], deadline: float) -> None:
    pending = list(workers)
    while pending:
        for w in list(pending):
            rc = w.proc.poll()
            if rc is None:
                continue
            pending.remove(w)
            if rc != 0:
                raise LaunchError(f"worker {w.rank} exited with rc={rc}; end of {w.log}:\n{_tail(w.log)}")
        if pending and time.perf_counter() > deadline:
            raise LaunchError(
                f"workers {[w.rank for w in pending]} still running at the timeout; end of {pending[0].log}:\n"
                f"{_tail(pending[0].log)}"
            )
        time.sleep(0.2)


def _stop(workers: list[WorkerProcess], grace: float = 5.0) -> None:
    """SIGTERM each still-running worker's process group, SIGKILL what is left after ``grace``."""
    alive = [w for w in workers if w.proc.poll() is None]
    for w in alive:
        _signal_group(w.proc, signal.SIGTERM)
    deadline = time.perf_counter() + grace
    for w in alive:
        try:
            w.proc.wait(max(0.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            pass
    for w in workers:
        # Also the group of an exited torchrun agent: a rank it left behind would keep the namespace alive.
        _signal_group(w.proc, signal.SIGKILL)
        try:
            w.proc.wait(5)
        except subprocess.TimeoutExpired:
            logger.warning("worker %d (pid %d) did not exit after SIGKILL", w.rank, w.proc.pid)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the session/group id is the child's pid (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as err:
        return f"<cannot read log: {err}>"
