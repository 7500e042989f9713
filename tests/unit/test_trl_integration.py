"""The trl integration without a training run: config classes, lazy exports, the metric combine on 2 gloo ranks."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tempfile
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from palsgd_hf.config import PALSGDConfigError
from palsgd_hf.integrations.trl.metrics import LocalTrlMetricsMixin


def test_import_palsgd_hf_does_not_import_trl_or_peft():
    code = "import sys, palsgd_hf; loaded = {'trl', 'peft'} & set(sys.modules); assert not loaded, loaded"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------- config classes (need trl)
@pytest.fixture(scope="module")
def trl_configs():
    pytest.importorskip("trl")
    from palsgd_hf.integrations.trl import PALSGDDPOConfig, PALSGDSFTConfig

    return PALSGDSFTConfig, PALSGDDPOConfig


def test_configs_keep_trl_defaults_and_every_palsgd_field(trl_configs):
    from trl import DPOConfig, SFTConfig

    from palsgd_hf.integrations.trainer_args import PALSGDTrainingArguments

    palsgd = {f.name: f for f in dataclasses.fields(PALSGDTrainingArguments) if f.name.startswith("palsgd_")}
    for ours, theirs in zip(trl_configs, (SFTConfig, DPOConfig)):
        fields = {f.name: f for f in dataclasses.fields(ours)}
        for f in dataclasses.fields(theirs):  # trl's defaults win over TrainingArguments' (e.g. learning_rate)
            assert fields[f.name].default == f.default, f"{ours.__name__}.{f.name}"
        for name, f in palsgd.items():
            assert fields[name].default == f.default and fields[name].metadata == f.metadata


def test_config_parses_from_the_command_line_and_validates(trl_configs, tmp_path):
    from transformers import HfArgumentParser

    sft_config, _ = trl_configs
    (args,) = HfArgumentParser(sft_config).parse_args_into_dataclasses([
        "--output_dir", str(tmp_path), "--use_cpu", "--max_length", "64", "--palsgd_pseudo_sync_prob", "0.3",
        "--palsgd_sync_interval", "8", "--palsgd_mixing_rate", "100", "--palsgd_coins", "per_replica",
    ])
    config = args.palsgd_config()
    assert (args.max_length, config.pseudo_sync_prob, config.sync_interval, config.coins) == (64, 0.3, 8, "per_replica")
    with pytest.raises(PALSGDConfigError, match="palsgd_pseudo_sync_prob"):
        sft_config(output_dir=str(tmp_path), use_cpu=True, palsgd_pseudo_sync_prob=1.5)


def test_lazy_exports(trl_configs):
    import palsgd_hf

    assert palsgd_hf.PALSGDSFTConfig is trl_configs[0] and palsgd_hf.PALSGDDPOConfig is trl_configs[1]
    from palsgd_hf.integrations.trl import PALSGDSFTTrainer

    assert palsgd_hf.PALSGDSFTTrainer is PALSGDSFTTrainer


# ---------------------------------------------------------------- combining each worker's metrics at log time
class FakeTrainer(LocalTrlMetricsMixin):
    """What the combine reads of a trl trainer: _metrics, _total_train_tokens, args.device."""

    def __init__(self, metrics: dict, tokens: int):
        self._metrics = {"train": defaultdict(list, metrics), "eval": defaultdict(list)}
        self._total_train_tokens = tokens
        self.args = SimpleNamespace(device=torch.device("cpu"))


def _combine_worker(rank: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    # Rank 1 computed nothing in the first window (possible with per-replica coins): no per-micro-batch keys.
    first = {"entropy": [1.0, 3.0], "mean_token_accuracy": [0.5, 0.7], "num_tokens": [100]} if rank == 0 else {}
    trainer = FakeTrainer(first, 100 if rank == 0 else 0)
    trainer._palsgd_combine_metrics()
    window1 = dict(trainer._metrics["train"])
    trainer._metrics["train"].clear()
    # Second window: both computed one micro-batch each; trl added its local count onto the global total.
    trainer._metrics["train"].update({"entropy": [2.0 + 2 * rank]})
    trainer._total_train_tokens += 10 + rank
    trainer._palsgd_combine_metrics()
    results[rank] = (window1, dict(trainer._metrics["train"]))
    dist.destroy_process_group()


def test_combine_averages_micro_batches_and_sums_tokens_over_workers():
    with tempfile.TemporaryDirectory() as tmp:
        results = mp.Manager().dict()
        mp.start_processes(_combine_worker, args=(f"{tmp}/init", results), nprocs=2, start_method="spawn")
        for rank in (0, 1):
            window1, window2 = results[rank]
            assert window1 == {"entropy": [2.0], "mean_token_accuracy": [0.6], "num_tokens": [100]}
            assert window2 == {"entropy": [3.0], "num_tokens": [121]}


def test_chat_data_is_reproducible_and_checks_its_operation(tmp_path):
    import json

    from palsgd_hf.lm import write_chat_jsonl, write_preference_jsonl

    a = write_chat_jsonl(tmp_path / "a.jsonl", 5, seed=3, op="minus").read_text()
    assert a == write_chat_jsonl(tmp_path / "b.jsonl", 5, seed=3, op="minus").read_text()
    first = json.loads(a.splitlines()[0])["messages"]
    question, answer = first[0]["content"], first[1]["content"]  # "What is A minus B?" / "A minus B is C."
    x, y = (int(v) for v in question.removeprefix("What is ").removesuffix("?").split(" minus "))
    assert answer == f"{x} minus {y} is {x - y}."
    pair = json.loads(write_preference_jsonl(tmp_path / "p.jsonl", 1).read_text())
    assert pair["chosen"] != pair["rejected"] and pair["prompt"][0]["role"] == "user"
    with pytest.raises(ValueError, match="op='times'"):
        write_chat_jsonl(tmp_path / "c.jsonl", 1, op="times")
