"""Recipes for trl's trainers and LoRA (``trainer: sft | dpo``, ``peft:``, pretrained-model keys), in one process.

Checked: the keys are parsed against the trainer's own arguments class (SFTConfig/DPOConfig fields are
recipe keys for those trainers only), the pretrained-model keys reach ``from_pretrained`` through trl's
``model_init_kwargs``, ``peft:`` builds a ``LoraConfig``, and mistakes (causal-LM-only keys, no model,
data of the wrong shape, a LoRA argument that does not exist) are refused before anything launches.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from palsgd_hf.cli.chat_example import write_chat_example
from palsgd_hf.cli.preflight import check_sources
from palsgd_hf.cli.recipe import RecipeError, load_recipe

pytest.importorskip("trl")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[2]
SFT_LORA = ROOT / "recipes" / "sft" / "palsgd_lora.yaml"
DPO_LORA = ROOT / "recipes" / "sft" / "palsgd_dpo_lora.yaml"
TINY = ROOT / "recipes" / "shakespeare-tiny" / "palsgd.yaml"


@pytest.fixture(scope="module")
def example_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_root")
    write_chat_example(root / "outputs" / "chat-example", rows=40, base_steps=0)  # random base weights
    return root


@pytest.fixture(autouse=True)
def _in_example_root(monkeypatch, example_root):
    monkeypatch.chdir(example_root)  # the sft recipes name outputs/chat-example/... relative to the cwd


def test_sft_recipe_takes_sft_config_fields_and_builds_lora():
    recipe = load_recipe(str(SFT_LORA), ["--max_length", "48", "--packing", "true", "--dtype", "float32",
                                         "--attn_implementation", "eager", "--peft.r", "4"])
    assert recipe.spec.trainer == "sft" and recipe.training["max_length"] == 48 and recipe.training["packing"] is True
    args = recipe.training_arguments(use_cpu=True)
    assert type(args).__name__ == "PALSGDSFTConfig"
    # trl loads the model by name with these; trust_remote_code stays off unless the recipe turns it on.
    assert args.model_init_kwargs == {"trust_remote_code": False, "dtype": "float32", "attn_implementation": "eager"}
    lora = recipe.lora_config()
    assert lora.r == 4 and lora.lora_alpha == 16 and set(lora.target_modules) == {"q_proj", "v_proj"}
    assert str(lora.task_type) in ("CAUSAL_LM", "TaskType.CAUSAL_LM")
    # trust_remote_code is a field of trl's configs too: one key, on both sides.
    trusted = load_recipe(str(SFT_LORA), ["--trust_remote_code", "true"])
    assert trusted.spec.trust_remote_code is True and trusted.training["trust_remote_code"] is True


def test_dpo_recipe_takes_dpo_config_fields():
    recipe = load_recipe(str(DPO_LORA), ["--beta", "0.2"])
    assert recipe.training["beta"] == 0.2
    assert type(recipe.training_arguments(use_cpu=True)).__name__ == "PALSGDDPOConfig"
    with pytest.raises(RecipeError, match="unknown key 'beta'"):  # a DPO field is not a key of an SFT recipe
        load_recipe(str(SFT_LORA), ["--beta", "0.2"])
    with pytest.raises(RecipeError, match="unknown key 'max_length'"):  # nor of a causal_lm one (block_size there)
        load_recipe(str(TINY), ["--max_length", "64"])


@pytest.mark.parametrize("overrides, fragment", [
    (["--trainer", "ppo"], "trainer='ppo' is not one of"),
    (["--block_size", "64"], "block_size applies to trainer: causal_lm only (set max_length"),
    (["--text_column", "messages"], "text_column applies to trainer: causal_lm only"),
    (["--model", "null"], "trainer: sft fine-tunes a pretrained model"),
    (["--train_files", "null"], "needs data with messages (chat) or text"),
    (["--train_files", "data.jsonl"], "train_files='data.jsonl': file not found"),
    (["--train_files", "../README.md"], "expected files of one kind, with a suffix among"),
    (["--peft.rank", "4"], "unknown key 'peft.rank' (peft.LoraConfig has no such argument)"),
    (["--peft", "8"], "peft must be a mapping"),
    (["--dtype", "float64"], "dtype='float64' is not one of"),
    (["--model_init_kwargs", "{}"], "set the recipe keys dtype, attn_implementation and trust_remote_code"),
    (["--peft_config", "{}"], "set the recipe's peft: mapping instead"),
    (["--max_length", "long"], "max_length='long' should be an int"),
])
def test_trl_recipe_mistakes_are_refused(overrides, fragment):
    with pytest.raises(RecipeError) as err:
        load_recipe(str(SFT_LORA), overrides)
    assert fragment in str(err.value)


def test_pretrained_model_keys_need_a_pretrained_model():
    with pytest.raises(RecipeError, match="dtype applies to a pretrained model"):
        load_recipe(str(TINY), ["--dtype", "bfloat16"])
    recipe = load_recipe(str(TINY), ["--peft.r", "2", "--peft.target_modules", "[c_attn]"])  # LoRA on causal_lm too
    assert recipe.lora_config().r == 2


def test_rows_of_the_wrong_shape_are_refused_before_launch(example_root):
    chat = "outputs/chat-example/chat_train.jsonl"
    with pytest.raises(RecipeError, match=r"trainer: dpo reads rows with chosen\+rejected; its first row has"):
        check_sources(load_recipe(str(DPO_LORA), ["--train_files", chat]))
    with pytest.raises(RecipeError, match=r"text_column='messages' holds list, not text \(chat data: use trainer: sft"):
        check_sources(load_recipe(str(TINY), ["--dataset", "null", "--train_files", chat, "--text_column", "messages"]))
    with pytest.raises(RecipeError, match="its rows have no 'text' column"):
        check_sources(load_recipe(str(TINY), ["--dataset", "null", "--train_files", chat]))
    rows = example_root / "rows.json"  # one JSON document holding a list of rows: its first row is checked
    rows.write_text(json.dumps([{"prompt": "a", "completion": "b"}]))
    check_sources(load_recipe(str(SFT_LORA), ["--train_files", str(rows), "--validation_files", "null"]))
    check_sources(load_recipe(str(SFT_LORA)))  # the shipped recipe on the data chat-example writes
