"""Build the architecture (torchvision, timm or any `_target_`), replace its head, describe it.

The model is built on the meta device for planning (no memory, no init time) or on the CPU
when real tensors are needed. `describe` turns a model into a `ParamTable`: the names, shapes
and module facts that rules, groups and the report work on without touching tensor data.
"""

from __future__ import annotations

import fnmatch
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune_prep.config import MAX_OUTPUTS
from finetune_prep.errors import FinetunePrepError, did_you_mean

SOURCES = ("torchvision", "timm", "target", "hf")
GRANULARITIES = ("block", "stage")  # what optim.layer_decay counts as one layer
# torchvision's transformers have no no_weight_decay(): these parameter names are excluded as
# the DeiT/MAE recipes and torchvision's own reference scripts (transformer_embedding_decay) do
TORCHVISION_NO_WEIGHT_DECAY = ("class_token", "pos_embedding", "relative_position_bias_table")


def covers(prefix: str, name: str) -> bool:
    """True if `prefix` is `name` or an enclosing module of it (dot boundary)."""
    return name == prefix or name.startswith(prefix + ".")


@dataclass(frozen=True)
class ParamTable:
    """What the pure stages of the pipeline know about a model: names, shapes and structure.

    It is the one place that says which parameters a stage or the head holds.
    """

    names: tuple[str, ...]  # parameters in model order, tied weights once
    shapes: Mapping[str, tuple[int, ...]]
    owner: Mapping[str, str]  # parameter name -> the module that holds it ("" for the root)
    module_types: Mapping[str, str]  # module name -> class name, model order
    norm_modules: frozenset[str]  # normalization layers (BatchNorm, LayerNorm, GroupNorm, ...)
    stat_modules: frozenset[str]  # modules with running statistics (BatchNorm and kin)
    head: tuple[str, ...]  # head modules: the main head first, then auxiliary heads
    stages: tuple[tuple[str, ...], ...]  # each stage: module or parameter names, model order
    layers: Mapping[str, int] = field(default_factory=dict)  # block-level layer id, head last
    no_weight_decay: frozenset[str] = frozenset()  # the model's own no-weight-decay parameters

    def numel(self, name: str) -> int:
        """Number of elements of one parameter."""
        return math.prod(self.shapes[name])

    def count(self, names: Sequence[str] | None = None) -> int:
        """Number of elements of `names` (all parameters by default)."""
        return sum(self.numel(n) for n in (self.names if names is None else names))

    def params_under(self, entries: Sequence[str]) -> list[str]:
        """Parameters that any of `entries` (module or parameter names) covers, model order."""
        return [n for n in self.names if any(covers(e, n) for e in entries)]

    def stage_params(self, index: int) -> list[str]:
        """Parameters of stage `index` (Python indexing), in model order."""
        return self.params_under(self.stages[index])

    def head_params(self) -> list[str]:
        """Parameters of the head module(s), in model order."""
        return self.params_under(self.head)

    def stage_label(self, index: int) -> str:
        """A short readable name for a stage, for people (files keep the list)."""
        return "+".join(self.stages[index])

    def stage_lists(self) -> list[list[str]]:
        """The stages as JSON-ready lists of module/parameter names."""
        return [list(s) for s in self.stages]

    @cached_property
    def position(self) -> Mapping[str, int | None]:
        """Each parameter's stage index; the head's is len(stages); None outside every stage."""
        positions: dict[str, int | None] = dict.fromkeys(self.names)
        for i in range(len(self.stages)):
            positions.update(dict.fromkeys(self.stage_params(i), i))
        positions.update(dict.fromkeys(self.head_params(), len(self.stages)))
        return positions

    def layer_ids(self, granularity: str = "block") -> dict[str, int]:
        """Each parameter's layer id for layer-wise lr decay: 0 the stem ... the highest the
        head. `block`: one per block (see stages.derive_layers); `stage`: the stage index
        (head len(stages); a parameter outside every stage 0)."""
        if granularity == "block" and self.layers:
            return dict(self.layers)
        return {n: p or 0 for n, p in self.position.items()}


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


@contextmanager
def init_on_meta() -> Iterator[None]:
    """Move every parameter and buffer to the meta device as it is registered.

    Unlike `with torch.device("meta")`, constructor arithmetic on plain tensors still runs on
    the CPU, so models that compute their layout with torch ops (regnets) build too.
    """
    register_parameter = nn.Module.register_parameter
    register_buffer = nn.Module.register_buffer

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
    try:
        yield
    finally:
        nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
        nn.Module.register_buffer = register_buffer  # type: ignore[method-assign]


