"""The run folder: one message when it cannot be written, one run at a time, a full log disk."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from conftest import run_cli

from finetune_prep import rundir

FAST = "verify.backward=false"


def one_error(done) -> str:
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output and "Logging error" not in output, output
    assert output.count("[ERROR]") == 1, output
    return output


def test_writable_problem_names_the_reason(tmp_path, monkeypatch):
    assert rundir.writable_problem(tmp_path / "new" / "run") is None
    (tmp_path / "file").write_text("x")
    assert rundir.writable_problem(tmp_path / "file" / "run") == "Not a directory"

    def refuse(*args, **kwargs):  # root writes anywhere: simulate a read-only folder
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(rundir.tempfile, "TemporaryFile", refuse)
    assert rundir.writable_problem(tmp_path) == "Read-only file system"


def test_a_second_lock_on_a_folder_names_the_holder(tmp_path):
    assert rundir.lock(tmp_path) is None
    assert (tmp_path / rundir.LOCK_FILE).read_text().strip() == str(os.getpid())
    second = rundir.lock(tmp_path)  # flock conflicts between two opens, even in one process
    assert second is not None and f"is in use by process {os.getpid()}" in second


@pytest.mark.slow
def test_run_dir_under_a_regular_file_is_one_message(tmp_path):
    (tmp_path / "file").write_text("x")
    output = one_error(run_cli(FAST, f"hydra.run.dir={tmp_path / 'file' / 'run'}"))
    assert f"cannot write {tmp_path / 'file' / 'run'}: Not a directory" in output
    assert "hydra.run.dir=DIR" in output


@pytest.mark.slow
def test_a_run_dir_in_use_stops_the_second_run_before_it_writes(tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli(FAST, f"hydra.run.dir={run_dir}").returncode == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert rundir.lock(run_dir) is None  # this test process now holds the folder
    output = one_error(run_cli(FAST, "freeze=full", f"hydra.run.dir={run_dir}"))
    assert f"{run_dir} is in use by process {os.getpid()}" in output
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    lock = run_dir / rundir.LOCK_FILE
    assert {p: b for p, b in after.items() if p != lock} == \
        {p: b for p, b in before.items() if p != lock}  # .hydra/config.yaml included


@pytest.mark.slow
def test_a_log_file_that_cannot_be_written_is_one_message(tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "finetune_prep.log").symlink_to("/dev/full")  # every write: ENOSPC
    output = one_error(run_cli(FAST, f"hydra.run.dir={run_dir}"))
    assert f"cannot write the log file {run_dir / 'finetune_prep.log'}: No space left" in output
