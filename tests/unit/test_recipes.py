"""Recipes and the launch checks, in one process: every shipped recipe validates, mistakes are refused.

Also the Hub path (``hub:ORG/REPO/path.yaml[@rev]``) against a Hugging Face cache laid out on disk
the way ``hf_hub_download`` leaves it, resolved by the real ``hf_hub_download`` offline, and the
CLI's user-error contract (one stderr line, exit code 2, no traceback).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from palsgd_hf import cli
from palsgd_hf.config import METHODS
from palsgd_hf.cli.launch import LaunchError, build_command, check_accelerate_config, check_hardware, check_world
from palsgd_hf.cli.chat_example import write_chat_example
from palsgd_hf.cli.recipe import BUILTIN_DIR, RecipeError, load_recipe, parse_overrides

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(
    p for p in (ROOT / "recipes").rglob("*.yaml") if p.parent.name not in ("accelerate", "deepspeed")
)
BUILTINS = sorted(BUILTIN_DIR.glob("*.yaml"))
TINY = ROOT / "recipes" / "shakespeare-tiny" / "palsgd.yaml"


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name paths relative to the repository root


@pytest.fixture(scope="module")
def chat_example_root(tmp_path_factory):
    """A directory holding outputs/chat-example/ (what `palsgd-hf chat-example` writes) for the sft recipes."""
    root = tmp_path_factory.mktemp("chat_root")
    write_chat_example(root / "outputs" / "chat-example", rows=40, base_steps=0)  # random base weights
    return root


def test_there_are_recipes_for_every_method():
    names = {p.relative_to(ROOT / "recipes").as_posix() for p in RECIPES}
    for method in ("ddp", "diloco", "palsgd"):
        assert f"shakespeare-tiny/{method}.yaml" in names
        assert f"gpt-neo-8m/tinystories_{method}.yaml" in names
    assert {p.stem for p in BUILTINS} >= {"demo-ddp", "demo-palsgd"}


@pytest.mark.parametrize("path", RECIPES + BUILTINS, ids=lambda p: p.relative_to(p.parents[1]).as_posix())
def test_every_recipe_parses_and_validates(path, request, monkeypatch):
    source = f"builtin:{path.stem}" if path.parent == BUILTIN_DIR else str(path.relative_to(ROOT))
    if path.parent.name == "sft":  # their model and data are what `palsgd-hf chat-example` writes into the cwd
        monkeypatch.chdir(request.getfixturevalue("chat_example_root"))
        source = str(path)
    recipe = load_recipe(source)  # keys, types, data/model/launch choices, PALSGDTrainingArguments
    cmd = build_command(recipe, [source])
    assert cmd[cmd.index("-m", 1) + 1] in ("torch.distributed.run", "accelerate.commands.launch")
    assert "--cpu" not in cmd
    method = recipe.training.get("palsgd_method", "palsgd")
    # The file name says which method the recipe runs, and names no other (a diloco.yaml running palsgd,
    # or a palsgd-vs-ddp.yaml, would mislead whoever picks it by name).
    named = {m for m in METHODS if m in Path(source).stem}
    assert named == {method}, f"{source}: runs method={method!r} but its name mentions {sorted(named)}"
    if method == "palsgd":
        config = recipe.training_arguments(bf16=False, fp16=False, palsgd_shard_size=1).palsgd_config()
        peak = recipe.training["learning_rate"]
        c = config.resolved(peak).check_mixing_coefficient(peak)  # the default pull: eta derived from the peak
        # c = lr * (pull * p / lr) / p: four roundings of relative 2^-53 each when eta is derived from the pull.
        assert 0.01 <= c <= 0.1 * (1 + 4 * 2.0**-53), f"{source}: pull c = {c} at the peak LR; aim for 0.01-0.1"


def test_gpt_neo_8m_recipe_is_the_papers_setup():
    recipe = load_recipe("recipes/gpt-neo-8m/tinystories_palsgd.yaml")
    t = recipe.training
    assert recipe.spec.model_preset == "gpt-neo-8m" and recipe.spec.block_size == 300
    assert recipe.spec.dataset_name == "roneneldan/TinyStories" and recipe.launch.num_processes == 4
    assert (t["palsgd_sync_interval"], t["palsgd_pseudo_sync_prob"], t["palsgd_mixing_rate"]) == (32, 0.2, 1.0)
    assert (t["palsgd_warmup_steps"], t["learning_rate"], t["max_grad_norm"], t["gradient_accumulation_steps"]) == (
        32, 0.01, 1.0, 16)
    assert (t["palsgd_outer_optimizer"], t["palsgd_outer_lr"], t["palsgd_outer_momentum"]) == ("nesterov", 0.7, 0.9)


# ----------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("overrides, fragment", [
    (["--learning_rat", "0.1"], "unknown key 'learning_rat'. Did you mean 'learning_rate'?"),
    (["--palsgd_sync_intervall", "8"], "Did you mean 'palsgd_sync_interval'?"),
    (["--local_rank", "0"], "the launcher sets the rank"),
    (["--launch.num_proc", "2"], "unknown key 'launch.num_proc'. Did you mean 'num_processes'?"),
    (["--learning_rate", "fast"], "learning_rate='fast' should be a float"),
    (["--max_steps", "1.5"], "max_steps=1.5 should be an int"),
    (["--palsgd_pseudo_sync_prob", "1.5"], "palsgd_pseudo_sync_prob=1.5 must lie in [0, 1)"),
    (["--palsgd_mixing_rate", "100"], "lower palsgd_mixing_rate"),
    (["--palsgd_shard_size", "4"], "not a multiple of palsgd_shard_size=4"),
    (["--train_files", "[a.txt]"], "exactly one data source"),
    (["--model", "gpt2"], "set one"),
    (["--model_preset", "huge"], "model_preset='huge' is not one of"),
    (["--launch.launcher", "mpirun"], "launch.launcher='mpirun' is not one of"),
    (["--launch.accelerate_config", "recipes/accelerate/ddp.yaml"], "set launcher: accelerate"),
    (["--eval_strategy", "sometimes"], "eval_strategy='sometimes' is not one of 'no', 'steps', 'epoch'"),
    (["--bf16", "maybe"], "bf16='maybe' is refused: Truthy value expected"),
    (["--launch", "4"], "launch must be a mapping"),
    (["--model_config", "3"], "model_config must be a mapping"),
    (["--learning_rate"], "has no value"),
])
def test_mistakes_are_refused_with_the_key_and_a_fix(overrides, fragment):
    with pytest.raises((RecipeError, LaunchError)) as err:
        load_recipe(str(TINY.relative_to(ROOT)), overrides)
    assert fragment in str(err.value)


def test_overrides_are_typed_like_their_fields():
    parsed = parse_overrides(["--learning_rate", "1e-3", "--max_steps=7", "--bf16", "false", "--run_name", "123",
                              "--launch.num_processes", "1", "--model_config.num_layers", "3"])
    assert parsed["learning_rate"] == "1e-3" and parsed["max_steps"] == 7 and parsed["bf16"] is False
    recipe = load_recipe(str(TINY.relative_to(ROOT)), ["--learning_rate", "1e-3", "--max_steps=7", "--run_name", "123",
                                                         "--launch.num_processes", "1", "--model_config.num_layers", "3",
                                                         "--warmup_steps", "2"])
    assert recipe.training["learning_rate"] == 1e-3 and recipe.training["run_name"] == "123"
    assert recipe.training["max_steps"] == 7 and recipe.launch.num_processes == 1
    assert recipe.spec.model_config == {"num_layers": 3}
    assert recipe.launch.launcher == "torchrun"  # untouched keys of the section keep the recipe's values


def test_recipe_file_problems(tmp_path):
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe("recipes/nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(str(bad))
    with pytest.raises(RecipeError, match="built-in recipes: .*demo-palsgd"):
        load_recipe("builtin:nope")
    with pytest.raises(RecipeError, match="hub:ORG/REPO/path"):
        load_recipe("hub:only-org/x.yaml")


def test_relative_paths_resolve_against_cwd_then_the_recipe_dir(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.txt").write_text("to be or not to be\n" * 50)
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("tokenizer: bpe-shakespeare-2048\ntrain_files: data/train.txt\nmax_steps: 2\n"
                           "launch: {num_processes: 1}\n")
    recipe = load_recipe(str(recipe_file))  # the cwd is the repo root: found next to the recipe
    assert recipe.spec.train_files == [str((tmp_path / "data" / "train.txt").resolve())]
    assert recipe.training["output_dir"] == os.path.join("outputs", "r")


# ----------------------------------------------------------------------------------- the launch trap
def test_single_process_job_is_refused_when_the_recipe_wants_more(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # what `accelerate launch --cpu` leaves behind
    with pytest.raises(LaunchError) as err:
        check_world(2, world_size=1)
    message = str(err.value)
    assert "ONE process" in message and "--multi_gpu" in message and "accelerate's single-process" in message
    assert check_world(1, world_size=1) == 1 and check_world(2, world_size=2) == 2


def test_multi_cpu_accelerate_config_is_launched_with_multi_gpu(tmp_path, caplog):
    config = tmp_path / "multi_cpu.yaml"
    config.write_text("distributed_type: MULTI_CPU\nnum_processes: 2\nuse_cpu: true\n")
    recipe = load_recipe(str(TINY.relative_to(ROOT)), ["--launch.launcher", "accelerate",
                                                         "--launch.accelerate_config", str(config)])
    with caplog.at_level("WARNING"):
        cmd = build_command(recipe, [recipe.source])
    assert "--multi_gpu" in cmd and "--cpu" not in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "2" and "--main_process_port" in cmd
    assert "start ONE process" in caplog.text
    config.write_text("distributed_type: FSDP\n")
    with pytest.raises(LaunchError, match="FSDP is not supported"):
        check_accelerate_config(str(config), 2)


def test_gpu_only_settings_are_refused_before_launch_on_cpu():
    recipe = load_recipe("recipes/gpt-neo-8m/tinystories_palsgd.yaml")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(LaunchError, match="pass --bf16 false"):
        check_hardware(recipe)


# ----------------------------------------------------------------------------------- CLI contract
def test_cli_user_errors_are_one_line_and_exit_2(capsys):
    assert cli.main(["train", str(TINY.relative_to(ROOT)), "--learning_rat", "0.1", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("palsgd-hf train: error:") and "learning_rate" in err[0]
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["check", "recipes/nope.yaml"]) == 2
    assert cli.main(["check", "recipes/accelerate/ddp.yaml", "recipes/shakespeare-tiny/ddp.yaml"]) == 0
    assert "skip recipes/accelerate/ddp.yaml: an accelerate launch config" in capsys.readouterr().out


def test_cli_dry_run_prints_the_launch_command(capsys):
    assert cli.main(["train", str(TINY.relative_to(ROOT)), "--max_steps", "5", "--dry-run"]) == 0
    out = capsys.readouterr().out.strip()
    assert "torch.distributed.run --standalone --nproc_per_node=2 -m palsgd_hf.cli.run" in out
    assert out.endswith("--max_steps 5")


# ----------------------------------------------------------------------------------- Hub recipes
def _hub_cache(root: Path, repo: str, files_by_commit: dict[str, dict[str, str]], main: str) -> Path:
    """A Hugging Face hub cache in the layout hf_hub_download reads: snapshots/<commit>/<path>, refs/main."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    for commit, files in files_by_commit.items():
        for rel, text in files.items():
            path = repo_dir / "snapshots" / commit / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(main)
    return root


