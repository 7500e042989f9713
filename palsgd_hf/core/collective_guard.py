"""Collective safety: what may cross replicas inside a local step, and what happens to the rest.

Between two syncs replicas are meant to be independent, and with per-replica coins they even run
different code: one takes a gradient step (forward, backward, maybe a metric gather) while another
takes a pseudo-sync step (no compute at all). A collective that some ranks issue inside a step and
others skip pairs with a *different* collective on the other replica: the job hangs until the
collective timeout, with every rank alive. The carriers are not PALSGD's: trl's ``compute_loss``
gathers metrics on every micro-batch, the Trainer gathers token counts
(``include_num_input_tokens_seen``), callbacks all-reduce in ``on_pre_optimizer_step``.

Two layers make that safe by design:

1. **Shared coins** (``coins='shared'``, the default): every replica draws the same coin at every
   step, so every rank runs the same kind of step and any collective issued inside it, by anyone,
   is issued by every rank in the same order. Nothing can deadlock. The price is only that the
   coins of different replicas are no longer independent (each replica's own sequence is the same
   Bernoulli(p) process as in the paper; see docs/reliability.md for the measured effect).
2. **This guard**, armed by the core for the interior of every local-phase step (from the coin draw
   to the end of the optimizer step) in a job of several replicas. It sees every call of the
   ``torch.distributed`` collective functions (module attributes, which is how torch, accelerate,
   transformers, trl and DeepSpeed call them). A collective is *foreign* when PALSGD did not issue
   it and its group spans more than one replica (the default group does). A group inside this
   rank's replica is always fine: the ranks of one replica share a coin.

   - ``coins='shared'``: a foreign collective is safe; it is counted (``palsgd/foreign_collectives``,
     ``palsgd/foreign_comm_bytes``: per-step traffic PALSGD was meant to remove, each a round trip
     over the slow link) and named once in a warning with its caller.
   - ``coins='per_replica'``: a foreign collective would hang, so it raises
     :class:`CollectiveSafetyError` naming the collective, its caller, the step and the fix,
     instead of a timeout minutes later that blames a dead rank.

Outside the armed interior (warm-up steps, logging/evaluation/saving at step boundaries, which
every rank reaches at the same global step) nothing is checked and the wrappers cost one attribute
read. The wrappers are installed once per process, the first time a multi-replica PALSGD is built.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import logging
import os
import sys
import threading
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from .topology import Topology

logger = logging.getLogger(__name__)

# The collective functions of torch.distributed that pair across ranks (point-to-point send/recv
# name their peer explicitly and are left alone).
COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "all_gather_object",
    "broadcast", "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor",
    "_reduce_scatter_base", "all_to_all", "all_to_all_single", "barrier", "monitored_barrier", "gather",
    "gather_object", "scatter", "scatter_object_list", "all_reduce_coalesced", "all_gather_coalesced",
)
_TENSOR_ARGS = ("tensor", "input", "input_tensor", "tensor_list", "input_tensor_list")


class CollectiveSafetyError(RuntimeError):
    """A collective across replicas inside a local step, where replicas run different code."""


class _GuardState(threading.local):
    def __init__(self) -> None:
        self.guard: Optional["CollectiveGuard"] = None  # the armed guard of this thread, if any
        self.issuing = 0  # > 0 while PALSGD itself issues collectives


_state = _GuardState()
_installed = False
_install_lock = threading.Lock()


class CollectiveGuard:
    """The collective-safety policy of one rank (see the module docstring).

    Args:
        replica_ranks: the global ranks of this rank's replica (they share a coin).
        num_replicas: replicas in the job; with one there is nothing to guard.
        refuse: raise on a foreign collective (per-replica coins) instead of counting it.
    """

    def __init__(self, replica_ranks: list[int], num_replicas: int, *, refuse: bool):
        self.replica_ranks = frozenset(replica_ranks)
        self.num_replicas = num_replicas
        self.refuse = refuse
        self.foreign_collectives = 0
        self.foreign_bytes = 0
        self.describe_step: Callable[[], str] = lambda: "a local step"
        self._warned: set[str] = set()
        self._inside_replica: dict[int, bool] = {}
        if self.active:
            install()

    @classmethod
    def for_job(cls, config) -> "CollectiveGuard":
        """The guard of this rank in the running job (inactive with one replica or no process group)."""
        t = Topology.from_environment(config.shard_size)
        return cls(t.replica_ranks(t.replica_index), t.num_replicas, refuse=config.coins == "per_replica")

    @property
    def active(self) -> bool:
        return self.num_replicas > 1

    def arm(self) -> None:
        if self.active:
            _state.guard = self

    def disarm(self) -> None:
        if _state.guard is self:
            _state.guard = None

    # ------------------------------------------------------------------ the check
    def check(self, name: str, bound: inspect.BoundArguments) -> None:
        group = bound.arguments.get("group")
        if self._within_replica(group):
            return
        nbytes = _payload_bytes(bound)
        caller = _caller()
        if self.refuse:
            raise CollectiveSafetyError(
                f"rank {_rank()}, {self.describe_step()}: {caller} called torch.distributed.{name} over "
                f"{_group_desc(group)}, which spans several replicas, inside a local step. With palsgd_coins="
                "'per_replica' replicas flip different coins and run different code between syncs, so this "
                "collective would pair with another one on a different replica and hang. Fix: use palsgd_coins="
                "'shared' (the default), or move the collective to a step boundary (on_step_end, logging), or "
                "issue it over the replica group."
            )
        self.foreign_collectives += 1
        self.foreign_bytes += nbytes
        key = f"{name}@{caller}"
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(
                "%s calls torch.distributed.%s over %s inside every local step: traffic between PALSGD syncs "
                "(one round trip over the slow link each time), counted in palsgd/foreign_collectives and "
                "palsgd/foreign_comm_bytes. It is safe with shared coins; remove it (e.g. "
                "include_num_input_tokens_seen='no') for local steps without communication.",
                caller, name, _group_desc(group),
            )

    def _within_replica(self, group: Optional[dist.ProcessGroup]) -> bool:
        if group is None or group is dist.GroupMember.WORLD:
            return dist.get_world_size() <= len(self.replica_ranks)
        key = id(group)
        if key not in self._inside_replica:
            try:
                ranks = set(dist.get_process_group_ranks(group))
            except (RuntimeError, ValueError):  # not a group this rank knows: let torch complain
                ranks = set(self.replica_ranks)
            self._inside_replica[key] = ranks <= self.replica_ranks
        return self._inside_replica[key]

    def metrics(self) -> dict[str, float]:
        return {"foreign_collectives": float(self.foreign_collectives), "foreign_comm_bytes": float(self.foreign_bytes)}

    def state_dict(self) -> dict[str, int]:
        return {"foreign_collectives": self.foreign_collectives, "foreign_bytes": self.foreign_bytes}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.foreign_collectives = int(state.get("foreign_collectives", 0))
        self.foreign_bytes = int(state.get("foreign_bytes", 0))


@contextlib.contextmanager
def palsgd_issuing() -> Iterator[None]:
    """PALSGD's own collectives (syncs, warm-up averaging, flags): never foreign."""
    _state.issuing += 1
    try:
        yield
    finally:
        _state.issuing -= 1



