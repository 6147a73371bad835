"""Map parameter and module names through the wrappers trainers put around a model.

DataParallel, DistributedDataParallel and AveragedModel hold the model as `module`,
torch.compile as `_orig_mod`, FSDP1 as `_fsdp_wrapped_module` (at every wrapped level) and
activation checkpointing as `_checkpoint_wrapped_module`, peft's PeftModel as
`base_model.model` (a plan of an adapted model names the model inside it); FSDP2's
`fully_shard` keeps the names and swaps the tensors. A name in param_groups.json is the bare
model's name: these functions give every parameter, buffer and module of a wrapped model
under that name. Wrapper classes are recognised without importing their modules (importing
torch._dynamo alone costs seconds).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from torch import nn

# (module, class name) -> the attribute that holds the wrapped model
WRAPPERS: dict[tuple[str, str], str] = {
    ("torch.nn.parallel.data_parallel", "DataParallel"): "module",
    ("torch.nn.parallel.distributed", "DistributedDataParallel"): "module",
    ("torch.optim.swa_utils", "AveragedModel"): "module",
    ("torch._dynamo.eval_frame", "OptimizedModule"): "_orig_mod",
    ("torch.distributed.fsdp.fully_sharded_data_parallel", "FullyShardedDataParallel"):
        "_fsdp_wrapped_module",
    ("torch.distributed.algorithms._checkpoint.checkpoint_wrapper", "CheckpointWrapper"):
        "_checkpoint_wrapped_module",
    ("deepspeed.runtime.engine", "DeepSpeedEngine"): "module",
    ("peft.peft_model", "PeftModel"): "base_model",  # and its task subclasses
    ("peft.tuners.tuners_utils", "BaseTuner"): "model",  # LoraModel, IA3Model, LoHaModel
}

# wrappers that record which parameters require grad when they are built
BUILT_ON_REQUIRES_GRAD = ("DistributedDataParallel", "FullyShardedDataParallel",
                          "DeepSpeedEngine")


def wrapper_attr(module: nn.Module) -> str | None:
    """The attribute holding the wrapped model if `module` is a known wrapper, else None."""
    for (where, name), attr in WRAPPERS.items():
        cls = getattr(sys.modules.get(where), name, None)
        if cls is not None and isinstance(module, cls):
            return attr
    return None


def wrapper_names(model: nn.Module) -> list[str]:
    """Class names of the wrappers inside `model`, outermost first (empty for a bare model)."""
    return [type(m).__name__ for _, m in model.named_modules() if wrapper_attr(m)]


def built_on_requires_grad(model: nn.Module) -> str | None:
    """The first wrapper in `model` that fixes the trainable set when built (DDP, FSDP1)."""
    return next((n for n in wrapper_names(model) if n in BUILT_ON_REQUIRES_GRAD), None)


def _hops(model: nn.Module) -> set[str]:
    """Raw module paths that only exist because of a wrapper (`module`, `_orig_mod`, ...)."""
    hops = set()
    for name, module in model.named_modules():
        if attr := wrapper_attr(module):
            hops.add(f"{name}.{attr}" if name else attr)
    return hops


def plain_name(raw: str, hops: set[str]) -> str:
    """`raw` (a name in the wrapped model) without the wrapper hops: the bare model's name."""
    kept, path = [], ""
    for part in raw.split("."):
        path = f"{path}.{part}" if path else part
        if path not in hops:
            kept.append(part)
    return ".".join(kept)


def _plain(items: Iterator[tuple[str, object]], hops: set[str]) -> dict[str, object]:
    return {plain_name(n, hops): v for n, v in items}


def named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's parameters under the bare model's names (the current tensors: after
    `fully_shard` these are the DTensor parameters, which an optimizer must hold)."""
    return _plain(model.named_parameters(), _hops(model))  # type: ignore[return-value]


def named_buffers(model: nn.Module) -> dict[str, object]:
    """The model's buffers under the bare model's names (AveragedModel's `n_averaged` too)."""
    return _plain(model.named_buffers(), _hops(model))


def named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules under the bare model's names; where a wrapper and its model share a name, the
    wrapped (innermost) module wins."""
    return _plain(model.named_modules(), _hops(model))  # type: ignore[return-value]


def bare_model(model: nn.Module) -> nn.Module:
    """The bare model inside the outer wrappers (DDP(compile(model)) -> model)."""
    while attr := wrapper_attr(model):
        model = getattr(model, attr)
    return model


def optimizer_groups(optimizer: object) -> list[dict]:
    """The optimizer's groups holding the model's own parameters. A DeepSpeed ZeRO optimizer
    steps flat partitions: its stage 1/2 `bit16_groups` and stage 3 `fp16_groups` (sub-groups
    mapped through `sub_group_to_group_id`) say which parameters each group trains."""
    groups = list(optimizer.param_groups)  # type: ignore[attr-defined]
    if isinstance(getattr(optimizer, "bit16_groups", None), list):
        pairs = zip(groups, optimizer.bit16_groups, strict=True)  # one per param group
        return [{**g, "params": list(ps)} for g, ps in pairs]
    subs = getattr(optimizer, "fp16_groups", None)
    owner = getattr(optimizer, "sub_group_to_group_id", None)
    if isinstance(subs, list) and isinstance(owner, dict):
        merged = [{**g, "params": []} for g in groups]
        for i, params in enumerate(subs):
            merged[owner[i]]["params"] += list(params)
        return merged
    return groups
