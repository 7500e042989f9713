"""Causal language models for the demo, recipes, tests and benchmarks.

Either a pretrained model (Hub name or local directory, through ``AutoModelForCausalLM``) or a
GPT-Neo built from scratch from a named preset:

* ``"tiny"``: 64 wide, 2 layers, 4 heads, 256 positions, 2048-token vocabulary (the size of
  ``load_tokenizer("bpe-shakespeare-2048")``, whose ``<|endoftext|>`` is id 0). For CPU tests.
* ``"gpt-neo-8m"``: the paper's small language model: 128 wide, 8 layers, 8 heads, 512 positions
  (room for its ~300-token sequences) and the GPT-2 vocabulary (50257, eos 50256).

GPT-Neo alternates global and local (windowed) attention; its config rejects an
``attention_types`` list whose expansion does not have one entry per layer, so the pattern is
derived from ``num_layers`` unless the caller sets ``attention_types`` explicitly.

From-scratch weights depend only on ``seed``: they are drawn inside ``torch.random.fork_rng`` so
building a model neither depends on nor disturbs the caller's RNG state.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPTNeoConfig, PreTrainedModel

logger = logging.getLogger(__name__)

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "vocab_size": 2048,
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "max_position_embeddings": 256,
        "window_size": 256,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
    },
    "gpt-neo-8m": {
        "vocab_size": 50257,
        "hidden_size": 128,
        "num_layers": 8,
        "num_heads": 8,
        "max_position_embeddings": 512,
        "window_size": 256,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "pad_token_id": 50256,
    },
}

# GPTNeoConfig aliases (num_hidden_layers -> num_layers, ...) folded to the canonical names.
_ALIASES = dict(GPTNeoConfig.attribute_map)
_GPT_NEO_KEYS = {f.name for f in dataclasses.fields(GPTNeoConfig)}


def build_causal_lm(
    model_name_or_path: str | os.PathLike | None = None,
    config_overrides: dict[str, Any] | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
    *,
    preset: str = "tiny",
    tokenizer=None,
    model_kwargs: dict[str, Any] | None = None,
) -> PreTrainedModel:
    """Build a causal LM: pretrained if ``model_name_or_path`` is given, else ``preset`` from scratch.

    ``tokenizer`` (optional) supplies ``vocab_size`` (its ``len``) and the bos/eos/pad ids;
    ``vocab_size`` alone sets just the size. ``config_overrides`` is applied last; unknown keys are
    errors. A pretrained model whose embedding is smaller than the vocabulary is resized.
    ``model_kwargs`` go to ``from_pretrained`` (``dtype``, ``attn_implementation``, ``trust_remote_code``).
    """
    overrides = dict(config_overrides or {})
    token_ids = _token_ids(tokenizer)
    if tokenizer is not None:
        if vocab_size is not None and vocab_size != len(tokenizer):
            raise ValueError(f"vocab_size={vocab_size} differs from len(tokenizer)={len(tokenizer)}; pass one of them.")
        vocab_size = len(tokenizer)

    if model_name_or_path is not None:
        return _pretrained(str(model_name_or_path), overrides, vocab_size, token_ids, dict(model_kwargs or {}))

    if preset not in MODEL_PRESETS:
        raise ValueError(
            f"preset={preset!r} is unknown; choose one of {sorted(MODEL_PRESETS)} or pass model_name_or_path."
        )
    params = copy.deepcopy(MODEL_PRESETS[preset])
    if vocab_size is not None:
        params["vocab_size"] = vocab_size
    params.update(token_ids)
    for key, value in overrides.items():
        canonical = _ALIASES.get(key, key)
        if canonical not in _GPT_NEO_KEYS:
            raise ValueError(
                f"config_overrides key {key!r} is not a GPTNeoConfig field; valid keys: {sorted(_GPT_NEO_KEYS)}."
            )
        params[canonical] = value
    if "attention_types" not in overrides:
        params["attention_types"] = _alternating_attention(params["num_layers"])
    _check_params(params, preset)

    config = GPTNeoConfig(**params)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    logger.info(
        "Built GPT-Neo %r from scratch: %.2fM parameters (seed %d)",
        preset,
        sum(p.numel() for p in model.parameters()) / 1e6,
        seed,
    )
    return model


def _token_ids(tokenizer) -> dict[str, int]:
    if tokenizer is None:
        return {}
    ids = {}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            ids[name] = value
    return ids


def _alternating_attention(num_layers: int) -> list:
    # GPT-Neo's own pattern (global, local, global, ...); an odd count ends with one global layer.
    pattern: list = [[["global", "local"], num_layers // 2]] if num_layers >= 2 else []
    if num_layers % 2:
        pattern.append([["global"], 1])
    return pattern


def _check_params(params: dict[str, Any], preset: str) -> None:
    hidden, heads, layers = params["hidden_size"], params["num_heads"], params["num_layers"]
    if layers < 1 or heads < 1 or hidden % heads:
        raise ValueError(
            f"preset {preset!r} with overrides gives num_layers={layers}, hidden_size={hidden}, num_heads={heads}: "
            "need num_layers >= 1 and hidden_size divisible by num_heads."
        )
    vocab = params["vocab_size"]
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = params.get(name)
        if value is not None and not 0 <= value < vocab:
            raise ValueError(
                f"{name}={value} is outside the vocabulary (vocab_size={vocab}); pass tokenizer= so the ids "
                f"and size come from it, or set {name} in config_overrides."
            )


def _pretrained(
    name: str, overrides: dict[str, Any], vocab_size: int | None, token_ids: dict[str, int], kwargs: dict[str, Any]
) -> PreTrainedModel:
    config = AutoConfig.from_pretrained(name, trust_remote_code=kwargs.get("trust_remote_code", False))
    known = set(config.to_dict()) | set(getattr(config, "attribute_map", {}))
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"config_overrides keys {unknown} are not fields of {name}'s {type(config).__name__}; "
            "check the spelling against its config.json."
        )
    for key, value in {**token_ids, **overrides}.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_pretrained(name, config=config, **kwargs)
    embeddings = model.get_input_embeddings().weight.shape[0]
    if vocab_size is not None and vocab_size > embeddings:
        logger.info("Resizing %s's token embeddings from %d to %d to fit the tokenizer", name, embeddings, vocab_size)
        model.resize_token_embeddings(vocab_size)
    return model
