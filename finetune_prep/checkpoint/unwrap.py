"""Unwrap a loaded checkpoint to a flat state dict: nested keys (NESTED order or
`checkpoint.key`), then wrapper and attribute prefixes (`module.`, `_orig_mod.`, `model.`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from finetune_prep.checkpoint import formats, safe_unpickle
from finetune_prep.errors import FinetunePrepError

NESTED = ("state_dict_ema", "model_ema", "state_dict", "model", "model_state", "module", "ema")
WRAPPERS = {"module.": "DataParallel/DDP", "_orig_mod.": "torch.compile"}
ATTRIBUTES = ("model.", "net.", "network.")  # Lightning-style: a LightningModule's attribute
MAX_NESTING = 32  # real checkpoints nest their weights a few dicts deep; deeper is a broken file


def unwrap(raw: Any, key: str | None, file: str, steps: list[str]) -> dict[str, torch.Tensor]:
    """The flat dict of tensors: at `key` if given, else auto-detected; non-tensors dropped."""
    if not isinstance(raw, Mapping):
        raise FinetunePrepError(
            f"checkpoint.path={file} holds {_describe(raw)}, not a dict of named tensors: save "
            "the weights with torch.save(model.state_dict(), path)."
        )
    if not key:
        formats.refuse_object(raw, file)
    obj = _take_key(raw, key, file, steps) if key else raw
    memo: dict[int, Any] = {}
    try:
        found = _auto(obj, [], memo)
        trail = found[1] if found else []
        others = [n for n in NESTED if trail and n not in trail and _auto_candidate(obj, n, memo)]
    except _TooDeep as deep:
        raise FinetunePrepError(_too_deep(deep.trail, key, file)) from None
    if found is None:
        raise FinetunePrepError(_no_tensors(obj, key, file))
    weights, trail = found
    if trail:
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


class _TooDeep(Exception):
    """Raised by `_auto` past MAX_NESTING levels (a deeper chain, or a dict that holds itself)."""

    def __init__(self, trail: list[str]) -> None:
        super().__init__(".".join(trail))
        self.trail = trail


def _auto(obj: Any, trail: list[str], memo: dict[int, Any]) -> tuple[Mapping, list[str]] | None:
    """Nested weights by the usual names first, then the dict itself if it holds tensors.

    `memo` maps id(dict) -> its result relative to that dict: a pickle may share one dict under
    several keys, and without it each level would double the work.
    """
    if id(obj) in memo:
        hit = memo[id(obj)]
        return None if hit is None else (hit[0], [*trail, *hit[1]])
    if len(trail) > MAX_NESTING:
        raise _TooDeep(trail)
    result = None
    for name in NESTED:
        value = obj.get(name) if isinstance(obj, Mapping) else None
        if isinstance(value, Mapping):
            found = _auto(value, [*trail, name], memo)
            if found is not None and (found[1] != [*trail, name] or _mostly_tensors(value)):
                result = found
                break
    if result is None and isinstance(obj, Mapping) and any(
            isinstance(v, torch.Tensor) for v in obj.values()):
        result = obj, trail
    memo[id(obj)] = None if result is None else (result[0], result[1][len(trail):])
    return result


def _auto_candidate(obj: Any, name: str, memo: dict[int, Any]) -> bool:
    value = obj.get(name) if isinstance(obj, Mapping) else None
    return isinstance(value, Mapping) and _auto(value, [], memo) is not None


def _too_deep(trail: list[str], key: str | None, file: str) -> str:
    where = f"checkpoint.key={key}" if key else f"checkpoint.path={file}"
    chain = ".".join(trail[:3]) + "..."
    return (f"{where} nests dicts more than {MAX_NESTING} levels deep (under '{chain}'), or a "
            "dict holds itself; no real checkpoint does, so the weights were not searched for "
            "further. Re-save the weights flat with torch.save(model.state_dict(), path), or set "
            "checkpoint.key to the dotted key of the dict that holds them.")


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
    if isinstance(value, (safe_unpickle.Foreign, safe_unpickle.Global)):
        return f"{value.name}, not loaded"
    return "None" if value is None else type(value).__name__


def _describe(value: Any) -> str:
    kind = _kind(value)
    return kind if kind == "None" else ("an " if kind[0] in "aeiouAEIOU" else "a ") + kind


def _names(keys: Sequence[str], n: int) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


# --------------------------------------------------------------------------- prefixes


class Renamed(NamedTuple):
    """What `strip_prefixes` did: old key -> new key, the new names of the keys outside the
    prefix, and the prefixes stripped on a guess (in order), which `fit_prefixes` may undo."""

    names: dict[str, str]
    outside: list[str]
    guessed: list[str]


def strip_prefixes(
    keys: list[str], prefix: str | None, steps: list[str], lightning: bool = False
) -> Renamed:
    """Old key -> new key after removing wrapper prefixes and the user's `prefix` (or, in a
    Lightning checkpoint, the attribute prefix most keys have), and the new names of the keys
    outside that prefix (a loss's `pos_weight`, metric states: not part of the model).

    Without a user prefix, a wrapper or attribute prefix every key has is stripped on a guess:
    it may be the model's own first name (a child named `model`), so it is listed in
    `guessed` and kept again by `fit_prefixes` when the model's names have it."""
    names = {k: k for k in keys}
    names = _drop_n_averaged(names, steps)
    outside: list[str] = []
    if prefix:
        if not any(k.startswith(prefix) for k in names.values()):
            names = _strip_all(names, steps, WRAPPERS)
        names, outside = _strip_user(names, prefix, steps)
    elif lightning:
        names = _strip_all(names, steps, WRAPPERS)
        main = _main_attribute(list(names.values()))
        if main:
            names, outside = _strip_user(names, main, steps, "a LightningModule attribute")
    guessed: list[str] = []
    names = _strip_all(names, steps, WRAPPERS if prefix else (*WRAPPERS, *ATTRIBUTES), guessed)
    return Renamed(names, [names[k] for k in outside if k in names], [] if prefix else guessed)


def restore_prefix(shapes: Mapping[str, tuple[int, ...]], guessed: Sequence[str],
                   model: Mapping[str, tuple[int, ...]]) -> str:
    """The guessed prefixes to put back (joined; '' for none): the shortest tail of `guessed`
    whose return makes the most keys fit the `model` by name and shape. The model's own state
    dict then always loads into it, and a wrapper's prefix stays stripped where the model
    lacks it."""
    def fitting(back: str) -> int:
        return sum(model.get(back + k) == tuple(v) for k, v in shapes.items())

    best, score = "", fitting("")
    for n in range(1, len(guessed) + 1):
        back = "".join(guessed[-n:])
        if (hits := fitting(back)) > score:
            best, score = back, hits
    return best


def _main_attribute(keys: list[str]) -> str | None:
    """The Lightning-style attribute prefix most (not all) keys have: the wrapped model."""
    for p in ATTRIBUTES:
        n = sum(k.startswith(p) for k in keys)
        if len(keys) > n and n * 2 > len(keys):
            return p
    return None


def _drop_n_averaged(names: dict[str, str], steps: list[str]) -> dict[str, str]:
    """torch.optim.swa_utils.AveragedModel adds a counter beside its `module.` weights."""
    rest = [k for k in names if k != "n_averaged"]
    if "n_averaged" in names and rest and all(k.startswith("module.") for k in rest):
        steps.append("dropped 'n_averaged' (the AveragedModel counter)")
        return {k: names[k] for k in rest}
    return names


def _strip_all(names: dict[str, str], steps: list[str], prefixes: Iterable[str],
               stripped: list[str] | None = None) -> dict[str, str]:
    """Strip, repeatedly, any of `prefixes` that every key has (wrappers before attributes);
    each prefix stripped is appended to `stripped`."""
    prefixes = list(prefixes)
    while names:
        hit = next((p for p in prefixes if all(v.startswith(p) for v in names.values())), None)
        if hit is None or any(v == hit for v in names.values()):
            return names
        why = WRAPPERS.get(hit, "a Lightning-style attribute prefix")
        steps.append(f"stripped prefix '{hit}' from all {len(names)} keys ({why})")
        names = {k: v[len(hit):] for k, v in names.items()}
        if stripped is not None:
            stripped.append(hit)
    return names


def _strip_user(names: dict[str, str], prefix: str, steps: list[str],
                why: str = "checkpoint.prefix") -> tuple[dict[str, str], list[str]]:
    """Strip the user's prefix from every key that has it; an error if none has it. Also
    returns the keys without it (kept, but outside the model unless the model has them)."""
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
    outside = [k for k, v in names.items() if not v.startswith(prefix)]
    rest = (f" ({len(outside)} keys without it kept as they are, outside the model unless it "
            f"has them: {_names([names[k] for k in outside], 3)})" if outside else "")
    scope = f"all {len(hits)}" if not outside else f"{len(hits)} of {len(values)}"
    steps.append(f"stripped prefix '{prefix}' from {scope} keys ({why}){rest}")
    return new, outside
