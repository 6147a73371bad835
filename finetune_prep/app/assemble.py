"""Assemble the param_groups.json document from what the pipeline built, loaded and decided."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from finetune_prep.model.describe import BuiltModel
from finetune_prep.paramfile.format import FORMAT
from finetune_prep.plan.memory import memory_estimate
from finetune_prep.plan.rules import FreezePlan


def document(
    built: BuiltModel, sources: Sequence[Any], freeze: FreezePlan, groups: list[dict[str, Any]],
    eval_modules: list[str], optimizer: Any, verified: dict[str, Any], prov: dict[str, Any],
    model_cfg: Any = None, phases: Sequence[tuple[Any, list[str]]] = (),
    adapter: dict[str, Any] | None = None, heads: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The content of param_groups.json (`sources`: checkpoints read, each with a label,
    the opened checkpoint and its fit to the model; `model_cfg`: the model config, whose
    constructor arguments let `build_model` rebuild the model from the file alone; `adapter`:
    the adapters peft built, recorded so `build_model` rebuilds the PeftModel; `heads`: the
    head modules of the model before the adapters, when they differ from the table's)."""
    from omegaconf import OmegaConf

    table = built.table
    heads = list(heads or table.head)  # the model's head modules (before peft wraps them)
    state = _trainability(table, freeze, optimizer)
    doc = {
        "format": FORMAT,
        "model": {"source": built.source, "arch": built.arch,
                  **({"num_outputs": built.num_outputs} if built.num_outputs else {}),
                  "head_mode": built.head_mode,
                  "head": heads[0] if heads else None, "heads": heads,
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
    if adapter is not None:  # peft's config and the adapter parameters (paramfile.allowlist)
        doc["adapter"] = adapter
    return doc


def _phase_block(table: Any, phase: Any, eval_modules: list[str], optimizer: Any) -> dict:
    """One later phase: when it starts, its rules, its new groups and who trains then."""
    state = _trainability(table, phase.plan, optimizer)
    return {"phase": phase.index, "at": phase.at, "rules": list(phase.rules),
            "groups": phase.groups, "frozen": state["frozen"], "eval_modules": eval_modules,
            "counts": state["counts"], "memory": state["memory"]}


def _trainability(table: Any, plan: FreezePlan, optimizer: Any) -> dict[str, Any]:
    """What a freeze plan gives: frozen names, parameter counts and training memory."""
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
