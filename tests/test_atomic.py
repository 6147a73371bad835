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


# --------------------------------------------------------------------------- planted links

def _victim(tmp_path):
    victim = tmp_path / "victim" / ".bashrc"
    victim.parent.mkdir()
    victim.write_bytes(b"export PATH=/usr/bin\n")
    return victim


def test_open_for_writing_refuses_a_symlink_and_leaves_its_target_alone(tmp_path):
    victim = _victim(tmp_path)
    link = tmp_path / "finetune_prep.log"
    link.symlink_to(victim)
    with pytest.raises(FinetunePrepError, match=r"finetune_prep.log is a symbolic link \(to "):
        atomic.open_for_writing(link)
    assert victim.read_bytes() == b"export PATH=/usr/bin\n"
    dangling = tmp_path / "dangling.log"
    dangling.symlink_to(tmp_path / "victim" / "authorized_keys")
    with pytest.raises(FinetunePrepError, match="symbolic link"):
        atomic.open_for_writing(dangling)
    assert not (tmp_path / "victim" / "authorized_keys").exists()  # not created through it


def test_open_for_writing_refuses_a_fifo_and_a_hard_link_without_blocking(tmp_path):
    fifo = tmp_path / "fifo.log"
    os.mkfifo(fifo)  # no reader: a plain open for writing would block forever
    with pytest.raises(FinetunePrepError, match="fifo.log is not a regular file"):
        atomic.open_for_writing(fifo)
    victim = _victim(tmp_path)
    hard = tmp_path / ".finetune_prep.lock"
    os.link(victim, hard)
    with pytest.raises(FinetunePrepError, match="is a hard link to another file"):
        atomic.open_for_writing(hard, append=False)
    assert victim.read_bytes() == b"export PATH=/usr/bin\n"


def test_open_for_writing_appends_to_a_regular_file(tmp_path):
    path = tmp_path / "a.log"
    path.write_text("one\n")
    with os.fdopen(atomic.open_for_writing(path), "a") as f:
        f.write("two\n")
    assert path.read_text() == "one\ntwo\n"


def test_a_temp_name_taken_by_a_planted_link_is_not_written_through(tmp_path, monkeypatch):
    victim = _victim(tmp_path)
    monkeypatch.setattr(atomic.secrets, "token_hex", lambda n: "feedbeef")  # a guessed name
    planted = tmp_path / f".param_groups.json.{os.getpid()}.feedbeef.tmp"
    planted.symlink_to(victim)
    with pytest.raises(FinetunePrepError, match="cannot write .*param_groups.json"):
        atomic.write_atomic(tmp_path / "param_groups.json", "{}\n")
    assert victim.read_bytes() == b"export PATH=/usr/bin\n"
    assert not (tmp_path / "param_groups.json").exists()


def test_a_target_that_is_a_link_is_replaced_not_written_through(tmp_path):
    victim = _victim(tmp_path)
    plan, summary = tmp_path / "param_groups.json", tmp_path / "trainability.txt"
    plan.symlink_to(victim)
    summary.mkdir()  # the second rename fails: the link is put back as a link
    with pytest.raises(FinetunePrepError, match="Is a directory"):
        atomic.write_files({plan: "new plan\n", summary: "new summary\n"})
    assert plan.is_symlink() and victim.read_bytes() == b"export PATH=/usr/bin\n"
    summary.rmdir()
    atomic.write_files({plan: "new plan\n", summary: "new summary\n"})
    assert not plan.is_symlink() and plan.read_text() == "new plan\n"
    assert victim.read_bytes() == b"export PATH=/usr/bin\n"


# --------------------------------------------------------------------------- staged folders

def _hydra_dir(folder, text):
    folder.mkdir()
    (folder / "config.yaml").write_text(text)
    return folder


def test_a_staged_folder_replaces_its_target_with_the_files(tmp_path):
    target = _hydra_dir(tmp_path / ".hydra", "old")
    staged = _hydra_dir(tmp_path / atomic.temp_name(".hydra"), "new")
    atomic.write_files({tmp_path / "param_groups.json": "new plan\n"}, dirs={target: staged})
    assert (target / "config.yaml").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hydra", "param_groups.json"]


def test_a_failed_write_puts_the_earlier_folder_back(tmp_path):
    plan, summary = tmp_path / "param_groups.json", tmp_path / "trainability.txt"
    atomic.write_files({plan: "old plan\n", summary: "old summary\n"})
    target = _hydra_dir(tmp_path / ".hydra", "old")
    staged = _hydra_dir(tmp_path / atomic.temp_name(".hydra"), "new")
    summary.unlink()
    summary.mkdir()  # the last rename fails, after the folder was swapped
    with pytest.raises(FinetunePrepError, match="the earlier files are unchanged"):
        atomic.write_files({plan: "new plan\n", summary: "new summary\n"}, dirs={target: staged})
    assert (target / "config.yaml").read_text() == "old" and plan.read_text() == "old plan\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".hydra", "param_groups.json", "trainability.txt"]


def test_a_target_folder_that_is_a_link_is_moved_aside_never_followed(tmp_path):
    victim_dir = tmp_path / "victim"
    _hydra_dir(victim_dir, "victim's")
    target = tmp_path / "run" / ".hydra"
    target.parent.mkdir()
    target.symlink_to(victim_dir)
    staged = _hydra_dir(tmp_path / "run" / atomic.temp_name(".hydra"), "new")
    atomic.write_files({tmp_path / "run" / "param_groups.json": "{}\n"}, dirs={target: staged})
    assert not target.is_symlink() and (target / "config.yaml").read_text() == "new"
    assert (victim_dir / "config.yaml").read_text() == "victim's"


def test_staged_folders_of_dead_writers_are_swept_and_an_aside_one_comes_back(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    pending = _hydra_dir(tmp_path / f"..hydra.{dead}.abcd1234.tmp", "killed run")
    mine = _hydra_dir(tmp_path / atomic.temp_name(".hydra"), "this run")
    aside = _hydra_dir(tmp_path / f"..hydra.old.{dead}.abcd1234.tmp", "the earlier run")
    assert atomic.sweep_stale(tmp_path / ".hydra") == [pending]
    assert mine.exists() and not pending.exists() and not aside.exists()
    assert (tmp_path / ".hydra" / "config.yaml").read_text() == "the earlier run"
