"""A process-level cache of meta-built models and opened checkpoints.

In a basic-launcher multirun every job runs in this one process; jobs that share the model
and head config, or the checkpoint, reuse the meta model and the checkpoint's index instead of
building and opening them again. What is cached never holds real weights:

- models: the meta-built `BuiltModel`. The first call gets the model it built, uncopied (a
  single run copies nothing); a second call with the same config builds a master that no job
  touches, and it and every later call get their own `copy.deepcopy` of it (cheap: no tensor
  data), so setting requires_grad or loading real tensors never reaches the next job;
- checkpoints: the opened `Checkpoint` (mmap'd or header-only tensors) for planning only; a
  run that materializes re-reads the file, so weights it hands out (and may train in place)
  are never shared. The key holds the file's size, mtime, ctime and inode, and a hit is
  checked against every file it was read from (shards, DCP data), so a file rewritten between
  calls is read again.

Both are small LRUs; `clear()` empties them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from finetune_prep import checkpoint
from finetune_prep.config import to_plain
from finetune_prep.errors import FinetunePrepError
from finetune_prep.model.build import build_architecture
from finetune_prep.model.describe import BuiltModel

MAX_ENTRIES = 4
T = TypeVar("T")
_models: OrderedDict[Hashable, BuiltModel] = OrderedDict()
_lent: set[Hashable] = set()  # keys whose cached model was handed out itself (a first call's)
_checkpoints: OrderedDict[Hashable, checkpoint.Checkpoint] = OrderedDict()


def build_meta_model(model_cfg: Any, head_cfg: Any) -> BuiltModel:
    """`build_model(model_cfg, head_cfg, meta=True)`, built once per config: a fresh copy."""
    key = _model_key(model_cfg, head_cfg)

    def build() -> BuiltModel:
        return build_architecture(model_cfg, head_cfg, meta=True)

    if key is None:
        return build()
    if key not in _models:  # the first call: its own model, and its table for meta_table
        _lent.add(key)
        return _get(_models, key, build)
    if key in _lent:  # the first call's model may have been changed: build the master
        _lent.discard(key)
        _models[key] = build()
    master = _get(_models, key, build)
    return dataclasses.replace(master, model=copy.deepcopy(master.model))


def meta_table(model_cfg: Any, head_cfg: Any) -> Any:
    """The ParamTable of the cached meta model (no copy: a table is never changed, even where
    its model was handed out)."""
    key = _model_key(model_cfg, head_cfg)
    if key is None:
        return build_architecture(model_cfg, head_cfg, meta=True).table
    return _get(_models, key, lambda: build_architecture(model_cfg, head_cfg, meta=True)).table


def read_checkpoint(
    path: str | os.PathLike, key: str | None = None, prefix: str | None = None
) -> checkpoint.Checkpoint:
    """`checkpoint.read_checkpoint`, opened once per file version (for planning only)."""
    try:
        st = os.stat(os.path.expanduser(os.fspath(path)))
    except (OSError, TypeError, ValueError):
        return checkpoint.read_checkpoint(path, key=key, prefix=prefix)  # its own message
    ident = (os.path.realpath(os.path.expanduser(os.fspath(path))), key, prefix,
             st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
    cached = _checkpoints.get(ident)
    if cached is not None and not _unchanged(cached):  # a shard or DCP file of a folder
        del _checkpoints[ident]
    return _get(_checkpoints, ident,
                lambda: checkpoint.read_checkpoint(path, key=key, prefix=prefix))


def _unchanged(ckpt: checkpoint.Checkpoint) -> bool:
    """Every file the checkpoint was read from is still the same (size, mtime, inode)."""
    try:
        checkpoint.integrity.check_unchanged(ckpt.files, ckpt.path)
    except FinetunePrepError:
        return False
    return True


def clear() -> None:
    """Forget every cached model and checkpoint."""
    _models.clear()
    _lent.clear()
    _checkpoints.clear()


def _get(store: OrderedDict[Hashable, T], key: Hashable, make: Callable[[], T]) -> T:
    if key in store:
        store.move_to_end(key)
        return store[key]
    value = store[key] = make()
    while len(store) > MAX_ENTRIES:
        _lent.discard(store.popitem(last=False)[0])
    return value


def _model_key(model_cfg: Any, head_cfg: Any) -> Hashable | None:
    """The resolved model and head config; for a `_target_` model also the class object itself
    (so a class redefined in a notebook is built again). None: do not cache."""
    try:
        plain = [to_plain(c) for c in (model_cfg, head_cfg)]
        key: tuple = (json.dumps(plain, sort_keys=True),)
    except Exception:  # unresolvable or not JSON-able: build it uncached, with its own errors
        return None
    if plain[0].get("source") == "hf":  # the folder's config.json, as it is now
        config = os.path.join(os.path.expanduser(str(plain[0].get("arch"))), "config.json")
        with contextlib.suppress(OSError):
            st = os.stat(config)
            key += (st.st_size, st.st_mtime_ns, st.st_ino)
    if plain[0].get("source") == "target":
        from hydra.utils import get_object

        try:
            key += (id(get_object(str(plain[0]["target"]["_target_"]))),)
        except Exception:
            return None
    return key
