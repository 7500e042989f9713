"""palsgd_hf.state_files: the one per-rank state file is atomic (a crash mid-write leaves the old file or
none, never a torn one), durable (file and directory fsynced) and refuses files it cannot use, naming them."""

from __future__ import annotations

import os

import pytest
import torch

from palsgd_hf import state_files
from palsgd_hf.state_files import StateFileError


class Bomb:
    """Pickling this raises, after torch.save has already written the tensors before it: a crash mid-write."""

    def __reduce__(self):
        raise OSError("disk full (simulated)")


def old_file(tmp_path):
    path = tmp_path / "palsgd" / "rank_0.pt"
    state_files.save(path, rank=0, world_size=2, algorithm={"step": 1}, model={"w": torch.ones(3)})
    return path


def assert_old_file_intact(path):
    state = state_files.load(path, rank=0, world_size=2)
    assert state["algorithm"] == {"step": 1} and torch.equal(state["model"]["w"], torch.ones(3))
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name], "a temporary file was left behind"


def test_round_trip_has_the_one_layout(tmp_path):
    path = state_files.save(tmp_path / "a" / "f.pt", rank=1, world_size=2, algorithm={"step": 3})
    raw = torch.load(path, weights_only=True)
    assert raw == {"format": state_files.FORMAT, "rank": 1, "world_size": 2, "algorithm": {"step": 3}, "model": None,
                   "optimizer": None}
    assert state_files.load(path, rank=1, world_size=2) == raw


def test_a_save_that_fails_midway_leaves_the_previous_file(tmp_path):
    path = old_file(tmp_path)
    big = torch.zeros(100_000)  # written before the bomb goes off: the temporary file is really half-written
    with pytest.raises(OSError, match="disk full"):
        state_files.save(path, rank=0, world_size=2, algorithm={"step": 2, "x": big, "y": Bomb()})
    assert_old_file_intact(path)


def test_a_failing_rename_leaves_the_previous_file(tmp_path, monkeypatch):
    path = old_file(tmp_path)

    def failing_replace(src, dst):
        raise OSError("rename failed (simulated)")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        state_files.save(path, rank=0, world_size=2, algorithm={"step": 2}, model={"w": torch.zeros(3)})
    monkeypatch.undo()
    assert_old_file_intact(path)


def test_a_crash_on_the_first_save_leaves_no_file(tmp_path):
    path = tmp_path / "new.pt"
    with pytest.raises(OSError):
        state_files.save(path, rank=0, world_size=1, algorithm={"y": Bomb()})
    assert list(tmp_path.iterdir()) == []


def test_the_file_and_its_directory_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", None)), real_replace(a, b)))
    state_files.save(tmp_path / "f.pt", rank=0, world_size=1, algorithm={})
    assert events == [("fsync", False), ("replace", None), ("fsync", True)]


def test_another_format_is_refused_naming_file_versions_and_fix(tmp_path):
    path = tmp_path / "f.pt"
    torch.save({"format": state_files.FORMAT + 1, "rank": 0, "world_size": 1, "algorithm": {}}, path)
    with pytest.raises(StateFileError, match=rf"{path} has format {state_files.FORMAT + 1}, written by a newer "
                                             rf"palsgd_hf; upgrade .* reads format {state_files.FORMAT} only"):
        state_files.load(path, rank=0, world_size=1)
    torch.save({"format": 0, "rank": 0, "world_size": 1}, path)
    with pytest.raises(StateFileError, match="has format 0; resume it with the palsgd_hf release that wrote it"):
        state_files.load(path, rank=0, world_size=1)
    torch.save({"algorithm": {}, "world_size": 1}, path)  # the DeepSpeed writer's earlier, unversioned layout
    with pytest.raises(StateFileError, match="has no format number"):
        state_files.load(path, rank=0, world_size=1)
    # The Accelerate hooks' earlier layout: format 1 but no rank.
    torch.save({"format": 1, "world_size": 1, "algorithm": {}, "model": None, "optimizer": None}, path)
    with pytest.raises(StateFileError, match=r"lacks \['rank'\]"):
        state_files.load(path, rank=0, world_size=1)


def test_other_rank_or_world_and_torn_files_are_refused(tmp_path):
    path = state_files.save(tmp_path / "f.pt", rank=1, world_size=2, algorithm={})
    with pytest.raises(StateFileError, match="written by rank 1 of 2 processes, but this is rank 1 of 4"):
        state_files.load(path, rank=1, world_size=4)
    with pytest.raises(StateFileError, match="written by rank 1 of 2 processes, but this is rank 0 of 2"):
        state_files.load(path, rank=0, world_size=2)
    torn = tmp_path / "torn.pt"
    torn.write_bytes(path.read_bytes()[:200])  # what a plain torch.save killed midway leaves
    with pytest.raises(StateFileError, match=rf"cannot read PALSGD state file {torn} .*not a complete state file"):
        state_files.load(torn, rank=1, world_size=2)
    with pytest.raises(FileNotFoundError, match="missing.pt is missing"):
        state_files.load(tmp_path / "missing.pt", rank=0, world_size=1)
