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

from finetune_prep.errors import FinetunePrepError, did_you_mean
from finetune_prep.integrations import wrappers
from finetune_prep.models import BuiltModel
from finetune_prep.rules import FreezePlan

FORMAT = "finetune_prep/param_groups@2"  # @2 added `schedule` (the phases of gradual unfreezing)
READABLE = ("finetune_prep/param_groups@1", FORMAT)  # an @1 file is an @2 file without phases
GROUP_KEYS = ("lr", "weight_decay")  # the keys of a group that torch.optim takes


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
    """What makes a document unusable: every group's params, lr and weight decay, the frozen
    list, eval_modules and the optimizer block; a name listed twice (in groups or in `frozen`)
    is a problem, since it would train a frozen parameter or train one twice."""
    groups, frozen = document.get("groups"), document.get("frozen")
    if not isinstance(groups, list) or not isinstance(frozen, list):
        return ["'groups' and 'frozen' must be lists"]
    schedule = document.get("schedule", [])
    if not isinstance(schedule, list) or not all(
            isinstance(p, dict) and isinstance(p.get("groups"), list) for p in schedule):
        return ["'schedule' must be a list of phases, each with a list of 'groups'"]
    problems = [p for i, g in enumerate(groups) for p in _group_problems(i, g)]
    problems += [p for k, phase in enumerate(schedule) for i, g in enumerate(phase["groups"])
                 for p in _group_problems(i, g, f"schedule[{k}].")]
    if not _strings(frozen):
        problems.append("'frozen' must be a list of parameter names")
    if not _strings(document.get("eval_modules", [])):
        problems.append("'eval_modules' must be a list of module names")
    spec = document.get("optimizer", {"_target_": "torch.optim.AdamW"})
    if not isinstance(spec, dict) or not isinstance(spec.get("_target_"), str):
        problems.append("'optimizer' must be an object with a '_target_' string")
    if not problems:
        grouped = [n for g in groups for n in g["params"]]
        later = [n for phase in schedule for g in phase["groups"] for n in g["params"]]
        for names, where in ((grouped + frozen, "in a group and in 'frozen'"),
                             (grouped + later, "in two groups")):
            twice = [n for n, count in Counter(names).items() if count > 1]
            if twice:
                problems.append(f"{len(twice)} names are listed twice ({where}): "
                                f"{', '.join(twice[:5])}")
    return problems


def _group_problems(i: int, group: Any, where: str = "") -> list[str]:
    at = f"{where}groups[{i}]"
    if not isinstance(group, dict):
        return [f"{at} is not an object"]
    problems = []
    if not _strings(group.get("params")) or not group.get("params"):
        problems.append(f"{at}.params must be a non-empty list of parameter names")
    for key, low in (("lr", 0.0), ("weight_decay", None)):
        value = group.get(key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or (value <= low if low is not None
                                                      else value < 0):
            bound = "> 0" if low is not None else ">= 0"
            problems.append(f"{at}.{key} is {value!r}; it must be a finite number {bound}")
    return problems


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


def optimizer_factory(spec: Any) -> Any:
    """`groups -> optimizer` from an optimizer spec (`_target_` and arguments): the one factory
    that the plan-time check, the proof and `build_optimizer` share."""
    from hydra.utils import instantiate

    try:
        return instantiate(spec, _partial_=True)
    except Exception as err:
        raise FinetunePrepError(f"optim.optimizer cannot be built: {err}") from err


def build_optimizer(model: nn.Module, path: str | os.PathLike) -> torch.optim.Optimizer:
    """The optimizer the file records (its `_target_` and arguments), on the file's groups.

    Build it after wrapping and sharding (`fully_shard` replaces the parameters), from the model
    as it will train: the groups hold its current tensors.
    """
    document = read(path)
    groups = _apply(model, document, path)
    spec = document.get("optimizer") or {"_target_": "torch.optim.AdamW"}
    try:
        return optimizer_factory(spec)(groups)
    except (TypeError, ValueError) as err:
        raise FinetunePrepError(
            f"{path}: the optimizer {spec.get('_target_')} rejects the file's arguments: {err}"
        ) from err


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


def build_model(path: str | os.PathLike) -> nn.Module:
    """The model the file was made for, rebuilt from its `model` block: the architecture with
    the fresh head, real tensors, random init. Load your weights into it, then train.

    A `_target_` model needs its class importable here (on PYTHONPATH), as at planning time.
    """
    from omegaconf import OmegaConf

    from finetune_prep import models

    info = read(path).get("model") or {}
    source, heads = info.get("source"), list(info.get("heads") or [info.get("head")])
    if source == "target" and not info.get("target"):
        raise FinetunePrepError(
            f"{path} names a _target_ model ({info.get('arch')}) but not its arguments (written "
            "by an older finetune_prep): prepare the file again, or build the model yourself."
        )
    model_cfg = OmegaConf.create({
        "source": source, "arch": info.get("arch"), "kwargs": info.get("kwargs") or {},
        "target": info.get("target"), "stages": info.get("stages") or None, "input_size": None,
        "hf_class": info.get("hf_class"),
    })
    head_cfg = OmegaConf.create({"num_outputs": info.get("num_outputs", 1),
                                 "module": heads[0] if len(heads) == 1 else None})
    try:
        model = models.build_model(model_cfg, head_cfg, meta=False).model
    except FinetunePrepError as err:
        needs = (f" It needs {info['target'].get('_target_')} importable in this process: add "
                 "the folder of its module to PYTHONPATH." if source == "target" else "")
        raise FinetunePrepError(f"build_model({path}): {err}{needs}") from err
    check_names(wrappers.named_parameters(model), read(path), path)
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
