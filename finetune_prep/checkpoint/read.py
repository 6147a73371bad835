"""Open a checkpoint file: check the path, sniff its bytes, read torch or safetensors files.

Reading never touches tensor data: torch files are opened with `weights_only=True` and
`mmap=True`, safetensors files through their header only (meta tensors until `load_tensors`).
Every user mistake raises `FinetunePrepError` with one message saying what is wrong and the fix.
"""

from __future__ import annotations

import errno
import os
import pickle
import pickletools
import re
import stat
import struct
import warnings
import zipfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from finetune_prep.checkpoint import dcp, formats, integrity, safe_unpickle, shards
from finetune_prep.checkpoint.unwrap import strip_prefixes, unwrap
from finetune_prep.errors import FinetunePrepError, did_you_mean

EXTENSIONS = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".tar")
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "C64": "complex64",
}
MAGIC = (  # (leading bytes, what the file looks like)
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"GIF8", "a GIF image"),
    (b"\x1f\x8b", "a gzip archive (decompress it first)"),
    (b"BZh", "a bzip2 archive (decompress it first)"),
    (b"\xfd7zXZ\x00", "an xz archive (decompress it first)"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive (extract it first)"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras/TensorFlow .h5 weights, not PyTorch)"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"GGUF", "a GGUF file (llama.cpp), not a PyTorch checkpoint"),
    (b"%PDF", "a PDF document"),
    (b"\x7fELF", "an executable program"),
)


@dataclass
class Checkpoint:
    """A checkpoint unwrapped to a flat state dict, with a log of what unwrapping did."""

    path: str
    tensors: dict[str, torch.Tensor]  # mmap'd (torch files) or meta placeholders (safetensors, DCP)
    steps: list[str]
    # lazy key -> (file or DCP folder, name in it), read by `load_tensors`
    stored: dict[str, tuple[str, str]] = field(default_factory=dict, repr=False)
    outside: list[str] = field(default_factory=list)  # keys outside checkpoint.prefix
    files: dict[str, integrity.Fingerprint] = field(default_factory=dict, repr=False)
    format: str = "torch"  # torch | safetensors | safetensors shards | torch shards | dcp
    guessed: list[str] = field(default_factory=list)  # prefixes stripped on a guess (fit_prefixes)


def read_checkpoint(
    path: str | os.PathLike, key: str | None = None, prefix: str | None = None
) -> Checkpoint:
    """Open a checkpoint (a torch.save or safetensors file, a shard index, a folder holding one,
    or a DCP folder) and unwrap it to a flat state dict (no tensor data read)."""
    target = _check_path(path)
    notes: list[str] = []
    if dcp.is_dcp_folder(target):
        raw, by_id, files = dcp.open_dcp(target)
        kind = "dcp"
    elif target.endswith(".index.json"):
        by_id = {}

        def opener(file: str) -> dict[str, torch.Tensor]:
            held = _open_shard(file)
            by_id.update({id(t): (file, k) for k, t in held.items() if t.is_meta})
            return held

        raw, files = shards.open_index(target, opener)
        kind = "safetensors shards" if files[0].endswith(".safetensors") else "torch shards"
        notes.append(f"read the index of {len(files)} shards")
    else:
        raw, by_id, notes, kind = _open_file(target)
        files = [target]
    fingerprints = {f: integrity.fingerprint(f) for f in files}
    steps: list[str] = list(notes)
    weights = unwrap(raw, key, target, steps)
    lightning = isinstance(raw, Mapping) and "pytorch-lightning_version" in raw
    names, outside, guessed = strip_prefixes(list(weights), prefix, steps, lightning)
    tensors = {new: weights[old] for old, new in names.items()}
    stored = {k: by_id[id(t)] for k, t in tensors.items() if id(t) in by_id}
    steps += _dtype_steps(tensors)
    return Checkpoint(target, tensors, steps, stored, outside, fingerprints, kind, guessed)


