"""Read a checkpoint, unwrap it to a flat state dict, check that it fits a model, load it.

Reading never touches tensor data: torch files are opened with `weights_only=True` and
`mmap=True`, safetensors files through their header only (meta tensors until `load_tensors`).
Every user mistake raises `FinetunePrepError` with one message saying what is wrong and the fix.
"""

from __future__ import annotations

import difflib
import os
import pickle
import re
import struct
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from finetune_prep.errors import FinetunePrepError

NESTED = ("state_dict_ema", "model_ema", "state_dict", "model", "model_state", "module", "ema")
WRAPPERS = {"module.": "DataParallel/DDP", "_orig_mod.": "torch.compile"}
ATTRIBUTES = ("model.", "net.", "network.")  # Lightning-style: a LightningModule's attribute
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
    tensors: dict[str, torch.Tensor]  # mmap'd (torch files) or meta placeholders (safetensors)
    steps: list[str]
    _stored: dict[str, str] = field(default_factory=dict, repr=False)  # lazy key -> name in file


@dataclass
class Fit:
    """How a checkpoint's keys and shapes meet a model's state dict."""

    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    skipped: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
    excluded: list[str]


# --------------------------------------------------------------------------- reading


def read_checkpoint(
    path: str | os.PathLike, key: str | None = None, prefix: str | None = None
) -> Checkpoint:
    """Open a torch.save or safetensors file and unwrap it to a flat state dict (no data read)."""
    file = _check_file(path)
    kind, named = _sniff(file), file.lower().endswith(".safetensors")
    if kind == "safetensors" or (kind is None and named):
        raw, stored = _open_safetensors(file)
    elif named:  # torch.load itself would treat the file as safetensors
        looks = "a torch.save file" if kind in ("zip", "pickle") else kind
        raise FinetunePrepError(f"checkpoint.path={file} is not a safetensors file: it looks "
                                f"like {looks}. Check the path (or rename a torch file to .pt).")
    elif kind in ("zip", "pickle"):  # a torch.save file, whatever its extension
        raw, stored = _torch_load(file, mmap=kind == "zip"), {}
    else:
        raise FinetunePrepError(_not_a_checkpoint(file, kind))
    steps: list[str] = []
    weights = _unwrap(raw, key, file, steps)
    names = _strip_prefixes(list(weights), prefix, steps)
    tensors = {new: weights[old] for old, new in names.items()}
    stored = {new: stored[old] for old, new in names.items()} if stored else {}
    return Checkpoint(file, tensors, steps, stored)


def _check_file(path: str | os.PathLike) -> str:
    """The path as a string, after checking it names a readable, non-empty file."""
    raw = os.fspath(path)
    if not str(raw).strip():
        raise FinetunePrepError("checkpoint.path is empty: give the file that holds the weights.")
    file = os.path.expanduser(str(raw))
    if not os.path.exists(file):
        raise FinetunePrepError(f"checkpoint.path={raw} does not exist "
                                f"(looked for {os.path.abspath(file)}).{_near_files(file)}")
    if os.path.isdir(file):
        raise FinetunePrepError(f"checkpoint.path={raw} is a directory: give the weights file "
                                f"inside it.{_candidates(file)}")
    if os.path.getsize(file) == 0:
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
    close = difflib.get_close_matches(os.path.basename(file), names, n=3, cutoff=0.8)
    return f" Did you mean: {', '.join(close)}?" if close else ""


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
        with open(file, "rb") as f:
            head = f.read(512)
    except PermissionError as err:
        raise FinetunePrepError(
            f"checkpoint.path={file} cannot be read (permission denied): make it readable "
            "(chmod +r) or copy it somewhere you can read."
        ) from err
    except OSError as err:
        raise FinetunePrepError(f"checkpoint.path={file} cannot be read: {err.strerror}.") from err
    size = os.path.getsize(file)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    for magic, what in MAGIC:
        if head.startswith(magic):
            return what
    if len(head) > 262 and head[257:262] == b"ustar":
        return "a tar archive (extract it first)"
    return _sniff_text(head)


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


