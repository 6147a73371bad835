"""Find a model's classifier head(s) and replace them with fresh layers of the right size."""

from __future__ import annotations

from typing import Any

from torch import nn

from finetune_prep.errors import FinetunePrepError, did_you_mean
from finetune_prep.plan.memory import check_memory


def replace_heads(
    model: nn.Module, model_cfg: Any, head_cfg: Any, num_outputs: int, meta: bool
) -> tuple[str, ...]:
    """Give the model fresh head(s) with `num_outputs` outputs; return the head module names."""
    if model_cfg.source == "timm":
        return timm_head(model)  # timm built it with num_classes already
    modules = dict(model.named_modules())
    if head_cfg.get("module"):
        name = head_cfg.module
        if name not in modules:
            linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
            raise FinetunePrepError(
                f"head.module={name!r} is not a module of this model.{did_you_mean(name, linears)}"
                f" Its Linear layers: {', '.join(linears[-5:]) or 'none'}."
            )
        if not isinstance(modules[name], nn.Linear):
            raise FinetunePrepError(
                f"head.module={name!r} is a {type(modules[name]).__name__}, not an nn.Linear; "
                "the head is replaced by a fresh nn.Linear, so name a Linear layer "
                "(or leave head.module=null to use the model's last Linear)."
            )
        heads = [name]
    else:
        heads = find_heads(model)
    for name in heads:
        if not meta:
            check_memory(fresh_numel(modules[name], num_outputs), f"the new head {name}")
        set_module(model, name, fresh_head(modules[name], num_outputs, "meta" if meta else None))
    return tuple(heads)


def find_heads(model: nn.Module) -> list[str]:
    """The classifier: the last nn.Linear (or a final 1x1 conv, as in squeezenet).

    Auxiliary heads (inception_v3's AuxLogits.fc, googlenet's aux1/aux2.fc2) are the other
    Linear layers with the same number of outputs; they are replaced too and listed after it.
    """
    modules = list(model.named_modules())
    linears = [(n, m) for n, m in modules if isinstance(m, nn.Linear)]
    if linears:
        main, layer = linears[-1]
        aux = [n for n, m in linears[:-1] if m.out_features == layer.out_features]
        return [main, *aux]
    convs = [(n, m) for n, m in modules if isinstance(m, nn.Conv2d)]
    if convs and convs[-1][1].kernel_size == (1, 1):
        return [convs[-1][0]]
    raise FinetunePrepError(
        "found no head: the model has no nn.Linear and does not end in a 1x1 convolution. "
        "Name the head with head.module=..."
    )


def fresh_head(old: nn.Module, num_outputs: int, device: str | None) -> nn.Module:
    """A new head layer, built directly on `device` (on meta nothing is allocated, whatever
    head.num_outputs says)."""
    bias = old.bias is not None
    if isinstance(old, nn.Linear):
        return nn.Linear(old.in_features, num_outputs, bias=bias, device=device)
    assert isinstance(old, nn.Conv2d)
    return nn.Conv2d(old.in_channels, num_outputs, kernel_size=1, bias=bias, device=device)


def fresh_numel(old: nn.Module, num_outputs: int) -> int:
    fan_in = old.in_features if isinstance(old, nn.Linear) else old.in_channels
    return (fan_in + (old.bias is not None)) * num_outputs


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def timm_head(model: nn.Module) -> tuple[str, ...]:
    """timm's own classifier(s): distilled models return (head, head_dist)."""
    found = model.get_classifier()
    targets = found if isinstance(found, tuple) else (found,)
    names = tuple(n for n, m in model.named_modules() if any(m is t for t in targets))
    return names or tuple(find_heads(model)[:1])
