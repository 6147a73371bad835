"""A `_target_` model for sweep tests whose constructor can kill its own process, the way the
out-of-memory killer or a segfault ends a job: no exception, no callback, just a dead process.

With DYING_NET_AFTER=SWEEP_DIR:N set, the dying job first waits (up to two minutes) until N jobs
of the sweep have a COMPLETED result, so which jobs finish does not depend on timing.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from torch import nn


class DyingNet(nn.Module):
    """A tiny classifier; with `die=True` its constructor sends SIGKILL (or the signal named
    by `sig`, e.g. SIGINT: a Ctrl-C at that moment) to its own process."""

    def __init__(self, die: bool = False, width: int = 4, sig: str = "SIGKILL") -> None:
        if die:
            _wait_for_others()
            os.kill(os.getpid(), signal.Signals[sig])
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3)
        self.bn = nn.BatchNorm2d(width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        return self.fc(self.pool(self.bn(self.stem(x))).flatten(1))


def _wait_for_others() -> None:
    folder, _, count = os.environ.get("DYING_NET_AFTER", "").rpartition(":")
    deadline = time.monotonic() + 120
    while folder and time.monotonic() < deadline and _completed(Path(folder)) < int(count):
        time.sleep(0.2)


def _completed(folder: Path) -> int:
    done = 0
    for path in folder.rglob("job_result.json"):
        try:
            done += json.loads(path.read_text())["status"] == "COMPLETED"
        except (OSError, ValueError, KeyError):
            pass
    return done