def _torch_load(file: str, mmap: bool) -> Any:
    """torch.load with weights_only=True (always), mmap'd when the file is in zip format."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise FinetunePrepError(_refused(file, str(err))) from err
    except (EOFError, RuntimeError, zipfile.BadZipFile, UnicodeDecodeError, KeyError,
            ValueError, struct.error) as err:
        raise FinetunePrepError(_corrupt(file, mmap, err)) from err
    except Exception as err:  # anything else torch may raise on a bad file: still one message
        raise FinetunePrepError(
            f"checkpoint.path={file} could not be read as a torch checkpoint "
            f"({type(err).__name__}: {_first_line(str(err))}). Re-save it with "
            "torch.save(model.state_dict(), path) or as .safetensors."
        ) from err


def _refused(file: str, reason: str) -> str:
    """The message for a pickle that weights_only=True refuses."""
    glob = re.search(r"GLOBAL ([\w.]+)", reason)
    if not glob:  # an opcode torch's safe unpickler does not know: not a torch.save file
        why = _quote(reason)
        return (f"checkpoint.path={file} is a Python pickle but not a plain torch weights file: "
                f"the safe loader (weights_only=True) rejects it ({why}). Save the weights with "
                "torch.save(model.state_dict(), path) or as .safetensors.")
    name = glob.group(1)
    whole = re.match(r"(torch\.nn|torchvision|timm)\.", name) or name.endswith(("Module", "Net"))
    fix = ("it seems to hold a whole pickled model: in a trusted environment load it and save "
           "only the weights with torch.save(model.state_dict(), path)" if whole else
           "if you trust its source, load it once in a trusted environment and save only the "
           "weights: torch.save(model.state_dict(), path) or as .safetensors")
    return (f"checkpoint.path={file} is not a plain weights file: it was refused because "
            f"unpickling it would run code or reference non-tensor globals ({name}); torch says: "
            f"{_quote(reason)}. finetune_prep never loads checkpoints with weights_only=False; "
            f"{fix}.")


def _quote(reason: str) -> str:
    """The informative sentence of torch's weights_only error, shortened."""
    for line in reason.splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line.startswith(("Unsupported", "Trying to load")):
            return repr(line.split(". ")[0].rstrip(".")[:160])
    return repr(_first_line(reason)[:160])


