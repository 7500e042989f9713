"""Bad input is refused before any process group starts or any training happens, with one message that
names the value, the rule and the fix: PALSGDConfig values, PALSGDTrainingArguments that contradict each
other, recipe keys and files, CLI flags and launch layouts.

Each row of the table is (what, call, value, rule, fix): ``call`` must raise a user error whose message
contains the three fragments. The last tests run the CLI as a user does (subprocesses): exit code 2, one
line on stderr, no traceback, nothing launched, and far cheaper than the launch it prevents.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from palsgd_hf import cli
from palsgd_hf.config import PALSGDConfig, PALSGDConfigError
from palsgd_hf.core.topology import Topology
from palsgd_hf.integrations.trainer_args import PALSGDTrainingArguments, check_model_sharding, check_world
from palsgd_hf.cli.launch import LaunchError, check_accelerate_config
from palsgd_hf.cli.launch import check_world as check_launch_world
from palsgd_hf.cli.preflight import check_sources
from palsgd_hf.cli.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPE = "recipes/shakespeare-tiny/palsgd.yaml"
USER_ERRORS = (PALSGDConfigError, RecipeError, LaunchError)


def args(tmp_path, **kw):
    return PALSGDTrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", **kw)


def recipe(*overrides):
    return load_recipe(RECIPE, list(overrides))


def recipe_file(tmp_path, **changes):
    data = yaml.safe_load((ROOT / RECIPE).read_text())
    data.update(changes)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_recipe(str(path))


def accelerate_config(tmp_path, kind):
    path = tmp_path / "accelerate.yaml"
    path.write_text(yaml.safe_dump({"distributed_type": kind, "num_processes": 2}))
    return check_accelerate_config(str(path), 2)


CASES = [
    # ---- PALSGDConfig: the algorithm's own values
    ("p above 1", lambda t: PALSGDConfig(pseudo_sync_prob=1.5), "pseudo_sync_prob=1.5", "must lie in [0, 1)",
     "use p in [0, 0.5]"),
    ("p negative", lambda t: PALSGDConfig(pseudo_sync_prob=-0.1), "pseudo_sync_prob=-0.1", "must lie in [0, 1)",
     "use p in [0, 0.5]"),
    ("p = 1", lambda t: PALSGDConfig(pseudo_sync_prob=1.0), "pseudo_sync_prob=1.0", "no gradient step is ever taken",
     "use p in"),
    ("H < 1", lambda t: PALSGDConfig(sync_interval=0), "sync_interval=0", "integer >= 1", "use H >= 1"),
    ("eta = 0", lambda t: PALSGDConfig(mixing_rate=0.0), "mixing_rate=0.0", "must be > 0", "use e.g. 0.5-1.0"),
    ("eta < 0", lambda t: PALSGDConfig(mixing_rate=-1.0), "mixing_rate=-1.0", "must be > 0", "use e.g. 0.5-1.0"),
    ("negative warm-up", lambda t: PALSGDConfig(warmup_steps=-1), "warmup_steps=-1", "integer >= 0",
     "use 0 or more warm-up steps"),
    ("unknown method", lambda t: PALSGDConfig(method="adamw"), "method='adamw'", "is not one of", "pick one of them"),
    ("p for diloco", lambda t: PALSGDConfig(method="diloco", pseudo_sync_prob=0.2), "pseudo_sync_prob=0.2",
     "fixes pseudo_sync_prob=0.0", "use method='palsgd'"),
    ("overlap >= H", lambda t: PALSGDConfig(sync_interval=4, overlap_steps=4), "overlap_steps=4",
     "must be smaller than sync_interval=4", "lower overlap_steps"),
    ("outer momentum 1", lambda t: PALSGDConfig(outer_momentum=1.0), "outer_momentum=1.0", "must lie in [0, 1)",
     "default is 0.9"),
    ("c > 1 at the peak LR", lambda t: PALSGDConfig(mixing_rate=5.0).check_mixing_coefficient(0.1),
     "0.1*5/0.2 = 2.5", "must lie in (0, 1]", "lower mixing_rate to at most 2 "),
    ("shard size not dividing the world", lambda t: Topology(world_size=4, rank=0, shard_size=3),
     "world size 4 is not divisible by shard_size=3", "needs exactly shard_size ranks",
     "launch a multiple of 3 processes"),
    # ---- PALSGDTrainingArguments: palsgd_* against the other arguments
    ("c > 1 with the Trainer's LR", lambda t: args(t, learning_rate=0.1, palsgd_mixing_rate=5.0),
     "peak learning_rate=0.1", "must lie in (0, 1]", "lower palsgd_mixing_rate to at most 2 "),
    ("p in the Trainer", lambda t: args(t, palsgd_pseudo_sync_prob=1.5), "palsgd_pseudo_sync_prob=1.5",
     "must lie in [0, 1)", "use p in"),
    ("shard size without DeepSpeed or FSDP2",
     lambda t: check_model_sharding(PALSGDConfig(shard_size=2), args(t), fsdp2_model=False), "palsgd_shard_size=2",
     "is not an FSDP2 model", "pass deepspeed=<ZeRO config>, or shard the model with fully_shard"),
    ("world not a multiple of the shard size", lambda t: check_world(PALSGDConfig(shard_size=3), 4),
     "has 4 processes", "not a multiple of palsgd_shard_size=3", "launch a multiple of 3 processes"),
    ("zero collective timeout", lambda t: args(t, palsgd_comm_timeout_seconds=0), "palsgd_comm_timeout_seconds=0",
     "positive number of seconds", "leave it unset"),
    ("zero ddp_timeout", lambda t: args(t, ddp_timeout=0), "ddp_timeout=0", "positive number of seconds",
     "use e.g. 600"),
    ("optimizer stepping in backward", lambda t: args(t, optim="lomo"), "optim='lomo'", "inside backward",
     "optim='adamw_torch'"),
    ("FSDP", lambda t: args(t, fsdp="full_shard"), "fsdp=", "cannot be combined with PALSGD",
     "mesh=palsgd_hf.adapters.fsdp.shard_mesh(palsgd_shard_size)) before PALSGDTrainer"),
    ("unknown eval_on", lambda t: args(t, palsgd_eval_on="both"), "palsgd_eval_on='both'", "is not one of",
     "pick one"),
    # ---- recipes: keys, types, files
    ("unknown recipe key", lambda t: recipe("--palsgd_sync_intervall", "8"), "'palsgd_sync_intervall'",
     "unknown key", "Did you mean 'palsgd_sync_interval'?"),
    ("wrong type", lambda t: recipe("--learning_rate", "fast"), "learning_rate='fast'", "should be a float",
     "float"),
    ("p in a recipe", lambda t: recipe("--palsgd_pseudo_sync_prob", "1.5"), "palsgd_pseudo_sync_prob=1.5",
     "must lie in [0, 1)", "use p in"),
    ("c > 1 in a recipe", lambda t: recipe("--palsgd_mixing_rate", "100"), "0.003*100/0.2 = 1.5",
     "must lie in (0, 1]", "lower palsgd_mixing_rate"),
    ("missing dataset file", lambda t: recipe_file(t, dataset=None, train_files=["no-such-corpus.txt"]),
     "train_files='no-such-corpus.txt'", "file not found", "fix the path"),
    ("missing tokenizer directory", lambda t: check_sources(recipe("--tokenizer", "./no-such-tokenizer")),
     "tokenizer='./no-such-tokenizer'", "not found", "fix the path"),
    ("Hub tokenizer offline, not cached",
     lambda t: check_sources(recipe("--tokenizer", "nobody-xyz/no-such-tokenizer")),
     "tokenizer='nobody-xyz/no-such-tokenizer'", "not in the Hugging Face cache", "HF_HUB_OFFLINE"),
    ("Hub dataset offline, not cached",
     lambda t: check_sources(recipe("--dataset", "null", "--dataset_name", "nobody-xyz/no-such-dataset")),
     "dataset_name='nobody-xyz/no-such-dataset'", "not in the Hugging Face cache", "HF_HUB_OFFLINE"),
    ("fsdp2 without shards", lambda t: recipe("--fsdp2", "true"), "fsdp2: true",
     "cannot go with palsgd_shard_size: 1", "set palsgd_shard_size to the ranks per worker"),
    ("recipe processes vs shard size", lambda t: recipe("--palsgd_shard_size", "3"), "launch.num_processes=2",
     "not a multiple of palsgd_shard_size=3", "palsgd_shard_size ranks"),
    ("unknown launcher", lambda t: recipe("--launch.launcher", "mpirun"), "launch.launcher='mpirun'",
     "is not one of", "torchrun"),
    ("no processes", lambda t: recipe("--launch.num_processes", "0"), "launch.num_processes=0", "must be >= 1",
     ">= 1"),
    # ---- launch layouts
    ("a launch that silently runs one process", lambda t: check_launch_world(2, world_size=1),
     "launch.num_processes=2", "this job has 1 process", "accelerate launch --multi_gpu --num_processes 2"),
    ("unsupported accelerate config", lambda t: accelerate_config(t, "FSDP"), "distributed_type FSDP",
     "not supported with PALSGD", "use MULTI_GPU"),
]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_there_are_at_least_twenty_bad_inputs():
    assert len(CASES) >= 20 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("what, call, value, rule, fix", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_naming_value_rule_and_fix(tmp_path, what, call, value, rule, fix):
    with pytest.raises(USER_ERRORS) as err:
        call(tmp_path)
    message = str(err.value)
    for fragment in (value, rule, fix):
        assert fragment in message, f"{what}: {fragment!r} not in {message!r}"
    assert "\n" not in message, f"{what}: one line expected"
    assert not (tmp_path / "out").exists()  # nothing was written: refused before any work


def test_the_cli_refuses_each_kind_of_mistake_in_one_line_before_launching(capsys, tmp_path):
    for flags in (["--palsgd_pseudo_sync_prob", "1.5"], ["--palsgd_sync_interval", "0"], ["--learning_rat", "1"],
                  ["--tokenizer", "./no-such-tokenizer"], ["--palsgd_shard_size", "3"]):
        code = cli.main(["train", RECIPE, *flags, "--output_dir", str(tmp_path / "out")])
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("palsgd-hf train: error:"), (flags, lines)
        assert "torch.distributed.run" not in captured.err + captured.out  # the launch line is never printed
    assert not (tmp_path / "out").exists()


def run_timed(cmd, **kw):
    """Run ``cmd``; return it and the CPU seconds (user + system) it and its children used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300, **kw)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return proc, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


