"""The one atomic writer: all or nothing, and a failure never touches the earlier file."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from finetune_prep import atomic
from finetune_prep.errors import FinetunePrepError


def test_write_atomic_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "param_groups.json"
    target.write_text("good\n")

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", no_space)
    with pytest.raises(FinetunePrepError, match="No space left on device"):
        atomic.write_atomic(target, "partial")
    assert target.read_text() == "good\n"
    assert [p.name for p in tmp_path.iterdir()] == ["param_groups.json"]


def test_the_writer_does_not_import_torch():
    code = "import finetune_prep.atomic, sys; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_write_files_is_all_or_nothing_when_the_second_rename_fails(tmp_path):
    plan, summary = tmp_path / "param_groups.json", tmp_path / "trainability.txt"
    atomic.write_files({plan: "old plan\n", summary: "old summary\n"})
    summary.unlink()
    summary.mkdir()  # a folder where the second file goes: its rename fails
    with pytest.raises(FinetunePrepError, match="trainability.txt: Is a directory") as err:
        atomic.write_files({plan: "new plan\n", summary: "new summary\n"})
    assert "the earlier files are unchanged" in str(err.value)
    assert plan.read_text() == "old plan\n"  # put back after its own rename had succeeded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["param_groups.json", "trainability.txt"]


def test_write_files_keeps_both_earlier_files_when_the_disk_fills_on_the_second(
        tmp_path, monkeypatch):
    plan, summary = tmp_path / "param_groups.json", tmp_path / "trainability.txt"
    atomic.write_files({plan: "old plan\n", summary: "old summary\n"})
    calls = []

    def fsync_fills_up(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", fsync_fills_up)
    with pytest.raises(FinetunePrepError, match="trainability.txt: No space left on device"):
        atomic.write_files({plan: "new plan\n", summary: "new summary\n"})
    assert (plan.read_text(), summary.read_text()) == ("old plan\n", "old summary\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["param_groups.json", "trainability.txt"]


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic.write_atomic(tmp_path / "a.json", "{}")
        os.umask(0o077)
        atomic.write_atomic(tmp_path / "b.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o600


def test_stale_temp_files_of_dead_writers_are_swept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = [tmp_path / f".param_groups.json.{dead}.abcd1234.tmp"]
    alive = tmp_path / f".param_groups.json.{os.getpid()}.feedbeef.tmp"  # a writer still running
    other = tmp_path / f".trainability.txt.{dead}.abcd1234.tmp"  # another file's: not ours to sweep
    kept = tmp_path / f".param_groups.json.old.{dead}.abcd1234.tmp"  # an earlier version
    for path in [*stale, alive, other, kept]:
        path.write_text("partial")
    atomic.write_atomic(tmp_path / "param_groups.json", "{}\n")
    assert not any(p.exists() for p in stale)
    assert alive.exists() and other.exists() and kept.exists()
