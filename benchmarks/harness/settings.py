"""What one benchmark compares: the shared model, data, budget, and the per-method settings.

Every method gets the same model (same seed), the same data order, the same batch and learning
rate. DDP runs ``steps`` optimizer steps; the local methods may run up to ``local_step_factor``
times as many (ALGORITHM.md, "Practical notes": cheaper steps may need more of them) and stop as
soon as their global model reaches DDP's final eval loss. "Equal tokens" compares every method's
eval loss at DDP's last step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

METHODS = ("ddp", "localsgd", "diloco", "palsgd")
# The runs of the one-command sitting (issue 17): Local SGD at its three usual intervals (the target is to beat
# it at its best one), DiLoCo, and PALSGD with the library's defaults, fixed and with sync_policy='auto'.
DEFAULT_RUNS = ("ddp", "localsgd@8", "localsgd", "localsgd@32", "diloco", "palsgd", "palsgd@auto")


def split_run(name: str) -> tuple[str, Optional[str]]:
    """A run's method and variant: 'localsgd@8' -> ('localsgd', '8') (H = 8); 'palsgd@auto' -> ('palsgd', 'auto')
    (sync_policy='auto'); 'diloco' -> ('diloco', None) (the settings' H)."""
    method, sep, variant = name.partition("@")
    return method, (variant if sep else None)


def _check_run(name: str) -> None:
    method, variant = split_run(name)
    if method not in METHODS:
        raise ValueError(f"run {name!r}: the method must be one of {METHODS} (e.g. 'localsgd@8', 'palsgd@auto').")
    if variant is None:
        return
    if method == "ddp":
        raise ValueError(f"run {name!r}: DDP has no sync interval; use 'ddp'.")
    if variant != "auto" and not (variant.isdigit() and int(variant) >= 1):
        raise ValueError(f"run {name!r}: after '@' comes an interval H >= 1 (e.g. '{method}@8') or 'auto'.")

# GPT-Neo overrides of the "tiny" preset. "small" (1.1M parameters, 4.3 MB of fp32 gradients) makes
# one DDP all-reduce at 100 Mbit/s cost ~0.37 s against ~0.3 s of compute per step on one core:
# communication and compute both matter, as on a real cluster with slow links.
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {},
    "small": {"hidden_size": 128, "num_layers": 4, "num_heads": 4},
    "medium": {"hidden_size": 192, "num_layers": 4, "num_heads": 4},
}


