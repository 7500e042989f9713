"""The palsgd-hf command as a user types it: overrides in check, one dry-run command, run warnings shown.

In-process calls of ``palsgd_hf.cli.main`` (no launch): what goes to stdout and stderr.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from palsgd_hf import cli

ROOT = Path(__file__).resolve().parents[2]
TINY = "recipes/shakespeare-tiny/palsgd.yaml"


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name paths relative to the repository root
    yield
    # main() attaches a stderr handler to the palsgd_hf logger for its process; drop it between tests.
    ours = logging.getLogger("palsgd_hf")
    for h in list(ours.handlers):
        ours.removeHandler(h)
    ours.propagate = True


def test_check_takes_the_same_overrides_as_train(capsys):
    assert cli.main(["check", TINY, "--max_steps", "80", "--palsgd_sync_interval", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ok  {TINY}:") and "--max_steps 80 --palsgd_sync_interval 8" in out
    # A bad override is refused by check as it is by train: one line, exit 2.
    assert cli.main(["check", TINY, "--palsgd_pseudo_sync_prob", "1.5"]) == 2
    assert "palsgd_pseudo_sync_prob=1.5 must lie in [0, 1)" in capsys.readouterr().err


def test_dry_run_prints_the_launch_command_once(capsys):
    assert cli.main(["train", TINY, "--max_steps", "80", "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("torch.distributed.run") == 1
    assert "torch.distributed.run" not in captured.err


def test_dry_run_shows_the_warnings_the_run_would_log(capsys):
    # 40 steps after 32 warm-up steps: shorter than the sync interval of 64.
    assert cli.main(["train", TINY, "--max_steps", "72", "--palsgd_sync_interval", "64", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "palsgd-hf: warning: palsgd_sync_interval=64 is longer than the 40 steps after warm-up" in err
    assert "single worker" not in err  # about the one-process check itself, not the launched job