def _open_file(file: str) -> tuple[Any, dict[int, tuple[str, str]], list[str], str]:
    """A single file: (its object, lazy tensor ids, notes, format)."""
    folder = dcp.shard_folder(file)
    if folder:  # DCP data files start with a torch.save'd item: not a checkpoint on their own
        raise FinetunePrepError(
            f"checkpoint.path={file} is one data file of a torch.distributed.checkpoint (DCP) "
            f"folder: give the folder itself, checkpoint.path={folder}.")
    formats.refuse_file(file)
    kind, named = _sniff(file), file.lower().endswith(".safetensors")
    if kind == "safetensors" or (kind is None and named):
        _refuse_lone_shard(file)
        raw = _open_safetensors(file)
        return raw, {id(t): (file, k) for k, t in raw.items()}, [], "safetensors"
    if named:  # torch.load itself would treat the file as safetensors
        looks = "a torch.save file" if kind in ("zip", "pickle") else kind
        raise FinetunePrepError(f"checkpoint.path={file} is not a safetensors file: it looks "
                                f"like {looks}. Check the path (or rename a torch file to .pt).")
    if kind in ("zip", "pickle"):  # a torch.save file, whatever its extension
        _refuse_lone_shard(file)
        raw, notes = _torch_load(file, mmap=kind == "zip")
        return raw, {}, notes, "torch"
    raise FinetunePrepError(_not_a_checkpoint(file, kind))


def _refuse_lone_shard(file: str) -> None:
    """One shard of a sharded checkpoint holds only part of the weights: ask for the index."""
    index = shards.index_listing(file)
    if index:
        raise FinetunePrepError(
            f"checkpoint.path={file} is one shard of a sharded checkpoint: it holds only part "
            f"of the weights. Give the index instead, checkpoint.path={index} (or its folder).")


def _open_shard(file: str) -> dict[str, torch.Tensor]:
    """One shard of an index: a flat dict of tensors (safetensors header or mmap'd torch)."""
    if file.lower().endswith(".safetensors"):
        return _open_safetensors(file)
    raw, _ = _torch_load(file, mmap=_sniff(file) == "zip")
    if not isinstance(raw, Mapping):
        raise FinetunePrepError(f"checkpoint.path={file}: this shard holds {type(raw).__name__}, "
                                "not a dict of tensors.")
    return {str(k): v for k, v in raw.items() if isinstance(v, torch.Tensor)}


def _dtype_steps(tensors: dict[str, torch.Tensor]) -> list[str]:
    """A note when floating-point tensors are stored in another precision than float32."""
    counts = Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values()
                     if t.is_floating_point() and t.dtype != torch.float32)
    if not counts:
        return []
    listed = ", ".join(f"{n} {d}" for d, n in counts.most_common())
    return [f"stored in reduced or other precision: {listed} tensors (cast to the model's dtype "
            "when loaded)"]


def _check_path(path: str | os.PathLike) -> str:
    """The path as a string, after checking it names a readable, non-empty regular file, or a
    folder holding a checkpoint (a DCP folder, a shard index, a single model file)."""
    raw = os.fspath(path)
    if not str(raw).strip():
        raise FinetunePrepError("checkpoint.path is empty: give the file that holds the weights.")
    file = os.path.expanduser(str(raw))
    try:
        st = os.stat(file)
    except OSError as err:
        if err.errno == errno.ELOOP:
            hop = os.readlink(file) if os.path.islink(file) else "..."
            raise FinetunePrepError(
                f"checkpoint.path={raw} is a symbolic link that loops ({raw} -> {hop} -> ... "
                "never reaches a file): point it at the weights file.") from err
        if os.path.islink(file):
            raise FinetunePrepError(
                f"checkpoint.path={raw} is a broken symbolic link: it points to "
                f"{os.readlink(file)}, which does not exist.") from err
        if err.errno == errno.EACCES:
            raise FinetunePrepError(
                f"checkpoint.path={raw} cannot be reached (permission denied on a folder of the "
                "path).") from err
        raise FinetunePrepError(f"checkpoint.path={raw} does not exist "
                                f"(looked for {os.path.abspath(file)}).{_near_files(file)}"
                                ) from err
    if stat.S_ISDIR(st.st_mode):
        formats.refuse_folder(file)
        try:
            found = shards.resolve_folder(file)
        except OSError as err:
            raise FinetunePrepError(f"checkpoint.path={raw} is a folder that cannot be listed "
                                    f"({err.strerror}): make it readable.") from err
        if found is None:
            raise FinetunePrepError(f"checkpoint.path={raw} is a directory: give the weights "
                                    f"file inside it.{_candidates(file)}")
        return found
    if not stat.S_ISREG(st.st_mode):
        raise FinetunePrepError(
            f"checkpoint.path={raw} is not a regular file but {integrity.file_type(st.st_mode)}: "
            "give "
            "the checkpoint file itself (a pipe or device cannot be memory-mapped).")
    if st.st_size == 0:
        raise FinetunePrepError(f"checkpoint.path={raw} is an empty file (0 bytes): the save or "
                                "copy that made it failed; save or copy it again.")
    return file


