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
