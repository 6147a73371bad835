"""All-or-nothing file writes (temp file, fsync, rename), free of torch so any module can use it.

`write_files` replaces several files as one: either every file is new, or every earlier file is
as it was. Files are created with the permissions the umask gives (as any other tool would),
and temp files left by a killed run (their writer's process is gone) are swept by the next.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from finetune_prep.errors import FinetunePrepError

_TMP = ".{name}.{pid}.{token}.tmp"  # a temp file names its writer's process


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temp file, fsync and rename: all or nothing."""
    write_files({path: text})


def write_files(files: Mapping[str | os.PathLike, str]) -> None:
    """Write every file or none: temp files first, then renames; a failed rename puts back the
    files already replaced (`backups`: each replaced file's earlier version, None if new).
    An OSError becomes a FinetunePrepError naming the path."""
    targets = {Path(p): text for p, text in files.items()}
    temps: dict[Path, Path] = {}
    backups: dict[Path, Path | None] = {}
    current = next(iter(targets))
    try:
        for path, text in targets.items():
            current = path
            sweep_stale(path)
            temps[path] = _write_temp(path, text)
        for path in targets:
            current = path
            pending = _backup(path)
            try:
                os.replace(temps[path], path)
            except BaseException:
                if pending is not None:
                    pending.unlink(missing_ok=True)
                raise
            backups[path] = pending
            del temps[path]
    except BaseException as err:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        restored = _restore(backups)
        if isinstance(err, OSError):
            raise FinetunePrepError(_cannot_write(current, err, len(targets), restored)) from err
        raise
    for backup in backups.values():
        if backup is not None:
            backup.unlink(missing_ok=True)


def _write_temp(path: Path, text: str) -> Path:
    tmp = path.with_name(_TMP.format(name=path.name, pid=os.getpid(), token=secrets.token_hex(4)))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _backup(path: Path) -> Path | None:
    """A hard link to the file about to be replaced (None if there is none), to put it back."""
    if not path.is_file():
        return None
    backup = path.with_name(_TMP.format(name=path.name + ".old", pid=os.getpid(),
                                        token=secrets.token_hex(4)))
    os.link(path, backup)
    return backup


def _restore(backups: Mapping[Path, Path | None]) -> bool:
    """Put back the files already replaced; False if one of them could not be."""
    ok = True
    for path, backup in backups.items():
        try:
            if backup is None:
                path.unlink(missing_ok=True)
            else:
                os.replace(backup, path)
        except OSError:
            ok = False
    return ok


def sweep_stale(path: Path) -> list[Path]:
    """Remove temp files of `path`'s naming whose writer process no longer runs."""
    removed = []
    try:
        candidates = list(path.parent.glob(f".{path.name}.*.tmp"))
    except OSError:
        return removed
    for tmp in candidates:
        # an .old. file, an earlier version kept when it could not be put back, is never swept
        parts = tmp.name[len(path.name) + 2:].split(".")
        if parts and parts[0].isdigit() and not pid_alive(int(parts[0])):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (this one included); a zombie, dead but not yet reaped, does
    not, though it still answers kill(pid, 0) (Linux: state Z in /proc)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _cannot_write(path: Path, err: OSError, count: int, restored: bool = True) -> str:
    if not restored:
        kept = ("The earlier files could not all be put back: check the folder (temp files "
                "named .NAME.old.*.tmp hold the earlier versions)")
    elif count > 1:
        kept = "Nothing was written and the earlier files are unchanged"
    else:
        kept = "Nothing was written and an earlier file of that name is unchanged"
    return (f"cannot write {path}: {err.strerror or err}. {kept}. Free disk space or make the "
            "folder writable, or choose another output folder with hydra.run.dir=DIR.")
