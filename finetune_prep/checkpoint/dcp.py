"""torch.distributed.checkpoint (DCP) folders: `.metadata` plus `__R_N.distcp` data files.

torch's own `FileSystemReader.read_metadata` unpickles `.metadata` with plain `pickle.load`,
which would run whatever the file names. Here `.metadata` goes through the restricted
unpickler, and its records are turned back into DCP's metadata dataclasses field by field
(names, shapes, dtypes, file offsets; nothing else is accepted). Verification needs only that;
loading hands the rebuilt metadata to torch's own reader (`dcp.load(no_dist=True)`, one
process, no process group), which reads each tensor with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from finetune_prep.checkpoint import safe_unpickle
from finetune_prep.errors import FinetunePrepError

METADATA = ".metadata"
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
        with open(path, "rb") as f:
            raw = safe_unpickle.loads(f.read(), record)
        if record.dangerous:
            raise FinetunePrepError(
                f"checkpoint.path={folder}: its {METADATA} was refused because it names "
                f"{record.dangerous[0]}, which would run code if unpickled normally (as torch's "
                "own reader does). Nothing in it was run; do not use this checkpoint.")
        return _metadata(raw)
    except FinetunePrepError:
        raise
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError,
            IndexError, AttributeError, UnicodeDecodeError) as err:
        raise FinetunePrepError(
            f"checkpoint.path={folder} is a torch.distributed.checkpoint folder whose {METADATA} "
            f"is truncated or corrupt ({type(err).__name__}: {err}): save it again.") from err


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
            file = os.path.join(folder, rel)
            if not os.path.isfile(file):
                raise FinetunePrepError(
                    f"checkpoint.path={folder}: data file {rel} is missing (its {METADATA} "
                    f"needs it for {index.fqn}): copy every file of the folder.")
            sizes[rel] = os.path.getsize(file)
        if info.offset + info.length > sizes[rel]:
            raise FinetunePrepError(
                f"checkpoint.path={folder}: data file {rel} is truncated or corrupt: "
                f"'{index.fqn}' needs bytes {info.offset}..{info.offset + info.length} but the "
                f"file has {sizes[rel]}. Copy or save the checkpoint again.")
    return [os.path.join(folder, METADATA), *(os.path.join(folder, rel) for rel in sizes)]


def load(folder: str, wanted: Mapping[str, str], dtypes: Mapping[str, torch.dtype],
         shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Tensors `key -> DCP name` read by torch's DCP reader on this process alone."""
    import torch.distributed.checkpoint as dcp

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
    except Exception as err:
        raise FinetunePrepError(
            f"checkpoint.path={folder} could not be read by torch.distributed.checkpoint "
            f"({type(err).__name__}: {str(err).strip().splitlines()[0][:160] if str(err) else ''}"
            "): was it changed since it was opened? Copy or save it again.") from err
    return out


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
    if not isinstance(value, (torch.Size, tuple, list)) or not all(
            isinstance(d, int) and d >= 0 for d in value):
        raise ValueError(f"not a size: {value!r:.80}")
    return torch.Size(value)


def _int(value: Any) -> int:
    if not isinstance(value, int) or value < 0:
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
        if not isinstance(rel, str) or os.path.basename(rel) != rel or rel in ("", ".", ".."):
            raise ValueError(f"bad data file name {rel!r:.80}")
        if vi.get("transform_descriptors"):
            raise ValueError("transformed (compressed or encrypted) data is not supported")
        offset = ki.get("offset")
        index = MetadataIndex(str(ki["fqn"]), None if offset is None else _size(offset),
                              None if ki.get("index") is None else _int(ki["index"]))
        storage[index] = _StorageInfo(rel, _int(vi["offset"]), _int(vi["length"]))
    planner = f.get("planner_data")
    planner_data = None
    if isinstance(planner, dict) and all(
            isinstance(k, str) and isinstance(v, tuple) and all(isinstance(p, (str, int))
                                                                 for p in v)
            for k, v in planner.items()):
        planner_data = planner
    return Metadata(state_dict_metadata=state_dict_metadata, planner_data=planner_data,
                    storage_data=storage)


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
