"""torch.distributed.checkpoint (DCP) folders: `.metadata` plus `__R_N.distcp` data files.

torch's own `FileSystemReader.read_metadata` unpickles `.metadata` with plain `pickle.load`,
which would run whatever the file names. Here `.metadata` goes through the restricted
unpickler, and its records are turned back into DCP's metadata dataclasses field by field
(names, shapes, dtypes, file offsets; nothing else is accepted). Verification needs only that;
loading hands the rebuilt metadata to torch's own reader (`dcp.load(no_dist=True)`, one
process, no process group), which reads each tensor with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import math
import os
import pickle
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from finetune_prep.checkpoint import integrity, safe_unpickle
from finetune_prep.errors import FinetunePrepError

METADATA = ".metadata"
MAX_METADATA_BYTES = 1 << 30  # a million-tensor checkpoint's .metadata is far smaller
MAX_ELEMENTS = 1 << 48  # no tensor has more elements (2^48 fp32 = 1 PiB)
MAX_RANK = 64  # torch's own limit on tensor dimensions
PAIRWISE_CHUNKS = 4096  # above this, only chunks split along one dimension are checked
_M = "torch.distributed.checkpoint.metadata."


class NonTensor:
    """A non-tensor entry of a DCP checkpoint (a step counter, an RNG state): never read."""

    def __repr__(self) -> str:
        return "<non-tensor DCP entry>"


def is_dcp_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, METADATA))


def shard_folder(file: str) -> str | None:
    """The DCP folder a `.distcp` data file belongs to, if it looks like one."""
    folder = os.path.dirname(os.path.abspath(file))
    if file.endswith(".distcp") or is_dcp_folder(folder) and \
            os.path.basename(file).startswith("__"):
        return folder
    return None


def read_metadata(folder: str) -> Any:
    """DCP's `Metadata` of a folder, read without running anything `.metadata` names."""
    path = os.path.join(folder, METADATA)
    record = safe_unpickle.Record()
    try:
        raw = safe_unpickle.loads(integrity.read_regular(path, MAX_METADATA_BYTES), record)
        if record.dangerous:
            raise FinetunePrepError(
                f"checkpoint.path={folder}: its {METADATA} was refused because it names "
                f"{record.dangerous[0]}, which would run code if unpickled normally (as torch's "
                "own reader does). Nothing in it was run; do not use this checkpoint.")
        meta = _metadata(raw)
    except FinetunePrepError:
        raise
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError,
            IndexError, AttributeError, UnicodeDecodeError, RecursionError, MemoryError,
            OverflowError) as err:
        raise FinetunePrepError(
            f"checkpoint.path={folder} is a torch.distributed.checkpoint folder whose {METADATA} "
            f"is truncated or corrupt ({type(err).__name__}: {str(err)[:200]}): save it again."
        ) from err
    check_layout(folder, meta)
    return meta


def open_dcp(folder: str) -> tuple[dict[str, Any], dict[int, tuple[str, str]], list[str]]:
    """The nested dict of meta tensors (as saved: `{"model": {...}}`), each meta tensor's id ->
    (folder, DCP name), and the data files; checks every tensor's bytes are in its file."""
    meta = read_metadata(folder)
    tensors: dict[str, Any] = {}
    stored: dict[int, tuple[str, str]] = {}
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    for fqn, item in meta.state_dict_metadata.items():
        path = (meta.planner_data or {}).get(fqn, (fqn,))
        if isinstance(item, TensorStorageMetadata):
            value: Any = torch.empty(tuple(item.size), dtype=item.properties.dtype,
                                     device="meta")
            stored[id(value)] = (folder, fqn)
        else:
            value = NonTensor()
        _put(tensors, [str(p) for p in path], value)
    files = _check_data(folder, meta)
    return tensors, stored, files