def _near_files(file: str) -> str:
    """A hint naming files with a similar name next to where `file` was expected."""
    folder = os.path.dirname(os.path.abspath(file))
    if not os.path.isdir(folder):
        return f" The folder {folder} does not exist either."
    try:
        names = os.listdir(folder)
    except OSError:
        return ""
    return did_you_mean(os.path.basename(file), names, n=3, cutoff=0.8)


def _candidates(folder: str) -> str:
    """A hint listing the weight files in a folder."""
    try:
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith(EXTENSIONS))
    except OSError:
        return ""
    if not names:
        return " It holds no .pt/.pth/.bin/.ckpt/.safetensors file."
    shown = ", ".join(names[:5]) + (f" (and {len(names) - 5} more)" if len(names) > 5 else "")
    return f" Weight files there: {shown}."


def _sniff(file: str) -> str | None:
    """What the file's first bytes say it is: 'zip', 'pickle', 'safetensors' or a description."""
    try:
        with os.fdopen(integrity.open_regular(file), "rb") as f:
            head = f.read(512)
            size = os.fstat(f.fileno()).st_size
    except PermissionError as err:
        raise FinetunePrepError(
            f"checkpoint.path={file} cannot be read (permission denied): make it readable "
            "(chmod +r) or copy it somewhere you can read."
        ) from err
    except OSError as err:
        raise FinetunePrepError(f"checkpoint.path={file} cannot be read: {err.strerror}.") from err
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if _old_pickle(head):
        return "pickle"
    for magic, what in MAGIC:
        if head.startswith(magic):
            return what
    if len(head) > 262 and head[257:262] == b"ustar":
        return "a tar archive (extract it first)"
    return _sniff_text(head)


def _old_pickle(head: bytes) -> bool:
    """A protocol 0/1 pickle (no PROTO opcode): its first bytes parse as pickle opcodes."""
    if not head or head[:1] not in b"(}]cNIJKLFSVXGlds":
        return False
    n = end = 0
    try:
        for op, _arg, pos in pickletools.genops(head):
            n, end = n + 1, pos
            if op.name == "STOP":
                return n >= 2
    except Exception:  # genops raises ValueError and others at the first non-opcode
        pass
    return n >= 3 and end >= min(len(head) - 16, 64)


def _sniff_text(head: bytes) -> str | None:
    """A description of a text file from its first bytes, or None for unknown binary data."""
    if b"\x00" in head:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    first = text.strip().splitlines()[0][:60] if text.strip() else ""
    lower = text.lstrip().lower()
    if lower.startswith("version https://git-lfs"):
        return "a Git LFS pointer, not the weights themselves (run `git lfs pull`)"
    if lower.startswith(("<!doctype html", "<html")):
        return "an HTML page (a failed download? download the file itself)"
    if lower.startswith(("{", "[")):
        return f"a JSON text file (it starts with {first!r})"
    return f"a text file (it starts with {first!r})"