# ---------------------------------------------------------------------------------------------- install
def install() -> None:
    """Wrap the collective functions of ``torch.distributed`` (idempotent, once per process).

    Both the package attribute (``torch.distributed.all_reduce``, what callers use) and the
    ``distributed_c10d`` one are replaced by the same wrapper; unarmed, it calls straight through.
    """
    global _installed
    with _install_lock:
        if _installed or not dist.is_available():
            return
        from torch.distributed import distributed_c10d as c10d

        for name in COLLECTIVES:
            original = getattr(c10d, name, None) or getattr(dist, name, None)
            if original is None or getattr(original, "_palsgd_guarded", False):
                continue
            wrapper = _wrap(name, original)
            for module in (dist, c10d):
                if getattr(module, name, None) is original:
                    setattr(module, name, wrapper)
        _installed = True


def _wrap(name: str, original: Callable) -> Callable:
    try:
        signature = inspect.signature(original)
    except (TypeError, ValueError):
        signature = None

    @functools.wraps(original)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        guard = _state.guard
        if guard is not None and not _state.issuing and signature is not None:
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError:
                bound = None  # a call torch itself will reject with its own message
            if bound is not None:
                guard.check(name, bound)
        return original(*args, **kwargs)

    guarded._palsgd_guarded = True  # type: ignore[attr-defined]
    return guarded


# ---------------------------------------------------------------------------------------------- messages
def _payload_bytes(bound: inspect.BoundArguments) -> int:
    total = 0
    for key in _TENSOR_ARGS:
        value = bound.arguments.get(key)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
        if total:
            break
    return total


def _package_dir(name: str) -> Optional[str]:
    # Without importing it (DeepSpeed is an optional extra and slow to import).
    spec = importlib.util.find_spec(name)
    return os.path.dirname(spec.origin) if spec is not None and spec.origin else None


# Frames skipped when naming the caller: the collective layers between a user's code and torch.
_SKIP_DIRS = tuple(d for d in (
    os.path.dirname(dist.__file__), os.path.dirname(__file__), _package_dir("accelerate"),
    os.path.join(_package_dir("deepspeed") or "", "comm") if _package_dir("deepspeed") else None,
) if d)


def _caller() -> str:
    """file:line (function) of the first frame outside torch.distributed and this module."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_SKIP_DIRS):
        frame = frame.f_back
    if frame is None:
        return "<unknown>"
    code = frame.f_code
    path = code.co_filename
    for marker in ("site-packages" + os.sep, "palsgd_hf" + os.sep):
        if marker in path:
            path = path.split(marker, 1)[1] if marker.startswith("site") else "palsgd_hf/" + path.split(marker, 1)[1]
            break
    return f"{path}:{frame.f_lineno} ({code.co_name})"


def _group_desc(group: Optional[dist.ProcessGroup]) -> str:
    if group is None or group is dist.GroupMember.WORLD:
        return f"the default group (all {dist.get_world_size()} ranks)"
    try:
        return f"a group of ranks {sorted(dist.get_process_group_ranks(group))}"
    except (RuntimeError, ValueError):
        return "a process group"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0
