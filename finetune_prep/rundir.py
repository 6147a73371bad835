"""The run folder, checked before Hydra writes into it: creatable, writable, one run at a time.

Hydra creates the run dir and opens its log file before any task code runs, so a folder that
cannot be written (read-only, under a regular file, no permission) would fail inside Hydra with
two chained tracebacks. This callback runs first (`on_run_start`) and turns each case into one
message and exit status 1. It also takes a lock in the folder, held until the process ends, so
a second run into the same folder stops with "in use by process N" instead of mixing its
`.hydra/config.yaml` with the first run's plan.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

LOCK_FILE = ".finetune_prep.lock"
_held: list[Any] = []  # open lock files, kept for the life of the process


class RunDirGuard(Callback):
    """Registered in conf/config.yaml under hydra.callbacks."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(str(config.hydra.run.dir)).absolute()
        fail_unless_writable(folder, "hydra.run.dir")
        problem = lock(folder)
        if problem:
            _fail(problem)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        fail_unless_writable(Path(str(config.hydra.sweep.dir)).absolute(), "hydra.sweep.dir")


def writable_problem(folder: Path) -> str | None:
    """Why `folder` cannot be created or written, or None if it can."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        return err.strerror or str(err)
    return None


def fail_unless_writable(folder: Path, key: str) -> None:
    reason = writable_problem(folder)
    if reason:
        _fail(f"cannot write {folder}: {reason}. Choose a folder you can write with "
              f"{key}=DIR (or make this one writable).")


def lock(folder: Path) -> str | None:
    """Lock `folder` for this process; the message if another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; runs are not serialised there
        return None
    handle = open(folder / LOCK_FILE, "a+")  # noqa: SIM115 - held open until the process ends
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "?"
        handle.close()
        return (f"{folder} is in use by process {owner} (another finetune_prep run is writing "
                "there). Wait for it to finish, or choose another folder with hydra.run.dir=DIR.")
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _held.append(handle)
    return None


def _fail(message: str) -> None:
    """One message, exit status 1: Hydra has not set up logging yet, so print it."""
    print(f"[ERROR] {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)
