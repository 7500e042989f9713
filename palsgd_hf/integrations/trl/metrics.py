"""trl's training metrics without per-step collectives: each worker keeps its own, combined at log time.

trl's trainers gather their metrics (token accuracy, entropy, token counts, DPO rewards) over all
ranks inside ``compute_loss``, on every micro-batch. Between PALSGD syncs that is per-step traffic
over the slow link PALSGD exists to avoid (counted as ``palsgd/foreign_collectives``), and with
``palsgd_coins='per_replica'`` it is refused (replicas run different steps). This mixin runs
``compute_loss`` in training with accelerate's ``gather``/``gather_for_metrics`` replaced by the
identity, so each worker records the metrics of its own micro-batches; on every training log (a
step boundary that every rank reaches together) one all-reduce combines them:

* every per-micro-batch metric in trl's ``_metrics["train"]`` becomes the mean over all micro-batches
  of all workers since the last log. For per-example means (DPO's rewards, log-probs) with equal
  per-worker batch sizes that is trl's own value; for token ratios (``mean_token_accuracy``,
  ``entropy``) it is the mean of each worker's ratio rather than the ratio of the summed counts;
* ``num_tokens`` (trl's running count of tokens trained on) is summed over workers: the same
  number trl's per-step gathers produce.

Evaluation is untouched (trl's gathers run as usual: every rank evaluates together).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist

# trl keeps this one as a running total in a one-element list; every other key is one value per micro-batch.
TOKEN_KEY = "num_tokens"


def _local(data: Any, *args: Any, **kwargs: Any) -> Any:
    """What accelerate's gather returns on a single process: the data itself."""
    return data


class LocalTrlMetricsMixin:
    """Put before ``PALSGDTrainerMixin`` in the bases of a trl trainer (see the module docstring)."""

    _palsgd_tokens_mark = 0  # trl's token total at the last combine (global from then on)

    @contextlib.contextmanager
    def _palsgd_local_gathers(self) -> Iterator[None]:
        # trl tells training from evaluation by the model's mode; so do we.
        deferred = self.model.training and getattr(self, "palsgd", None) is not None and self.args.world_size > 1
        if not deferred:
            yield
            return
        accelerator = self.accelerator
        # Instance attributes shadow the bound methods for the duration of compute_loss only.
        accelerator.gather = accelerator.gather_for_metrics = _local
        try:
            yield
        finally:
            vars(accelerator).pop("gather", None)
            vars(accelerator).pop("gather_for_metrics", None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self._palsgd_local_gathers():
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.model.training and getattr(self, "palsgd", None) is not None and self.args.world_size > 1:
            self._palsgd_combine_metrics()
        super().log(logs, *args, **kwargs)

    def _palsgd_combine_metrics(self) -> None:
        """Collective (every rank logs at the same step): each worker's metrics -> the workers' combined ones."""
        metrics = self._metrics["train"]
        keys = sorted(k for k in metrics if k != TOKEN_KEY)
        if dist.is_available() and dist.is_initialized():
            # Key sets differ only when a worker computed nothing since the last log (per-replica coins).
            everyone: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, keys)
            keys = sorted(set().union(*everyone))
        local_tokens = getattr(self, "_total_train_tokens", 0) - self._palsgd_tokens_mark
        values = [v for k in keys for v in (float(sum(metrics.get(k, []))), float(len(metrics.get(k, []))))]
        # float64: token totals stay exact up to 2**53.
        flat = torch.tensor([*values, float(local_tokens)], dtype=torch.float64, device=self.args.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flat)
        for i, key in enumerate(keys):
            total, count = flat[2 * i].item(), flat[2 * i + 1].item()
            if count > 0:
                metrics[key] = [total / count]
            else:
                metrics.pop(key, None)
        if hasattr(self, "_total_train_tokens"):
            self._total_train_tokens = self._palsgd_tokens_mark + int(flat[-1].item())
            self._palsgd_tokens_mark = self._total_train_tokens
            if TOKEN_KEY in metrics or flat[-1].item() > 0:
                metrics[TOKEN_KEY] = [self._total_train_tokens]
