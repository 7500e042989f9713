"""The emulated network: namespaces, tbf shaping, and teardown on success, failure, Ctrl-C and SIGTERM.

Needs the rights to create network namespaces (root / CAP_NET_ADMIN + CAP_SYS_ADMIN, as in CI);
skipped with the reason otherwise. The refusal without those rights is tested by dropping them
from a child process with ``setpriv``. Every test checks that it left no namespace behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from benchmarks.harness.launch import LaunchError, launch
from benchmarks.harness.netns import (
    NAME_PREFIX,
    LinkSpec,
    NetnsCluster,
    cleanup_stale,
    list_namespaces,
    netns_available,
)

REPO = Path(__file__).resolve().parents[2]
AVAILABLE, REASON = netns_available()
needs_netns = pytest.mark.skipif(not AVAILABLE, reason=f"network namespaces unavailable: {REASON}")


def ours(pid: int | None = None) -> list[str]:
    prefix = f"{NAME_PREFIX}{pid if pid is not None else ''}"
    return [n for n in list_namespaces() if n.startswith(prefix)]


def test_link_spec_validation():
    assert LinkSpec(None).label == "unshaped" and LinkSpec(100).label == "100mbit"
    with pytest.raises(ValueError, match="rate_mbit"):
        LinkSpec(0)
    with pytest.raises(ValueError, match="num_workers"):
        NetnsCluster(0)


@needs_netns
def test_cluster_shapes_both_directions_and_removes_everything():
    before = set(list_namespaces())
    with NetnsCluster(3, LinkSpec(50)) as cluster:
        names = set(cluster.created)
        assert names == {cluster.switch, *(cluster.namespace(i) for i in range(3))}
        assert names <= set(list_namespaces())
        table = cluster.qdiscs()
        # eth0 in each worker namespace and its switch port: 6 tbf qdiscs at 50 Mbit/s.
        assert table.count("tbf") == 6 and table.count("rate 50Mbit") == 6
        # Nothing was added to the host's own network namespace.
        host_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        assert cluster.tag not in host_links
    assert set(list_namespaces()) == before
    assert cluster.down() == []  # idempotent


@needs_netns
def test_teardown_after_a_failed_launch(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import sys; sys.exit(3)\n")
    cluster = NetnsCluster(2, LinkSpec(100))
    with pytest.raises(LaunchError, match="exited with rc"):
        with cluster:
            launch([str(script)], 2, tmp_path, cluster=cluster, timeout=60)
    assert not [n for n in list_namespaces() if n.startswith(cluster.tag)]


@needs_netns
def test_cleanup_stale_removes_only_dead_owners():
    # A namespace named as if created by a process that no longer exists, and one of ours (alive).
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = f"{NAME_PREFIX}{dead.pid}xabc123-w0"
    live = f"{NAME_PREFIX}{os.getpid()}xabc123-w0"
    for name in (stale, live):
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        removed = cleanup_stale()
        assert stale in removed and live not in removed
        assert live in list_namespaces() and stale not in list_namespaces()
    finally:
        for name in (stale, live):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


_HOLD = textwrap.dedent("""
    import sys, time
    from benchmarks.harness.netns import LinkSpec, NetnsCluster
    from benchmarks.harness.launch import launch
    from pathlib import Path
    out = Path(sys.argv[1])
    (out / "sleep.py").write_text("import time; time.sleep(60)  # held by the teardown test")
    cluster = NetnsCluster(2, LinkSpec(100)).up()
    try:
        print("UP", cluster.tag, flush=True)
        # A worker per namespace that would run for a minute: teardown must stop it too.
        launch([str(out / "sleep.py")], 2, out, cluster=cluster, timeout=120)
    finally:
        cluster.down()
""")


@needs_netns
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_tears_down(tmp_path, sig):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    try:
        line = proc.stdout.readline()
        assert line.startswith("UP"), line
        tag = line.split()[1]
        deadline = time.time() + 60
        while not any((tmp_path / f"worker{i}.log").exists() for i in range(2)) and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # the workers are running inside the namespaces now
        assert [n for n in list_namespaces() if n.startswith(tag)]
        proc.send_signal(sig)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert not [n for n in list_namespaces() if n.startswith(tag)]
    # No worker left: nothing of ours runs `sleep(60)` any more.
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path / "sleep.py") not in ps


@pytest.mark.skipif(shutil.which("setpriv") is None or os.geteuid() != 0, reason="needs root and setpriv")
def test_refuses_clearly_without_rights(tmp_path):
    # Drop CAP_NET_ADMIN and CAP_SYS_ADMIN for the child: the CLI must refuse before any work.
    cmd = ["setpriv", "--inh-caps=-net_admin,-sys_admin", "--bounding-set=-net_admin,-sys_admin",
           sys.executable, str(REPO / "benchmarks" / "bench.py"), "run", "--tiny", "--netns", "on",
           "--out", str(tmp_path / "o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "lacks CAP_NET_ADMIN, CAP_SYS_ADMIN" in proc.stderr and "--netns off" in proc.stderr
    assert not (tmp_path / "o").exists()
