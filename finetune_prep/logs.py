"""The console's log format: the summary as plain text, warnings and errors marked by level."""

from __future__ import annotations

import logging


class ConsoleFormatter(logging.Formatter):
    """INFO lines as they are; WARNING and above as `[LEVEL] message` (the log file keeps the
    timestamps, through Hydra's own file formatter)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"[{record.levelname}] {text}"
        return text


class FileHandler(logging.FileHandler):
    """The job's log file; when a write fails (a full disk) it remembers the first error
    instead of printing a traceback per log line, and the CLI reports it once."""

    failure: tuple[str, str] | None = None  # (file, reason) of the first failed write

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if FileHandler.failure is None:
            import sys

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
