"""The job's log handlers: a full disk reported once, a planted link refused, a closed pipe."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import pytest

from finetune_prep.app import logs


@pytest.fixture(autouse=True)
def _fresh_state():
    logs.FileHandler.failure = logs.FileHandler.refused = None
    yield
    logs.FileHandler.failure = logs.FileHandler.refused = None


def _record(text: str) -> logging.LogRecord:
    return logging.LogRecord("finetune_prep", logging.INFO, __file__, 1, text, None, None)


def test_a_full_disk_is_remembered_once_not_printed_per_line(tmp_path, capsys):
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    handler = logs.FileHandler(tmp_path / "finetune_prep.log")
    handler.stream.close()
    handler.stream = open("/dev/full", "w", buffering=1)  # every write: ENOSPC  # noqa: SIM115
    for i in range(3):
        handler.emit(_record(f"line {i}"))
    with contextlib.suppress(OSError):  # the unwritten rest; logging.shutdown ignores it too
        handler.close()
    assert capsys.readouterr().err == ""
    message = logs.log_file_failure()
    assert message.startswith(f"cannot write the log file {tmp_path / 'finetune_prep.log'}: "
                              "No space left on device")


def test_a_log_file_that_is_a_link_is_refused_and_never_written(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep\n")
    (tmp_path / "finetune_prep.log").symlink_to(victim)
    handler = logs.FileHandler(tmp_path / "finetune_prep.log")
    handler.emit(_record("must not reach the victim"))
    handler.close()
    assert "finetune_prep.log is a symbolic link" in logs.FileHandler.refused
    assert victim.read_bytes() == b"keep\n"
    logs.FileHandler(tmp_path / "next.log").close()  # the next job's own file
    assert logs.FileHandler.refused is None


def test_the_console_goes_quiet_when_its_reader_has_gone(capfd):
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    os.close(read_end)  # the reader (| head) has exited
    handler = logs.ConsoleHandler(stream)
    for i in range(3):
        handler.emit(_record(f"line {i}"))  # BrokenPipeError inside: handled, not printed
    stream.write("more\n")
    stream.flush()  # the descriptor is the null device now
    stream.close()
    assert capfd.readouterr().err == ""
