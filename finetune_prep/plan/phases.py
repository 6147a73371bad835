"""Gradual unfreezing: the phases of `freeze.schedule`, each planned and checked like the first.

Phase 0 is what `freeze.rules` give (the file's top-level groups). Each later phase starts at an
epoch or a step boundary, applies its rules on top of the phase before, and adds optimizer
groups for the parameters that train for the first time (`optimizer.add_param_group`, so the
state of earlier groups is kept). Their lr is what `optim` gives them (layer decay included),
times `lr_mult`, or an absolute `lr`. `each_stage: true` expands into one phase per stage, from
the top, `every` epochs (or steps) apart: ULMFiT's gradual unfreezing. Pure: names and numbers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from finetune_prep.config import MAX_COUNT
from finetune_prep.errors import FinetunePrepError
from finetune_prep.plan.groups import assign, check_groups, merge
from finetune_prep.plan.rules import FreezePlan, Rule, evaluate, parse_rules
from finetune_prep.plan.table import ParamTable

UNITS = ("epoch", "step")


@dataclass(frozen=True)
class Phase:
    """One phase after the first: when it starts, what it applied, who trains, its new groups."""

    index: int
    at: dict[str, int]  # {"epoch": N} or {"step": N}
    rules: tuple[str, ...]
    plan: FreezePlan
    groups: list[dict[str, Any]]  # groups of the parameters that train for the first time


def plan_phases(
    table: ParamTable, first: FreezePlan, schedule: Sequence[Any], optim: Any
) -> list[Phase]:
    """Every phase of the schedule, in order. A phase that changes nothing, or that freezes
    what trained before, is an error."""
    phases: list[Phase] = []
    previous = first
    grouped = {n for n in table.names if first.trainable[n]}
    last: tuple[str, int, str] | None = None  # unit, boundary, where of the phase before
    for i, spec in enumerate(schedule):
        where = f"freeze.schedule[{i}]"
        unit, start = _boundary(spec, where)
        _check_numbers(spec, where)
        for at, rules, label in _steps(table, previous, spec, where, unit, start):
            _check_order(last, unit, at[unit], label)
            last = (unit, at[unit], label)
            plan = evaluate(rules, table, start=previous)
            _check_change(table, previous, plan, label)
            new = [n for n in table.names if plan.trainable[n] and n not in grouped]
            grouped.update(new)
            index = len(phases) + 1
            groups = _groups(table, new, optim, spec, f"phase{index}/") if new else []
            phases.append(Phase(index, at, tuple(str(r) for r in rules), plan, groups))
            previous = plan
    return phases


def _steps(
    table: ParamTable, previous: FreezePlan, spec: Any, where: str, unit: str, start: int
) -> list[tuple[dict[str, int], list[Rule], str]]:
    """The phases one schedule entry makes: one, or one per stage still frozen (each_stage),
    from the top, `every` apart."""
    if not spec.each_stage:
        if not spec.rules:
            raise FinetunePrepError(f"{where} has no rules: give rules (e.g. "
                                    "[{unfreeze: '@stage[-2]'}]) or each_stage: true.")
        return [({unit: start}, parse_rules(spec.rules, f"{where}.rules"), where)]
    if spec.rules:
        raise FinetunePrepError(f"{where}: give rules or each_stage: true, not both.")
    todo = [k for k in reversed(range(len(table.stages)))
            if not all(previous.trainable[n] for n in table.stage_params(k))]
    if not todo:
        raise FinetunePrepError(f"{where} (each_stage) changes nothing: every stage already "
                                "trains. Remove the phase.")
    last = start + (len(todo) - 1) * spec.every
    if last > MAX_COUNT:
        raise FinetunePrepError(f"{where}: its last stage would start at {unit} {last:,}, past "
                                f"{MAX_COUNT:,}; lower at.{unit} or every.")
    steps = []
    for j, k in enumerate(todo):
        rule = Rule("unfreeze", f"@stage[{k}]", f"{where} (stage {k})")
        steps.append(({unit: start + j * spec.every}, [rule], rule.where))
    return steps


def _check_change(table: ParamTable, previous: FreezePlan, plan: FreezePlan, where: str) -> None:
    if plan.trainable == previous.trainable:
        raise FinetunePrepError(
            f"{where} changes nothing: every parameter it selects is already as it says. "
            "Remove the phase or give it rules that unfreeze something new."
        )
    refrozen = [n for n in table.names if previous.trainable[n] and not plan.trainable[n]]
    if refrozen:
        raise FinetunePrepError(
            f"{where} freezes {len(refrozen)} parameters that train in an earlier phase "
            f"({', '.join(refrozen[:3])}{' ...' if len(refrozen) > 3 else ''}): a phase only "
            "adds what trains (the optimizer keeps its groups). Unfreeze later instead."
        )


def _boundary(spec: Any, where: str) -> tuple[str, int]:
    at = dict(spec.at or {})
    if len(at) != 1 or next(iter(at)) not in UNITS:
        raise FinetunePrepError(f"{where}.at is {at or '{}'}; write {{epoch: N}} or {{step: N}}.")
    unit, value = next(iter(at.items()))
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise FinetunePrepError(f"{where}.at.{unit}={value!r}: a whole number >= 1 (phase 0, "
                                "freeze.rules, is the start).")
    if spec.every < 1:
        raise FinetunePrepError(f"{where}.every={spec.every}: a whole number >= 1.")
    return unit, value


def _check_numbers(spec: Any, where: str) -> None:
    for key, low in (("lr", 0.0), ("lr_mult", 0.0), ("weight_decay", None)):
        value = getattr(spec, key)
        if value is None:
            continue
        if not math.isfinite(value) or (value <= low if low is not None else value < 0):
            bound = "> 0" if low is not None else ">= 0"
            raise FinetunePrepError(f"{where}.{key}={value}: must be a finite number {bound}.")
    if spec.lr is not None and spec.lr_mult is not None:
        raise FinetunePrepError(f"{where}: give lr (absolute) or lr_mult, not both.")


def _check_order(last: tuple[str, int, str] | None, unit: str, value: int, where: str) -> None:
    if last is None:
        return
    if last[0] != unit:
        raise FinetunePrepError("freeze.schedule mixes epoch and step boundaries; use one unit "
                                "for every phase (a step count does not know the epoch length).")
    if value <= last[1]:
        raise FinetunePrepError(f"{where} starts at {unit} {value}, not after the phase before "
                                f"it ({last[2]}, {unit} {last[1]}): phases must start in "
                                "increasing order.")


def _groups(
    table: ParamTable, new: list[str], optim: Any, spec: Any, prefix: str
) -> list[dict[str, Any]]:
    """Groups for a phase's new parameters: optim's settings, then the phase's lr/wd."""
    settings = assign(table, new, optim)
    for name, s in settings.items():
        lr = spec.lr if spec.lr is not None else s.lr * (spec.lr_mult or 1.0)
        wd = spec.weight_decay if spec.weight_decay is not None and s.weight_decay else \
            s.weight_decay
        settings[name] = dataclasses.replace(s, lr=float(lr), weight_decay=float(wd))
    merged = merge(settings, float(optim.lr), optim.layer_decay)
    groups = [{**g, "name": prefix + g["name"]} for g in merged]
    check_groups(groups, optim, where=f"freeze.schedule ({prefix.rstrip('/')})")
    return groups
