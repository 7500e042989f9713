"""What PALSGDTrainer refuses before any training work, and the schedule check behind the pull.

* FSDP switched on by the launcher (``accelerate launch --use_fsdp`` sets ACCELERATE_USE_FSDP) is
  refused like ``fsdp=...`` (before, it slipped past and FSDP was treated as a bare module).
* With per-replica coins the Trainer's own per-step token gather is refused (it would hang).
* c = lr*eta/p <= 1 is checked at the schedule's peak, not its first value: a OneCycle schedule
  that starts at max_lr/25 and peaks mid-run is refused before the first step (before, the run
  crashed at the peak).
"""

from __future__ import annotations

import pytest
import torch

from palsgd_hf.config import PALSGDConfigError
from palsgd_hf.lm import build_lm_datasets, load_tokenizer, shakespeare_corpus
from palsgd_hf.integrations.schedules import schedule_peak_lr
from palsgd_hf.integrations.trainer import PALSGDTrainer
from palsgd_hf.integrations.trainer_args import PALSGDTrainingArguments
from palsgd_hf.lm import build_causal_lm


def make(tmp_path, **kwargs):
    return PALSGDTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kwargs)


def test_fsdp_from_the_launcher_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(PALSGDConfigError, match=r"ACCELERATE_USE_FSDP .*cannot be combined with PALSGD.*DeepSpeed"):
        make(tmp_path)


def test_per_replica_coins_refuse_the_trainers_token_gather(tmp_path):
    with pytest.raises(PALSGDConfigError, match=r"include_num_input_tokens_seen='all'.*palsgd_coins='shared'"):
        make(tmp_path, palsgd_coins="per_replica", include_num_input_tokens_seen="all")
    make(tmp_path, include_num_input_tokens_seen="all")  # shared coins: safe (and counted as foreign traffic)


# Tolerances below: the learning rates are float64 products of a few factors computed in another order than the
# expected value (a handful of roundings, < 1e-15 relative); pytest.approx's default rel=1e-6 bounds that with room
# while any wrong step or factor is off by >= 0.5%. OneCycle's peak is the cosine phase at its 0/1 end point:
# max_lr up to the same few roundings.


def _optimizer(lr=0.01):
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def test_schedule_peak_of_a_lambda_schedule_is_read_without_stepping():
    opt = _optimizer(0.01)
    # Warm-up over 10 steps to 1.0, then decay: the peak is the base LR, reached at step 10.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min((t + 1) / 10, 1.0) * (1 - t / 200))
    assert schedule_peak_lr(opt, sched, 100) == pytest.approx(0.01 * 1.0 * (1 - 9 / 200))
    assert sched.last_epoch == 0 and opt.param_groups[0]["lr"] == pytest.approx(0.001)


def test_schedule_peak_of_one_cycle_is_found_and_the_state_restored():
    opt = _optimizer()
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=100)
    first = opt.param_groups[0]["lr"]
    assert first == pytest.approx(0.5 / 25)
    assert schedule_peak_lr(opt, sched, 100) == pytest.approx(0.5, rel=1e-6)
    assert opt.param_groups[0]["lr"] == first and sched.last_epoch == 0  # nothing moved


def test_schedule_peak_falls_back_to_the_initial_lr_for_plateau_schedules():
    opt = _optimizer(0.03)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    assert schedule_peak_lr(opt, sched, 50) == pytest.approx(0.03)


def test_a_one_cycle_schedule_whose_peak_overshoots_is_refused_before_training(tmp_path):
    tokenizer = load_tokenizer("bpe-shakespeare-2048")
    corpus = shakespeare_corpus()
    train, _ = build_lm_datasets(tokenizer, train_files=corpus.train_files[:1],
                                 validation_files=corpus.validation_files[:1], block_size=16, max_train_samples=64,
                                 max_eval_samples=4)
    model = build_causal_lm(tokenizer=tokenizer, seed=0)
    # p = 0.2, eta = 1: c = lr / 0.2. OneCycle starts at 0.1 / 25 = 0.004 (c = 0.02) and peaks at 0.1 (c = 0.5)...
    args = make(tmp_path, max_steps=20, per_device_train_batch_size=2, palsgd_warmup_steps=2,
                palsgd_mixing_rate=1.0, learning_rate=0.004)
    opt = torch.optim.AdamW(model.parameters(), lr=0.004)
    ok = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20)
    PALSGDTrainer(model=model, args=args, train_dataset=train, optimizers=(opt, ok)).train()  # c <= 1 everywhere
    # ...while a peak of 0.5 gives c = 2.5: refused before the first step, naming the schedule's peak.
    model = build_causal_lm(tokenizer=tokenizer, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.004)
    bad = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=20)
    trainer = PALSGDTrainer(model=model, args=args, train_dataset=train, optimizers=(opt, bad))
    with pytest.raises(PALSGDConfigError, match=r"schedule's peak learning rate 0\.5.*c = lr\*eta/p"):
        trainer.train()
    assert trainer.state.global_step == 0
