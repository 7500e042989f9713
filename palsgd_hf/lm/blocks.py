"""Causal-LM datasets: load text, tokenize, concatenate and cut into fixed-length blocks.

The pipeline is the one of transformers' ``run_clm.py``, so results compare with the usual
recipes: rows are tokenized in batches, all tokens of a batch of rows are concatenated, cut into
``block_size`` pieces (the ragged end of each batch is dropped) and ``labels`` is a copy of
``input_ids`` (the model shifts them). Every block is full, so no padding and no collator logic.

Sources: a Hub dataset (``dataset_name``/``dataset_config``, the real path for users with network)
or local ``.txt``/``.json``/``.jsonl``/``.csv`` files. Text files are read one row per line with the
line breaks kept, so concatenation restores the original text. Without a validation split, the
last ``validation_split_percentage`` % of the training rows become one: a contiguous tail, not a
random sample, so validation lines do not sit between training lines of the same passage.

Tokenized results are cached by ``datasets`` (fingerprints of the data, tokenizer and block size),
in ``<cache root>/datasets`` unless ``HF_DATASETS_CACHE`` is set. In multi-process runs call this
on the main process first (``TrainingArguments.main_process_first()``), as ``run_clm.py`` does, so
the other ranks read the cache instead of tokenizing in parallel.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING

from ._cache import resolve_cache_dir

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv"}
_HUGE = int(1e12)  # tokenizers without a length limit report ~1e30 as model_max_length


def build_lm_datasets(
    tokenizer: PreTrainedTokenizerBase,
    *,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    train_files: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    validation_files: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    text_column: str = "text",
    block_size: int = 128,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    num_proc: int | None = None,
    validation_split_percentage: int = 5,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[Dataset, Dataset]:
    """Return ``(train_dataset, eval_dataset)`` of ``block_size``-token blocks with ``labels``.

    Give either ``dataset_name`` (Hub) or ``train_files`` (local, optionally ``validation_files``).
    ``max_*_samples`` keep the first N blocks. Columns: the tokenizer's outputs plus ``labels``.
    """
    # datasets (the [demo] extra) pulls in pyarrow/pandas (~1 s); import it only when datasets are built.
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            "building LM datasets needs the `datasets` package: pip install 'palsgd_hf[demo]'"
        ) from err

    _check_args(
        dataset_name,
        train_files,
        validation_files,
        block_size,
        max_train_samples,
        max_eval_samples,
        validation_split_percentage,
    )
    ds_cache = _datasets_cache_dir(cache_dir)

    if dataset_name is not None:
        try:
            raw = datasets.load_dataset(dataset_name, dataset_config, cache_dir=ds_cache)
        except Exception as err:  # any failure: re-raised below with the offline remedy attached
            raise RuntimeError(
                f"Could not load dataset {dataset_name!r} (config {dataset_config!r}): {err}. Without "
                "network (or with HF_DATASETS_OFFLINE=1) pass local files instead: "
                "train_files=[...] (and validation_files=[...]) with .txt/.json/.jsonl/.csv files."
            ) from err
        if not isinstance(raw, datasets.DatasetDict) or "train" not in raw:
            splits = list(raw.keys()) if isinstance(raw, datasets.DatasetDict) else type(raw).__name__
            raise ValueError(
                f"Dataset {dataset_name!r} has no 'train' split (found {splits}); pick a config that has one."
            )
    else:
        data_files = {"train": _existing_files(train_files, "train_files")}
        if validation_files is not None:
            data_files["validation"] = _existing_files(validation_files, "validation_files")
        builder = _builder_for(data_files)
        # keep_linebreaks: without it every line loses its "\n" and the text becomes one run-on line.
        kwargs = {"keep_linebreaks": True} if builder == "text" else {}
        raw = datasets.load_dataset(builder, data_files=data_files, cache_dir=ds_cache, **kwargs)

    train_raw = raw["train"]
    if "validation" in raw:
        eval_raw = raw["validation"]
    else:
        train_raw, eval_raw = _carve_validation(train_raw, validation_split_percentage)

    for split_name, split in (("train", train_raw), ("validation", eval_raw)):
        if text_column not in split.column_names:
            raise ValueError(
                f"text_column={text_column!r} is not a column of the {split_name} split (columns: "
                f"{split.column_names}); pass text_column= one of those (text files always give 'text')."
            )

    max_len = getattr(tokenizer, "model_max_length", _HUGE)
    if block_size > max_len:
        logger.warning(
            "block_size=%d exceeds the tokenizer's model_max_length=%d; make sure the model "
            "has at least that many positions.",
            block_size,
            max_len,
        )

    def tokenize(batch):
        return tokenizer(batch[text_column])

    def group_texts(batch):
        concatenated = {k: list(chain.from_iterable(batch[k])) for k in batch}
        total = (len(concatenated["input_ids"]) // block_size) * block_size
        result = {k: [v[i : i + block_size] for i in range(0, total, block_size)] for k, v in concatenated.items()}
        result["labels"] = [list(x) for x in result["input_ids"]]
        return result

    out = []
    for split_name, split, limit in (
        ("train", train_raw, max_train_samples),
        ("validation", eval_raw, max_eval_samples),
    ):
        tokenized = split.map(
            tokenize,
            batched=True,
            num_proc=num_proc,
            remove_columns=split.column_names,
            desc=f"Tokenizing {split_name}",
        )
        blocks = tokenized.map(
            group_texts, batched=True, num_proc=num_proc, desc=f"Grouping {split_name} into blocks of {block_size}"
        )
        if len(blocks) == 0:
            n_tokens = sum(len(ids) for ids in tokenized["input_ids"])
            raise ValueError(
                f"block_size={block_size} leaves the {split_name} split empty: it has {n_tokens} tokens, and "
                f"each 1000-row batch needs at least block_size of them; lower block_size or add data."
            )
        if limit is not None:
            blocks = blocks.select(range(min(limit, len(blocks))))
        out.append(blocks)
    logger.info("LM datasets: %d train / %d eval blocks of %d tokens", len(out[0]), len(out[1]), block_size)
    return out[0], out[1]


def _check_args(dataset_name, train_files, validation_files, block_size, max_train, max_eval, val_pct) -> None:
    if (dataset_name is None) == (train_files is None):
        raise ValueError(
            f"Got dataset_name={dataset_name!r} and train_files={train_files!r}: exactly one data source is "
            "needed; pass a Hub dataset name or local train_files, not both and not neither."
        )
    if validation_files is not None and train_files is None:
        raise ValueError("validation_files needs train_files (it does not apply to Hub datasets).")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size={block_size!r}: must be an int >= 2 (input and shifted target).")
    for name, value in (("max_train_samples", max_train), ("max_eval_samples", max_eval)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}={value!r}: must be a positive int or None (use all).")
    if not isinstance(val_pct, int) or not 0 < val_pct < 100:
        raise ValueError(f"validation_split_percentage={val_pct!r}: must be an int in 1..99, e.g. 5.")


def _datasets_cache_dir(cache_dir) -> str | None:
    # An explicit cache_dir wins; otherwise honour a user's HF_DATASETS_CACHE (None lets datasets
    # read it), and only then fall back to the project cache so nothing lands in ~/.cache.
    if cache_dir is None and os.environ.get("HF_DATASETS_CACHE"):
        return None
    return str(resolve_cache_dir(cache_dir) / "datasets")


def _existing_files(files, arg_name: str) -> list[str]:
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    paths = [str(Path(f).expanduser().resolve()) for f in files]
    if not paths:
        raise ValueError(f"{arg_name} is empty: pass at least one .txt/.json/.jsonl/.csv file.")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"{arg_name}: file(s) not found: {missing}. Check the paths (they are resolved "
            f"against the working directory {os.getcwd()})."
        )
    return paths


def _builder_for(data_files: dict[str, list[str]]) -> str:
    suffixes = {Path(p).suffix.lower() for files in data_files.values() for p in files}
    builders = {_BUILDERS.get(s) for s in suffixes}
    if None in builders or len(builders) != 1:
        raise ValueError(
            f"Data files have extensions {sorted(suffixes)}: all files must share one format among "
            f"{sorted(_BUILDERS)} (text, json lines, csv); convert or split them."
        )
    return builders.pop()


def _carve_validation(train: Dataset, pct: int) -> tuple[Dataset, Dataset]:
    n = len(train)
    n_val = max(1, n * pct // 100)
    if n - n_val < 1:
        raise ValueError(
            f"The train split has {n} rows, too few to hold out {pct}% for validation; "
            "pass validation_files= or more data."
        )
    logger.info("No validation split: holding out the last %d of %d rows (%d%%).", n_val, n, pct)
    return train.select(range(n - n_val)), train.select(range(n - n_val, n))
