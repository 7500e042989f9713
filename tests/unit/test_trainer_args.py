"""PALSGDTrainingArguments and the per-rank checkpoint files, in one process (no training).

Arguments: one palsgd_ field per PALSGDConfig field, a lossless HfArgumentParser round trip, and
clear errors (naming the palsgd_ field) for values that contradict each other or the rest of the
arguments. Checkpoint files: round trip, atomic write, and refusals of a foreign layout.
"""

from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace

import pytest
import torch
from transformers import HfArgumentParser, TrainingArguments

from palsgd_hf.config import PALSGDConfig, PALSGDConfigError
from palsgd_hf.integrations import checkpoint
from palsgd_hf.integrations.trainer import resolve_palsgd_config
from palsgd_hf.integrations.trainer_args import PALSGDTrainingArguments, check_model_sharding, prefixed


def make(tmp_path, **kwargs):
    return PALSGDTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kwargs)


def test_every_config_field_has_a_prefixed_twin_with_its_default_and_help():
    args_fields = {f.name: f for f in dataclasses.fields(PALSGDTrainingArguments)}
    for f in dataclasses.fields(PALSGDConfig):
        twin = args_fields[f"palsgd_{f.name}"]
        assert twin.default == f.default
        assert f.metadata["help"] in twin.metadata["help"]


def test_hf_argument_parser_round_trip(tmp_path):
    parser = HfArgumentParser(PALSGDTrainingArguments)
    cli = [
        "--output_dir", str(tmp_path), "--report_to", "none", "--use_cpu", "--learning_rate", "0.01",
        "--palsgd_method", "palsgd", "--palsgd_sync_interval", "16", "--palsgd_pseudo_sync_prob", "0.1",
        "--palsgd_mixing_rate", "0.5", "--palsgd_warmup_steps", "8", "--palsgd_outer_optimizer", "adam",
        "--palsgd_outer_lr", "0.3", "--palsgd_outer_momentum", "0.8", "--palsgd_seed", "7",
        "--palsgd_comm_dtype", "bf16", "--palsgd_eval_on", "local", "--palsgd_comm_timeout_seconds", "60",
    ]
    (args,) = parser.parse_args_into_dataclasses(args=cli)
    assert args.palsgd_config() == PALSGDConfig(
        sync_interval=16, pseudo_sync_prob=0.1, mixing_rate=0.5, warmup_steps=8, outer_optimizer="adam",
        outer_lr=0.3, outer_momentum=0.8, seed=7, comm_dtype="bf16", comm_timeout_seconds=60,
    )
    assert (args.palsgd_eval_on, args.palsgd_comm_timeout_seconds) == ("local", 60.0)
    (again,) = parser.parse_dict(args.to_dict())
    assert again.palsgd_config() == args.palsgd_config()
    assert {k: v for k, v in again.to_dict().items() if k.startswith("palsgd_")} == {
        k: v for k, v in args.to_dict().items() if k.startswith("palsgd_")
    }
    # Preset values left unset resolve like PALSGDConfig's own.
    (plain,) = parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path), "--palsgd_method", "diloco",
                                                        "--learning_rate", "0.01"])
    assert plain.palsgd_config() == PALSGDConfig(method="diloco")


def test_parser_refuses_unknown_choices(tmp_path):
    parser = HfArgumentParser(PALSGDTrainingArguments)
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path), "--palsgd_method", "fedavg"])


BAD = [
    (dict(palsgd_method="diloco", palsgd_pseudo_sync_prob=0.2),
     "palsgd_pseudo_sync_prob=0.2 contradicts palsgd_method='diloco'"),
    (dict(palsgd_sync_interval=0), "palsgd_sync_interval=0 must be an integer >= 1"),
    (dict(palsgd_sync_interval=4, palsgd_overlap_steps=4),
     "palsgd_overlap_steps=4 must be smaller than palsgd_sync_interval=4"),
    (dict(learning_rate=0.5, palsgd_pseudo_sync_prob=0.2, palsgd_mixing_rate=1.0),
     "at the peak learning_rate=0.5: mixing coefficient c = lr*eta/p = 0.5*1/0.2 = 2.5 must lie in (0, 1]; "
     "lower palsgd_mixing_rate to at most 0.4"),
    (dict(fsdp="full_shard"), "fsdp='full_shard' cannot be combined with PALSGD"),
    (dict(optim="lomo"), "optim='lomo' updates parameters inside backward"),
    (dict(palsgd_eval_on="anchor"), "palsgd_eval_on='anchor' is not one of"),
    (dict(palsgd_comm_timeout_seconds=0), "palsgd_comm_timeout_seconds=0 must be a positive number"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m.split(" ")[0] for _, m in BAD])
