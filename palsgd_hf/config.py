"""PALSGDConfig: every algorithm knob in one framework-free dataclass.

The field names are public API (the Trainer arguments are the same names with a ``palsgd_``
prefix). Values are resolved and validated in ``__post_init__``: a field left at ``None`` takes
the value of the chosen method preset, an explicit value that contradicts the preset is an error,
and every error names the value, the rule and the fix.

Method presets (one algorithm, several well-known special cases; see ALGORITHM.md):

=========  ===================  ===============================================
method     pseudo_sync_prob p   outer optimizer
=========  ===================  ===============================================
palsgd     0.2                  Nesterov SGD, lr 0.7, momentum 0.5
diloco     0 (fixed)            Nesterov SGD, lr 0.7, momentum 0.9
localsgd   0 (fixed)            plain SGD, lr 1, momentum 0 (fixed: averaging)
ddp        -                    none: every step is a synchronous step
=========  ===================  ===============================================
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Optional

METHODS = ("palsgd", "diloco", "localsgd", "ddp")
OUTER_OPTIMIZERS = ("nesterov", "sgd", "adam")
COMM_DTYPES = ("fp32", "bf16", "int8", "int4")
ANCHOR_DEVICES = ("auto", "cpu")
COINS = ("shared", "per_replica")
SYNC_POLICIES = ("fixed", "auto")
# c at the peak learning rate when neither pull nor mixing_rate is set: within 2 % of the best PALSGD setting
# in every cell of the simulated sweep (3 learning rates x 2 worker counts; BENCHMARKS.md, "Simulated scale").
DEFAULT_PULL = 0.1

# Values each preset fills in for fields left at None. A field listed in _FIXED must keep the
# preset's value: anything else would silently run a different method than the one named.
_PRESETS: dict[str, dict[str, Any]] = {
    # Outer momentum 0.5, not DiLoCo's 0.9 (tuned for H = 500 and 8 workers): 0.9 lost in every cell of the
    # simulated sweep at H 8-32 and 2-8 workers (BENCHMARKS.md) and overshoots LoRA fine-tuning (docs/finetuning.md).
    "palsgd": dict(pseudo_sync_prob=0.2, outer_optimizer="nesterov", outer_lr=0.7, outer_momentum=0.5),
    "diloco": dict(pseudo_sync_prob=0.0, outer_optimizer="nesterov", outer_lr=0.7, outer_momentum=0.9),
    "localsgd": dict(pseudo_sync_prob=0.0, outer_optimizer="sgd", outer_lr=1.0, outer_momentum=0.0),
    "ddp": dict(pseudo_sync_prob=0.0, outer_optimizer="sgd", outer_lr=1.0, outer_momentum=0.0),
}
_FIXED: dict[str, tuple[str, ...]] = {
    "palsgd": (),
    "diloco": ("pseudo_sync_prob",),
    "localsgd": ("pseudo_sync_prob", "outer_optimizer", "outer_lr", "outer_momentum"),
    "ddp": ("pseudo_sync_prob",),
}
_FIX_HINT = {
    "diloco": "use method='palsgd' for p > 0",
    "localsgd": "use method='diloco' (or 'palsgd') to choose your own outer optimizer",
    "ddp": "use method='palsgd' for pseudo-synchronization",
}


class PALSGDConfigError(ValueError):
    """A PALSGD setting that cannot work; the message names the value, the rule and the fix."""


@dataclass
class PALSGDConfig:
    """Settings of Pseudo-Asynchronous Local SGD (Naganuma et al., TMLR 2025, Algorithm 1)."""

    method: str = field(
        default="palsgd",
        metadata={"help": f"Which method to run: one of {METHODS}. diloco = p 0; localsgd = p 0 with "
                  "plain averaging; ddp = gradient all-reduce every step."},
    )
    sync_interval: int = field(
        default=16, metadata={"help": "H: a global (outer) sync every H optimizer steps after warm-up (with "
                              "sync_policy='auto': the first interval, which the run then adapts)."}
    )
    sync_policy: str = field(
        default="fixed",
        metadata={"help": f"One of {SYNC_POLICIES}. 'fixed': a sync every sync_interval steps. 'auto': the interval "
                  "is re-decided at every sync from the measured local-step time and sync time, so that the "
                  "exposed communication stays near comm_target of the wall time; a cheap link never takes it "
                  "below sync_interval, and it grows only while the workers' drift stays within twice its value "
                  "at sync_interval (palsgd_hf/core/sync_policy.py)."},
    )
    comm_target: float = field(
        default=0.1,
        metadata={"help": "sync_policy='auto': the target fraction of wall time spent blocked in syncs, in (0, 1)."},
    )
    max_sync_interval: Optional[int] = field(
        default=None,
        metadata={"help": "sync_policy='auto': the longest interval it may choose. Default: 8 x sync_interval."},
    )
    pseudo_sync_prob: Optional[float] = field(
        default=None,
        metadata={"help": "p: probability of a pseudo-synchronization step (no forward/backward, a pull "
                  "toward the stale anchor). In [0, 1). Default: the method's (0.2 for palsgd, 0 else)."},
    )
    mixing_rate: Optional[float] = field(
        default=None,
        metadata={"help": "eta: strength of the pull (the paper's parameter). A pseudo-sync step moves x by "
                  "c = lr*eta/p of the way to the anchor. Set this or pull, not both; neither: eta = 1."},
    )
    pull: Optional[float] = field(
        default=None,
        metadata={"help": "c at the peak learning rate: the fraction of the way to the anchor a pseudo-sync step "
                  "moves the worker when the learning rate peaks, in (0, 1]; eta = pull*p/peak_lr is derived when "
                  "training starts (the Trainer reads the peak from its schedule, other loops from the optimizer's "
                  "initial learning rate: with a schedule that starts below its peak, e.g. OneCycleLR, use "
                  "mixing_rate there), so the pull no longer follows the learning rate you picked. Set this or "
                  "mixing_rate, not both."},
    )
    warmup_steps: int = field(
        default=32,
        metadata={"help": "Optimizer steps of ordinary synchronous data parallel before local steps start."},
    )
    outer_optimizer: Optional[str] = field(
        default=None,
        metadata={"help": f"Optimizer of the global model on the averaged pseudo-gradient: one of "
                  f"{OUTER_OPTIMIZERS}. Default: the method's (nesterov; sgd for localsgd)."},
    )
    outer_lr: Optional[float] = field(
        default=None, metadata={"help": "Outer learning rate. Default: the method's (0.7; 1.0 for localsgd)."}
    )
    outer_momentum: Optional[float] = field(
        default=None,
        metadata={"help": "Outer momentum (Adam: beta1). Default: the method's (0.9; 0 for localsgd)."},
    )
    seed: int = field(
        default=0,
        metadata={"help": "Seed of the coin generator(s): (seed) with shared coins, (seed, r) for replica r."},
    )
    coins: str = field(
        default="shared",
        metadata={"help": f"Who flips the pseudo-sync coin: one of {COINS}. 'shared': one coin per step for all "
                  "replicas, so every rank runs the same kind of step and any collective issued inside a step (by "
                  "the Trainer, accelerate, trl or a callback) pairs up; no replica waits for another at a sync. "
                  "'per_replica': each replica its own coin (the paper's Algorithm 1 read literally); a collective "
                  "over several replicas inside a local step is then refused with an error, since it would hang."},
    )
    shard_size: int = field(
        default=1,
        metadata={"help": "S: ranks that shard one model copy (DeepSpeed ZeRO inside a replica). The world "
                  "is world_size/S replicas; PALSGD averages across replicas. 1 = every rank a worker."},
    )
    overlap_steps: int = field(
        default=0,
        metadata={"help": "d >= 1: launch the pseudo-gradient all-reduce without blocking and apply the "
                  "outer update d steps later, keeping the local progress made meanwhile. 0 = block."},
    )
    fragments: int = field(
        default=1,
        metadata={"help": "F: cut the owned values into F fragments synced at staggered steps (fragment i when "
                  "(t+1) mod H == floor(i*H/F), each with its own outer step), so one sync sends 1/F of the model "
                  "(Streaming DiLoCo). 1 = the whole model at once. Needs F <= H, overlap_steps < H/F and "
                  "sync_policy='fixed'."},
    )
    comm_dtype: str = field(
        default="fp32",
        metadata={"help": f"Dtype of the pseudo-gradient on the wire: one of {COMM_DTYPES} (bf16 halves "
                  "the bytes; int8 / int4 send 0.254 / 0.129 of fp32's bytes, per-block scaled, with error "
                  "feedback: what a sync's quantization dropped is sent with the next; accumulation stays fp32)."},
    )
    anchor_device: str = field(
        default="auto",
        metadata={"help": "Where the anchor and outer-optimizer state live: 'auto' (beside the weights) "
                  "or 'cpu' (pinned host memory when a GPU is present)."},
    )
    replica_metrics: bool = field(
        default=False,
        metadata={"help": "Gather every replica's drift, local steps, sync wait and step time at each sync (one "
                  "small all-gather per sync) and log them as palsgd/replica{i}/... "
                  "(palsgd_hf/core/replica_stats.py)."},
    )
    comm_timeout_seconds: Optional[float] = field(
        default=None,
        metadata={"help": "Timeout of every collective while training (PALSGD's syncs, DDP's warm-up all-reduce, "
                  "the Trainer's own), in seconds: if a rank dies or hangs, the others fail with a clear error "
                  "within it. Default: the Trainer's ddp_timeout (which transformers itself applies on GPUs only); "
                  "in other loops, the process group's. Keep it above the longest legitimate wait between ranks "
                  "(a checkpoint save, an evaluation on rank 0). Not a checkpointed setting: a resumed run may "
                  "change it."},
    )

    def __post_init__(self) -> None:
        _check_choice("method", self.method, METHODS)
        preset, fixed = _PRESETS[self.method], _FIXED[self.method]
        for name, preset_value in preset.items():
            value = getattr(self, name)
            if value is None:
                setattr(self, name, preset_value)
            elif name in fixed and value != preset_value:
                raise PALSGDConfigError(
                    f"{name}={value!r} contradicts method={self.method!r}, which fixes {name}={preset_value!r}; "
                    f"leave {name} unset or {_FIX_HINT[self.method]}."
                )
        if self.pull is not None and self.mixing_rate is not None:
            raise PALSGDConfigError(
                f"pull={self.pull!r} and mixing_rate={self.mixing_rate!r} both set the pull strength (c = lr*eta/p at "
                "the peak learning rate vs eta itself); set one of them."
            )
        if self.pull is None and self.mixing_rate is None:
            if self.pseudo_sync_prob == 0:
                self.mixing_rate = 1.0  # no pseudo-sync step: the pull is never used
            else:
                self.pull = DEFAULT_PULL
        self._validate()

    def _validate(self) -> None:
        _check_int("sync_interval", self.sync_interval, minimum=1, fix="use H >= 1 (the paper uses 32-100)")
        _check_int("warmup_steps", self.warmup_steps, minimum=0, fix="use 0 or more warm-up steps")
        _check_int("shard_size", self.shard_size, minimum=1, fix="use 1 (no sharding) or the ZeRO group size")
        _check_int("overlap_steps", self.overlap_steps, minimum=0, fix="use 0 (blocking sync) or d >= 1")
        _check_int("seed", self.seed, minimum=0, fix="use a non-negative integer seed")
        p = self.pseudo_sync_prob
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
            raise PALSGDConfigError(
                f"pseudo_sync_prob={p!r} must lie in [0, 1): with p = 1 no gradient step is ever taken; "
                "use p in [0, 0.5] (the paper uses 0.1-0.2)."
            )
        eta = self.mixing_rate
        if eta is not None and (isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta > 0):
            raise PALSGDConfigError(
                f"mixing_rate={self.mixing_rate!r} must be > 0 (it is the pull strength eta); use e.g. 0.5-1.0."
            )
        if self.pull is not None and (isinstance(self.pull, bool) or not isinstance(self.pull, (int, float))
                                      or not 0 < self.pull <= 1):
            raise PALSGDConfigError(
                f"pull={self.pull!r} must lie in (0, 1]: it is the fraction of the way to the anchor a pseudo-sync "
                "step moves the worker at the peak learning rate; use e.g. 0.03."
            )
        _check_choice("sync_policy", self.sync_policy, SYNC_POLICIES)
        if isinstance(self.comm_target, bool) or not isinstance(self.comm_target, (int, float)) or \
                not 0 < self.comm_target < 1:
            raise PALSGDConfigError(
                f"comm_target={self.comm_target!r} must lie in (0, 1): it is the fraction of wall time the auto "
                "sync policy lets syncs block; use e.g. 0.1."
            )
        if self.max_sync_interval is not None:
            _check_int("max_sync_interval", self.max_sync_interval, minimum=self.sync_interval,
                       fix=f"use at least sync_interval={self.sync_interval}, or leave it unset (8 x sync_interval)")
        _check_choice("outer_optimizer", self.outer_optimizer, OUTER_OPTIMIZERS)
        if not isinstance(self.outer_lr, (int, float)) or not self.outer_lr > 0:
            raise PALSGDConfigError(f"outer_lr={self.outer_lr!r} must be > 0; DiLoCo's default is 0.7.")
        if not isinstance(self.outer_momentum, (int, float)) or not 0.0 <= self.outer_momentum < 1.0:
            raise PALSGDConfigError(
                f"outer_momentum={self.outer_momentum!r} must lie in [0, 1); DiLoCo's default is 0.9."
            )
        if self.outer_optimizer == "nesterov" and self.outer_momentum == 0:
            raise PALSGDConfigError(
                "outer_optimizer='nesterov' needs outer_momentum > 0 (Nesterov without momentum is plain "
                "SGD); set outer_momentum (e.g. 0.9) or use outer_optimizer='sgd'."
            )
        _check_choice("comm_dtype", self.comm_dtype, COMM_DTYPES)
        if not isinstance(self.replica_metrics, bool):
            raise PALSGDConfigError(f"replica_metrics={self.replica_metrics!r} must be true or false.")
        _check_choice("anchor_device", self.anchor_device, ANCHOR_DEVICES)
        _check_choice("coins", self.coins, COINS)
        t = self.comm_timeout_seconds
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < math.inf):
            raise PALSGDConfigError(
                f"comm_timeout_seconds={t!r} must be a positive number of seconds (finite); use e.g. 600, or leave "
                "it unset for the default (the Trainer's ddp_timeout)."
            )
        _check_int("fragments", self.fragments, minimum=1, fix="use 1 (whole-model syncs) or F <= sync_interval")
        if self.fragments > 1 and self.method != "ddp":
            self._check_fragments()
        if self.overlap_steps >= self.sync_interval and self.method != "ddp":
            raise PALSGDConfigError(
                f"overlap_steps={self.overlap_steps} must be smaller than sync_interval={self.sync_interval}: "
                "an outer update must land before the next sync starts; lower overlap_steps."
            )

    def _check_fragments(self) -> None:
        f, h = self.fragments, self.sync_interval
        if f > h:
            raise PALSGDConfigError(
                f"fragments={f} must be at most sync_interval={h}: each fragment needs its own step of the period; "
                f"lower fragments or raise sync_interval."
            )
        if self.sync_policy != "fixed":
            raise PALSGDConfigError(
                f"fragments={f} needs sync_policy='fixed' (got {self.sync_policy!r}): the auto policy decides one "
                "interval for the whole model; use fragments=1 with 'auto'."
            )
        gap = h // f
        if self.overlap_steps >= gap:
            raise PALSGDConfigError(
                f"overlap_steps={self.overlap_steps} must be smaller than sync_interval/fragments = {h}/{f} -> {gap} "
                "steps between fragment syncs: one fragment's update must land before the next fragment's sync "
                "starts; lower overlap_steps or fragments."
            )

    @property
    def is_ddp(self) -> bool:
        """True when every step is a synchronous data-parallel step (method 'ddp')."""
        return self.method == "ddp"

    def comm_timeout(self) -> Optional[timedelta]:
        """``comm_timeout_seconds`` as a ``timedelta`` (None when unset: the caller's default applies)."""
        return None if self.comm_timeout_seconds is None else timedelta(seconds=float(self.comm_timeout_seconds))

    def resolved(self, peak_lr: float) -> "PALSGDConfig":
        """This config with eta set: ``self`` when it already is, else a copy with eta = pull*p/peak_lr.

        The caller's config is left as it is (``pull`` set, eta not), so it can serve another run with
        another learning rate.
        """
        if self.mixing_rate is not None:
            return self
        p = self.pseudo_sync_prob
        if p == 0:
            return dataclasses.replace(self, pull=None, mixing_rate=1.0)  # eta is never used: no pseudo-sync step
        if not peak_lr > 0:
            raise PALSGDConfigError(
                f"pull={self.pull!r} needs a positive peak learning rate to derive eta = pull*p/peak_lr, got "
                f"{peak_lr!r}; set the learning rate, or set mixing_rate (eta) instead of pull."
            )
        return dataclasses.replace(self, pull=None, mixing_rate=self.pull * p / float(peak_lr))

    def check_mixing_coefficient(self, lr: float) -> float:
        """Return c = lr*eta/p for a learning rate, or raise if it lies outside [0, 1].

        c > 1 overshoots the anchor (the worker lands on the far side of it) and c < 0 pushes away
        from it. c = 0 only happens at lr = 0 (the ends of a schedule), where the pull, like the
        gradient step, is a no-op; we allow it rather than fail a run on its last step.
        """
        p = self.pseudo_sync_prob
        if p == 0:
            return 0.0
        if self.mixing_rate is None:
            raise PALSGDConfigError(f"pull={self.pull!r} is not resolved yet: use config.resolved(peak_lr).")
        c = float(lr) * self.mixing_rate / p
        if not 0.0 <= c <= 1.0:
            raise PALSGDConfigError(
                f"mixing coefficient c = lr*eta/p = {float(lr):g}*{self.mixing_rate:g}/{p:g} = {c:g} must lie "
                f"in (0, 1]; lower mixing_rate to at most {p / float(lr):g} for this learning rate"
                if lr > 0
                else f"mixing coefficient c = lr*eta/p = {c:g} is negative (lr={float(lr):g}); use lr >= 0."
            )
        return c

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise PALSGDConfigError(f"{name}={value!r} is not one of {choices}; pick one of them.")


def _check_int(name: str, value: Any, *, minimum: int, fix: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise PALSGDConfigError(f"{name}={value!r} must be an integer >= {minimum}; {fix}.")