def test_hub_recipe_loads_from_a_local_cache_offline(tmp_path):
    recipe_text = TINY.read_text().replace("launcher: torchrun", "launcher: accelerate\n  accelerate_config: ../accelerate/ddp.yaml")
    old, new = "a" * 40, "b" * 40
    cache = _hub_cache(tmp_path / "hub", "someorg/palsgd-recipes", {
        new: {"shakespeare/palsgd.yaml": recipe_text,
              "accelerate/ddp.yaml": (ROOT / "recipes" / "accelerate" / "ddp.yaml").read_text()},
        old: {"shakespeare/palsgd.yaml": TINY.read_text().replace("max_steps: 600", "max_steps: 77")},
    }, main=new)
    script = textwrap.dedent("""
        import json, sys
        from palsgd_hf.cli.recipe import load_recipe
        main = load_recipe("hub:someorg/palsgd-recipes/shakespeare/palsgd.yaml")
        pinned = load_recipe("hub:someorg/palsgd-recipes/shakespeare/palsgd.yaml@" + sys.argv[1])
        print(json.dumps({"main_steps": main.training["max_steps"], "pinned_steps": pinned.training["max_steps"],
                          "path": str(main.path), "accelerate_config": main.launch.accelerate_config}))
        try:
            load_recipe("hub:someorg/palsgd-recipes/missing.yaml")
        except Exception as err:
            print(type(err).__name__, err)
    """)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script, old], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = proc.stdout.strip().splitlines()[-2:]
    got = json.loads(first)
    assert got["main_steps"] == 600 and got["pinned_steps"] == 77
    assert got["path"].startswith(str(cache)) and f"snapshots/{new}" in got["path"]
    assert got["accelerate_config"].endswith(f"snapshots/{new}/accelerate/ddp.yaml")  # fetched from the same repo
    assert second.startswith("RecipeError") and "missing.yaml" in second and "HF_HUB_OFFLINE" in second
