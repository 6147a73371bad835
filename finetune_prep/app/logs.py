"""The console's log format and the job's log handlers: the summary as plain text, warnings
and errors marked by level; a log file never written through a planted link; a closed stdout
(`| head`) silences the console instead of printing a traceback per line."""

from __future__ import annotations

import logging
import os
import sys
from typing import IO

from finetune_prep.atomic import open_for_writing
from finetune_prep.errors import FinetunePrepError


class ConsoleFormatter(logging.Formatter):
    """INFO lines as they are; WARNING and above as `[LEVEL] message` (the log file keeps the
    timestamps, through Hydra's own file formatter)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"[{record.levelname}] {text}"
        return text


class ConsoleHandler(logging.StreamHandler):
    """The terminal. When the reader of stdout goes away (`... | head -3`), the rest of the
    output goes to the null device: the run finishes quietly, as `cat` would not."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            silence(self.stream)
        else:
            super().handleError(record)


def silence(stream: IO[str]) -> None:
    """Point `stream`'s descriptor at the null device (its reader has gone), so no later
    write or flush (ours, or the interpreter's at exit) fails again."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, stream.fileno())
        os.close(null)
    except (OSError, ValueError):
        pass


class FileHandler(logging.FileHandler):
    """The job's log file, opened without following a link (a planted link in a shared run
    folder must not append to another file: the refusal is kept in `refused` and the job
    stops with it). When a write fails (a full disk) it remembers the first error instead of
    printing a traceback per log line, and the CLI reports it once."""

    failure: tuple[str, str] | None = None  # (file, reason) of the first failed write
    refused: str | None = None  # why the current job's log file was not opened

    def _open(self) -> IO[str]:
        try:
            fd = open_for_writing(self.baseFilename, append=True)
        except FinetunePrepError as err:
            FileHandler.refused = str(err)
            return open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - the handler's stream
        FileHandler.refused = None  # each job of a sweep opens its own log file
        if "w" in self.mode:
            os.ftruncate(fd, 0)
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if FileHandler.failure is None:
            err = sys.exc_info()[1]
            reason = getattr(err, "strerror", None) or str(err)
            FileHandler.failure = (self.baseFilename, reason)


def log_file_failure() -> str | None:
    """The message for a log file that could not be written, if one could not."""
    if FileHandler.failure is None:
        return None
    file, reason = FileHandler.failure
    return (f"cannot write the log file {file}: {reason}. The run's messages are not all in it; "
            "free disk space, or choose another folder with hydra.run.dir=DIR.")
