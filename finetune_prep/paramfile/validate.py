"""What is wrong with a param-group document, each problem with its key path."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from finetune_prep.errors import listing
from finetune_prep.paramfile import allowlist
from finetune_prep.paramfile.allowlist import short, strings, whole

GROUP_KEYS = ("lr", "weight_decay")  # the keys of a group that torch.optim takes


UNITS = ("epoch", "step")  # what a phase boundary counts


def content_problems(document: dict[str, Any]) -> list[str]:
    """What makes a document unusable, each problem with its key path: every group (params, lr,
    weight decay), `frozen`, `eval_modules`, `counts`, the `optimizer` and `model` blocks (plain
    data only: see paramfile.allowlist) and every phase of `schedule`; then the names: each
    parameter exactly once in phase 0 (groups + frozen) and in every later phase (groups so far
    + that phase's frozen), none trained earlier frozen again."""
    groups, frozen = document.get("groups"), document.get("frozen")
    if not isinstance(groups, list) or not isinstance(frozen, list):
        return ["'groups' and 'frozen' must be lists"]
    problems = [p for i, g in enumerate(groups) for p in _group_problems(i, g)]
    if not strings(frozen):
        problems.append("'frozen' must be a list of parameter names")
    problems += _module_problems(document.get("eval_modules", []), "eval_modules")
    problems += _counts_problems(document.get("counts"), "counts", required=False)
    problems += allowlist.optimizer_problems(document.get("optimizer", allowlist.DEFAULT_OPTIMIZER))
    problems += allowlist.model_problems(document.get("model", {}))
    if "adapter" in document:
        problems += allowlist.adapter_problems(document["adapter"])
    schedule = document.get("schedule", [])
    if not isinstance(schedule, list):
        return [*problems, "'schedule' must be a list of phases"]
    problems += [p for k, phase in enumerate(schedule) for p in _phase_problems(k, phase)]
    if not problems:
        problems += _order_problems(schedule, document.get("counts"))
        problems += _name_problems(groups, frozen, schedule)
    return problems


def _group_problems(i: int, group: Any, where: str = "") -> list[str]:
    at = f"{where}groups[{i}]"
    if not isinstance(group, dict):
        return [f"{at} is not an object"]
    problems = []
    if not strings(group.get("params")) or not group.get("params"):
        problems.append(f"{at}.params must be a non-empty list of parameter names")
    if not isinstance(group.get("name", ""), str):
        problems.append(f"{at}.name is {group['name']!r}; it must be a string")
    for key, low in (("lr", 0.0), ("weight_decay", None)):
        value = group.get(key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or (value <= low if low is not None
                                                      else value < 0):
            bound = "> 0" if low is not None else ">= 0"
            problems.append(f"{at}.{key} is {value!r}; it must be a finite number {bound}")
    return problems + _info_problems(at, group)


def _info_problems(at: str, group: dict[str, Any]) -> list[str]:
    """The optional fields the summary and the diff read: layer decay and no-decay patterns."""
    problems = []
    decay = group.get("layer_decay")
    if decay is not None and not (
            isinstance(decay, dict) and isinstance(decay.get("factor"), (int, float))
            and not isinstance(decay.get("factor"), bool) and math.isfinite(decay["factor"])
            and whole(decay.get("depth")) and decay["depth"] >= 0):
        problems.append(f"{at}.layer_decay is {short(decay)}; it must be "
                        '{"factor": a number, "depth": a whole number >= 0}')
    if "no_decay" in group and not strings(group["no_decay"]):
        problems.append(f"{at}.no_decay must be a list of patterns")
    return problems


def _module_problems(names: Any, where: str) -> list[str]:
    """eval_modules: module names, none empty (the empty name is the whole model)."""
    if not strings(names):
        return [f"'{where}' must be a list of module names"]
    return [f"{where}[{i}] is '': the whole model, not a norm layer (name the layers to keep in "
            "eval mode)" for i, n in enumerate(names) if n == ""]


def _counts_problems(counts: Any, where: str, required: bool = True) -> list[str]:
    """counts: whole numbers >= 0 with trainable + frozen == total."""
    if counts is None and not required:
        return []
    keys = ("total", "trainable", "frozen")
    if not isinstance(counts, dict) or not all(
            whole(counts.get(k)) and counts[k] >= 0 for k in keys):
        return [f"{where} is {short(counts)}; it must be an object of whole numbers >= 0: "
                "total, trainable, frozen"]
    if counts["trainable"] + counts["frozen"] != counts["total"]:
        return [f"{where}: trainable {counts['trainable']} + frozen {counts['frozen']} is not "
                f"total {counts['total']}"]
    return []


def _phase_problems(k: int, phase: Any) -> list[str]:
    """The shape of one later phase, as the writer writes it (`_phase_block`)."""
    at = f"schedule[{k}]"
    if not isinstance(phase, dict):
        return [f"{at} is not an object"]
    problems = []
    if not whole(phase.get("phase")) or phase["phase"] != k + 1:
        problems.append(f"{at}.phase is {short(phase.get('phase'))}; it must be {k + 1} "
                        "(phases are numbered 1, 2, ... in file order)")
    boundary = phase.get("at")
    if not (isinstance(boundary, dict) and len(boundary) == 1
            and next(iter(boundary)) in UNITS and whole(next(iter(boundary.values())))
            and next(iter(boundary.values())) >= 1):
        problems.append(f"{at}.at is {short(boundary)}; it must be {{\"epoch\": N}} or "
                        "{\"step\": N} with a whole number N >= 1")
    if not strings(phase.get("rules")):
        problems.append(f"{at}.rules must be a list of strings")
    if not isinstance(phase.get("groups"), list):
        problems.append(f"{at}.groups must be a list of groups")
    else:
        problems += [p for i, g in enumerate(phase["groups"])
                     for p in _group_problems(i, g, f"{at}.")]
    if not strings(phase.get("frozen")):
        problems.append(f"{at}.frozen must be a list of parameter names")
    problems += _module_problems(phase.get("eval_modules"), f"{at}.eval_modules")
    problems += _counts_problems(phase.get("counts"), f"{at}.counts")
    return problems


def _order_problems(schedule: list[dict[str, Any]], counts: Any) -> list[str]:
    """One unit for every phase, boundaries increasing; counts that only grow, one total."""
    problems, last = [], None
    total = counts["total"] if isinstance(counts, dict) else None
    trainable = counts["trainable"] if isinstance(counts, dict) else 0
    for k, phase in enumerate(schedule):
        ((unit, value),) = phase["at"].items()
        if last is not None and unit != last[0]:
            problems.append(f"schedule[{k}].at uses {unit}, the phase before {last[0]}: one "
                            "unit for every phase")
        elif last is not None and value <= last[1]:
            problems.append(f"schedule[{k}].at is {unit} {value}, not after the phase before "
                            f"({unit} {last[1]}): phases start in increasing order")
        last = (unit, value)
        c = phase["counts"]
        if total is not None and c["total"] != total:
            problems.append(f"schedule[{k}].counts.total is {c['total']}, the plan's is {total}")
        if c["trainable"] < trainable:
            problems.append(f"schedule[{k}].counts.trainable is {c['trainable']}, fewer than "
                            f"the phase before ({trainable}): a phase only adds what trains")
        trainable = c["trainable"]
    return problems


def _name_problems(groups: list[dict], frozen: list[str], schedule: list[dict]) -> list[str]:
    """Every parameter once in phase 0 and in each later phase; nothing trained frozen again."""
    grouped = [n for g in groups for n in g["params"]]
    later = [n for phase in schedule for g in phase["groups"] for n in g["params"]]
    problems = []
    for names, where in ((grouped + frozen, "in a group and in 'frozen'"),
                         (grouped + later, "in two groups")):
        twice = [n for n, count in Counter(names).items() if count > 1]
        if twice:
            problems.append(f"{len(twice)} names are listed twice ({where}): "
                            f"{', '.join(twice[:5])}")
    if problems or not schedule:
        return problems
    every = grouped + frozen  # the plan's parameters (phase 0 lists each once)
    known, trained = set(every), set(grouped)
    for k, phase in enumerate(schedule):
        at = f"schedule[{k}]"
        new = [n for g in phase["groups"] for n in g["params"]]
        before, trained = trained, trained | set(new)
        listed = set(phase["frozen"])
        for where, what, names in (
            (f"{at}.groups", "parameters the plan does not list",
             [n for n in new if n not in known]),
            (f"{at}.frozen", "parameters the plan does not list",
             [n for n in phase["frozen"] if n not in known]),
            (f"{at}.frozen", "parameters listed twice",
             [n for n, c in Counter(phase["frozen"]).items() if c > 1]),
            (f"{at}.frozen", "parameters that train in an earlier phase (a phase only adds "
             "what trains)", [n for n in phase["frozen"] if n in before]),
            (f"{at}.frozen", "parameters in a group of the same phase",
             [n for n in new if n in listed]),
            (at, "parameters in no group so far and not frozen (they would train outside the "
             "optimizer)", [n for n in every if n not in trained and n not in listed]),
        ):
            if names:
                problems.append(f"{where}: {listing(what, names, 5)}")
    return problems