def _not_a_checkpoint(file: str, kind: str | None) -> str:
    looks = f"it looks like {kind}" if kind else "its first bytes match no known format"
    return (f"checkpoint.path={file} is not a checkpoint: {looks}. finetune_prep reads "
            "torch.save files (.pt/.pth/.bin/.ckpt) and .safetensors files; check the path.")


def _torch_load(file: str, mmap: bool) -> tuple[Any, list[str]]:
    """The file's object and notes on what was left out. torch.load with weights_only=True
    first; a file that torch's allowlist refuses is read again with the restricted unpickler
    (`safe_unpickle`), which never imports or calls what the file names."""
    with integrity.pinned(file) as path:  # every open below reaches this regular file
        if mmap:
            if integrity.torchscript(path):
                raise FinetunePrepError(
                    f"checkpoint.path={file} is a TorchScript archive (torch.jit.save): its code "
                    "is never loaded here. Save the weights with torch.save(model.state_dict(), "
                    "path).")
            integrity.check_zip(path, file)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*pickle protocol",
                                        category=UserWarning)
                return _load(path, mmap, weights_only=True), []
        except pickle.UnpicklingError as err:
            reason = str(err)
        except (EOFError, RuntimeError, zipfile.BadZipFile, UnicodeDecodeError, KeyError,
                ValueError, struct.error) as err:
            raise FinetunePrepError(_corrupt(file, mmap, err)) from err
        except Exception as err:  # anything else torch may raise on a bad file: one message
            raise FinetunePrepError(_unreadable(file, err)) from err
        return _safe_load(file, path, mmap, reason)


def _load(path: str, mmap: bool, **kwargs: Any) -> Any:
    """torch.load of a zip file mmap'd, or of a legacy file through `safe_unpickle.Bounded`
    (so no pickle opcode can make the reader allocate more than the file holds)."""
    if mmap:
        return torch.load(path, map_location="cpu", mmap=True, **kwargs)
    with open(path, "rb") as f:
        return torch.load(safe_unpickle.Bounded(f), map_location="cpu", mmap=False, **kwargs)


def _safe_load(file: str, path: str, mmap: bool, reason: str) -> tuple[Any, list[str]]:
    """torch.load through `safe_unpickle`: torch's zip reader, persistent_load and mmap, with
    every global outside torch's allowlist left as an inert record."""
    if os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true"):
        raise FinetunePrepError(_refused(file, reason))  # torch would ignore our unpickler
    record = safe_unpickle.Record()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # weights_only=False skips torch's sparse-index validation: switch it on here
            with torch.sparse.check_sparse_tensor_invariants():
                raw = _load(path, mmap, weights_only=False,
                            pickle_module=safe_unpickle.pickle_module(record))
    except Exception as err:
        if record.dangerous:
            raise FinetunePrepError(_refused(file, reason, record.dangerous[0])) from err
        if str(err).startswith(safe_unpickle.OVERSIZED):
            raise FinetunePrepError(
                f"checkpoint.path={file} is refused: {first_line(str(err))} (a damaged or "
                "crafted pickle; nothing was allocated for it). Save the weights again with "
                "torch.save(model.state_dict(), path) or as .safetensors.") from err
        if re.search(r"GLOBAL ([\w.]+)", reason) or mmap:  # a torch file that does not parse
            raise FinetunePrepError(_corrupt(file, mmap, err, pickled=True)) from err
        raise FinetunePrepError(_refused(file, reason)) from err  # not a torch.save file
    if record.dangerous:
        raise FinetunePrepError(_refused(file, reason, record.dangerous[0]))
    if isinstance(raw, (safe_unpickle.Foreign, safe_unpickle.Global)):
        raise FinetunePrepError(_refused(file, reason, raw.name))
    return raw, _metadata_notes(raw)