def test_contradictions_are_refused_naming_the_palsgd_field(tmp_path, kwargs, message):
    with pytest.raises(PALSGDConfigError) as err:
        make(tmp_path, **kwargs)
    assert message in str(err.value)


def test_shard_size_needs_deepspeed_or_an_fsdp2_model(tmp_path):
    """Checked where the model is known (PALSGDTrainer.__init__), not by the arguments alone."""
    args = make(tmp_path)
    with pytest.raises(PALSGDConfigError, match="palsgd_shard_size=2 needs each worker's model copy sharded"):
        check_model_sharding(PALSGDConfig(shard_size=2), args, fsdp2_model=False)
    check_model_sharding(PALSGDConfig(shard_size=2), args, fsdp2_model=True)
    with pytest.raises(PALSGDConfigError, match="and deepspeed is set: shard with one of them"):
        check_model_sharding(PALSGDConfig(shard_size=2), SimpleNamespace(deepspeed="zero2.json", world_size=4),
                             fsdp2_model=True)
    with pytest.raises(PALSGDConfigError, match="sharded with FSDP2 but palsgd_shard_size=1"):
        check_model_sharding(PALSGDConfig(), SimpleNamespace(deepspeed=None, world_size=4), fsdp2_model=True)


def test_weak_pull_and_all_warmup_runs_are_flagged(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="palsgd_hf"):
        make(tmp_path, learning_rate=2e-5, max_steps=100, palsgd_warmup_steps=10, palsgd_mixing_rate=1.0)
    assert "almost no pull toward the global model" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="palsgd_hf"):  # the default: c = palsgd_pull at any learning rate
        make(tmp_path, learning_rate=2e-5, max_steps=100, palsgd_warmup_steps=10)
    assert "almost no pull" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="palsgd_hf"):
        make(tmp_path, learning_rate=0.01, max_steps=20, palsgd_warmup_steps=32)
    assert "this run is plain DDP" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="palsgd_hf"):
        make(tmp_path, learning_rate=0.01, max_steps=200, palsgd_warmup_steps=10)
    assert "almost no pull" not in caplog.text and "plain DDP" not in caplog.text


def test_prefixed_renames_only_config_fields():
    msg = "pseudo_sync_prob=0.3 contradicts method='diloco'; use method='palsgd' (the seed=1 run); some method"
    assert prefixed(msg) == (
        "palsgd_pseudo_sync_prob=0.3 contradicts palsgd_method='diloco'; use palsgd_method='palsgd' "
        "(the palsgd_seed=1 run); some method"
    )


def test_trainer_settings_come_from_exactly_one_place(tmp_path):
    args = make(tmp_path, learning_rate=0.01)
    assert resolve_palsgd_config(args, None) == args.palsgd_config()
    with pytest.raises(ValueError, match="got both PALSGDTrainingArguments and palsgd_config"):
        resolve_palsgd_config(args, PALSGDConfig())
    plain = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, learning_rate=0.01)
    with pytest.raises(ValueError, match="PALSGD settings are missing"):
        resolve_palsgd_config(plain, None)
    assert resolve_palsgd_config(plain, PALSGDConfig(sync_interval=4)).sync_interval == 4
    with pytest.raises(PALSGDConfigError, match="at the peak learning_rate=0.01"):
        resolve_palsgd_config(plain, PALSGDConfig(mixing_rate=50.0))  # the same checks as the arguments


def test_rank_file_round_trip_is_atomic_and_refuses_other_layouts(tmp_path):
    algo = {"step": 7, "generator": torch.Generator().manual_seed(3).get_state()}
    model = {"w": torch.arange(4.0)}
    path = checkpoint.save_rank_state(tmp_path, 1, 2, algo, model_state=model, optimizer_state={"state": {}})
    assert path.name == "palsgd_rank1.pt" and sorted(p.name for p in tmp_path.iterdir()) == ["palsgd_rank1.pt"]
    state = checkpoint.load_rank_state(tmp_path, 1, 2)
    assert state["algorithm"]["step"] == 7 and torch.equal(state["model"]["w"], model["w"])
    assert torch.equal(state["algorithm"]["generator"], algo["generator"])
    with pytest.raises(FileNotFoundError, match=r"palsgd_rank0.pt is missing \(it holds \['palsgd_rank1.pt'\]\)"):
        checkpoint.load_rank_state(tmp_path, 0, 2)
    with pytest.raises(ValueError, match="written by rank 1 of 2 processes, but this is rank 1 of 4"):
        checkpoint.load_rank_state(tmp_path, 1, 4)
    # A save that fails part-way leaves the previous complete file and no temporary file behind.
    with pytest.raises(Exception):
        checkpoint.save_rank_state(tmp_path, 1, 2, {"bad": lambda: None})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["palsgd_rank1.pt"]
    assert checkpoint.load_rank_state(tmp_path, 1, 2)["algorithm"]["step"] == 7