def _corrupt(file: str, mmap: bool, err: BaseException) -> str:
    """The message for a torch file that is truncated or damaged."""
    text = str(err)
    if mmap and "not in a subdirectory" in text:
        return (f"checkpoint.path={file} is a zip archive but not a torch checkpoint: extract "
                "it, or give the .pt/.pth/.safetensors file itself.")
    what = "zip-format torch file" if mmap else "legacy-format torch file"
    detail = _first_line(text).split(". ")[0] or type(err).__name__
    return (f"checkpoint.path={file} is truncated or corrupt: it starts like a {what} but cannot "
            f"be read ({detail[:120]}). The download or copy was probably cut short: fetch or "
            "save it again.")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _open_safetensors(file: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Names, shapes and dtypes from a safetensors header, as meta tensors (no data read)."""
    from safetensors import safe_open

    try:
        with safe_open(file, framework="pt") as f:
            info = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as err:  # SafetensorError is not importable as a stable name
        raise FinetunePrepError(
            f"checkpoint.path={file} has a corrupt safetensors header "
            f"({_first_line(str(err))[:120]}): the file is damaged or incomplete; "
            "download or save it again."
        ) from err
    tensors = {k: torch.empty(shape, dtype=_dtype(dt), device="meta")
               for k, (shape, dt) in info.items()}
    return tensors, {k: k for k in tensors}


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, SAFETENSORS_DTYPES.get(name, ""), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.uint8


# --------------------------------------------------------------------------- unwrapping


def _unwrap(raw: Any, key: str | None, file: str, steps: list[str]) -> dict[str, torch.Tensor]:
    """The flat dict of tensors: at `key` if given, else auto-detected; non-tensors dropped."""
    if not isinstance(raw, Mapping):
        raise FinetunePrepError(
            f"checkpoint.path={file} holds {_describe(raw)}, not a dict of named tensors: save "
            "the weights with torch.save(model.state_dict(), path)."
        )
    obj = _take_key(raw, key, file, steps) if key else raw
    found = _auto(obj, [])
    if found is None:
        raise FinetunePrepError(_no_tensors(obj, key, file))
    weights, trail = found
    if trail:
        others = [n for n in NESTED if n not in trail and _auto_candidate(obj, n)]
        also = f" (also present: {', '.join(others)}; choose with checkpoint.key)" if others else ""
        steps.append(f"took nested key '{'.'.join(trail)}'{also}")
    dropped = [k for k, v in weights.items() if not isinstance(v, torch.Tensor)]
    if dropped:
        steps.append(f"ignored {len(dropped)} non-tensor entries ({_names(dropped, 3)})")
    return {str(k): v for k, v in weights.items() if isinstance(v, torch.Tensor)}


def _take_key(raw: Mapping, key: str, file: str, steps: list[str]) -> Mapping:
    """The value at a dotted key; a part may itself contain dots, or name a flat key prefix."""
    parts, obj, at = key.split("."), raw, []
    while parts:
        for n in range(len(parts), 0, -1):
            name = ".".join(parts[:n])
            if isinstance(obj, Mapping) and name in obj:
                obj, at, parts = obj[name], [*at, name], parts[n:]
                break
        else:
            rest = ".".join(parts) + "."
            flat = {k[len(rest):]: v for k, v in obj.items() if str(k).startswith(rest)} \
                if isinstance(obj, Mapping) else {}
            if not flat:
                raise FinetunePrepError(_key_not_found(raw, obj, key, at, file))
            obj, at, parts = flat, [*at, rest], []
    if not isinstance(obj, Mapping):
        raise FinetunePrepError(f"checkpoint.key={key} holds {_describe(obj)}, not a dict of "
                                f"tensors. {_top_keys(raw)} Set checkpoint.key to the one that "
                                "holds the weights (or null to auto-detect).")
    steps.append(f"took nested key '{key}' (checkpoint.key)")
    return obj


def _key_not_found(raw: Mapping, obj: Any, key: str, at: list[str], file: str) -> str:
    where = f"under '{'.'.join(at)}' the keys are: {_listing(obj)}" if at else _top_keys(raw)
    return (f"checkpoint.key={key} not found in {file}: {where}. Set checkpoint.key to one "
            "of them (dotted for nested keys), or null to auto-detect.")


def _auto(obj: Any, trail: list[str]) -> tuple[Mapping, list[str]] | None:
    """Nested weights by the usual names first, then the dict itself if it holds tensors."""
    for name in NESTED:
        value = obj.get(name) if isinstance(obj, Mapping) else None
        if isinstance(value, Mapping):
            found = _auto(value, [*trail, name])
            if found is not None and (found[1] != [*trail, name] or _mostly_tensors(value)):
                return found
    if isinstance(obj, Mapping) and any(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, trail
    return None


def _auto_candidate(obj: Any, name: str) -> bool:
    value = obj.get(name) if isinstance(obj, Mapping) else None
    return isinstance(value, Mapping) and _auto(value, []) is not None


def _mostly_tensors(d: Mapping) -> bool:
    return sum(isinstance(v, torch.Tensor) for v in d.values()) * 2 > len(d)


def _no_tensors(obj: Any, key: str | None, file: str) -> str:
    where = f"checkpoint.key={key}" if key else f"checkpoint.path={file}"
    nested = _tensor_dicts(obj, [], depth=3)
    hint = (f" Weights may be under: {', '.join(nested[:5])}; set checkpoint.key to one of "
            "them." if nested else " Save the weights with torch.save(model.state_dict(), path).")
    return f"{where} holds no tensors: {_top_keys(obj)}.{hint}"


def _tensor_dicts(obj: Any, trail: list[str], depth: int) -> list[str]:
    """Dotted keys of nested dicts that hold tensors, with their tensor counts."""
    if not isinstance(obj, Mapping) or depth < 0:
        return []
    n = sum(isinstance(v, torch.Tensor) for v in obj.values())
    found = [f"{'.'.join(trail)} ({n} tensors)"] if n and trail else []
    for k, v in list(obj.items())[:200]:
        found += _tensor_dicts(v, [*trail, str(k)], depth - 1)
    return found


def _top_keys(obj: Any) -> str:
    return f"its top-level keys are: {_listing(obj)}" if isinstance(obj, Mapping) else \
        f"it holds {_describe(obj)}"


def _listing(obj: Any, limit: int = 12) -> str:
    if not isinstance(obj, Mapping) or not obj:
        return "(none)"
    items = [f"{k} ({_kind(v)})" for k, v in list(obj.items())[:limit]]
    more = f", ... ({len(obj)} keys)" if len(obj) > limit else ""
    return ", ".join(items) + more


def _kind(value: Any) -> str:
    """What a value is, in a few words: 'int', 'tensor [3, 4]', 'dict of 122 tensors'."""
    if isinstance(value, torch.Tensor):
        return f"tensor {list(value.shape)}"
    if isinstance(value, Mapping):
        n = sum(isinstance(v, torch.Tensor) for v in value.values())
        if n:
            return f"dict of {n} tensors" if n == len(value) else \
                f"dict of {len(value)} entries, {n} tensors"
        return f"dict of {len(value)} entries"
    return "None" if value is None else type(value).__name__


def _describe(value: Any) -> str:
    kind = _kind(value)
    return kind if kind == "None" else ("an " if kind[0] in "aeiouAEIOU" else "a ") + kind


def _names(keys: Sequence[str], n: int) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


# --------------------------------------------------------------------------- prefixes


def _strip_prefixes(keys: list[str], prefix: str | None, steps: list[str]) -> dict[str, str]:
    """Old key -> new key after removing wrapper prefixes and the user's `prefix`."""
    names = {k: k for k in keys}
    names = _drop_n_averaged(names, steps)
    if prefix:
        if not any(k.startswith(prefix) for k in names.values()):
            names = _strip_all(names, steps, WRAPPERS)
        names = _strip_user(names, prefix, steps)
    return _strip_all(names, steps, WRAPPERS if prefix else (*WRAPPERS, *ATTRIBUTES))


def _drop_n_averaged(names: dict[str, str], steps: list[str]) -> dict[str, str]:
    """torch.optim.swa_utils.AveragedModel adds a counter beside its `module.` weights."""
    rest = [k for k in names if k != "n_averaged"]
    if "n_averaged" in names and rest and all(k.startswith("module.") for k in rest):
        steps.append("dropped 'n_averaged' (the AveragedModel counter)")
        return {k: names[k] for k in rest}
    return names


def _strip_all(names: dict[str, str], steps: list[str], prefixes: Iterable[str]) -> dict[str, str]:
    """Strip, repeatedly, any of `prefixes` that every key has (wrappers before attributes)."""
    prefixes = list(prefixes)
    while names:
        hit = next((p for p in prefixes if all(v.startswith(p) for v in names.values())), None)
        if hit is None or any(v == hit for v in names.values()):
            return names
        why = WRAPPERS.get(hit, "a Lightning-style attribute prefix")
        steps.append(f"stripped prefix '{hit}' from all {len(names)} keys ({why})")
        names = {k: v[len(hit):] for k, v in names.items()}
    return names


def _strip_user(names: dict[str, str], prefix: str, steps: list[str]) -> dict[str, str]:
    """Strip the user's prefix from every key that has it; an error if none has it."""
    values = list(names.values())
    if not prefix.endswith(".") and any(v.startswith(prefix + ".") for v in values):
        prefix += "."
    hits = [v for v in values if v.startswith(prefix)]
    if not hits:
        raise FinetunePrepError(
            f"checkpoint.prefix={prefix} matches no key of the checkpoint; its keys look like: "
            f"{', '.join(values[:3])}. Set checkpoint.prefix to the leading part to remove "
            "(e.g. 'backbone.'), or null to auto-detect."
        )
    new = {k: v[len(prefix):] if v.startswith(prefix) else v for k, v in names.items()}
    if len(set(new.values())) < len(new):
        clash = next(v for v in new.values() if list(new.values()).count(v) > 1)
        raise FinetunePrepError(
            f"checkpoint.prefix={prefix}: stripping it makes keys collide with keys that lack "
            f"it (e.g. {clash}). Use checkpoint.key or a longer checkpoint.prefix."
        )
    kept = len(values) - len(hits)
    rest = f" ({kept} keys without it kept as they are)" if kept else ""
    scope = f"all {len(hits)}" if not kept else f"{len(hits)} of {len(values)}"
    steps.append(f"stripped prefix '{prefix}' from {scope} keys (checkpoint.prefix){rest}")
    return new


# --------------------------------------------------------------------------- fitting


def check_fit(
    ckpt_shapes: Mapping[str, tuple[int, ...]],
    model_shapes: Mapping[str, tuple[int, ...]],
    strict: bool,
    exclude: Sequence[str] = (),
    source: str = "checkpoint",
) -> Fit:
    """Match checkpoint keys and shapes to the model's; raise if `strict` and anything is off.

    A missing BatchNorm `num_batches_tracked` (old checkpoints) never fails the strict check.
    """
    fit = _match(ckpt_shapes, model_shapes, exclude)
    failing = [k for k in fit.missing if not k.endswith(".num_batches_tracked")]
    if not fit.loaded or (strict and (failing or fit.unexpected or fit.skipped)):
        raise FinetunePrepError(_fit_message(fit, ckpt_shapes, model_shapes, source))
    return fit


def _match(ckpt: Mapping[str, tuple[int, ...]], model: Mapping[str, tuple[int, ...]],
           exclude: Sequence[str]) -> Fit:
    fit = Fit([], [], [], [], [])
    for k, shape in model.items():
        if _covered(k, exclude):
            fit.excluded.append(k)
        elif k not in ckpt:
            fit.missing.append(k)
        elif tuple(ckpt[k]) != tuple(shape):
            fit.skipped.append((k, tuple(ckpt[k]), tuple(shape)))
        else:
            fit.loaded.append(k)
    fit.unexpected = [k for k in ckpt if k not in model and not _covered(k, exclude)]
    return fit


def _covered(key: str, prefixes: Sequence[str]) -> bool:
    return any(p and (key == p or key.startswith(p + ".")) for p in prefixes)


def _fit_message(fit: Fit, ckpt: Mapping, model: Mapping, source: str) -> str:
    """One message explaining the mismatch in plain words, with grouped keys and the fix."""
    if not fit.loaded and not fit.skipped:
        return _no_match(ckpt, model, source)
    head = _head_mismatch(fit)
    if _foreign(fit, model) and not (head and len(fit.skipped) <= 4 and not fit.unexpected):
        return _foreign_message(fit, source)
    lead = (f"{source}: nothing would be loaded (all {len(fit.skipped)} matching keys have a "
            "different shape)" if not fit.loaded else
            f"{source} does not fit the model (checkpoint.strict=true)")
    lines = [f"{lead}: {_counts(fit)}."]
    if head:
        lines.append(head)
    lines += _details(fit)
    if not head:
        lines.append("Fix: set checkpoint.strict=false to load what fits (the rest keeps a fresh "
                     "init), checkpoint.exclude_head=true if only the head differs, or check that "
                     "model.arch matches the checkpoint.")
    return "\n".join(lines)


def _counts(fit: Fit) -> str:
    return (f"{len(fit.loaded)} keys fit, {len(fit.missing)} missing, "
            f"{len(fit.unexpected)} unexpected, {len(fit.skipped)} with a different shape")


def _details(fit: Fit) -> list[str]:
    lines = []
    if fit.missing:
        lines.append(f"missing from the checkpoint ({len(fit.missing)}):")
        lines += ["  " + g for g in group_keys(fit.missing)]
    if fit.unexpected:
        lines.append(f"in the checkpoint but not in the model ({len(fit.unexpected)}):")
        lines += ["  " + g for g in group_keys(fit.unexpected)]
    if fit.skipped:
        lines.append(f"different shape ({len(fit.skipped)}):")
        lines += ["  " + _shape_line(s) for s in fit.skipped[:8]]
        if len(fit.skipped) > 8:
            lines.append(f"  ... and {len(fit.skipped) - 8} more")
    return lines


def _shape_line(item: tuple[str, tuple[int, ...], tuple[int, ...]]) -> str:
    key, ckpt, model = item
    return f"{key}: checkpoint {list(ckpt)}, model {list(model)}"


def _head_mismatch(fit: Fit) -> str | None:
    """Plain words for skipped keys that differ only in their output size, in at most 2 modules."""
    if not fit.skipped:
        return None
    owners = {k.rsplit(".", 1)[0] for k, _, _ in fit.skipped}
    same_rest = all(len(a) == len(b) and a[1:] == b[1:] and a and a[0] != b[0]
                    for _, a, b in fit.skipped)
    if len(owners) > 2 or not same_rest:
        return None
    key, ckpt, model = next((s for s in fit.skipped if len(s[1]) >= 2), fit.skipped[0])
    return (f"the checkpoint's head has {ckpt[0]} outputs, the model's has {model[0]} "
            f"({key}: checkpoint {list(ckpt)}, model {list(model)}): set "
            "checkpoint.exclude_head=true to load the backbone only, or checkpoint.strict=false.")


def _foreign(fit: Fit, model: Mapping[str, tuple[int, ...]]) -> bool:
    """True when so little fits that the checkpoint was surely made for another architecture."""
    def numel(shape: tuple[int, ...]) -> int:
        n = 1
        for d in shape:
            n *= d
        return n

    wanted = [k for k in model if k not in set(fit.excluded)]
    loaded = sum(numel(model[k]) for k in fit.loaded)
    total = sum(numel(model[k]) for k in wanted) or 1
    bad = len(fit.unexpected) + len(fit.skipped)
    few = len(fit.loaded) * 2 < len(wanted) or loaded * 2 < total
    return bad >= 3 and (few or bad * 2 > len(fit.loaded))


def _foreign_message(fit: Fit, source: str) -> str:
    examples = "; ".join(_shape_line(s) for s in fit.skipped[:3])
    shown = f" Shape mismatches, e.g. {examples}." if examples else ""
    extra = (f" Keys the model does not have, e.g. {', '.join(fit.unexpected[:3])}."
             if fit.unexpected else "")
    return (f"{source}: this checkpoint does not look like it was made for this model: "
            f"{_counts(fit)}.{shown}{extra} Check that model.arch (and model.source) match the "
            "architecture the checkpoint was trained with.")


def _no_match(ckpt: Mapping, model: Mapping, source: str) -> str:
    c, m = list(ckpt), list(model)
    hint = _prefix_hint(c, set(m))
    return (f"{source}: no checkpoint key matches the model ({len(c)} checkpoint keys, "
            f"{len(m)} model keys). Checkpoint keys look like: {', '.join(c[:3]) or '(none)'}; "
            f"model keys look like: {', '.join(m[:3])}. {hint}")


def _prefix_hint(ckpt: list[str], model: set[str]) -> str:
    """Suggest the checkpoint.prefix that would make keys match, if there is one."""
    for depth in (1, 2, 3):
        firsts: dict[str, int] = {}
        for k in ckpt:
            parts = k.split(".")
            if len(parts) > depth:
                p = ".".join(parts[:depth]) + "."
                firsts[p] = firsts.get(p, 0) + 1
        for p, _ in sorted(firsts.items(), key=lambda kv: -kv[1])[:3]:
            if any(k[len(p):] in model for k in ckpt if k.startswith(p)):
                return f"Set checkpoint.prefix={p} to strip it."
    return ("If the weights sit under a nested key or carry an extra prefix, set checkpoint.key "
            "or checkpoint.prefix; otherwise check that model.arch matches the checkpoint.")


# --------------------------------------------------------------------------- key groups


def group_keys(keys: Iterable[str], limit: int = 12) -> list[str]:
    """Keys compacted into brace patterns such as `layer4.{0,1}.bn2.{running_mean,running_var}`.

    At most `limit` lines, then a line `... and N more keys`.
    """
    patterns = [[[part] for part in k.split(".")] for k in dict.fromkeys(keys)]
    changed = True
    while changed:
        changed = False
        for pos in range(max((len(p) for p in patterns), default=0) - 1, -1, -1):
            patterns, merged = _merge_at(patterns, pos)
            changed = changed or merged
    lines = [".".join(_alternatives(part) for part in p) for p in patterns]
    if len(lines) <= limit:
        return lines
    rest = sum(_size(p) for p in patterns[limit:])
    return [*lines[:limit], f"... and {rest} more keys"]


def _merge_at(patterns: list[list[list[str]]], pos: int) -> tuple[list[list[list[str]]], bool]:
    """Merge patterns equal everywhere but at `pos` (same length): their alternatives join."""
    out: list[list[list[str]]] = []
    index: dict[tuple, list[list[str]]] = {}
    merged = False
    for p in patterns:
        if pos >= len(p):
            out.append(p)
            continue
        sig = (len(p), tuple(frozenset(c) if i != pos else None for i, c in enumerate(p)))
        if sig in index:
            target = index[sig][pos]
            target.extend(a for a in p[pos] if a not in target)
            merged = True
        else:
            index[sig] = [list(c) for c in p]
            out.append(index[sig])
    return out, merged


def _alternatives(options: list[str]) -> str:
    """One pattern component: `a`, `{a,b}`, or numbered ones as `{0..11}` / `layer_{0..31}`."""
    if len(options) == 1:
        return options[0]
    numbered = [re.fullmatch(r"(.*?)([1-9]\d*|0)", o) for o in options]
    stems = {m.group(1) for m in numbered if m}
    if len(options) >= 3 and all(numbered) and len(stems) == 1:
        numbers = sorted(int(m.group(2)) for m in numbered if m)
        return stems.pop() + "{" + ",".join(_runs(numbers)) + "}"
    return "{" + ",".join(options) + "}"


def _runs(numbers: list[int]) -> list[str]:
    """Consecutive integers as 'a..b' (three or more), the others as they are."""
    out: list[str] = []
    start = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        run = range(start, prev + 1)
        out += [f"{start}..{prev}"] if len(run) >= 3 else [str(i) for i in run]
        if n is not None:
            start = prev = n
    return out


def _size(pattern: list[list[str]]) -> int:
    n = 1
    for options in pattern:
        n *= len(options)
    return n


# --------------------------------------------------------------------------- loading


def load_tensors(ckpt: Checkpoint, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Real CPU tensors for `keys`: the mmap'd ones as they are, safetensors ones read now."""
    keys = list(keys)
    lazy = [k for k in keys if k in ckpt._stored and ckpt.tensors[k].is_meta]
    out = {k: ckpt.tensors[k] for k in keys if k not in set(lazy)}
    if lazy:
        from safetensors import safe_open

        try:
            with safe_open(ckpt.path, framework="pt", device="cpu") as f:
                out.update({k: f.get_tensor(ckpt._stored[k]) for k in lazy})
        except Exception as err:
            raise FinetunePrepError(
                f"checkpoint.path={ckpt.path} could not be read ({_first_line(str(err))[:120]}): "
                "was it changed or truncated since it was opened? Save or copy it again."
            ) from err
    return {k: out[k] for k in keys}


def load_into(
    model: nn.Module, ckpt: Checkpoint, fit: Fit, rebuild: Callable[[], nn.Module]
) -> None:
    """Load `fit.loaded` into the model (assigned on meta, copied on CPU), then give every
    tensor still on meta a fresh init: `reset_parameters()` or, failing that, `rebuild()`."""
    ties = _tied(model)
    current = model.state_dict(keep_vars=True)
    data = load_tensors(ckpt, fit.loaded)
    data = {k: v.to(current[k].dtype) for k, v in data.items()}  # no copy when dtypes agree
    assign = _versioned(model, {k: v for k, v in data.items() if current[k].is_meta})
    copy = _versioned(model, {k: v for k, v in data.items() if not current[k].is_meta})
    if assign:
        model.load_state_dict(assign, strict=False, assign=True)
    if copy:
        with torch.no_grad():
            model.load_state_dict(copy, strict=False)
    _retie(ties, set(fit.loaded))
    _materialize(model, rebuild)
    _retie(ties, set(fit.loaded))
    left = [n for n, t in _all_tensors(model) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device after loading: {left[:5]}")


def _versioned(model: nn.Module, tensors: dict[str, torch.Tensor]) -> OrderedDict:
    """A state dict carrying the model's module versions, so no legacy migration kicks in."""
    sd: OrderedDict = OrderedDict(tensors)
    sd._metadata = {name: {"version": getattr(m, "_version", 1)}  # type: ignore[attr-defined]
                    for name, m in model.named_modules()}
    return sd


Slot = tuple[nn.Module, str, str, str]  # (module, "_parameters"/"_buffers", attribute, full name)


def _slots(model: nn.Module) -> list[Slot]:
    """Every parameter and buffer slot, tied ones under each of their names."""
    out = []
    for prefix, module in model.named_modules(remove_duplicate=False):
        for kind in ("_parameters", "_buffers"):
            for attr, t in getattr(module, kind).items():
                if t is not None:
                    out.append((module, kind, attr, f"{prefix}.{attr}" if prefix else attr))
    return out


def _all_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(name, getattr(m, kind)[attr]) for m, kind, attr, name in _slots(model)]


def _tied(model: nn.Module) -> list[list[Slot]]:
    """Groups of slots that hold the same tensor object (tied weights)."""
    groups: dict[int, list[Slot]] = {}
    for slot in _slots(model):
        m, kind, attr, _ = slot
        groups.setdefault(id(getattr(m, kind)[attr]), []).append(slot)
    return [g for g in groups.values() if len({(id(s[0]), s[2]) for s in g}) > 1]


def _retie(ties: list[list[Slot]], loaded: set[str]) -> None:
    """Make each tied group share one tensor again: a loaded one if any, else a real one."""
    for group in ties:
        held = [(s, getattr(s[0], s[1])[s[2]]) for s in group]
        real = [(s, t) for s, t in held if not t.is_meta]
        best = next(((s, t) for s, t in real if s[3] in loaded), real[0] if real else None)
        if best is None:
            continue
        for m, kind, attr, _ in group:
            getattr(m, kind)[attr] = best[1]


def _materialize(model: nn.Module, rebuild: Callable[[], nn.Module]) -> None:
    """Real tensors for everything still on meta: reset leaf modules, copy the rest from a
    freshly built model (built once, only if needed)."""
    pending: list[Slot] = []
    for prefix, module in model.named_modules():
        slots = _slots_of(module, prefix)
        meta = [s for s in slots if getattr(module, s[1])[s[2]].is_meta]
        if not meta:
            continue
        if len(meta) == len(slots) and _resettable(module):
            if _reset(module):
                continue
            pending += slots
            continue
        for s in meta:
            if s[2] == "num_batches_tracked":  # an old checkpoint's BatchNorm: start counting at 0
                module._buffers[s[2]] = torch.tensor(0, dtype=torch.long)
            else:
                pending.append(s)
    if pending:
        _copy_fresh(pending, rebuild())


def _slots_of(module: nn.Module, prefix: str) -> list[Slot]:
    return [(module, kind, attr, f"{prefix}.{attr}" if prefix else attr)
            for kind in ("_parameters", "_buffers")
            for attr, t in getattr(module, kind).items() if t is not None]


def _resettable(module: nn.Module) -> bool:
    """A module with `reset_parameters` and no child holding tensors (so a reset stays local)."""
    children = any(next(c.parameters(), None) is not None or next(c.buffers(), None) is not None
                   for c in module.children())
    return callable(getattr(module, "reset_parameters", None)) and not children


def _reset(module: nn.Module) -> bool:
    """to_empty + reset_parameters on one module; False unless that set every tensor."""
    try:
        with torch.no_grad():
            module.to_empty(device="cpu", recurse=False)
            for t in _direct(module):
                _poison(t)
            module.reset_parameters()  # type: ignore[operator]
    except Exception:
        return False
    return not any(t.is_meta or _poisoned(t) for t in _direct(module))


def _direct(module: nn.Module) -> list[torch.Tensor]:
    return [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]


def _poison(t: torch.Tensor) -> None:
    """Fill a fresh tensor with a value no reset produces, to see what the reset left out."""
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    elif t.dtype != torch.bool:
        t.fill_(torch.iinfo(t.dtype).min)


def _poisoned(t: torch.Tensor) -> bool:
    if t.dtype == torch.bool:
        return True  # cannot tell: let the rebuilt model provide it
    if t.is_floating_point() or t.is_complex():
        return bool(torch.isnan(t).any())
    return t.numel() > 0 and bool((t == torch.iinfo(t.dtype).min).all())


def _copy_fresh(pending: list[Slot], fresh: nn.Module) -> None:
    """Put the freshly built model's tensors into the pending slots."""
    source = dict(_all_tensors(fresh))
    for module, kind, attr, name in pending:
        if name not in source:
            raise RuntimeError(f"rebuild() returned a model without {name}")
        new, old = source[name].detach(), getattr(module, kind)[attr]
        if kind == "_parameters":
            new = nn.Parameter(new, requires_grad=old.requires_grad)
        getattr(module, kind)[attr] = new
