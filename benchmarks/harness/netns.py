"""An emulated slow network for benchmarks: one Linux network namespace per worker, a shaped link each.

Layout (everything lives inside namespaces this module creates; the host's own network is never
touched, and no address outside these namespaces is ever used)::

    <prefix>-w0 [eth0 10.213.0.1] --veth-- [p0]
    <prefix>-w1 [eth0 10.213.0.2] --veth-- [p1]   <prefix>-sw: bridge br0 joins p0..pN-1
    ...

Each worker is one "machine" with one NIC. With ``rate_mbit`` set, a ``tc tbf`` qdisc limits both
directions of every worker's link (egress of the worker's ``eth0`` and of its switch port), like
a full-duplex NIC of that speed plugged into a non-blocking switch. ``tc netem`` (added latency)
is absent on the kernels we target, so latency is whatever the kernel gives (tens of
microseconds); the projection adds latency through its alpha term instead.

Names carry the creating process id (``palsgdb<pid>x<random>``) so that :func:`cleanup_stale`
can remove what a killed run left behind without touching anything else. Deleting a namespace
removes its veth ends and qdiscs with it, so teardown is: stop our processes, delete our
namespaces. :meth:`NetnsCluster.down` is idempotent and runs from ``finally``, ``atexit`` and the
SIGINT/SIGTERM handlers installed while the cluster is up.

Rights: creating namespaces needs CAP_SYS_ADMIN and CAP_NET_ADMIN (root, usually) and
iproute2's ``ip`` and ``tc``. :func:`check_rights` tries it for real in a throw-away namespace and
raises :class:`NetnsUnavailable` with the reason and the fix when it cannot.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Optional, Sequence

logger = logging.getLogger(__name__)

NAME_PREFIX = "palsgdb"
_NAME_RE = re.compile(rf"^{NAME_PREFIX}(\d+)x([0-9a-f]+)-(w\d+|sw|probe)$")
SUBNET = "10.213.0"  # /24, private; only ever assigned inside namespaces created here
WORKER_DEV = "eth0"
MAX_WORKERS = 250
_CMD_TIMEOUT = 20


class NetnsUnavailable(RuntimeError):
    """Network namespaces or tc shaping cannot be used here; the message says why and what to do."""


@dataclass(frozen=True)
class LinkSpec:
    """A worker's link: ``rate_mbit`` None = unshaped (veth speed).

    ``burst_kib`` is tbf's bucket: at least rate/HZ and >= 64 KiB so that gloo's large sends are
    not chopped into sub-millisecond slices; ``queue_ms`` is tbf's ``latency`` (how long a packet
    may wait in the queue before being dropped), generous so TCP sees shaping, not loss.
    """

    rate_mbit: Optional[float] = None
    burst_kib: int = 256
    queue_ms: int = 200

    def __post_init__(self) -> None:
        if self.rate_mbit is not None and not self.rate_mbit > 0:
            raise ValueError(f"rate_mbit={self.rate_mbit!r} must be > 0 (Mbit/s) or None for an unshaped link.")
        if self.burst_kib < 16 or self.queue_ms < 1:
            raise ValueError(
                f"burst_kib={self.burst_kib} / queue_ms={self.queue_ms}: use burst_kib >= 16 and queue_ms >= 1."
            )

    @property
    def label(self) -> str:
        return "unshaped" if self.rate_mbit is None else f"{self.rate_mbit:g}mbit"


def _run(cmd: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=_CMD_TIMEOUT)
    if check and proc.returncode != 0:
        raise NetnsUnavailable(f"`{' '.join(cmd)}` failed (rc={proc.returncode}): {proc.stderr.strip()}")
    return proc


def _capabilities() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        return None
    return None


_CAP_NET_ADMIN, _CAP_SYS_ADMIN = 12, 21
_FIX = (
    "run the benchmark as root (or with CAP_NET_ADMIN and CAP_SYS_ADMIN, e.g. `sudo -E`), "
    "or pass --netns off to run all workers on loopback without a shaped link"
)


def check_rights(shape: bool = True) -> None:
    """Raise :class:`NetnsUnavailable` unless namespaces (and tbf, if ``shape``) work here.

    Beyond reading capabilities it creates a namespace, adds a tbf qdisc to its loopback and
    deletes it again, because containers can hold the capabilities and still forbid the calls.
    """
    if not os.path.exists("/proc/self/ns/net"):
        raise NetnsUnavailable(f"this system has no network namespaces (Linux only); {_FIX}.")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise NetnsUnavailable(f"iproute2 tools {missing} are not on PATH; install iproute2, or {_FIX}.")
    caps = _capabilities()
    if caps is not None:
        lacking = [n for n, bit in (("CAP_NET_ADMIN", _CAP_NET_ADMIN), ("CAP_SYS_ADMIN", _CAP_SYS_ADMIN))
                   if not caps >> bit & 1]
        if lacking:
            raise NetnsUnavailable(f"this process lacks {', '.join(lacking)} (euid {os.geteuid()}); {_FIX}.")
    name = f"{NAME_PREFIX}{os.getpid()}x{secrets.token_hex(3)}-probe"
    proc = _run(["ip", "netns", "add", name], check=False)
    if proc.returncode != 0:
        raise NetnsUnavailable(f"`ip netns add` was refused: {proc.stderr.strip()}; {_FIX}.")
    try:
        if shape:
            proc = _run(["tc", "-n", name, "qdisc", "add", "dev", "lo", "root", "tbf",
                         "rate", "100mbit", "burst", "64kb", "latency", "50ms"], check=False)
            if proc.returncode != 0:
                raise NetnsUnavailable(
                    f"`tc qdisc add ... tbf` was refused ({proc.stderr.strip()}): the kernel lacks the tbf "
                    f"scheduler (sch_tbf) or the right to use it; load sch_tbf, or {_FIX}."
                )
    finally:
        _run(["ip", "netns", "del", name], check=False)


def netns_available(shape: bool = True) -> tuple[bool, str]:
    """(True, "") when :func:`check_rights` passes, else (False, its reason)."""
    try:
        check_rights(shape)
    except NetnsUnavailable as err:
        return False, str(err)
    return True, ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_namespaces() -> list[str]:
    proc = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def cleanup_stale() -> list[str]:
    """Delete namespaces of this harness whose creating process is gone (a run killed by SIGKILL)."""
    removed = []
    for name in list_namespaces():
        match = _NAME_RE.match(name)
        if match and not _pid_alive(int(match.group(1))):
            _run(["ip", "netns", "del", name], check=False)
            removed.append(name)
    if removed:
        logger.info("Removed %d stale benchmark namespaces: %s", len(removed), ", ".join(removed))
    return removed


@dataclass(eq=False)  # identity semantics: each object owns its own namespaces
class NetnsCluster:
    """``num_workers`` namespaces joined by a bridge, each link shaped by ``link``.

    Use as a context manager; :meth:`down` removes exactly what :meth:`up` created.
    """

    num_workers: int
    link: LinkSpec = field(default_factory=LinkSpec)
    tag: str = field(default_factory=lambda: f"{NAME_PREFIX}{os.getpid()}x{secrets.token_hex(3)}")
    created: list[str] = field(default_factory=list, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.num_workers, int) or not 1 <= self.num_workers <= MAX_WORKERS:
            raise ValueError(f"num_workers={self.num_workers!r} must be an integer in [1, {MAX_WORKERS}].")
        if not _NAME_RE.match(f"{self.tag}-sw"):
            raise ValueError(f"tag={self.tag!r} must look like {NAME_PREFIX}<pid>x<hex> (cleanup relies on it).")

    # ------------------------------------------------------------------ names
    def namespace(self, worker: int) -> str:
        return f"{self.tag}-w{worker}"

    @property
    def switch(self) -> str:
        return f"{self.tag}-sw"

    def address(self, worker: int) -> str:
        return f"{SUBNET}.{worker + 1}"

    @property
    def device(self) -> str:
        """The worker-side interface name (the same in every worker namespace)."""
        return WORKER_DEV

    def exec_prefix(self, worker: int) -> list[str]:
        """Command prefix that runs a program inside worker ``worker``'s namespace."""
        return ["ip", "netns", "exec", self.namespace(worker)]

    # ------------------------------------------------------------------ lifecycle
    def up(self) -> "NetnsCluster":
        check_rights(shape=self.link.rate_mbit is not None)
        _install_teardown(self)
        try:
            self._add_ns(self.switch)
            _run(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
            _run(["ip", "-n", self.switch, "link", "set", "br0", "up"])
            for w in range(self.num_workers):
                self._add_worker(w)
        except BaseException:
            self.down()
            raise
        logger.info(
            "Network up: %d worker namespaces %s-w*, link %s, addresses %s.1-%d",
            self.num_workers, self.tag, self.link.label, SUBNET, self.num_workers,
        )
        return self

    def _add_ns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        with self._lock:
            self.created.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])

    def _add_worker(self, w: int) -> None:
        ns, port = self.namespace(w), f"p{w}"
        self._add_ns(ns)
        # Both ends are created directly inside our namespaces: no device ever appears on the host.
        _run(["ip", "link", "add", WORKER_DEV, "netns", ns, "type", "veth", "peer", "name", port, "netns", self.switch])
        _run(["ip", "-n", self.switch, "link", "set", port, "master", "br0"])
        _run(["ip", "-n", self.switch, "link", "set", port, "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{self.address(w)}/24", "dev", WORKER_DEV])
        _run(["ip", "-n", ns, "link", "set", WORKER_DEV, "up"])
        if self.link.rate_mbit is not None:
            for where, dev in ((ns, WORKER_DEV), (self.switch, port)):
                _run(["tc", "-n", where, "qdisc", "add", "dev", dev, "root", "tbf",
                      "rate", f"{self.link.rate_mbit:g}mbit", "burst", f"{self.link.burst_kib}kb",
                      "latency", f"{self.link.queue_ms}ms"])

    def down(self) -> list[str]:
        """Delete every namespace this cluster created (their veths and qdiscs go with them).

        Idempotent and safe to call from a signal handler or atexit. Returns the names removed.
        """
        with self._lock:
            names, self.created = list(reversed(self.created)), []
        removed = []
        for name in names:
            proc = _run(["ip", "netns", "del", name], check=False)
            if proc.returncode == 0:
                removed.append(name)
            else:
                logger.warning("Could not delete namespace %s: %s", name, proc.stderr.strip())
        _ACTIVE.discard(self)
        if removed:
            logger.info("Network down: removed %s", ", ".join(removed))
        return removed

    def qdiscs(self) -> str:
        """The tc qdisc table of every namespace (for logs and tests)."""
        out = []
        for name in list(self.created):
            out.append(f"[{name}]\n" + _run(["tc", "-n", name, "qdisc", "show"], check=False).stdout)
        return "\n".join(out)

    def __enter__(self) -> "NetnsCluster":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()


# ---------------------------------------------------------------------- teardown on exit / signals
_ACTIVE: set = set()
_HANDLERS_INSTALLED = False


def teardown_all() -> None:
    for cluster in list(_ACTIVE):
        cluster.down()


def _on_signal(signum, frame) -> None:
    # Only raise: the ``finally`` blocks on the way out stop the workers first and then call
    # down(); the atexit hook catches whatever they miss. Deleting namespaces from inside the
    # handler could race a ``down()`` already running in the interrupted frame.
    previous = _PREVIOUS.get(signum)
    if callable(previous) and previous is not signal.default_int_handler:
        previous(signum, frame)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


_PREVIOUS: dict = {}


def _install_teardown(cluster: NetnsCluster) -> None:
    global _HANDLERS_INSTALLED
    _ACTIVE.add(cluster)
    if _HANDLERS_INSTALLED:
        return
    atexit.register(teardown_all)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            _PREVIOUS[sig] = signal.getsignal(sig)
            signal.signal(sig, _on_signal)
    _HANDLERS_INSTALLED = True