def build_model(
    model_cfg: Any, head_cfg: Any, meta: bool, make_target: Callable[[], Any] | None = None,
) -> BuiltModel:
    """Build the configured architecture with a fresh head of `head_cfg.num_outputs` outputs.

    `make_target` builds a `_target_` model instead of Hydra's instantiate: a model rebuilt
    from a plan file (untrusted) is built only by the class its caller passed."""
    num_outputs = int(head_cfg.num_outputs)
    if not 1 <= num_outputs <= MAX_OUTPUTS:
        raise FinetunePrepError(
            f"head.num_outputs={num_outputs}: a head needs at least one output and at most "
            f"{MAX_OUTPUTS:,}. Set head.num_outputs to the number of classes (1 for a binary "
            "logit)."
        )
    source = str(getattr(model_cfg.source, "value", model_cfg.source))  # the enum's name
    if source not in SOURCES:
        raise FinetunePrepError(
            f"model.source={source!r} is not one of {', '.join(SOURCES)}."
        )
    if source == "hf":  # Hugging Face transformers: its own module
        from finetune_prep import hf

        return hf.build(model_cfg, head_cfg, num_outputs, meta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # googlenet/inception init notices
        if meta:
            with init_on_meta():
                model, input_size = _construct(model_cfg, num_outputs, meta, make_target)
        else:
            model, input_size = _construct(model_cfg, num_outputs, meta, make_target)
    head = _replace_heads(model, model_cfg, head_cfg, num_outputs, meta)
    stages = _stages(model, model_cfg, head)
    own = input_size
    if model_cfg.get("input_size"):
        input_size = tuple(model_cfg.input_size)
    table = describe(model, head, stages, _layers(model, head, stages),
                     no_weight_decay_names(model, source))
    arch = model_cfg.arch if source != "target" else _target_name(model_cfg)
    return BuiltModel(model, table, source, arch, num_outputs, input_size, own_input_size=own)


# Above this many outputs a timm head is built as num_classes=1, then reset_classifier on meta:
# create_model would allocate it at full size on the CPU (reset_classifier may drop a
# distillation head, so ordinary sizes take the exact path).
TIMM_HEAD_ON_META = 100_000
RESERVED_KWARGS = {  # keyword arguments the builder sets itself, and the key that sets them
    "torchvision": {"weights": "model.weights", "num_classes": "head.num_outputs"},
    "timm": {"pretrained": "checkpoint.path", "num_classes": "head.num_outputs",
             "pretrained_cfg_overlay": "checkpoint.path"},
}


def _construct(
    model_cfg: Any, num_outputs: int, meta: bool = False,
    make_target: Callable[[], Any] | None = None,
) -> tuple[nn.Module, tuple[int, ...] | None]:
    kwargs = dict(model_cfg.get("kwargs") or {})
    source = str(getattr(model_cfg.source, "value", model_cfg.source))
    for key, instead in RESERVED_KWARGS.get(source, {}).items():
        if key in kwargs:
            raise FinetunePrepError(
                f"model.kwargs.{key}: finetune_prep sets {key} itself; use {instead} instead "
                "(and remove it from model.kwargs)."
            )
    try:
        if source == "torchvision":
            return _torchvision(model_cfg.arch, kwargs)
        if source == "timm":
            return _timm(model_cfg.arch, num_outputs, kwargs, meta)
    except FinetunePrepError:
        raise
    except Exception as err:  # with kwargs given, a constructor that fails rejects them
        if not kwargs:
            raise
        why = (str(err).strip().splitlines() or [""])[0]
        raise FinetunePrepError(
            f"model.kwargs ({', '.join(kwargs)}) rejected by {model_cfg.arch}: "
            f"{type(err).__name__}: {why}. Check the names and values against the model's "
            "constructor, or remove them."
        ) from err
    return _target(model_cfg), None


def _torchvision(arch: str, kwargs: dict) -> tuple[nn.Module, tuple[int, ...]]:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        raise FinetunePrepError(
            f"model.arch={arch!r} is not a torchvision classification model."
            f"{did_you_mean(arch, names)} "
            f"See torchvision.models.list_models() for all {len(names)}."
        )
    model = torchvision.models.get_model(arch, weights=None, **kwargs)
    return model, (3, 299, 299) if arch == "inception_v3" else (3, 224, 224)


def _timm(
    arch: str, num_outputs: int, kwargs: dict, meta: bool = False
) -> tuple[nn.Module, tuple[int, ...] | None]:
    try:
        import timm
    except ImportError as err:
        raise FinetunePrepError(
            "model.source=timm needs timm: pip install 'finetune_prep[timm]'."
        ) from err
    if not timm.is_model(arch):
        names = timm.list_models()
        raise FinetunePrepError(
            f"model.arch={arch!r} is not a timm model.{did_you_mean(arch, names)}"
            " See timm.list_models('*pattern*')."
        )
    if meta and num_outputs > TIMM_HEAD_ON_META:  # timm allocates its head on the CPU first
        model = timm.create_model(arch, pretrained=False, num_classes=1, **kwargs)
        with torch.device("meta"):
            model.reset_classifier(num_outputs)
    else:
        model = timm.create_model(arch, pretrained=False, num_classes=num_outputs, **kwargs)
    input_size = getattr(model, "pretrained_cfg", {}).get("input_size")
    return model, tuple(input_size) if input_size else None


def _target(model_cfg: Any) -> nn.Module:
    from hydra.utils import instantiate

    if not model_cfg.get("target") or "_target_" not in model_cfg.target:
        raise FinetunePrepError(
            "model.source=target needs model.target with a _target_, e.g. "
            "model.target._target_=mypkg.nets.MyNet (plus its arguments)."
        )
    try:
        model = instantiate(model_cfg.target)
    except Exception as err:  # Hydra wraps import and constructor errors alike
        raise FinetunePrepError(f"could not build model.target: {err}") from err
    if not isinstance(model, nn.Module):
        raise FinetunePrepError(
            f"model.target built a {type(model).__name__}, not a torch.nn.Module."
        )
    return model


def _target_name(model_cfg: Any) -> str:
    return str(model_cfg.target["_target_"])


def _replace_heads(
    model: nn.Module, model_cfg: Any, head_cfg: Any, num_outputs: int, meta: bool
) -> tuple[str, ...]:
    """Give the model fresh head(s) with `num_outputs` outputs; return the head module names."""
    if model_cfg.source == "timm":
        return _timm_head(model)  # timm built it with num_classes already
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
            check_memory(_fresh_numel(modules[name], num_outputs), f"the new head {name}")
        _set_module(model, name, _fresh(modules[name], num_outputs, "meta" if meta else None))
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


def _fresh(old: nn.Module, num_outputs: int, device: str | None) -> nn.Module:
    """A new head layer, built directly on `device` (on meta nothing is allocated, whatever
    head.num_outputs says)."""
    bias = old.bias is not None
    if isinstance(old, nn.Linear):
        return nn.Linear(old.in_features, num_outputs, bias=bias, device=device)
    assert isinstance(old, nn.Conv2d)
    return nn.Conv2d(old.in_channels, num_outputs, kernel_size=1, bias=bias, device=device)


def _fresh_numel(old: nn.Module, num_outputs: int) -> int:
    fan_in = old.in_features if isinstance(old, nn.Linear) else old.in_channels
    return (fan_in + (old.bias is not None)) * num_outputs


def check_memory(numel: int, what: str, bytes_per: int = 4) -> None:
    """Refuse to allocate real tensors larger than this machine's memory: a clear message
    instead of a MemoryError, or the OOM killer, when e.g. head.num_outputs is absurd."""
    ram = physical_memory()
    need = numel * bytes_per
    if ram is not None and need > ram:
        raise FinetunePrepError(
            f"{what} has {numel:,} parameters: {human_bytes(need)} as float32, more than this "
            f"machine's {human_bytes(ram)} of memory, so it cannot be built with real tensors (the "
            "backward proof and prepare(materialize=True) need them). Check head.num_outputs "
            "and the model's size; to plan without real tensors, set verify.backward=false "
            "(the CLI) or call prepare(cfg, materialize=False)."
        )


def physical_memory() -> int | None:
    """Total physical memory in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def human_bytes(n: float) -> str:
    """A byte count for people: 1,536 -> '1.5 KiB'."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _timm_head(model: nn.Module) -> tuple[str, ...]:
    """timm's own classifier(s): distilled models return (head, head_dist)."""
    found = model.get_classifier()
    targets = found if isinstance(found, tuple) else (found,)
    names = tuple(n for n, m in model.named_modules() if any(m is t for t in targets))
    return names or tuple(find_heads(model)[:1])


def _stages(model: nn.Module, model_cfg: Any, head: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    from finetune_prep.stages import derive_stages, override_stages

    if model_cfg.get("stages"):
        return override_stages(model, model_cfg.stages, head)
    return tuple(tuple(s) for s in derive_stages(model, head))


def _layers(
    model: nn.Module, head: Sequence[str], stages: Sequence[Sequence[str]]
) -> dict[str, int]:
    from finetune_prep.stages import derive_layers

    return derive_layers(model, head, stages)


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
    )


def torchvision_weights_file(arch: str, weights: str) -> Path:
    """The hub-cache file of a torchvision weights enum member; never downloads."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(arch)
        member = enum[weights]
    except (KeyError, ValueError) as err:
        options = ["DEFAULT", *enum.__members__] if "enum" in locals() else []
        raise FinetunePrepError(
            f"model.weights={weights!r} is not a weights name of {arch}. "
            f"Options: {', '.join(dict.fromkeys(options)) or 'none'}; or null for random init."
        ) from err
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(member.url).name
    if not path.is_file():
        raise FinetunePrepError(
            f"model.weights={weights} needs {path.name} in torch's hub cache ({path.parent}), "
            "and finetune_prep never downloads. On a machine with network run "
            f"`python -c \"import torchvision; torchvision.models.get_model('{arch}', "
            f"weights='{weights}')\"` and copy {path.name} to {path.parent} here "
            "(or set TORCH_HOME); or give the file as checkpoint.path=...; "
            "or set model.weights=null."
        )
    return path
