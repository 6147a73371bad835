"""Describe a built model as a `ParamTable`, and build on the meta device without computing."""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from finetune_prep.plan.table import ParamTable

# torchvision's transformers have no no_weight_decay(): these parameter names are excluded as
# the DeiT/MAE recipes and torchvision's own reference scripts (transformer_embedding_decay) do
TORCHVISION_NO_WEIGHT_DECAY = ("class_token", "pos_embedding", "relative_position_bias_table")


@dataclass
class BuiltModel:
    """A built model with its head replaced, and its table."""

    model: nn.Module
    table: ParamTable
    source: str
    arch: str
    num_outputs: int
    input_size: tuple[int, ...] | None  # (C, H, W) for the verification pass, if known
    folder: str | None = None  # source=hf: the model's folder (config.json, its own weights)
    # the proof's batch (batch size, generator) -> input, when not a float image batch (tokens)
    make_batch: Callable[[int, torch.Generator], torch.Tensor] | None = None
    own_input_size: tuple[int, ...] | None = None  # the architecture's own, before model.input_size
    task: str = "classification"  # classification | detection | segmentation (what the proof feeds)
    head_mode: str = "replace"  # head.mode: replace | keep | none
    notes: tuple[str, ...] = ()  # what the summary should say about the build (a CPU fallback)


@contextmanager
def init_on_meta() -> Iterator[None]:
    """Move every parameter and buffer to the meta device as it is registered.

    Unlike `with torch.device("meta")`, constructor arithmetic on plain tensors still runs on
    the CPU, so models that compute their layout with torch ops (regnets) build too. The
    torch.nn.init functions leave a meta tensor as it is: there are no values to fill, and on
    meta they run torch's Python decompositions (vit_h_14: about 20 ms).
    """
    register_parameter = nn.Module.register_parameter
    register_buffer = nn.Module.register_buffer
    inits = {name: getattr(nn.init, name) for name in INIT_FUNCTIONS}

    def to_meta_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register_parameter(module, name, param)
        if param is not None and param.device.type != "meta":
            cls = type(param)
            extra = dict(param.__dict__)
            extra["requires_grad"] = param.requires_grad
            module._parameters[name] = cls(param.to("meta"), **extra)

    def to_meta_buffer(
        module: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True
    ) -> None:
        register_buffer(module, name, tensor, persistent)
        if tensor is not None:
            module._buffers[name] = module._buffers[name].to("meta")

    nn.Module.register_parameter = to_meta_parameter  # type: ignore[method-assign]
    nn.Module.register_buffer = to_meta_buffer  # type: ignore[method-assign]
    for name, init in inits.items():
        setattr(nn.init, name, _skip_meta(init))
    try:
        yield
    finally:
        nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
        nn.Module.register_buffer = register_buffer  # type: ignore[method-assign]
        for name, init in inits.items():
            setattr(nn.init, name, init)


INIT_FUNCTIONS = ("constant_", "dirac_", "eye_", "kaiming_normal_", "kaiming_uniform_",
                  "normal_", "ones_", "orthogonal_", "sparse_", "trunc_normal_", "uniform_",
                  "xavier_normal_", "xavier_uniform_", "zeros_")


def _skip_meta(init: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`init` that returns a meta tensor untouched (and runs as ever on any other)."""

    @functools.wraps(init)
    def on_meta(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return tensor if tensor.is_meta else init(tensor, *args, **kwargs)

    return on_meta


NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def is_norm(module: nn.Module) -> bool:
    """Normalization layers, including library classes named like one (LayerNorm2d, RmsNorm)."""
    return isinstance(module, NORM_TYPES) or "norm" in type(module).__name__.lower()


def has_running_stats(module: nn.Module) -> bool:
    """BatchNorm-like layers whose running statistics move in train mode."""
    return getattr(module, "track_running_stats", False) and getattr(
        module, "running_mean", None
    ) is not None


def no_weight_decay_names(model: nn.Module, source: str) -> frozenset[str]:
    """The parameters the model itself says not to decay: timm's `no_weight_decay()` (names or
    fnmatch patterns, matched as timm does); a torchvision transformer's tokens, position
    embeddings and relative position bias tables."""
    names = [n for n, _ in model.named_parameters()]
    if callable(getattr(model, "no_weight_decay", None)):
        patterns = set(model.no_weight_decay())
        return frozenset(n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns))
    if source == "torchvision":
        return frozenset(n for n in names
                         if n.rpartition(".")[2] in TORCHVISION_NO_WEIGHT_DECAY)
    return frozenset()


def describe(
    model: nn.Module,
    head: Sequence[str],
    stages: Sequence[Sequence[str]],
    layers: Mapping[str, int] | None = None,
    no_weight_decay: frozenset[str] = frozenset(),
) -> ParamTable:
    """Read names, shapes and structure off a model (meta or real; no tensor data read)."""
    params = list(model.named_parameters())
    modules = list(model.named_modules())
    return ParamTable(
        names=tuple(n for n, _ in params),
        shapes={n: tuple(p.shape) for n, p in params},
        owner={n: n.rpartition(".")[0] for n, _ in params},
        module_types={n: type(m).__name__ for n, m in modules},
        norm_modules=frozenset(n for n, m in modules if is_norm(m)),
        stat_modules=frozenset(n for n, m in modules if has_running_stats(m)),
        head=tuple(head),
        stages=tuple(tuple(s) for s in stages),
        layers=dict(layers or {}),
        no_weight_decay=no_weight_decay,
        model_frozen=frozenset(n for n, p in params if not p.requires_grad),
    )
