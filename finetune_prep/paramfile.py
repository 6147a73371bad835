"""The param_groups.json file (format finetune_prep/param_groups@1): the one writer and the one
reader of the format, and the optimizer factory both sides use.

A training script turns the file into an optimizer in one call:
`torch.optim.AdamW(load_param_groups(model, path))`, or `build_optimizer(model, path)`.
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

from finetune_prep.errors import FinetunePrepError
from finetune_prep.models import BuiltModel
from finetune_prep.rules import FreezePlan

FORMAT = "finetune_prep/param_groups@1"
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
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise FinetunePrepError(
            f"{path} has format {found!r}; this finetune_prep reads {FORMAT!r}. "
            "Run the finetune_prep that wrote it, or prepare the file again."
        )
    problems = content_problems(document)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... and {len(problems) - 5} more"
                                           if len(problems) > 5 else "")
        raise FinetunePrepError(f"{path} is not a valid param-group file: {shown}. "
                                "Prepare the file again instead of editing it.")
    return document


def content_problems(document: dict[str, Any]) -> list[str]:
    """What makes a document unusable: every group's params, lr and weight decay, the frozen
    list, eval_modules and the optimizer block; a name listed twice (in groups or in `frozen`)
    is a problem, since it would train a frozen parameter or train one twice."""
    groups, frozen = document.get("groups"), document.get("frozen")
    if not isinstance(groups, list) or not isinstance(frozen, list):
        return ["'groups' and 'frozen' must be lists"]
    problems = [p for i, g in enumerate(groups) for p in _group_problems(i, g)]
    if not _strings(frozen):
        problems.append("'frozen' must be a list of parameter names")
    if not _strings(document.get("eval_modules", [])):
        problems.append("'eval_modules' must be a list of module names")
    spec = document.get("optimizer", {"_target_": "torch.optim.AdamW"})
    if not isinstance(spec, dict) or not isinstance(spec.get("_target_"), str):
        problems.append("'optimizer' must be an object with a '_target_' string")
    if not problems:
        names = [n for g in groups for n in g["params"]] + frozen
        twice = [n for n, count in Counter(names).items() if count > 1]
        if twice:
            problems.append(f"{len(twice)} names are listed twice (in two groups, or in a group "
                            f"and in 'frozen'): {', '.join(twice[:5])}")
    return problems


def _group_problems(i: int, group: Any) -> list[str]:
    at = f"groups[{i}]"
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
    """Set requires_grad on `model` as the file says; return groups of tensors for torch.optim."""
    document = read(path)
    params = dict(model.named_parameters())
    _check_names(params, document, path)
    trainable = {n for g in document["groups"] for n in g["params"]}
    for name, param in params.items():
        param.requires_grad_(name in trainable)
    return tensor_groups(model, document["groups"])


def tensor_groups(model: nn.Module, groups: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups of parameter names -> the groups of tensors that torch.optim takes."""
    params = dict(model.named_parameters())
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
    """The optimizer the file records (its `_target_` and arguments), on the file's groups."""
    groups = load_param_groups(model, path)
    spec = read(path).get("optimizer") or {"_target_": "torch.optim.AdamW"}
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
    """model.train(), then the named modules back to eval mode."""
    model.train()
    modules = dict(model.named_modules())
    unknown = [n for n in eval_modules if n not in modules]
    if unknown:
        raise FinetunePrepError(
            f"eval_modules names modules this model does not have: {', '.join(unknown[:5])}. "
            "Prepare the file for this model."
        )
    for name in eval_modules:
        modules[name].eval()
    return model


def _check_names(params: dict[str, Any], document: dict[str, Any], path: Any) -> None:
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


# --------------------------------------------------------------------------- writing


def document(
    built: BuiltModel, sources: Sequence[Any], freeze: FreezePlan, groups: list[dict[str, Any]],
    eval_modules: list[str], optimizer: Any, verified: dict[str, Any], prov: dict[str, Any],
) -> dict[str, Any]:
    """The content of param_groups.json (`sources`: checkpoints read, each with a label,
    the opened checkpoint and its fit to the model)."""
    from omegaconf import OmegaConf

    from finetune_prep.verify import memory_estimate

    table = built.table
    trainable = [n for n in table.names if freeze.trainable[n]]
    total = sum(table.numel(n) for n in table.names)
    n_trainable = sum(table.numel(n) for n in trainable)
    return {
        "format": FORMAT,
        "model": {"source": built.source, "arch": built.arch, "num_outputs": built.num_outputs,
                  "head": table.head[0], "heads": list(table.head),
                  "stages": table.stage_lists()},
        "checkpoint": _checkpoint_block(sources, built.model),
        "counts": {"total": total, "trainable": n_trainable, "frozen": total - n_trainable},
        "groups": groups,
        "frozen": [n for n in table.names if not freeze.trainable[n]],
        "eval_modules": eval_modules,
        "optimizer": OmegaConf.to_container(optimizer, resolve=True)
        if OmegaConf.is_config(optimizer) else dict(optimizer),
        "verified": verified,
        "memory": memory_estimate(table, trainable, optimizer),
        "rules": {n: freeze.decided_by[n] for n in table.names},
        "provenance": prov,
    }


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
