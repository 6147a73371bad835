"""Fit a checkpoint to a model by names and shapes only, and explain a misfit in plain words
(missing/unexpected keys grouped into brace patterns by `group_keys`)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from finetune_prep.checkpoint.read import Checkpoint
from finetune_prep.checkpoint.unwrap import restore_prefix
from finetune_prep.errors import FinetunePrepError


@dataclass
class Fit:
    """How a checkpoint's keys and shapes meet a model's state dict."""

    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    skipped: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
    excluded: list[str]
    outside: list[str] = field(default_factory=list)  # not in the model, outside the prefix
    dropped: list[str] = field(default_factory=list)  # counters a FrozenBatchNorm2d drops


def fit_prefixes(ckpt: Checkpoint, model_shapes: Mapping[str, tuple[int, ...]]) -> Checkpoint:
    """The checkpoint with the prefixes stripped on a guess (`module.`, `model.`, ...) put back
    where the model's own names carry them: a model whose only child is named `model` (as
    ultralytics' are) loads its own state dict. Stripping stays where it fits more keys."""
    if not ckpt.guessed:
        return ckpt
    shapes = {k: tuple(t.shape) for k, t in ckpt.tensors.items()}
    back = restore_prefix(shapes, ckpt.guessed, model_shapes)
    if not back:
        return ckpt
    kept = next(n for n in range(len(ckpt.guessed) + 1) if "".join(ckpt.guessed[n:]) == back)
    return dataclasses.replace(
        ckpt,
        tensors={back + k: t for k, t in ckpt.tensors.items()},
        stored={back + k: v for k, v in ckpt.stored.items()},
        outside=[back + k for k in ckpt.outside],
        guessed=ckpt.guessed[:kept],
        steps=[*ckpt.steps, f"put prefix '{back}' back on every key: the model's own names "
                            "start with it"],
    )


def check_fit(
    ckpt_shapes: Mapping[str, tuple[int, ...]],
    model_shapes: Mapping[str, tuple[int, ...]],
    strict: bool,
    exclude: Sequence[str] = (),
    source: str = "checkpoint",
    outside: Sequence[str] = (),
) -> Fit:
    """Match checkpoint keys and shapes to the model's; raise if `strict` and anything is off.

    A missing BatchNorm `num_batches_tracked` (old checkpoints) never fails the strict check,
    nor do keys `outside` the checkpoint's prefix that the model lacks (a Lightning module's
    loss or metric state): they are listed as `fit.outside`.
    """
    fit = _match(ckpt_shapes, model_shapes, exclude)
    fit.dropped = frozen_norm_counters(fit.unexpected, model_shapes)
    aside = set(outside) | set(fit.dropped)
    fit.outside = [k for k in fit.unexpected if k in aside and k not in fit.dropped]
    fit.unexpected = [k for k in fit.unexpected if k not in aside]
    failing = [k for k in fit.missing if not k.endswith(".num_batches_tracked")]
    if not fit.loaded or (strict and (failing or fit.unexpected or fit.skipped)):
        raise FinetunePrepError(_fit_message(fit, ckpt_shapes, model_shapes, source))
    return fit


def frozen_norm_counters(unexpected: Iterable[str],
                         model_shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """The checkpoint's BatchNorm `num_batches_tracked` counters whose layer in the model has
    running statistics but no counter (torchvision's FrozenBatchNorm2d): its
    `_load_from_state_dict` drops them, so a BatchNorm checkpoint loads into the frozen model."""
    return [k for k in unexpected if k.endswith(".num_batches_tracked")
            and k.removesuffix("num_batches_tracked") + "running_mean" in model_shapes]


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
    aside = f", {len(fit.outside)} outside the model" if fit.outside else ""
    return (f"{len(fit.loaded)} keys fit, {len(fit.missing)} missing, "
            f"{len(fit.unexpected)} unexpected, {len(fit.skipped)} with a different shape{aside}")


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
    wanted = [k for k in model if k not in set(fit.excluded)]
    loaded = sum(math.prod(model[k]) for k in fit.loaded)
    total = sum(math.prod(model[k]) for k in wanted) or 1
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
    """How many keys a brace pattern stands for."""
    return math.prod(len(options) for options in pattern)
