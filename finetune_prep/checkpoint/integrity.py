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

import math
import os
import pickle
import zipfile

from finetune_prep.checkpoint import safe_unpickle
from finetune_prep.errors import FinetunePrepError

Fingerprint = tuple[int, int, int, int]  # (size, mtime_ns, inode, device)


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


def check_zip(file: str) -> None:
    """Check every tensor of a torch zip file against its storage record (no data read).

    Does nothing when the archive or its data.pkl cannot be parsed: torch's own reader then
    gives the error.
    """
    try:
        with zipfile.ZipFile(file) as z:
            records = {i.filename: i for i in z.infolist()}
            pkl = [n for n in records if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkl) != 1:
                return
            data = z.read(pkl[0])
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError):
        return
    try:
        obj, _ = safe_unpickle.scan(data)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, UnicodeDecodeError, RuntimeError):
        return
    prefix, size = pkl[0][: -len("data.pkl")], os.path.getsize(file)
    for ref in safe_unpickle.tensor_refs(obj):
        problem = _problem(ref, records.get(f"{prefix}data/{ref.storage.key}"), size)
        if problem:
            raise FinetunePrepError(
                f"checkpoint.path={file} is truncated or corrupt: tensor '{ref.path}' {problem}. "
                "Reading it would give it other bytes as weights; fetch or save the file again."
            )


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
