"""Where the data helpers keep their files, and how they fill them safely.

Everything downloaded or derived (corpus texts, trained tokenizers, tokenized datasets) lives under
one cache root, chosen in this order: an explicit ``cache_dir`` argument, the ``PALSGD_HF_CACHE``
environment variable, then ``./.cache/palsgd_hf`` relative to the working directory.

Each cached artefact is a directory that appears in one ``os.replace`` once it is complete, so a
reader never sees a half-written one, and that is built under a file lock, so several processes
(the ranks of one launch, or two test runs) that ask at the same moment build it once. The
directory's existence is the only "done" marker: the fast path is a single ``is_dir`` call.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock, Timeout

logger = logging.getLogger(__name__)

CACHE_ENV = "PALSGD_HF_CACHE"

# Long enough for a slow pip download on another rank; short enough that a wedged peer is reported.
DEFAULT_LOCK_TIMEOUT_S = 900.0


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the absolute cache root (argument, then $PALSGD_HF_CACHE, then ./.cache/palsgd_hf)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser().resolve()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return (Path.cwd() / ".cache" / "palsgd_hf").resolve()


def build_once(
    final: Path,
    build: Callable[[Path], None],
    *,
    what: str,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
) -> Path:
    """Make sure directory ``final`` exists, running ``build(tmp_dir)`` at most once across processes.

    ``build`` fills a fresh temporary directory next to ``final`` (same filesystem, so the rename is
    atomic); on success it is renamed to ``final``, on any error it is deleted and the error re-raised.
    """
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    lock_path = final.parent / f".{final.name}.lock"
    try:
        with FileLock(str(lock_path), timeout=lock_timeout):
            # Another process may have finished while we waited for the lock.
            if final.is_dir():
                return final
            # Holding the lock means nobody else is building: leftovers are from killed runs.
            for stale in final.parent.glob(f".{final.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            # Not tempfile.mkdtemp: its 0700 mode would survive the rename and lock out the other
            # users of a shared cache; mkdir honours the umask.
            tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                logger.info("Building %s in %s", what, final)
                build(tmp)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except Timeout as err:
        raise RuntimeError(
            f"Timed out after {lock_timeout:.0f} s waiting for the lock {lock_path} while building "
            f"{what}: another process holds it (it is released when that process exits). "
            f"Wait for it, or use a different cache with {CACHE_ENV}=DIR / cache_dir=DIR."
        ) from err
    return final
