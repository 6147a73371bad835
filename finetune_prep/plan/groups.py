"""Optimizer groups: absolute lr and weight_decay per trainable parameter, merged when equal.

Every group carries concrete numbers (never a scale that only one scheduler applies), frozen
parameters are in no group, and the order is the model's, so the same config gives the same
groups, byte for byte.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from finetune_prep.config import F32_MAX, F32_TINY, LR_FIX, check_optim, group_rules, patterns
from finetune_prep.errors import FinetunePrepError
from finetune_prep.plan.rules import match_all, select_all
from finetune_prep.plan.table import GRANULARITIES, ParamTable


@dataclass(frozen=True)
class Setting:
    """The hyperparameters of one parameter and why it has them."""

    lr: float
    weight_decay: float
    label: str  # what placed it (head, backbone, layer3, stage3, a group rule's name)
    no_decay: bool  # weight decay switched off by optim.no_decay
    reasons: tuple[str, ...]
    layer: int  # layer id (optim.layer_decay_granularity); groups record it per parameter
    by_layer: bool = False  # layer decay is on: one group per layer
    depth: int = 0  # layer decay: layers below the head (lr = lr * decay ** depth)
    no_decay_by: str = ""  # the optim.no_decay pattern that switched weight decay off


def build_groups(
    table: ParamTable, trainable: Sequence[str], optim: Any
) -> list[dict[str, Any]]:
    """Optimizer groups for the trainable parameters: [{name, lr, weight_decay, params, ...}]."""
    _check_numbers(optim)
    settings = assign(table, trainable, optim)
    groups = merge(settings, float(optim.lr), optim.layer_decay)
    check_groups(groups, optim)
    return groups


def assign(table: ParamTable, trainable: Sequence[str], optim: Any) -> dict[str, Setting]:
    """Each trainable parameter's lr and weight decay: group rules, layer decay, no-decay.

    Layer decay gives layer k of n (0 the stem, n-1 the head) lr * decay ** (n-1-k), the
    effective lr of timm's `param_groups_layer_decay` (which stores the factor as lr_scale).
    """
    rules = _group_rules(table, group_rules(optim.groups))
    no_decay = _pattern_union(table, patterns(optim.no_decay, "optim.no_decay"))
    decay = optim.layer_decay
    granularity = granularity_of(optim)
    layers = table.layer_ids(granularity)
    top = max(layers.values(), default=0)  # the head's layer: all parameters count, frozen too
    settings = {}
    for name in trainable:
        lr, wd = float(optim.lr), float(optim.weight_decay)
        label, reasons = _base_label(table, name, layers[name], top, decay, granularity), []
        if decay is not None:
            depth = top - layers[name]
            lr *= decay**depth
            reasons.append(f"layer_decay {decay}^{depth}")
        if rule := rules.get(name):
            where, cfg = rule
            lr, wd = lr * cfg.lr_mult, wd * cfg.wd_mult
            label = f"{label}/{cfg.name or cfg.match}" if decay is not None \
                else cfg.name or cfg.match
            reasons.append(f"{where} ({cfg.match})")
        off = name in no_decay and wd != 0.0
        if off:
            wd = 0.0
            reasons.append(f"optim.no_decay ({no_decay[name]})")
        settings[name] = Setting(lr, wd, label, off, tuple(reasons), layers[name],
                                 decay is not None, top - layers[name],
                                 no_decay[name] if off else "")
    return settings


def merge(settings: Mapping[str, Setting], base_lr: float,
          decay: float | None = None) -> list[dict[str, Any]]:
    """One group per distinct (lr, weight_decay) (and layer, under layer decay), named by its
    labels, params in model order, each parameter's layer id beside it; under layer decay
    (`decay`) each group records its factor and depth as data."""
    groups: dict[tuple, dict[str, Any]] = {}
    for name, s in settings.items():
        key = (s.lr, s.weight_decay, s.layer if s.by_layer else None)
        group = groups.setdefault(
            key,
            {"labels": [], "lr": s.lr, "weight_decay": s.weight_decay, "reasons": [],
             "no_decay": [], "params": [], "layer_ids": [], "depth": s.depth},
        )
        group["params"].append(name)
        group["layer_ids"].append(s.layer)
        _add_unique(group["labels"], [s.label])
        _add_unique(group["no_decay"], [s.no_decay_by] if s.no_decay else [])
        _add_unique(group["reasons"], s.reasons)
    return [
        {
            "name": "+".join(g["labels"]) + ("/no_decay" if g["no_decay"] else ""),
            "lr": g["lr"],
            "weight_decay": g["weight_decay"],
            "lr_scale": g["lr"] / base_lr if base_lr else 1.0,
            **({"layer_decay": {"factor": decay, "depth": g["depth"]}} if decay is not None
               else {}),
            "no_decay": g["no_decay"],  # the optim.no_decay patterns that switched wd off
            "reasons": g["reasons"],
            "params": g["params"],
            "layer_ids": g["layer_ids"],
        }
        for g in groups.values()
    ]


def granularity_of(optim: Any) -> str:
    """optim.layer_decay_granularity, checked (block when the key is absent)."""
    value = optim.get("layer_decay_granularity", "block") or "block"
    if value not in GRANULARITIES:
        raise FinetunePrepError(
            f"optim.layer_decay_granularity={value!r}: use block (one layer per block, as timm "
            "and the BEiT/MAE recipes) or stage (one layer per stage)."
        )
    return value


def _add_unique(items: list[str], new: Sequence[str]) -> None:
    items.extend(x for x in new if x not in items)


def _base_label(
    table: ParamTable, name: str, layer: int, top: int, decay: float | None, granularity: str
) -> str:
    if decay is None:
        return "head" if table.position[name] == len(table.stages) else "backbone"
    if layer == top:
        return "head"
    if granularity == "stage" and table.position[name] is None:
        return "unstaged"
    return f"{'layer' if granularity == 'block' else 'stage'}{layer}"


def _group_rules(table: ParamTable, rules: Sequence[Any]) -> dict[str, tuple[str, Any]]:
    """First matching optim.groups rule per parameter (MMEngine's custom_keys order)."""
    placed: dict[str, tuple[str, Any]] = {}
    wheres = [f"optim.groups[{i}]" for i in range(len(rules))]
    selections = select_all([rule.match for rule in rules], table, wheres)
    for where, rule, names in zip(wheres, rules, selections, strict=True):
        for name in names:
            placed.setdefault(name, (where, rule))
    return placed


def _pattern_union(table: ParamTable, patterns: Sequence[str]) -> dict[str, str]:
    """Parameter -> the first pattern that selects it. A pattern may match nothing here
    (a model without biases is fine), but it must be well-formed."""
    hit: dict[str, str] = {}
    for pattern, names in zip(patterns, match_all(list(patterns), table), strict=True):
        for name in names:
            hit.setdefault(name, pattern)
    return hit


# Optimizers whose weight decay multiplies the weights by (1 - lr * weight_decay) each step
# (decoupled, or plain SGD's L2): at lr * weight_decay >= 1 that zeroes or flips every weight.
SHRINKING = ("adamw", "sgd", "lion")


def check_groups(groups: Sequence[Mapping[str, Any]], optim: Any, where: str = "optim") -> None:
    """The numbers each group ends up with (lr times layer decay, multipliers and phase
    settings) are ones float32 training can use: a product that overflows to inf, underflows
    below the smallest normal float32, or a weight decay that wipes the weights is an error."""
    spec = optim.get("optimizer") or {}
    name = str(spec.get("_target_", "")).rpartition(".")[2].lower()
    shrinks = name in SHRINKING or bool(spec.get("decoupled_weight_decay"))
    for g in groups:
        lr, wd = g["lr"], g["weight_decay"]
        why = f" ({', '.join(g['reasons'])})" if g.get("reasons") else ""
        label = f"{where}: group {g['name']!r}{why} gets"
        if not (math.isfinite(lr) and F32_TINY <= lr <= F32_MAX):
            raise FinetunePrepError(
                f"{label} lr {lr:g}: not a learning rate float32 can apply; it must be in "
                f"1.2e-38 .. 3.4e38 ({LR_FIX}). Change optim.lr or the multipliers that give it.")
        if not (math.isfinite(wd) and 0 <= wd <= F32_MAX):
            raise FinetunePrepError(
                f"{label} weight_decay {wd:g}: it must be a finite number >= 0 and <= 3.4e38. "
                "Change optim.weight_decay or the multipliers that give it.")
        if shrinks and lr * wd >= 1:
            raise FinetunePrepError(
                f"{label} lr {lr:g} and weight_decay {wd:g}: with {spec.get('_target_')} every "
                f"step multiplies its weights by 1 - lr x weight_decay = {1 - lr * wd:g}, which "
                "zeroes or flips them. Keep lr x weight_decay well below 1 (AdamW's usual "
                "weight_decay is 0.01 .. 0.1).")


def _check_numbers(optim: Any) -> None:
    """Every number a group gets is finite and in range (NaN or inf would reach the file): the
    same checks as config.validate, for callers that pass an optim section directly."""
    granularity_of(optim)
    check_optim(optim)