@dataclass
class BenchSettings:
    """The knobs of one benchmark (defaults: the full CPU benchmark of BENCHMARKS.md)."""

    workers: int = 2
    model_size: str = "small"
    vocab_size: int = 2048
    block_size: int = 128
    batch_size: int = 8  # per worker, per optimizer step
    steps: int = 320  # DDP's optimizer steps: the token budget
    local_step_factor: float = 2.0
    learning_rate: float = 3e-3
    lr_warmup_steps: int = 10  # linear LR warm-up, then constant (methods run different step counts)
    eval_every: int = 16
    eval_samples: int = 64  # validation blocks per evaluation
    # H and the warm-up are the library's defaults (PALSGDConfig; a unit test keeps them equal).
    palsgd_warmup_steps: int = 32  # synchronous steps before local steps start (all local methods)
    sync_interval: int = 16
    pseudo_sync_prob: float = 0.2
    mixing_rate: Optional[float] = None  # None: chosen so that c = lr*eta/p = pull_coefficient
    # The pull per pseudo-sync step. The paper's GPT-Neo-8M example has c = 0.05; a sweep here
    # (c = 0.001, 0.02, 0.05, 0.1, 0.2; BENCHMARKS.md) found 0.1 best, so the benchmark uses it.
    pull_coefficient: float = 0.1
    # Outer Nesterov of DiLoCo and PALSGD (the same for both). DiLoCo's lr 0.7 with momentum 0.9 was
    # tuned for H = 500 and 8 workers; at H = 32 with 2 workers and a constant inner LR it amplifies
    # the noise of each pseudo-gradient and both methods plateau above DDP's loss (BENCHMARKS.md,
    # "Outer optimizer"). Momentum 0.5 was the best of a small sweep for DiLoCo, and is used for both.
    outer_lr: float = 0.7
    outer_momentum: float = 0.5
    seed: int = 0
    methods: tuple[str, ...] = DEFAULT_RUNS  # run names: a method, optionally '@H' or '@auto'
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model_size not in MODEL_SIZES:
            raise ValueError(f"model_size={self.model_size!r} is unknown; choose one of {sorted(MODEL_SIZES)}.")
        if not self.methods:
            raise ValueError(f"methods=[]: name at least 'ddp' and one of {METHODS[1:]}.")
        for name in self.methods:
            _check_run(name)
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods={list(self.methods)!r} repeats a run; name each once.")
        if "ddp" not in self.methods:
            raise ValueError("methods must include 'ddp': its final eval loss is the target of the others.")
        for name, minimum in (("workers", 1), ("steps", 1), ("eval_every", 1), ("batch_size", 1),
                              ("sync_interval", 1), ("block_size", 8), ("eval_samples", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name}={value!r} must be an integer >= {minimum}.")
        if self.steps % self.eval_every:
            fix = (self.steps // self.eval_every + 1) * self.eval_every
            raise ValueError(
                f"steps={self.steps} must be a multiple of eval_every={self.eval_every}: DDP's last step must be "
                f"evaluated (its loss is the target); e.g. steps={fix}."
            )
        if not self.local_step_factor >= 1.0:
            raise ValueError(f"local_step_factor={self.local_step_factor!r} must be >= 1 (1 = DDP's step count).")
        if not 0 < self.pseudo_sync_prob < 1:
            raise ValueError(f"pseudo_sync_prob={self.pseudo_sync_prob!r} must lie in (0, 1) for PALSGD.")
        if self.palsgd_warmup_steps >= self.steps:
            raise ValueError(
                f"palsgd_warmup_steps={self.palsgd_warmup_steps} leaves no local steps in {self.steps} steps; "
                "lower it or raise steps."
            )

    @property
    def model_overrides(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, **MODEL_SIZES[self.model_size]}

    @property
    def eta(self) -> float:
        """The mixing rate: explicit, or the one that makes the pull c = lr*eta/p equal pull_coefficient."""
        if self.mixing_rate is not None:
            return self.mixing_rate
        return self.pull_coefficient * self.pseudo_sync_prob / self.learning_rate

    def max_steps(self, run: str) -> int:
        return self.steps if run == "ddp" else int(round(self.steps * self.local_step_factor))

    def tokens_per_step(self) -> int:
        return self.workers * self.batch_size * self.block_size

    def palsgd_config(self, run: str) -> dict[str, Any]:
        """PALSGDConfig fields of ``run`` (same H, warm-up and seed for every local method unless the run names
        its own H, or 'auto': then H starts at the settings' H and the policy moves it)."""
        method, variant = split_run(run)
        cfg: dict[str, Any] = {"method": method, "seed": self.seed}
        if method == "ddp":
            return cfg
        interval = int(variant) if variant not in (None, "auto") else self.sync_interval
        cfg.update(sync_interval=interval, warmup_steps=self.palsgd_warmup_steps)
        if variant == "auto":
            cfg.update(sync_policy="auto")
        if method in ("diloco", "palsgd"):
            cfg.update(outer_lr=self.outer_lr, outer_momentum=self.outer_momentum)
        if method == "palsgd":
            cfg.update(pseudo_sync_prob=self.pseudo_sync_prob, mixing_rate=self.eta)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["methods"] = list(self.methods)
        out["eta"] = self.eta
        out["model_overrides"] = self.model_overrides
        return out


def tiny_settings(**overrides: Any) -> BenchSettings:
    """Seconds-long settings for the test suite: checks the harness, not the claims."""
    base = dict(model_size="tiny", block_size=32, batch_size=4, steps=24, eval_every=8, eval_samples=8,
                palsgd_warmup_steps=4, sync_interval=4, local_step_factor=1.5)
    base.update(overrides)
    return BenchSettings(**base)
