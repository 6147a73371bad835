"""`check(model, optimizer, path)`: a cheap runtime guard that the running setup is the plan.

No forward pass: it compares names, identities, flags and numbers. It catches an optimizer that
holds stale tensors (built before FSDP2 `fully_shard`), requires_grad changed after loading,
parameters missing from the optimizer, a scheduler that flattened the per-group learning rates,
`lr_scale` left in optimizer groups (timm's scheduler would apply it again), and frozen norm
layers back in train mode.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from finetune_prep.errors import FinetunePrepError, listing
from finetune_prep.paramfile.format import Group, Plan, as_plan
from finetune_prep.train import apply, wrappers

RTOL = 1e-6
FLATTENED_HINT = (
    "\nA scheduler that sets one lr for every group flattens the plan: give OneCycleLR "
    "max_lr=finetune_prep.peak_lrs(optimizer); build the groups with load_param_groups."
)


def check(
    model: nn.Module, optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
    plan: Plan | str | os.PathLike, phase: int = 0,
) -> None:
    """Raise a FinetunePrepError listing every way `model` + `optimizer` differ from the plan.

    lr is compared through each group's base lr (`initial_lr`, which torch and timm schedulers
    record when built, else `lr`): a scheduler may scale all groups together (warm-up, cosine),
    not give them one value. `model` may be wrapped (DDP, compile, FSDP, AveragedModel).
    With a schedule, `phase` is the phase training is in (`Schedule.phase`). A DeepSpeed
    engine and its ZeRO optimizer are compared through the parameters each group steps.
    """
    plan = as_plan(plan).at_phase(phase)  # gradual unfreezing: the plan in phase N
    params = wrappers.named_parameters(model)
    _not_on_meta(model, params)
    apply.check_names(params, plan)
    optimizers = [optimizer] if hasattr(optimizer, "param_groups") else list(optimizer)
    groups = [g for opt in optimizers for g in wrappers.optimizer_groups(opt)]
    order = {n: i for i, n in enumerate(params)}
    problems = _membership(params, groups, plan.trainable, order)
    planned = {n: g for g in plan.groups for n in g.params}
    placed = _placed(params, groups)
    flattened = _ratios("lr", planned, placed, _base_lr)
    problems += flattened
    problems += _ratios("weight_decay", planned, placed,
                        lambda g: float(g.get("weight_decay", 0)))
    problems += _lr_scales(groups)
    problems += _eval_modules(model, plan.eval_modules)
    if problems:
        raise FinetunePrepError(
            f"the training setup differs from {plan.origin} in {len(problems)} way(s):\n- "
            + "\n- ".join(problems) + (FLATTENED_HINT if flattened else "")
        )


def _not_on_meta(model: nn.Module, params: dict[str, nn.Parameter]) -> None:
    """A meta-built model has no data: nothing would train, so no check can pass on it."""
    meta = [n for n, p in params.items() if p.is_meta]
    meta += [n for n, b in wrappers.named_buffers(model).items()
             if isinstance(b, torch.Tensor) and b.is_meta]
    if meta:
        raise FinetunePrepError(
            f"{listing('tensors of the model are on the meta device', meta)} "
            "(built without data: nothing would train). Materialize it first: "
            "`model.to_empty(device='cpu')` and load your weights, or "
            "`finetune_prep.build_model(path)`; then build the optimizer and check again."
        )


def _placed(params: dict[str, nn.Parameter], groups: list[dict]) -> dict[str, dict]:
    """Parameter name -> the optimizer group holding it."""
    group_of = {id(p): g for g in groups for p in g["params"]}
    return {n: group_of[id(p)] for n, p in params.items() if id(p) in group_of}


def _membership(
    params: dict[str, nn.Parameter], groups: list[dict], trainable: Sequence[str],
    order: dict[str, int],
) -> list[str]:
    current = {id(p) for p in params.values()}
    stale = sum(1 for g in groups for p in g["params"] if id(p) not in current)
    problems = []
    if stale:
        problems.append(
            f"{stale} optimizer parameter(s) are not parameters of the model: the optimizer holds "
            "tensors the model no longer uses (built before `fully_shard`, a wrapper or a "
            "`.to()` that replaced them), so they train nothing. Build the optimizer after "
            "sharding/wrapping: `finetune_prep.build_optimizer(model, path)`."
        )
    planned = set(trainable)
    grad = {n for n, p in params.items() if p.requires_grad}
    held = {id(q) for g in groups for q in g["params"]}
    in_optimizer = {n for n, p in params.items() if id(p) in held}
    for what, names in (
        ("trainable in the plan but requires_grad=False", planned - grad),
        ("frozen in the plan but requires_grad=True", grad - planned),
        ("trainable in the plan but in no optimizer group", planned - in_optimizer),
        ("frozen in the plan but in an optimizer group", in_optimizer - planned),
    ):
        if names:
            problems.append(listing(what, sorted(names, key=order.get)))
    return problems


def _base_lr(group: dict) -> float:
    return float(group.get("initial_lr", group["lr"]))


def _ratios(key: str, plan: dict[str, Group], placed: dict[str, dict], value: Any) -> list[str]:
    """Every file group's optimizer value is one common factor times its planned value."""
    pairs = [(g, float(getattr(g, key)), value(placed[n])) for n, g in plan.items() if n in placed]
    if not pairs:
        return []
    ref_group, ref_plan, ref_actual = max(pairs, key=lambda t: t[1])
    scale = ref_actual / ref_plan if ref_plan else 1.0
    if ref_plan and not scale > 0:
        return [f"every group's {key} is {ref_actual} in the optimizer; the plan has "
                f"{ref_plan} for {ref_group.name!r}"]
    problems: dict[str, str] = {}
    for g, planned, actual in pairs:
        expected = scale * planned
        if abs(actual - expected) > RTOL * max(abs(expected), abs(actual)) + 1e-12:
            problems.setdefault(g.name, (
                f"group {g.name!r}: {key} {actual:.6g} in the optimizer, but the plan's ratios "
                f"give {expected:.6g} (plan {planned:.6g}, scaled like {ref_group.name!r}: "
                f"x{scale:.6g})"
            ))
    return list(problems.values())


def _lr_scales(groups: Iterable[dict]) -> list[str]:
    scaled = [i for i, g in enumerate(groups) if float(g.get("lr_scale", 1.0)) != 1.0]
    if not scaled:
        return []
    return [
        f"optimizer group(s) {', '.join(map(str, scaled))} carry lr_scale beside an lr that "
        "already includes it (timm's scheduler would multiply it in again): build the groups "
        "with finetune_prep.load_param_groups, not by spreading the file's groups"
    ]


def _eval_modules(model: nn.Module, eval_modules: Sequence[str]) -> list[str]:
    modules = wrappers.named_modules(model)
    training = [n for n in eval_modules if n in modules and modules[n].training]
    missing = [n for n in eval_modules if n not in modules]
    return [
        listing(what, names) for what, names in (
            ("frozen norm layers in train mode (their running statistics would move; "
             "call finetune_prep.train_mode(model, path) instead of model.train())", training),
            ("eval_modules not in the model", missing),
        ) if names
    ]