def _metadata_notes(raw: Any) -> list[str]:
    """'ignored non-tensor entries: args (argparse.Namespace), hyper_parameters (...)'."""
    if not isinstance(raw, Mapping):
        return []
    parts = []
    for k, v in raw.items():
        names = safe_unpickle.foreign_names(v, limit=4)
        if names:
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            parts.append(f"{k} ({shown})")
    if not parts:
        return []
    return ["read without running code (restricted unpickler): ignored non-tensor entries: "
            + ", ".join(parts)]


def _unreadable(file: str, err: BaseException) -> str:
    return (f"checkpoint.path={file} could not be read as a torch checkpoint "
            f"({type(err).__name__}: {first_line(str(err))}). Re-save it with "
            "torch.save(model.state_dict(), path) or as .safetensors.")


def _refused(file: str, reason: str, name: str | None = None) -> str:
    """The message for a pickle that is refused: it names code to run, holds a whole pickled
    model (`name`), or is no torch.save file at all (no `name`, no GLOBAL in `reason`)."""
    glob = re.search(r"GLOBAL ([\w.]+)", reason)
    if not glob and not name:  # an opcode torch's safe unpickler does not know
        why = _quote(reason)
        return (f"checkpoint.path={file} is a Python pickle but not a plain torch weights file: "
                f"the safe loader (weights_only=True) rejects it ({why}). Save the weights with "
                "torch.save(model.state_dict(), path) or as .safetensors.")
    name = name or (glob.group(1) if glob else "?")
    whole = re.match(r"(torch\.nn|torchvision|timm)\.", name) or name.endswith(("Module", "Net"))
    fix = ("it seems to hold a whole pickled model: in a trusted environment load it and save "
           "only the weights with torch.save(model.state_dict(), path)" if whole else
           "if you trust its source, load it once in a trusted environment and save only the "
           "weights: torch.save(model.state_dict(), path) or as .safetensors")
    why = ("it holds a whole pickled object" if whole else
           "unpickling it would run code or reference non-tensor globals")
    return (f"checkpoint.path={file} is not a plain weights file: it was refused because {why} "
            f"({name}); torch says: {_quote(reason)}. Nothing in it was run: finetune_prep "
            f"never imports or calls what a checkpoint names; {fix}.")


def _quote(reason: str) -> str:
    """The informative sentence of torch's weights_only error, shortened."""
    for line in reason.splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line.startswith(("Unsupported", "Trying to load")):
            return repr(line.split(". ")[0].rstrip(".")[:160])
    return repr(first_line(reason)[:160])


def _corrupt(file: str, mmap: bool, err: BaseException, pickled: bool = False) -> str:
    """The message for a torch file that is truncated or damaged (`pickled`: its pickle)."""
    text = str(err)
    if mmap and "not in a subdirectory" in text:
        return (f"checkpoint.path={file} is a zip archive but not a torch checkpoint: extract "
                "it, or give the .pt/.pth/.safetensors file itself.")
    what = "zip-format torch file" if mmap else "legacy-format torch file"
    detail = first_line(text).split(". ")[0] or type(err).__name__
    if pickled:
        detail = f"its pickled data does not parse: {detail}"
    return (f"checkpoint.path={file} is truncated or corrupt: it starts like a {what} but cannot "
            f"be read ({detail[:120]}). The download or copy was probably cut short: fetch or "
            "save it again.")


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _open_safetensors(file: str) -> dict[str, torch.Tensor]:
    """Names, shapes and dtypes from a safetensors header, as meta tensors (no data read)."""
    from safetensors import safe_open

    try:
        with integrity.pinned(file) as path, safe_open(path, framework="pt") as f:
            info = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
    except FinetunePrepError:
        raise
    except Exception as err:  # SafetensorError is not importable as a stable name
        raise FinetunePrepError(
            f"checkpoint.path={file} has a corrupt safetensors header "
            f"({first_line(str(err))[:120]}): the file is damaged or incomplete; "
            "download or save it again."
        ) from err
    return {k: torch.empty(shape, dtype=_dtype(dt), device="meta")
            for k, (shape, dt) in info.items()}


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, SAFETENSORS_DTYPES.get(name, ""), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.uint8
