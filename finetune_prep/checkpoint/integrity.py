"""Never trust bytes that do not add up: a torch zip file's tensors must fit their storage
records, and a checkpoint must not change while a run uses it.

With `mmap=True` torch slices each storage out of the mapped file by the size the pickle
claims, without checking the zip record's size (it does without mmap): a short record hands
the tensor its neighbours' bytes. `check_zip` walks `data.pkl` with the restricted unpickler
(no data read) and compares every tensor's offset, shape and stride with its record first.
A file truncated or rewritten while mapped kills the process with SIGBUS on first touch:
`fingerprint` and `check_unchanged` catch the change before any data is read.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import stat
import zipfile
from collections import Counter
from collections.abc import Iterator

from finetune_prep.checkpoint import safe_unpickle
from finetune_prep.errors import FinetunePrepError

Fingerprint = tuple[int, int, int, int]  # (size, mtime_ns, inode, device)
MAX_PICKLE_BYTES = 256 << 20  # a data.pkl this large would hold millions of tensors
MAX_RATIO = 50  # a compressed zip record may expand this much (pickles compress ~5-10x)
SMALL_RECORD = 8 << 20  # records up to this size are never called a bomb
CHUNK = 1 << 20
REMEDY = {  # what to give instead of a special file, by setting (else: "give the file itself")
    "checkpoint.path": "give the checkpoint file itself",
    "adapter.resume": "give the folder PeftModel.save_pretrained wrote, as regular files",
}
IN_FOLDER = "copy the folder again: its files must be the regular files its writer saved"


def file_type(mode: int) -> str:
    """'a named pipe (FIFO)', 'a character device', ... for a non-regular file's mode."""
    for test, what in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character "
                       "device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return what
    return "a special file"


def open_regular(file: str, shown: str | None = None, key: str = "checkpoint.path",
                 remedy: str | None = None) -> int:
    """A read-only descriptor of `file`, opened without blocking (a FIFO swapped in after a
    `stat` would otherwise hang the open forever) and checked to be a regular file.
    `remedy`: what the message tells the user to do (e.g. IN_FOLDER for a file a checkpoint
    folder holds); by default, what REMEDY says for `key`."""
    fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise FinetunePrepError(
                f"{key}={shown or file} is not a regular file but {file_type(mode)} "
                "(it changed since it was checked, or was never a file): "
                f"{remedy or REMEDY.get(key, 'give the file itself')}.")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(file: str, limit: int, shown: str | None = None,
                 key: str = "checkpoint.path", remedy: str | None = None) -> bytes:
    """The whole of a small regular file (an index, DCP metadata), refused above `limit`;
    `key`, `remedy`: for the messages, as in open_regular."""
    fd = open_regular(file, shown, key, remedy)
    parts, total = [], 0
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while size <= limit and total <= limit and (chunk := f.read(CHUNK)):
            parts.append(chunk)  # chunks: a read(n) would allocate n bytes up front
            total += len(chunk)
    data = b"".join(parts)
    if size > limit or len(data) > limit:
        raise FinetunePrepError(
            f"{key}={shown or file}: {os.path.basename(file)} is "
            f"{max(size, len(data))} bytes, more than the {limit} such a file can sensibly "
            "hold: it is not what it claims to be; download or save it again.")
    return data


@contextlib.contextmanager
def pinned(file: str, shown: str | None = None, key: str = "checkpoint.path") -> Iterator[str]:
    """A path that names the regular file `file` is now, for readers that open by path
    (torch.load with mmap, safetensors): `/proc/self/fd/N` where the system has it, so the
    file cannot be swapped for another (a FIFO) between this check and their open. `key`:
    the setting that named it, for the messages."""
    fd = open_regular(file, shown, key)
    try:
        proc = f"/proc/self/fd/{fd}"
        yield proc if os.path.exists(proc) else file
    finally:
        os.close(fd)


def fingerprint(file: str) -> Fingerprint:
    st = os.stat(file)
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


def check_unchanged(files: dict[str, Fingerprint], path: str) -> None:
    """Raise if any file of the checkpoint at `path` changed (size, mtime, inode) since it
    was opened."""
    for file, before in files.items():
        try:
            now = fingerprint(file)
        except OSError:
            now = None
        if now == before:
            continue
        what = "was deleted" if now is None else _what_changed(before, now)
        which = f"checkpoint.path={path}" + (f": {file}" if file != path else "")
        raise FinetunePrepError(
            f"{which} changed while it was being prepared ({what}). A checkpoint must "
            "not be rewritten while finetune_prep uses it (its tensors are memory-mapped): "
            "wait until the save or copy has finished, then run again."
        )


def _what_changed(before: Fingerprint, now: Fingerprint) -> str:
    parts = []
    if before[0] != now[0]:
        parts.append(f"size {before[0]} -> {now[0]} bytes")
    if before[2:] != now[2:]:
        parts.append("replaced by another file")
    if before[1] != now[1] and not parts:
        parts.append("modified")
    return ", ".join(parts) or "modified"


