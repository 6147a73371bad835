"""Apply a plan to a live model: param groups, the optimizer, train/eval modes, the rebuilt model.

A training script turns the file into an optimizer in one call:
`torch.optim.AdamW(load_param_groups(model, path))`, or `build_optimizer(model, path)`; the
model may be wrapped (DDP, torch.compile, FSDP, AveragedModel: names map through
`train.wrappers`), and `build_model(path)` rebuilds the model the file was made for.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from finetune_prep.errors import FinetunePrepError, did_you_mean, listing
from finetune_prep.model import adapters
from finetune_prep.model.build import build_architecture
from finetune_prep.paramfile import allowlist
from finetune_prep.paramfile.format import Group, Plan, as_plan
from finetune_prep.train import wrappers


def load_param_groups(model: nn.Module, plan: Plan | str | os.PathLike) -> list[dict[str, Any]]:
    """Set requires_grad on `model` as the plan (a `Plan` or a file's path) says; return groups
    of tensors for torch.optim.

    `model` may be wrapped (DataParallel/DDP, torch.compile, AveragedModel, FSDP1 with
    use_orig_params=True, FSDP2): names map through the wrapper. DDP and FSDP1 fix the trainable
    set when they are built, so on those the file must already hold (apply it to the bare model
    before wrapping); a difference is an error that says so, not a reducer error a step later.
    """
    return _apply(model, as_plan(plan))


def _apply(model: nn.Module, plan: Plan) -> list[dict[str, Any]]:
    """`load_param_groups` on a plan already read."""
    params = wrappers.named_parameters(model)
    check_names(params, plan)
    trainable = set(plan.trainable)
    _check_order(model, params, trainable, plan.origin)
    for name, param in params.items():
        param.requires_grad_(name in trainable)
    return tensor_groups(model, plan.groups)


def _check_order(model: nn.Module, params: dict[str, Any], trainable: set[str], path: Any) -> None:
    """On a wrapper built on requires_grad (DDP, FSDP1), the file must already be applied."""
    wrapper = wrappers.built_on_requires_grad(model)
    if wrapper is None:
        return
    differ = [n for n, p in params.items() if p.requires_grad != (n in trainable)]
    if differ:
        raise FinetunePrepError(
            f"the model is wrapped in {wrapper}, which fixed the trainable parameters when it "
            f"was built, and requires_grad differs from {path} on {listing('parameters', differ)}"
            " (training would fail a step later). Apply the file to the bare "
            f"model first: `finetune_prep.load_param_groups(model, path)`, then `{wrapper}(model)`,"
            " then `finetune_prep.build_optimizer(wrapped, path)`."
        )


def tensor_groups(model: nn.Module, groups: Sequence[Group]) -> list[dict[str, Any]]:
    """Groups of parameter names -> the groups of tensors that torch.optim takes.

    Only `params`, `lr` and `weight_decay` go into a group: the file's `lr` is absolute (layer
    decay and multipliers are in it already), so its `lr_scale` stays out, and a scheduler that
    reads `lr_scale` (timm's) cannot apply it a second time. The tensors are the model's current
    ones, looked up by name through any wrapper (after FSDP2 `fully_shard`: the sharded ones).
    """
    params = wrappers.named_parameters(model)
    missing = [n for g in groups for n in g.params if n not in params]
    if missing:
        raise FinetunePrepError(
            f"{listing('names in the groups not in the model', missing)}."
            f"{did_you_mean(missing[0], params)} Build the model the groups were made for."
        )
    return [
        {"params": [params[n] for n in g.params], **g.optimizer_args()} for g in groups
    ]


def build_optimizer(
    model: nn.Module, plan: Plan | str | os.PathLike,
    optimizers: Sequence[allowlist.OptimizerSpec] = (),
) -> torch.optim.Optimizer:
    """The optimizer the plan records (its `_target_` and arguments), on the plan's groups.

    The file may name a `torch.optim` optimizer; another class only if it is in `optimizers`
    (classes, or dotted names you write: `optimizers=[timm.optim.Lamb]`). Build it after
    wrapping and sharding (`fully_shard` replaces the parameters), from the model as it will
    train: the groups hold its current tensors.
    """
    plan = as_plan(plan)
    factory = allowlist.file_optimizer_factory(  # refuses before anything changes
        dict(plan.optimizer), optimizers, plan.origin)
    return factory(_apply(model, plan))


def train_mode(model: nn.Module, plan: Plan | str | os.PathLike) -> nn.Module:
    """model.train(), but the plan's `eval_modules` (frozen norm layers) stay in eval mode.
    Pass a `Plan` (finetune_prep.load_plan) when calling it every batch: a path is read again."""
    return set_train_mode(model, as_plan(plan).eval_modules)


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
            f"{listing('eval_modules not in the model', missing)}."
            f"{did_you_mean(missing[0], modules)} Build the model the file was made for."
        )
    for name in eval_modules:
        modules[name].eval()
    return model


def check_names(params: dict[str, Any], plan: Plan) -> None:
    """The model's parameter names (bare names) are exactly the plan's, or an error listing
    the differences."""
    listed = plan.names
    known = set(listed)
    missing = [n for n in params if n not in known]
    extra = [n for n in listed if n not in params]
    if missing or extra:
        raise FinetunePrepError(
            f"{plan.origin} was made for another model ({plan.model.arch}, "
            f"{plan.model.num_outputs or '?'} outputs): "
            + "; ".join(
                part for part in (
                    listing("parameters of the model not in the file", missing),
                    listing("names in the file not in the model", extra),
                ) if part
            )
            + ". Prepare the file for this model, or build the model the file describes."
        )


def build_model(plan: Plan | str | os.PathLike, target: Any = None) -> nn.Module:
    """The model the file was made for, rebuilt from its `model` block: the architecture with
    the fresh head, real tensors, random init. Load your weights into it, then train.

    torchvision and timm models are rebuilt by registry name, a Hugging Face model from its
    folder on this machine (never remote code). A `_target_` model is rebuilt only from the
    class you pass (`build_model(path, target=MyNet)`), which must be the class the file names:
    a file never imports or calls anything itself (see finetune_prep/allowlist.py).

    A plan of an adapted model (adapter=lora/ia3/loha) gives the PeftModel: peft's config is
    rebuilt from the file's `adapter` block (only allowlisted peft classes and checked fields),
    and peft adds the adapters to the rebuilt model. Load the base weights into
    `peft_model.base_model.model` (or before, with your own `build_model`) and train.
    """

    plan = as_plan(plan)
    path = plan.origin
    model_cfg, head_cfg, make_target = allowlist.model_config(dict(plan.model.fields), target, path)
    try:
        model = build_architecture(model_cfg, head_cfg, meta=False, make_target=make_target).model
    except FinetunePrepError as err:
        raise FinetunePrepError(f"build_model({path}): {err}") from err
    except (TypeError, ValueError) as err:  # registry builders rejecting the file's kwargs
        raise FinetunePrepError(f"build_model({path}): {model_cfg.arch} cannot be built from "
                                f"the file's model block: {err}") from err
    if plan.adapter is not None:
        model = _with_adapters(model, plan)
    check_names(wrappers.named_parameters(model), plan)
    return model


def _with_adapters(model: nn.Module, plan: Plan) -> nn.Module:
    """The file's adapters on `model`, built by peft from its checked config."""
    adapters.require_peft()
    block = dict(plan.adapter or {})
    peft_type = block["peft_type"]
    kwargs = allowlist.adapter_kwargs(block, adapters.config_defaults(peft_type), plan.origin)
    try:
        config = adapters.peft_config(peft_type, kwargs)
        return adapters.wrap(model, config, meta=False)
    except FinetunePrepError as err:
        raise FinetunePrepError(f"build_model({plan.origin}): {err}") from err
