"""Hugging Face sharded checkpoints and model folders.

An index (`model.safetensors.index.json`, `pytorch_model.bin.index.json`) maps every tensor
name to its shard file: `{"metadata": {...}, "weight_map": {name: shard}}`. Opening it reads
only the shards' headers (safetensors) or their mmap'd metadata (torch .bin) and checks that
the index and the shards agree: a shard it lists that is missing, a shard of the same set that
it does not list, a tensor in the wrong shard are errors naming the file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable

import torch

from finetune_prep.checkpoint import integrity
from finetune_prep.errors import FinetunePrepError

INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLES = ("model.safetensors", "pytorch_model.bin")
SHARD = re.compile(r"(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)(?P<ext>\.[A-Za-z]+)$")

ShardOpener = Callable[[str], dict[str, torch.Tensor]]
MAX_INDEX_BYTES = 64 << 20  # a million-tensor index is about 100 MB less than this
MAX_DEPTH = 32  # an index is {"metadata": {...}, "weight_map": {name: file}}: depth 2 or 3


def resolve_folder(folder: str) -> str | None:
    """What a folder given as checkpoint.path stands for: a DCP folder (itself), a shard
    index, or a single model file; None when it holds none of them."""
    names = set(os.listdir(folder))
    if ".metadata" in names:
        return folder
    for name in (*INDEXES, *SINGLES):
        if name in names:
            return os.path.join(folder, name)
    others = sorted(n for n in names if n.endswith(".index.json"))
    if len(others) == 1:
        return os.path.join(folder, others[0])
    return None


def index_listing(file: str) -> str | None:
    """The index beside `file` that lists it as a shard, if there is one."""
    if not SHARD.match(os.path.basename(file)):
        return None
    folder = os.path.dirname(os.path.abspath(file))
    for name in sorted(os.listdir(folder)):
        if name.endswith(".index.json"):
            try:
                listed = read_index(os.path.join(folder, name)).get("weight_map", {}).values()
            except (OSError, ValueError, AttributeError, FinetunePrepError):
                continue
            if os.path.basename(file) in set(listed):
                return os.path.join(folder, name)
    return None


def open_index(index: str, open_shard: ShardOpener) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every tensor of a sharded checkpoint (meta or mmap'd) and the shard files, in order."""
    weight_map = _weight_map(index)
    folder = os.path.dirname(os.path.abspath(index))
    shards = list(dict.fromkeys(weight_map.values()))
    _check_shard_set(index, folder, shards)
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        file = os.path.join(folder, shard)
        held = open_shard(file)
        listed = [k for k, s in weight_map.items() if s == shard]
        lacking = [k for k in listed if k not in held]
        if lacking:
            raise FinetunePrepError(
                f"checkpoint.path={index}: the index puts {len(lacking)} tensors in {shard} "
                f"that it does not hold (e.g. {', '.join(lacking[:3])}): the index and the "
                "shards come from different saves; download or save them again together.")
        unlisted = [k for k in held if weight_map.get(k) != shard]
        if unlisted:
            raise FinetunePrepError(
                f"checkpoint.path={index}: shard {shard} holds {len(unlisted)} tensors the "
                f"index does not assign to it (e.g. {', '.join(unlisted[:3])}): the index and "
                "the shards come from different saves; download or save them again together.")
        tensors.update({k: held[k] for k in listed})
    return tensors, [os.path.join(folder, s) for s in shards]


def read_index(index: str) -> object:
    """An index file's JSON, refused (one message) when it is huge or nested deeper than any
    index is: the size is checked before reading, the depth before parsing."""
    data = integrity.read_regular(index, MAX_INDEX_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise FinetunePrepError(
            f"checkpoint.path={index} is not a readable shard index (not UTF-8 text: {err}): "
            "download or save it again.") from err
    depth = json_depth(text)
    if depth > MAX_DEPTH:
        raise FinetunePrepError(
            f"checkpoint.path={index} is not a shard index: it nests {depth} levels deep "
            f"(an index has 2 or 3, at most {MAX_DEPTH} are read). Download or save it again.")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        raise FinetunePrepError(
            f"checkpoint.path={index} is not a readable shard index ({str(err)[:160]}): "
            "download or save it again.") from err


def json_depth(text: str) -> int:
    """How deeply JSON text nests arrays and objects (brackets inside strings skipped)."""
    depth = deepest = 0
    for token in re.finditer(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', text):
        t = token.group()
        if t in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif t in "]}":
            depth -= 1
    return deepest


def _weight_map(index: str) -> dict[str, str]:
    try:
        data = read_index(index)
    except OSError as err:
        raise FinetunePrepError(
            f"checkpoint.path={index} is not a readable shard index ({err}): download or save "
            "it again.") from err
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise FinetunePrepError(
            f"checkpoint.path={index} is not a shard index: it has no \"weight_map\" of tensor "
            "names to shard files. Give the index written with the shards "
            "(model.safetensors.index.json or pytorch_model.bin.index.json).")
    bad = [s for s in weight_map.values()
           if os.path.basename(s) != s or "\0" in s or s in ("", ".", "..")]
    if bad:
        raise FinetunePrepError(
            f"checkpoint.path={index}: shard names must be files beside the index, got {bad[0]!r}.")
    return weight_map


def _check_shard_set(index: str, folder: str, shards: list[str]) -> None:
    """Every listed shard exists; no file of the same numbered set is left out of the index."""
    missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
    if missing:
        raise FinetunePrepError(
            f"checkpoint.path={index}: shard {missing[0]} is missing from {folder}"
            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: download or "
            "copy every shard the index lists.")
    sets = {(m["stem"], m["n"], m["ext"]) for s in shards if (m := SHARD.match(s))}
    listed = set(shards)
    for name in sorted(os.listdir(folder)):
        m = SHARD.match(name)
        if m and (m["stem"], m["n"], m["ext"]) in sets and name not in listed:
            raise FinetunePrepError(
                f"checkpoint.path={index}: {name} in {folder} looks like a shard of this "
                "checkpoint but the index does not list it: the index and the shards come from "
                "different saves (or the index is incomplete); download or save them again.")
    for stem, n, ext in sets:
        count = sum(1 for s in shards if (m := SHARD.match(s)) and (m["stem"], m["n"],
                                                                   m["ext"]) == (stem, n, ext))
        if count != int(n):
            raise FinetunePrepError(
                f"checkpoint.path={index}: the shards are named '-of-{n}' but the index lists "
                f"{count} of them: the index is incomplete; download or save it again.")
