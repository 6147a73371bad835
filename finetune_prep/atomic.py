"""All-or-nothing file writes (temp file, fsync, rename), free of torch so any module can use it.

`write_files` replaces several files (and staged folders, such as a run's `.hydra`) as one:
either every one is new, or every earlier one is as it was. Files are created with the
permissions the umask gives (as any other tool would), and temp files or folders left by a
killed run (their writer's process is gone) are swept by the next.

A run folder may be shared or cloned, so it may hold planted symbolic links: nothing here writes
through one. Temp files are created exclusively without following links, a rename replaces a
link (never its target), and `open_for_writing` refuses anything but a regular file.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path

from finetune_prep.errors import FinetunePrepError

_TMP = ".{name}.{pid}.{token}.tmp"  # a temp file names its writer's process
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # not on Windows: the fstat check below still runs
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a planted FIFO must not block the open


def temp_name(name: str) -> str:
    """A fresh temp name for the file or folder `name`, in the format `sweep_stale` knows."""
    return _TMP.format(name=name, pid=os.getpid(), token=secrets.token_hex(8))


def write_atomic(path: str | os.PathLike, text: str | bytes) -> None:
    """Write `text` to `path` through a temp file, fsync and rename: all or nothing."""
    write_files({path: text})


def write_files(
    files: Mapping[str | os.PathLike, str | bytes],
    dirs: Mapping[str | os.PathLike, str | os.PathLike] | None = None,
) -> None:
    """Write every file or none: temp files first, then renames; a failed rename puts back the
    files already replaced (`backups`: each replaced file's earlier version, None if new).
    `dirs` maps a folder to a complete staged folder that replaces it in the same step (the
    earlier folder is moved aside, and back on failure). An OSError becomes a
    FinetunePrepError naming the path."""
    targets = {Path(p): text for p, text in files.items()}
    moves = {Path(t): Path(s) for t, s in (dirs or {}).items()}
    temps: dict[Path, Path] = {}
    backups: dict[Path, Path | None] = {}
    asides: dict[Path, Path | None] = {}
    current = next(iter(targets))
    try:
        for path, text in targets.items():
            current = path
            sweep_stale(path)
            temps[path] = _write_temp(path, text)
        for target, staged in moves.items():  # last step before the renames: keep it short
            current = target
            asides[target] = _swap_dir(target, staged)
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
        restored = _restore(backups) & _restore_dirs(asides)
        if isinstance(err, OSError):
            raise FinetunePrepError(
                _cannot_write(current, err, len(targets) + len(moves), restored)) from err
        raise
    for backup in [*backups.values(), *asides.values()]:
        if backup is not None:
            remove(backup)


def _write_temp(path: Path, text: str | bytes) -> Path:
    tmp = path.with_name(temp_name(path.name))
    # O_EXCL: a planted link (or anything else) of that name is an error, never written through
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666)  # umask applies
    try:
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w",
                      **({} if isinstance(text, bytes) else {"encoding": "utf-8"})) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _backup(path: Path) -> Path | None:
    """A hard link to the file about to be replaced (None if there is none), to put it back.
    A symbolic link is linked itself, never its target."""
    if not (path.is_symlink() or path.is_file()):
        return None
    backup = path.with_name(temp_name(path.name + ".old"))
    os.link(path, backup, follow_symlinks=False)
    return backup


def _swap_dir(target: Path, staged: Path) -> Path | None:
    """Move `target` (a folder, or a link: moved, not followed) aside and `staged` in its
    place; the aside name (None if there was nothing), to put it back or remove it."""
    aside = None
    if os.path.lexists(target):
        aside = target.with_name(temp_name(target.name + ".old"))
        os.rename(target, aside)
    try:
        os.rename(staged, target)
    except BaseException:
        if aside is not None:
            os.rename(aside, target)
        raise
    return aside


def _restore_dirs(asides: Mapping[Path, Path | None]) -> bool:
    """Put back the folders already replaced (the new ones are removed); False if one could
    not be."""
    ok = True
    for target, aside in asides.items():
        try:
            remove(target)
            if aside is not None:
                os.rename(aside, target)
        except OSError:
            ok = False
    return ok


def remove(path: Path) -> None:
    """Remove a file, a link (not its target) or a whole folder; gone already is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)  # rmtree never follows links inside
    else:
        path.unlink(missing_ok=True)


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
    """Remove temp files (or staged folders) of `path`'s naming whose writer process no longer
    runs. A folder whose earlier version a killed writer had moved aside gets it back."""
    removed = []
    try:
        candidates = sorted(path.parent.glob(f".{path.name}.*.tmp"))
    except OSError:
        return removed
    for tmp in candidates:
        # an .old. file, an earlier version kept when it could not be put back, is never swept
        parts = tmp.name[len(path.name) + 2:].split(".")
        if parts and parts[0].isdigit() and not pid_alive(int(parts[0])):
            remove(tmp)
            removed.append(tmp)
        elif (parts[:1] == ["old"] and len(parts) > 1 and parts[1].isdigit()
              and tmp.is_dir() and not os.path.lexists(path) and not pid_alive(int(parts[1]))):
            os.rename(tmp, path)  # killed between moving the old folder aside and the new in
    return removed


def open_for_writing(path: str | os.PathLike, append: bool = True) -> int:
    """A descriptor open for writing on `path`, created if missing (the umask applies), never
    through a symbolic link: only a regular file with no other hard link is accepted, since a
    planted link, FIFO or device in a shared or cloned folder would send the write elsewhere.
    Refusals are FinetunePrepErrors; other OSErrors are raised as they are."""
    flags = os.O_RDWR | os.O_CREAT | _NOFOLLOW | _NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | (os.O_APPEND if append else 0), 0o666)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.EMLINK) and os.path.islink(path):
            raise FinetunePrepError(_unsafe(path, "a symbolic link")) from None
        if err.errno == errno.ENXIO:  # a FIFO with no reader
            raise FinetunePrepError(_unsafe(path, "not a regular file")) from None
        raise
    info = os.fstat(fd)
    problem = ("not a regular file" if not stat.S_ISREG(info.st_mode) else
               "a hard link to another file" if info.st_nlink > 1 else None)
    if problem is None and os.path.islink(path):  # Windows: no O_NOFOLLOW
        problem = "a symbolic link"
    if problem:
        os.close(fd)
        raise FinetunePrepError(_unsafe(path, problem))
    if _NONBLOCK:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_NONBLOCK)
    return fd


def refuse_link(path: str | os.PathLike) -> None:
    """A FinetunePrepError if `path` is a symbolic link (one a run would otherwise write or
    replace)."""
    if os.path.islink(path):
        raise FinetunePrepError(_unsafe(path, "a symbolic link"))


def _unsafe(path: str | os.PathLike, what: str) -> str:
    target = f" (to {os.readlink(path)})" if os.path.islink(path) else ""
    return (f"{path} is {what}{target}: finetune_prep writes only regular files of its own in a "
            "run folder, since a planted link there could make a run overwrite another file. "
            "Remove it, or choose another output folder (hydra.run.dir=DIR, or "
            "hydra.sweep.dir=DIR for -m).")


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
