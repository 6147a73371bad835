"""The run folder, checked before Hydra writes into it: creatable, writable, one run at a time.

Hydra creates the run dir and opens its log file before any task code runs, so a folder that
cannot be written (read-only, under a regular file, no permission) would fail inside Hydra with
two chained tracebacks. This callback runs first (`on_run_start`) and turns each case into one
message and exit status 1. It also takes a lock in the folder, held until the process ends, so
a second run into the same folder stops with "in use by process N" instead of mixing its
`.hydra/config.yaml` with the first run's plan.

A run folder may be shared or cloned, so it may hold planted links: the lock and the log are
opened without following links, and a folder whose lock, log or `.hydra` entries are links is
refused before anything is written (`atomic.open_for_writing`).

`.hydra` always describes the param_groups.json beside it: Hydra writes its output subdir into
a pending folder (`hydra.output_subdir: ${fp_pending:.hydra}`, a name private to this process),
and the runner moves it into `.hydra` in the same all-or-nothing step that writes the plan
files (`atomic.write_files(dirs=...)`). A failed run removes its pending folder; a killed one
leaves it, and the next run in that folder sweeps it (its process is gone).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from finetune_prep.app.sweep import LOCK_FILE as SWEEP_LOCK
from finetune_prep.atomic import open_for_writing, refuse_link, remove, sweep_stale, temp_name
from finetune_prep.errors import FinetunePrepError

LOCK_FILE = ".finetune_prep.lock"
HYDRA_DIR = ".hydra"
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")  # what Hydra writes there
PENDING_RESOLVER = "fp_pending"
_PENDING: dict[str, str] = {}  # one pending name per folder name, for the life of the process
_held: list[Any] = []  # open lock files, held until the command ends (release)


def pending_name(name: str = HYDRA_DIR) -> str:
    """This process's pending folder name for `name` (the same on every call)."""
    return _PENDING.setdefault(name, temp_name(name))


def register_resolvers() -> None:
    """Register `fp_pending` (idempotent); Hydra resolves hydra.output_subdir with it."""
    if not OmegaConf.has_resolver(PENDING_RESOLVER):
        OmegaConf.register_new_resolver(PENDING_RESOLVER, lambda name=HYDRA_DIR: pending_name(name))


register_resolvers()  # Hydra imports this callback in every joblib worker before running a job


class RunDirGuard(Callback):
    """Registered in conf/config.yaml under hydra.callbacks."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(str(config.hydra.run.dir)).absolute()
        fail_unless_writable(folder, "hydra.run.dir")
        try:
            check_entries(folder, f"{config.hydra.job.name}.log")
        except FinetunePrepError as err:
            _fail(str(err))
        problem = lock(folder)
        if problem:
            _fail(problem)
        sweep_pending(folder)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(str(config.hydra.sweep.dir)).absolute()
        fail_unless_writable(folder, "hydra.sweep.dir")
        try:
            for name in ("multirun.yaml", SWEEP_LOCK):  # Hydra's sweeper writes the first
                refuse_link(folder / name)  # with a plain open; the summary's lock is ours
        except FinetunePrepError as err:
            _fail(str(err))


def check_entries(folder: Path, log_name: str | None = None) -> None:
    """Refuse a run folder whose lock, log or .hydra entries are links (FinetunePrepError)."""
    names = [LOCK_FILE, HYDRA_DIR, *(f"{HYDRA_DIR}/{n}" for n in HYDRA_FILES)]
    for name in names + ([log_name] if log_name else []):
        refuse_link(folder / name)


def sweep_pending(folder: Path) -> None:
    """Remove the pending .hydra folders that killed runs left in `folder`."""
    sweep_stale(folder / HYDRA_DIR)


def staged_hydra(output_dir: Path, output_subdir: str | None) -> dict[Path, Path]:
    """{.hydra: the pending folder Hydra wrote} for the runner to move in with the plan files;
    empty when Hydra wrote into .hydra itself (a config without our hydra settings) or
    nowhere (hydra.output_subdir=null)."""
    if not output_subdir or output_subdir != _PENDING.get(HYDRA_DIR):
        return {}
    return {output_dir / HYDRA_DIR: output_dir / output_subdir}


def discard(staged: dict[Path, Path]) -> None:
    """Remove a pending folder the run did not move into place (it failed or was stopped)."""
    for pending in staged.values():
        remove(pending)


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
    try:  # never through a planted link: the lock is truncated below
        handle = os.fdopen(open_for_writing(folder / LOCK_FILE, append=False), "r+")
    except FinetunePrepError as err:
        return str(err)
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


def release() -> None:
    """Unlock every folder this process locked (the command is over)."""
    while _held:
        _held.pop().close()


def _fail(message: str) -> None:
    """One message, exit status 1: Hydra has not set up logging yet, so print it."""
    print(f"[ERROR] {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)