def _put(tree: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        nxt = tree.setdefault(part, {})
        tree = nxt if isinstance(nxt, dict) else tree
    tree[path[-1]] = value


def _check_data(folder: str, meta: Any) -> list[str]:
    """Every data file exists and holds the byte ranges the metadata gives it."""
    sizes: dict[str, int] = {}
    for index, info in meta.storage_data.items():
        rel = info.relative_path
        if rel not in sizes:
            sizes[rel] = _data_size(folder, rel, index.fqn)
        if info.offset + info.length > sizes[rel]:
            raise FinetunePrepError(
                f"checkpoint.path={folder}: data file {rel} is truncated or corrupt: "
                f"'{index.fqn}' needs bytes {info.offset}..{info.offset + info.length} but the "
                f"file has {sizes[rel]}. Copy or save the checkpoint again.")
    return [os.path.join(folder, METADATA), *(os.path.join(folder, rel) for rel in sizes)]


def _data_size(folder: str, rel: str, fqn: str) -> int:
    """The size of a data file, checked to be a regular file (opened without blocking)."""
    try:
        fd = integrity.open_regular(os.path.join(folder, rel), f"{folder}: data file {rel}",
                                    remedy=integrity.IN_FOLDER)
    except FileNotFoundError as err:
        raise FinetunePrepError(
            f"checkpoint.path={folder}: data file {rel} is missing (its {METADATA} "
            f"needs it for {fqn}): copy every file of the folder.") from err
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def check_layout(folder: str, meta: Any) -> None:
    """Every tensor's chunks lie inside it and tile it exactly, each with a data record:
    torch's reader fills a tensor chunk by chunk, so an element no chunk covers would keep
    whatever memory it had (garbage taken as weights) and an overlap hides a conflict."""
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

    for fqn, item in meta.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):
            continue
        problem = chunk_problem(item.size, [(c.offsets, c.sizes) for c in item.chunks])
        if not problem:
            missing = [c for c in item.chunks
                       if MetadataIndex(fqn, c.offsets) not in meta.storage_data]
            if missing:
                problem = (f"its chunk at offsets {list(missing[0].offsets)} has no data "
                           "record")
        if problem:
            raise FinetunePrepError(
                f"checkpoint.path={folder}: tensor '{fqn}' of this torch.distributed.checkpoint "
                f"folder is not stored whole: {problem}. Loading it would give the model "
                "uninitialized memory as weights; save the checkpoint again (every rank's "
                "files and its .metadata together).")


def chunk_problem(size: tuple[int, ...], chunks: list[tuple[tuple[int, ...], tuple[int, ...]]]
                  ) -> str:
    """What is wrong with chunks (offsets, sizes) meant to tile a tensor of `size`, or ''."""
    total = math.prod(size)
    if total > MAX_ELEMENTS:
        return f"its size {list(size)} is impossible ({total} elements)"
    for offsets, sizes in chunks:
        if len(offsets) != len(size) or len(sizes) != len(size):
            return (f"a chunk (offsets {list(offsets)}, sizes {list(sizes)}) does not have the "
                    f"tensor's {len(size)} dimensions")
        if any(o + n > d for o, n, d in zip(offsets, sizes, size, strict=True)):
            return (f"a chunk (offsets {list(offsets)}, sizes {list(sizes)}) reaches outside "
                    f"its size {list(size)}")
    covered = sum(math.prod(n) for _, n in chunks)
    overlap = _overlap(size, [c for c in chunks if math.prod(c[1])])
    if overlap:
        return overlap
    if covered != total:
        return f"its chunks cover {covered} of its {total} elements"
    return ""


def _overlap(size: tuple[int, ...], chunks: list[tuple[tuple[int, ...], tuple[int, ...]]]
             ) -> str:
    """Two non-empty chunks that share an element, described, or ''."""
    if len(chunks) > PAIRWISE_CHUNKS:  # many ranks: chunks split along one dimension only
        split = [d for d in range(len(size))
                 if any(o[d] != 0 or n[d] != size[d] for o, n in chunks)]
        if len(split) > 1:
            return (f"its {len(chunks)} chunks split it along several dimensions, too many "
                    "to check")
        d = split[0] if split else 0
        ordered = sorted(chunks, key=lambda c: c[0][d])
        pairs = zip(ordered, ordered[1:], strict=False)
        clash = next(((a, b) for a, b in pairs if a[0][d] + a[1][d] > b[0][d]), None)
    else:
        clash = next(((a, b) for i, a in enumerate(chunks) for b in chunks[i + 1:]
                      if all(oa < ob + nb and ob < oa + na for oa, na, ob, nb
                             in zip(a[0], a[1], b[0], b[1], strict=True))), None)
    if clash is None:
        return ""
    (oa, _), (ob, _) = clash
    return f"its chunks at offsets {list(oa)} and {list(ob)} overlap"


def load(folder: str, wanted: Mapping[str, str], dtypes: Mapping[str, torch.dtype],
         shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Tensors `key -> DCP name` read by torch's DCP reader on this process alone."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    meta = read_metadata(folder)

    class Reader(dcp.FileSystemReader):  # torch's reader, with the metadata read safely
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return meta

    planner_data = meta.planner_data or {}
    state: dict[str, Any] = {}
    out: dict[str, torch.Tensor] = {}
    for key, fqn in wanted.items():
        out[key] = torch.empty(shapes[key], dtype=dtypes[key])
        _put(state, [str(p) for p in planner_data.get(fqn, (fqn,))], out[key])
    try:
        with warnings.catch_warnings():  # "torch.distributed is disabled ...": we know
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=Reader(folder), no_dist=True)
    except (Exception, CheckpointException) as err:  # CheckpointException: a BaseException
        raise FinetunePrepError(
            f"checkpoint.path={folder} could not be read by torch.distributed.checkpoint "
            f"({_cause(err)}): was it changed since it was opened? Copy or save it again."
        ) from err
    return out