def torchscript(file: str) -> bool:
    """True for a torch.jit.save archive (its code is never loaded here)."""
    try:
        with zipfile.ZipFile(file) as z:
            return any(n.endswith("/constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def check_zip(file: str, shown: str | None = None) -> None:
    """Check every tensor of a torch zip file against its storage record (no data read).

    A record that would decompress to far more than its compressed size (a zip bomb) is
    refused before anything is decompressed, and data.pkl is read in bounded chunks. Does
    nothing else when the archive or its data.pkl cannot be parsed: torch's own reader then
    gives the error.
    """
    shown = shown or file
    try:
        with zipfile.ZipFile(file) as z:
            infos = z.infolist()
            check_sizes(shown, infos)
            records = {i.filename: i for i in infos}
            if len(records) != len(infos):
                twice = next(n for n, c in Counter(i.filename for i in infos).items() if c > 1)
                raise FinetunePrepError(
                    f"checkpoint.path={shown} is refused: its zip archive holds two records "
                    f"named {twice} (torch.save never writes that; readers would disagree on "
                    "which one is meant). Save the weights again.")
            pkl = [n for n in records if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkl) != 1:
                return
            data = _read_record(z, records[pkl[0]], shown)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError, RuntimeError):
        return
    try:
        obj, _ = safe_unpickle.scan(data)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, UnicodeDecodeError, RuntimeError, MemoryError, OverflowError):
        return  # RecursionError is a RuntimeError
    prefix, size = pkl[0][: -len("data.pkl")], os.path.getsize(file)
    for ref in safe_unpickle.tensor_refs(obj):
        problem = _problem(ref, records.get(f"{prefix}data/{ref.storage.key}"), size)
        if problem:
            raise FinetunePrepError(
                f"checkpoint.path={shown} is truncated or corrupt: tensor '{ref.path}' {problem}. "
                "Reading it would give it other bytes as weights; fetch or save the file again."
            )


def check_sizes(shown: str, records: list[zipfile.ZipInfo]) -> None:
    """Refuse a zip whose records declare more decompressed bytes than is sane (a zip bomb:
    a 1 MB file that expands to gigabytes), from the sizes in its directory alone."""
    for info in records:
        big = info.file_size > SMALL_RECORD and info.compress_type != zipfile.ZIP_STORED and \
            info.file_size > MAX_RATIO * max(info.compress_size, 1)
        pickle_too_big = info.filename.endswith("data.pkl") and info.file_size > MAX_PICKLE_BYTES
        if big or pickle_too_big:
            raise FinetunePrepError(
                f"checkpoint.path={shown} is refused: its record {info.filename} would "
                f"decompress to {info.file_size} bytes from {info.compress_size} (a zip bomb, "
                "or a damaged archive). torch.save never writes that; save the weights again "
                "with torch.save(model.state_dict(), path).")


def _read_record(z: zipfile.ZipFile, info: zipfile.ZipInfo, shown: str) -> bytes:
    """A record's bytes, read in chunks and never past its declared size (checked sane)."""
    parts, total = [], 0
    with z.open(info) as f:
        while chunk := f.read(CHUNK):
            total += len(chunk)
            if total > info.file_size:
                raise FinetunePrepError(
                    f"checkpoint.path={shown} is truncated or corrupt: record {info.filename} "
                    "holds more data than its header declares; save it again.")
            parts.append(chunk)
    return b"".join(parts)


def _problem(ref: safe_unpickle.TensorRef, info: zipfile.ZipInfo | None, size: int) -> str:
    """What is wrong with a tensor's storage record, or '' when it adds up."""
    itemsize = ref.storage.dtype.itemsize
    claimed = ref.storage.numel * itemsize
    if info is None:
        return f"has no storage record data/{ref.storage.key} in the archive"
    if info.compress_type != zipfile.ZIP_STORED:
        return f"is stored compressed (record data/{ref.storage.key}); torch cannot map it"
    if info.file_size < claimed:
        return (f"needs {claimed} bytes of storage record data/{ref.storage.key}, "
                f"which holds {info.file_size}")
    if info.header_offset + info.file_size > size:
        return f"lies beyond the end of the file (record data/{ref.storage.key})"
    if ref.offset < 0 or any(d < 0 for d in ref.size) or len(ref.size) != len(ref.stride):
        return "has a negative offset or size"
    if math.prod(ref.size) == 0:
        return ""
    end = ref.offset + sum((d - 1) * s for d, s in zip(ref.size, ref.stride, strict=True)) + 1
    if end * itemsize > claimed:
        return (f"needs {end * itemsize} bytes (offset {ref.offset}, shape {list(ref.size)}, "
                f"stride {list(ref.stride)}) but its storage holds {claimed}")
    return ""
