"""The param_groups.json file (format finetune_prep/param_groups@2): the one writer and the one
reader of the format, and the optimizer factory both sides use.

A training script turns the file into an optimizer in one call:
`torch.optim.AdamW(load_param_groups(model, path))`, or `build_optimizer(model, path)`; the
model may be wrapped (DDP, torch.compile, FSDP, AveragedModel: names map through
`integrations.wrappers`), and `build_model(path)` rebuilds the model the file was made for.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune_prep import trust
from finetune_prep.errors import FinetunePrepError, did_you_mean
from finetune_prep.integrations import wrappers
from finetune_prep.models import BuiltModel
from finetune_prep.rules import FreezePlan

FORMAT = "finetune_prep/param_groups@2"  # @2 added `schedule` (the phases of gradual unfreezing)
READABLE = ("finetune_prep/param_groups@1", FORMAT)  # an @1 file is an @2 file without phases
GROUP_KEYS = ("lr", "weight_decay")  # the keys of a group that torch.optim takes
UNITS = ("epoch", "step")  # what a phase boundary counts


def dumps(document: dict[str, Any]) -> str:
    """The file's text: stable key order and indentation, so equal plans give equal bytes."""
    return json.dumps(document, indent=2, allow_nan=False) + "\n"  # strict JSON: no NaN


def read(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a param_groups.json; errors say what is wrong with the file."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise FinetunePrepError(f"{path} does not exist; run finetune_prep to make it.") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FinetunePrepError(
            f"{path} is not valid JSON ({err}); it was edited or truncated. "
            "Run finetune_prep again to rewrite it."
        ) from err
    except RecursionError as err:
        raise FinetunePrepError(
            f"{path} is nested too deeply to be a param-group file; prepare the file again."
        ) from err
    if not isinstance(document, dict) or document.get("format") not in READABLE:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise FinetunePrepError(
            f"{path} has format {found!r}; this finetune_prep reads {' and '.join(READABLE)}. "
            "Run the finetune_prep that wrote it, or prepare the file again."
        )
    problems = content_problems(document)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... and {len(problems) - 5} more"
                                           if len(problems) > 5 else "")
        raise FinetunePrepError(f"{path} is not a valid param-group file: {shown}. "
                                "Prepare the file again instead of editing it.")
    return document


def at_phase(document: dict[str, Any], phase: int) -> dict[str, Any]:
    """The plan as it stands in `phase` of its schedule: every group added so far, and that
    phase's frozen parameters and eval modules (phase 0 is the document itself)."""
    schedule = document.get("schedule") or []
    if not 0 <= phase <= len(schedule):
        raise FinetunePrepError(
            f"phase {phase} is not in this plan: it has phases 0..{len(schedule)}.")
    if phase == 0:
        return document
    current = schedule[phase - 1]
    return {**document,
            "groups": document["groups"] + [g for p in schedule[:phase] for g in p["groups"]],
            "frozen": current["frozen"], "eval_modules": current["eval_modules"],
            "counts": current["counts"]}


def content_problems(document: dict[str, Any]) -> list[str]:
    """What makes a document unusable, each problem with its key path: every group (params, lr,
    weight decay), `frozen`, `eval_modules`, `counts`, the `optimizer` and `model` blocks (plain
    data only: see finetune_prep.trust) and every phase of `schedule`; then the names: each
    parameter exactly once in phase 0 (groups + frozen) and in every later phase (groups so far
    + that phase's frozen), none trained earlier frozen again."""
    groups, frozen = document.get("groups"), document.get("frozen")
    if not isinstance(groups, list) or not isinstance(frozen, list):
        return ["'groups' and 'frozen' must be lists"]
    problems = [p for i, g in enumerate(groups) for p in _group_problems(i, g)]
    if not _strings(frozen):
        problems.append("'frozen' must be a list of parameter names")
    problems += _module_problems(document.get("eval_modules", []), "eval_modules")
    problems += _counts_problems(document.get("counts"), "counts", required=False)
    problems += trust.optimizer_problems(document.get("optimizer", trust.DEFAULT_OPTIMIZER))
    problems += trust.model_problems(document.get("model", {}))
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
    if not _strings(group.get("params")) or not group.get("params"):
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
    return problems


def _module_problems(names: Any, where: str) -> list[str]:
    """eval_modules: module names, none empty (the empty name is the whole model)."""
    if not _strings(names):
        return [f"'{where}' must be a list of module names"]
    return [f"{where}[{i}] is '': the whole model, not a norm layer (name the layers to keep in "
            "eval mode)" for i, n in enumerate(names) if n == ""]