def _cause(err: BaseException) -> str:
    """'Type: first line' of what went wrong, looking inside DCP's per-rank exception."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        err = inner[0] if isinstance(inner, tuple) and inner else inner
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:160] if text else ''}"


# --------------------------------------------------------------------------- records -> metadata


def _state(rec: Any, name: str) -> Any:
    if not isinstance(rec, safe_unpickle.Foreign) or rec.name != name:
        got = rec.name if isinstance(rec, safe_unpickle.Foreign) else type(rec).__name__
        raise ValueError(f"expected {name}, got {got}")
    if len(rec.state) != 1 or rec.args or rec.items:
        raise ValueError(f"unexpected form of {name}")
    return rec.state[0]


def _fields(rec: Any, name: str) -> dict[str, Any]:
    state = _state(rec, name)
    if isinstance(state, tuple) and len(state) == 2 and state[0] is None:
        state = state[1]  # a slots dataclass: (None, {slot: value})
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"unexpected state of {name}")
    return state


def _size(value: Any) -> torch.Size:
    if not isinstance(value, (torch.Size, tuple, list)) or len(value) > MAX_RANK or not all(
            type(d) is int and 0 <= d <= MAX_ELEMENTS for d in value):
        raise ValueError(f"not a size: {value!r:.80}")
    return torch.Size(value)


def _int(value: Any) -> int:
    if type(value) is not int or not 0 <= value < 1 << 63:
        raise ValueError(f"not a non-negative int: {value!r:.80}")
    return value


def _metadata(raw: Any) -> Any:
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex

    f = _fields(raw, _M + "Metadata")
    items = f.get("state_dict_metadata")
    if not isinstance(items, dict):
        raise ValueError("no state_dict_metadata")
    state_dict_metadata = {str(k): _item(v) for k, v in items.items()}
    storage: dict[Any, Any] = {}
    for k, v in (f.get("storage_data") or {}).items():
        ki = _fields(k, _M + "MetadataIndex")
        vi = _fields(v, "torch.distributed.checkpoint.filesystem._StorageInfo")
        rel = vi.get("relative_path")
        if not isinstance(rel, str) or os.path.basename(rel) != rel or "\0" in rel or \
                rel in ("", ".", ".."):
            raise ValueError(f"bad data file name {rel!r:.80}")
        if vi.get("transform_descriptors"):
            raise ValueError("transformed (compressed or encrypted) data is not supported")
        offset = ki.get("offset")
        index = MetadataIndex(str(ki["fqn"]), None if offset is None else _size(offset),
                              None if ki.get("index") is None else _int(ki["index"]))
        storage[index] = _StorageInfo(rel, _int(vi["offset"]), _int(vi["length"]))
    planner_data = _planner(f.get("planner_data"), state_dict_metadata)
    return Metadata(state_dict_metadata=state_dict_metadata, planner_data=planner_data,
                    storage_data=storage)


def _planner(planner: Any, items: Mapping[str, Any]) -> dict[str, tuple] | None:
    """DCP's planner data (each flat name -> its path in the nested state dict), checked: a
    path is a non-empty tuple of names or indices, and no path is another's or inside it."""
    if planner is None:
        return None
    if not isinstance(planner, dict):
        raise ValueError(f"planner_data is {type(planner).__name__}, not a dict")
    seen: dict[tuple[str, ...], str] = {}
    for fqn, path in planner.items():
        if not isinstance(fqn, str) or not isinstance(path, tuple) or \
                not all(isinstance(p, (str, int)) for p in path):
            raise ValueError(f"planner_data entry {fqn!r:.80} is not a path of names")
        if not path:
            raise ValueError(f"planner_data gives '{fqn:.80}' an empty path")
        if ".".join(map(str, path)) != fqn:  # DCP names each entry by its joined path
            raise ValueError(f"planner_data puts '{fqn:.80}' at "
                             f"'{'.'.join(map(str, path)):.80}'")
        seen[tuple(map(str, path))] = fqn
    for path, fqn in seen.items():
        for i in range(1, len(path)):
            if path[:i] in seen:
                raise ValueError(f"planner_data puts '{fqn:.80}' inside "
                                 f"'{seen[path[:i]]:.80}'")
    if len(seen) != len(planner):
        raise ValueError("planner_data gives two entries the same path")
    unknown = [k for k in planner if k not in items]
    if unknown:
        raise ValueError(f"planner_data names '{unknown[0]:.80}', which has no metadata")
    return planner


def _item(rec: Any) -> Any:
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        TensorProperties,
        TensorStorageMetadata,
    )

    if isinstance(rec, safe_unpickle.Foreign) and rec.name == _M + "BytesStorageMetadata":
        return BytesStorageMetadata()
    f = _fields(rec, _M + "TensorStorageMetadata")
    props = _state(f["properties"], _M + "TensorProperties")
    dtype = props[0] if isinstance(props, tuple) and props else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError("tensor without a dtype")
    chunks = []
    for c in f.get("chunks") or []:
        cf = _fields(c, _M + "ChunkStorageMetadata")
        chunks.append(ChunkStorageMetadata(_size(cf["offsets"]), _size(cf["sizes"])))
    return TensorStorageMetadata(TensorProperties(dtype=dtype), _size(f["size"]), chunks)