@pytest.mark.timeout(400)
def test_cli_flag_error_is_one_line_no_traceback_and_cheaper_than_a_launch(tmp_path):
    bad = ["--palsgd_pseudo_sync_prob", "1.5"]
    proc, cli_cpu = run_timed([sys.executable, "-m", "palsgd_hf.cli", "train", RECIPE, *bad,
                               "--output_dir", str(tmp_path / "cli")])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"palsgd-hf train: error: recipe {RECIPE}: palsgd_pseudo_sync_prob=1.5 must lie in [0, 1): with p = 1 no "
        "gradient step is ever taken; use p in [0, 0.5] (the paper uses 0.1-0.2)."
    ]
    assert proc.stdout == "" and not (tmp_path / "cli").exists()
    # The same mistake typed straight into a torchrun launch: the processes start, then every rank refuses it
    # (before its process group: one line per rank, since torchrun may stop the others before rank 0 prints).
    launched, launch_cpu = run_timed([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                      "--nproc_per_node=2", "-m", "palsgd_hf.cli.run", RECIPE, *bad,
                                      "--output_dir", str(tmp_path / "torchrun")])
    assert launched.returncode != 0
    assert "palsgd_hf.cli.run: error: palsgd_pseudo_sync_prob=1.5 must lie in [0, 1)" in launched.stderr
    assert "palsgd_hf/" not in launched.stderr  # no traceback through our code (torchrun adds its own summary)
    assert not (tmp_path / "torchrun").exists()
    # Measured in CPU seconds, which a busy machine does not inflate: ~5 s for the CLI vs ~13 s for the launch.
    assert cli_cpu < 0.6 * launch_cpu, (cli_cpu, launch_cpu)


def test_sources_that_exist_are_accepted(tmp_path, monkeypatch):
    """The source check refuses only what is missing: local directories, cached Hub repos and the built-in BPE pass."""
    hub = tmp_path / "hub"
    for folder in ("models--someorg--tok", "datasets--someorg--data"):
        (hub / folder / "snapshots" / ("a" * 40)).mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    local = tmp_path / "my-tokenizer"
    local.mkdir()
    check_sources(recipe("--tokenizer", str(local)))
    check_sources(recipe("--tokenizer", "someorg/tok"))
    check_sources(recipe("--dataset", "null", "--dataset_name", "someorg/data"))
    check_sources(recipe())  # bpe-shakespeare-2048
    with pytest.raises(RecipeError, match=r"tokenizer='bpe-shakespeare-big' is malformed.*'bpe-shakespeare-2048'"):
        check_sources(recipe("--tokenizer", "bpe-shakespeare-big"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    check_sources(recipe("--tokenizer", "nobody-xyz/not-cached"))  # online, the run itself asks the Hub