def _counts_problems(counts: Any, where: str, required: bool = True) -> list[str]:
    """counts: whole numbers >= 0 with trainable + frozen == total."""
    if counts is None and not required:
        return []
    keys = ("total", "trainable", "frozen")
    if not isinstance(counts, dict) or not all(
            _whole(counts.get(k)) and counts[k] >= 0 for k in keys):
        return [f"{where} is {_short(counts)}; it must be an object of whole numbers >= 0: "
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
    if not _whole(phase.get("phase")) or phase["phase"] != k + 1:
        problems.append(f"{at}.phase is {_short(phase.get('phase'))}; it must be {k + 1} "
                        "(phases are numbered 1, 2, ... in file order)")
    boundary = phase.get("at")
    if not (isinstance(boundary, dict) and len(boundary) == 1
            and next(iter(boundary)) in UNITS and _whole(next(iter(boundary.values())))
            and next(iter(boundary.values())) >= 1):
        problems.append(f"{at}.at is {_short(boundary)}; it must be {{\"epoch\": N}} or "
                        "{\"step\": N} with a whole number N >= 1")
    if not _strings(phase.get("rules")):
        problems.append(f"{at}.rules must be a list of strings")
    if not isinstance(phase.get("groups"), list):
        problems.append(f"{at}.groups must be a list of groups")
    else:
        problems += [p for i, g in enumerate(phase["groups"])
                     for p in _group_problems(i, g, f"{at}.")]
    if not _strings(phase.get("frozen")):
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
                problems.append(f"{where}: {_listing(what, names, 5)}")
    return problems


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _strings(items: Any) -> bool:
    return isinstance(items, list) and all(isinstance(x, str) for x in items)


def load_param_groups(model: nn.Module, path: str | os.PathLike) -> list[dict[str, Any]]:
    """Set requires_grad on `model` as the file says; return groups of tensors for torch.optim.

    `model` may be wrapped (DataParallel/DDP, torch.compile, AveragedModel, FSDP1 with
    use_orig_params=True, FSDP2): names map through the wrapper. DDP and FSDP1 fix the trainable
    set when they are built, so on those the file must already hold (apply it to the bare model
    before wrapping); a difference is an error that says so, not a reducer error a step later.
    """
    return _apply(model, read(path), path)


def _apply(model: nn.Module, document: dict[str, Any], path: Any) -> list[dict[str, Any]]:
    """`load_param_groups` on a document already read."""
    params = wrappers.named_parameters(model)
    check_names(params, document, path)
    trainable = {n for g in document["groups"] for n in g["params"]}
    _check_order(model, params, trainable, path)
    for name, param in params.items():
        param.requires_grad_(name in trainable)
    return tensor_groups(model, document["groups"])


def _check_order(model: nn.Module, params: dict[str, Any], trainable: set[str], path: Any) -> None:
    """On a wrapper built on requires_grad (DDP, FSDP1), the file must already be applied."""
    wrapper = wrappers.built_on_requires_grad(model)
    if wrapper is None:
        return
    differ = [n for n, p in params.items() if p.requires_grad != (n in trainable)]
    if differ:
        raise FinetunePrepError(
            f"the model is wrapped in {wrapper}, which fixed the trainable parameters when it "
            f"was built, and requires_grad differs from {path} on {_listing('parameters', differ)}"
            " (training would fail a step later). Apply the file to the bare "
            f"model first: `finetune_prep.load_param_groups(model, path)`, then `{wrapper}(model)`,"
            " then `finetune_prep.build_optimizer(wrapped, path)`."
        )


def tensor_groups(model: nn.Module, groups: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups of parameter names -> the groups of tensors that torch.optim takes.

    Only `params`, `lr` and `weight_decay` go into a group: the file's `lr` is absolute (layer
    decay and multipliers are in it already), so its `lr_scale` stays out, and a scheduler that
    reads `lr_scale` (timm's) cannot apply it a second time. The tensors are the model's current
    ones, looked up by name through any wrapper (after FSDP2 `fully_shard`: the sharded ones).
    """
    params = wrappers.named_parameters(model)
    missing = [n for g in groups for n in g["params"] if n not in params]
    if missing:
        raise FinetunePrepError(
            f"{_listing('names in the groups not in the model', missing)}."
            f"{did_you_mean(missing[0], params)} Build the model the groups were made for."
        )
    return [
        {"params": [params[n] for n in g["params"]], **{k: g[k] for k in GROUP_KEYS if k in g}}
        for g in groups
    ]


# --------------------------------------------------------------------------- trust boundary
# Two optimizer factories, one per trust level:
# - `optimizer_factory` (TRUSTED input only): the user's own Hydra config at plan time (the
#   plan check, the proof, `Prepared.build_optimizer`), through Hydra's instantiate;
# - `trust.file_optimizer_factory` (UNTRUSTED input): the `optimizer` block of a file, which may
#   only name an allowlisted optimizer class (see finetune_prep/trust.py). Never pass anything
#   read from a file to `optimizer_factory`.


def optimizer_factory(spec: Any) -> Any:
    """`groups -> optimizer` from the user's own `optim.optimizer` config (`_target_` and
    arguments), through Hydra's instantiate. TRUSTED input only: the plan-time check, the proof
    and `Prepared.build_optimizer` share it; a file's block goes to
    `trust.file_optimizer_factory` instead."""
    from hydra.utils import instantiate

    try:
        return instantiate(spec, _partial_=True)
    except Exception as err:
        raise FinetunePrepError(f"optim.optimizer cannot be built: {err}") from err


def build_optimizer(
    model: nn.Module, path: str | os.PathLike, optimizers: Sequence[trust.OptimizerSpec] = (),
) -> torch.optim.Optimizer:
    """The optimizer the file records (its `_target_` and arguments), on the file's groups.

    The file may name a `torch.optim` optimizer; another class only if it is in `optimizers`
    (classes, or dotted names you write: `optimizers=[timm.optim.Lamb]`). Build it after
    wrapping and sharding (`fully_shard` replaces the parameters), from the model as it will
    train: the groups hold its current tensors.
    """
    document = read(path)
    spec = document.get("optimizer") or trust.DEFAULT_OPTIMIZER
    factory = trust.file_optimizer_factory(spec, optimizers, path)  # refuses before any change
    return factory(_apply(model, document, path))


def train_mode(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """model.train(), but the file's `eval_modules` (frozen norm layers) stay in eval mode."""
    return set_train_mode(model, read(path).get("eval_modules", []))


def set_train_mode(model: nn.Module, eval_modules: Sequence[str]) -> nn.Module:
    """model.train(), then the named modules (names of the bare model) back to eval mode."""
    model.train()
    return hold_eval(model, eval_modules)


def hold_eval(model: nn.Module, eval_modules: Sequence[str]) -> nn.Module:
    """Put only the named modules in eval mode, leaving the rest as it is (for trainers such as
    Lightning that switch the model's mode themselves). Names map through wrappers."""
    modules = wrappers.named_modules(model)
    missing = [n for n in eval_modules if n not in modules]
    if missing:
        raise FinetunePrepError(
            f"{_listing('eval_modules not in the model', missing)}."
            f"{did_you_mean(missing[0], modules)} Build the model the file was made for."
        )
    for name in eval_modules:
        modules[name].eval()
    return model


def check_names(params: dict[str, Any], document: dict[str, Any], path: Any) -> None:
    """The model's parameter names (bare names) are exactly the file's, or an error listing
    the differences."""
    listed = [n for g in document["groups"] for n in g["params"]] + list(document["frozen"])
    known = set(listed)
    missing = [n for n in params if n not in known]
    extra = [n for n in listed if n not in params]
    if missing or extra:
        model = document.get("model", {})
        raise FinetunePrepError(
            f"{path} was made for another model ({model.get('arch', '?')}, "
            f"{model.get('num_outputs', '?')} outputs): "
            + "; ".join(
                part for part in (
                    _listing("parameters of the model not in the file", missing),
                    _listing("names in the file not in the model", extra),
                ) if part
            )
            + ". Prepare the file for this model, or build the model the file describes."
        )


def _listing(what: str, names: list[str], limit: int = 8) -> str:
    if not names:
        return ""
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return f"{len(names)} {what}: {', '.join(names[:limit])}{more}"


def build_model(path: str | os.PathLike, target: Any = None) -> nn.Module:
    """The model the file was made for, rebuilt from its `model` block: the architecture with
    the fresh head, real tensors, random init. Load your weights into it, then train.

    torchvision and timm models are rebuilt by registry name, a Hugging Face model from its
    folder on this machine (never remote code). A `_target_` model is rebuilt only from the
    class you pass (`build_model(path, target=MyNet)`), which must be the class the file names:
    a file never imports or calls anything itself (see finetune_prep/trust.py).
    """
    from finetune_prep import models

    document = read(path)
    model_cfg, head_cfg, make_target = trust.model_config(document.get("model") or {}, target,
                                                          path)
    try:
        model = models.build_model(model_cfg, head_cfg, meta=False, make_target=make_target).model
    except FinetunePrepError as err:
        raise FinetunePrepError(f"build_model({path}): {err}") from err
    except (TypeError, ValueError) as err:  # registry builders rejecting the file's kwargs
        raise FinetunePrepError(f"build_model({path}): {model_cfg.arch} cannot be built from "
                                f"the file's model block: {err}") from err
    check_names(wrappers.named_parameters(model), document, path)
    return model


# --------------------------------------------------------------------------- writing


def document(
    built: BuiltModel, sources: Sequence[Any], freeze: FreezePlan, groups: list[dict[str, Any]],
    eval_modules: list[str], optimizer: Any, verified: dict[str, Any], prov: dict[str, Any],
    model_cfg: Any = None, phases: Sequence[tuple[Any, list[str]]] = (),
) -> dict[str, Any]:
    """The content of param_groups.json (`sources`: checkpoints read, each with a label,
    the opened checkpoint and its fit to the model; `model_cfg`: the model config, whose
    constructor arguments let `build_model` rebuild the model from the file alone)."""
    from omegaconf import OmegaConf

    table = built.table
    state = _trainability(table, freeze, optimizer)
    return {
        "format": FORMAT,
        "model": {"source": built.source, "arch": built.arch, "num_outputs": built.num_outputs,
                  "head": table.head[0], "heads": list(table.head),
                  "stages": table.stage_lists(), **_rebuild_block(model_cfg, built)},
        "checkpoint": _checkpoint_block(sources, built.model),
        "counts": state["counts"],
        "groups": groups,
        "frozen": state["frozen"],
        "eval_modules": eval_modules,
        "optimizer": OmegaConf.to_container(optimizer, resolve=True)
        if OmegaConf.is_config(optimizer) else dict(optimizer),
        "verified": verified,
        "memory": state["memory"],
        "rules": {n: freeze.decided_by[n] for n in table.names},
        "schedule": [_phase_block(table, phase, evals, optimizer) for phase, evals in phases],
        "provenance": prov,
    }


def _phase_block(table: Any, phase: Any, eval_modules: list[str], optimizer: Any) -> dict:
    """One later phase: when it starts, its rules, its new groups and who trains then."""
    state = _trainability(table, phase.plan, optimizer)
    return {"phase": phase.index, "at": phase.at, "rules": list(phase.rules),
            "groups": phase.groups, "frozen": state["frozen"], "eval_modules": eval_modules,
            "counts": state["counts"], "memory": state["memory"]}


def _trainability(table: Any, plan: FreezePlan, optimizer: Any) -> dict[str, Any]:
    """What a freeze plan gives: frozen names, parameter counts and training memory."""
    from finetune_prep.verify import memory_estimate

    trainable = [n for n in table.names if plan.trainable[n]]
    total, n_trainable = table.count(), table.count(trainable)
    return {"frozen": [n for n in table.names if not plan.trainable[n]],
            "counts": {"total": total, "trainable": n_trainable, "frozen": total - n_trainable},
            "memory": memory_estimate(table, trainable, optimizer)}


def _rebuild_block(model_cfg: Any, built: BuiltModel) -> dict[str, Any]:
    """What `build_model` needs beyond source/arch: constructor arguments and input size."""
    from omegaconf import OmegaConf

    if model_cfg is None:
        return {}

    def plain(value: Any) -> Any:
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value

    block = {"kwargs": plain(model_cfg.get("kwargs")) or {},
             "target": plain(model_cfg.get("target")),
             "input_size": list(built.input_size) if built.input_size else None}
    if built.source == "hf":
        block["hf_class"] = model_cfg.get("hf_class")
    return block


def _checkpoint_block(sources: Sequence[Any], model: nn.Module) -> dict[str, Any]:
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    blocks = [_source_block(s, dtypes) for s in sources]
    last = blocks[-1] if blocks else {"path": None, "unwrapped": [], "missing": [],
                                      "unexpected": [], "skipped": [], "excluded": [],
                                      "loaded": 0}
    return {**last, "sources": blocks}


def _source_block(s: Any, model_dtypes: dict[str, torch.dtype]) -> dict[str, Any]:
    stored = {k: s.checkpoint.tensors[k].dtype for k in s.fit.loaded}
    casts = Counter(f"{d} -> {model_dtypes[k]}".replace("torch.", "")
                    for k, d in stored.items() if d != model_dtypes.get(k, d))
    return {
        "path": s.checkpoint.path,
        "from": s.label,
        "format": s.checkpoint.format,
        "unwrapped": list(s.checkpoint.steps),
        "loaded": len(s.fit.loaded),
        "missing": list(s.fit.missing),
        "unexpected": list(s.fit.unexpected),
        "outside": list(s.fit.outside),
        "skipped": [{"key": k, "checkpoint": list(a), "model": list(b)}
                    for k, a, b in s.fit.skipped],
        "excluded": list(s.fit.excluded),
        "dtypes": dict(Counter(str(d).removeprefix("torch.") for d in stored.values())),
        "cast": dict(casts),
    }
